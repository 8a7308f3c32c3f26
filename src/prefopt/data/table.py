"""Tokenized examples in one Apache Arrow file, memory-mapped: what a training run reads its batches from.

Why a file and not lists: a preference set of 100k pairs held as Python lists of ints costs about 11 MB of
memory per 1,000 pairs, in every process of a run, and is rebuilt on every run. Written once as Arrow (the IPC
stream format ``datasets`` caches in, so ``datasets.Dataset.from_file`` opens it too), the ids are 4 bytes each
on disk; every process maps the same file, the operating system shares and pages it, and a run holds a Python
``TokenizedExample`` only for the rows of the micro-batch it is collating. ``TokenizedTable`` is a read-only
sequence of ``TokenizedExample``: the loop, the collate functions and the layouts index it as they would a list.

Columns (``SCHEMA``): ``prompt_ids`` (BOS included), ``response_ids`` (K lists, best first), ``source``
(``file:line``, for error messages), ``truncated``, ``loss_mask`` (the per-token loss mask of a multi-turn
SFT example, null otherwise) and ``label`` (labelled feedback for KTO: true for a desirable completion, null
otherwise).

Views: ``select(indices)`` (the eval hold-out and the rest) and ``chain(a, b)`` share the mapped file. Reference
log-probs precomputed for a view are kept beside it as one [N, K] float tensor (``with_reference``), never as
Python objects per row. ``fingerprint()`` names the exact ids a view holds (the reference cache keys on it): the
table's content digest, computed while it was written, plus the selected rows.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .types import TokenizedExample

SCHEMA = pa.schema([
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.list_(pa.int32()))),
    ("source", pa.string()),
    ("truncated", pa.bool_()),
    ("loss_mask", pa.list_(pa.bool_())),
    ("label", pa.bool_()),
])


def record_batch(items: Sequence[TokenizedExample]) -> pa.RecordBatch:
    """Examples as one Arrow record batch of ``SCHEMA``."""
    return pa.record_batch([
        pa.array([ex.prompt_ids for ex in items], type=SCHEMA.field("prompt_ids").type),
        pa.array([ex.response_ids for ex in items], type=SCHEMA.field("response_ids").type),
        pa.array([ex.source for ex in items], type=pa.string()),
        pa.array([bool(ex.meta.get("truncated", False)) for ex in items], type=pa.bool_()),
        pa.array([ex.meta.get("loss_mask") for ex in items], type=SCHEMA.field("loss_mask").type),
        pa.array([ex.meta.get("label") for ex in items], type=pa.bool_()),
    ], schema=SCHEMA)


class TableWriter:
    """Appends record batches to an Arrow stream file and digests the ids as they go (``digest``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self._hash = hashlib.sha256()
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        names = ["prompt_ids", "response_ids"]
        if batch.column("label").null_count < batch.num_rows:  # labelled feedback (KTO): the labels are content
            names.append("label")
        for name in names:
            for buf in batch.column(name).buffers():
                if buf is not None:
                    self._hash.update(buf)
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> str:
        """Finish the file (flushed and fsynced); returns the content digest."""
        self._writer.close()
        self._sink.flush()
        self._sink.close()
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
        return self._hash.hexdigest()


class _Chunk:
    """Zero-copy numpy views of one record batch's columns (offsets and values of the id lists)."""

    def __init__(self, batch: pa.RecordBatch):
        prompt = batch.column("prompt_ids")
        self.p_off = prompt.offsets.to_numpy()
        self.p_val = prompt.values.to_numpy()
        resp = batch.column("response_ids")
        self.r_off = resp.offsets.to_numpy()
        self.r_inner = resp.values.offsets.to_numpy()
        self.r_val = resp.values.values.to_numpy()
        self.source = batch.column("source")
        self.truncated = batch.column("truncated").to_numpy(zero_copy_only=False)
        self.loss_mask = batch.column("loss_mask")
        self.has_mask = self.loss_mask.null_count < len(self.loss_mask)
        self.label = batch.column("label")
        self.has_label = self.label.null_count < len(self.label)

    def row(self, i: int) -> TokenizedExample:
        prompt = self.p_val[self.p_off[i]:self.p_off[i + 1]].tolist()
        responses = [self.r_val[self.r_inner[j]:self.r_inner[j + 1]].tolist()
                     for j in range(self.r_off[i], self.r_off[i + 1])]
        meta: dict[str, Any] = {"truncated": bool(self.truncated[i])}
        if self.has_mask and self.loss_mask[i].is_valid:
            meta["loss_mask"] = self.loss_mask[i].as_py()
        if self.has_label and self.label[i].is_valid:
            meta["label"] = self.label[i].as_py()
        return TokenizedExample(prompt, responses, source=self.source[i].as_py(), meta=meta)

    def response_counts(self) -> np.ndarray:
        return np.diff(self.r_off)


class TokenizedTable(Sequence):
    """A memory-mapped Arrow file of tokenized examples, or a view of some of its rows (see the module doc)."""

    def __init__(self, chunks: list[_Chunk], digest: str, path: Path | None = None,
                 indices: np.ndarray | None = None, reference_logps: Any = None, keepalive: Any = None):
        self._chunks = chunks
        self._starts = np.cumsum([0] + [len(c.truncated) for c in chunks])
        self.digest = digest
        self.path = path
        self.indices = indices
        self.reference_logps = reference_logps
        self._keepalive = keepalive  # e.g. a TemporaryDirectory that must outlive the mapping

    @classmethod
    def open(cls, path: Path, digest: str, keepalive: Any = None) -> "TokenizedTable":
        """Map the Arrow stream file at ``path`` (nothing is read into memory until rows are indexed)."""
        source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_stream(source)
        return cls([_Chunk(b) for b in reader], digest, Path(path), keepalive=keepalive)

    def __len__(self) -> int:
        return int(self._starts[-1]) if self.indices is None else len(self.indices)

    def _base(self, i: int) -> TokenizedExample:
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._chunks[c].row(i - int(self._starts[c]))

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} examples")
        i = i % n
        ex = self._base(int(self.indices[i]) if self.indices is not None else i)
        if self.reference_logps is not None:
            ex.meta["reference_logps"] = self.reference_logps[i]
        return ex

    def __iter__(self) -> Iterator[TokenizedExample]:
        for i in range(len(self)):
            yield self[i]

    def _view(self, indices: np.ndarray | None, reference_logps: Any = None) -> "TokenizedTable":
        return TokenizedTable(self._chunks, self.digest, self.path, indices, reference_logps, self._keepalive)

    def select(self, indices: Iterable[int]) -> "TokenizedTable":
        """The rows ``indices`` of this view, in that order (no data is copied)."""
        picked = np.asarray(list(indices), dtype=np.int64)
        if picked.size and (picked.min() < -len(self) or picked.max() >= len(self)):
            raise IndexError(f"rows {picked.min()}..{picked.max()} out of range for {len(self)} examples")
        picked = picked % max(len(self), 1)  # negative indices count from the end, as for a list
        base = picked if self.indices is None else self.indices[picked]
        ref = None if self.reference_logps is None else self.reference_logps[picked]
        return self._view(base, ref)

    def with_reference(self, logps: Any) -> "TokenizedTable":
        """This view with precomputed reference log-probs ([len(self), K]) attached to every row it yields."""
        if len(logps) != len(self):
            raise ValueError(f"{len(logps)} rows of reference log-probs for {len(self)} examples")
        return self._view(self.indices, logps)

    def labels(self) -> np.ndarray:
        """The rows' labels (labelled feedback: True desirable) as a bool array, without building the examples."""
        values = np.concatenate([c.label.to_numpy(zero_copy_only=False) for c in self._chunks]) if self._chunks \
            else np.zeros(0, bool)
        values = values.astype(bool)  # a null (no label) counts False
        return values if self.indices is None else values[self.indices]

    def response_counts(self) -> set[int]:
        """The distinct numbers of responses per example (K), without building the examples."""
        counts = np.concatenate([c.response_counts() for c in self._chunks]) if self._chunks else np.zeros(0, int)
        if self.indices is not None:
            counts = counts[self.indices]
        return {int(k) for k in np.unique(counts)}

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.digest.encode())
        h.update(b"all" if self.indices is None else self.indices.tobytes())
        return h.hexdigest()


class Chain(Sequence):
    """Several sequences of examples read as one (e.g. train then eval, for one reference pass)."""

    def __init__(self, *parts: Sequence[TokenizedExample]):
        self.parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k][i - int(self._starts[k])]

    def fingerprint(self) -> str:
        return hashlib.sha256("|".join(fingerprint(p) for p in self.parts).encode()).hexdigest()


def fingerprint(items: Sequence[TokenizedExample]) -> str:
    """A digest of exactly the token ids of ``items`` (tables name theirs without reading the rows)."""
    if hasattr(items, "fingerprint"):
        return items.fingerprint()  # type: ignore[union-attr]
    h = hashlib.sha256()
    for ex in items:
        h.update(repr((ex.prompt_ids, ex.response_ids)).encode())
    return h.hexdigest()


def response_counts(*parts: Sequence[TokenizedExample]) -> set[int]:
    """The distinct K (responses per example) over ``parts``, read from the tables' columns where possible."""
    out: set[int] = set()
    for p in parts:
        out |= p.response_counts() if hasattr(p, "response_counts") else {ex.num_responses for ex in p}
    return out


def with_reference(items: Sequence[TokenizedExample], logps: Any) -> Sequence[TokenizedExample]:
    """``items`` with their reference log-probs attached (a table view; a list gets them in each row's meta)."""
    if hasattr(items, "with_reference"):
        return items.with_reference(logps)  # type: ignore[union-attr]
    for ex, row in zip(items, logps):
        ex.meta["reference_logps"] = row
    return items


__all__ = ["SCHEMA", "TokenizedTable", "TableWriter", "Chain", "record_batch", "fingerprint", "response_counts",
           "with_reference"]

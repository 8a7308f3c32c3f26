"""Rows -> validated examples -> token ids in a memory-mapped Arrow table, once, cached on disk.

Why this shape: preparing 100k preference pairs the plain way (every row a Python object, one example at a
time through the tokenizer, every id a Python int) took two minutes and 1.7 GB in every process of every run.
Here:

* **Streamed.** Rows are read, validated and converted one at a time (``formats.iter_examples``); only chunks of
  ``CHUNK`` examples exist at once, and the ids go straight into an Arrow file (``data.table``). Validation is
  unchanged: every bad row is counted by kind with its ``file:line`` in the same report, and without
  ``skip_bad`` the run stops with it.
* **Batched, in several processes.** Each chunk is tokenized with one tokenizer call (``tokenize_batch``, the
  same ids as ``tokenize_example``) in one of ``num_proc`` worker processes while the main process reads on.
  Chunks come back in order, so the table's row order is the file's; rows dropped as too long are reported
  with their ``file:line`` whichever worker found them.
* **Cached.** The table and its report are kept under ``<cache_dir>/data/<key>/``, the key naming everything
  that can change the ids: the input files (size, mtime and a content hash), the tokenizer (its full
  serialized pipeline, special tokens and chat template), the format options and the length limits, and
  ``PREPARE_VERSION`` (raised whenever the tokenization rules change). A rerun maps the cached table in well
  under a second and says so. The cache is written to a temporary folder and renamed into place, so a crash
  never leaves half a table behind and runs sharing the cache never read one.
* **Shared.** Under several processes the local main process of each node prepares the table and the others
  map the same file (see ``train.setup``); no rank tokenizes twice or holds its own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..errors import DataError
from .formats import LoadReport, finish_report, iter_examples, new_report, preference_reader
from .table import TableWriter, TokenizedTable, record_batch
from .tokenize import SpecialTokens, TokenizeReport, end_token_ids, tokenize_batch
from .validation import ValidationReport

PREPARE_VERSION = 3
"""Part of every cache key: raise it when a change to reading or tokenization can change the ids."""

CHUNK = 512
"""Examples per tokenizer call and per record batch of the table."""

TABLE_FILE = "tokenized.arrow"
REPORT_FILE = "report.json"


def default_cache_dir() -> Path:
    """``$PREFOPT_CACHE``, else ``~/.cache/prefopt``: tokenized tables and precomputed reference log-probs."""
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt"))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class PreparedData:
    """A prepared input: its table, what reading and tokenizing found, and whether it came from the cache."""

    table: TokenizedTable
    load_report: LoadReport
    tokenize_report: TokenizeReport
    cached: bool
    """Read from a table already there (the cache, or the one the local main process wrote)."""
    seconds: float
    location: Path
    in_cache: bool = False
    """The table lives in the shared cache (not in a run folder or a temporary one)."""


def _open_prepared(folder: Path, keepalive: Any) -> tuple[TokenizedTable, dict]:
    """The table of a finished preparation folder, and its report.json."""
    meta = json.loads((folder / REPORT_FILE).read_text())
    return TokenizedTable.open(folder / TABLE_FILE, meta["digest"], keepalive), meta


# ---------------------------------------------------------------------------------------------------------
# The cache key


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def input_files(path: Any) -> list[Path] | None:
    """The local files behind ``path`` (a file, or every file of a saved dataset folder); None when it is not
    local (a hub name, data in memory): such input is not cached."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file())
    return None


def tokenizer_digest(tokenizer: Any) -> str:
    """Everything about a tokenizer that can change ids: its serialized pipeline (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens), its special tokens and its chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                         "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
                         "len": len(tokenizer), "template": getattr(tokenizer, "chat_template", None),
                         "split_special_tokens": getattr(tokenizer, "split_special_tokens", False)},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(files: list[Path], tokenizer: Any, options: dict) -> str:
    h = hashlib.sha256(f"prepare-v{PREPARE_VERSION}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_file_digest(f)}".encode())
    h.update(tokenizer_digest(tokenizer).encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------
# Tokenizing chunks (in worker processes or here)

_WORK: dict[str, Any] = {}
"""What a worker tokenizes with, set before the pool forks (the tokenizer is not pickled)."""


def _tokenize_chunk(examples: list) -> tuple[Any, int, list[str]]:
    """One chunk -> (record batch of the examples that fit, how many were truncated, sources of those dropped)."""
    items = _WORK["tokenize"](examples)
    kept = [t for t in items if t is not None]
    dropped = [ex.source for ex, t in zip(examples, items) if t is None]
    return record_batch(kept), sum(bool(t.meta["truncated"]) for t in kept), dropped


def chunk_tokenizer(kind: str, tokenizer: Any, max_length: int | None, max_prompt_length: int | None
                    ) -> Callable[[list], list]:
    """``examples -> [TokenizedExample | None]`` for one kind of data ("preferences", "sft" or "unpaired")."""
    sp = SpecialTokens.of(tokenizer)
    if kind == "preferences":
        return lambda exs: tokenize_batch(exs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                          specials=sp)
    if kind == "unpaired":
        from .unpaired import tokenize_labelled

        return lambda exs: [tokenize_labelled(ex, tokenizer, sp, max_length, max_prompt_length) for ex in exs]
    from .sft import _tokenize_sft

    return lambda exs: [_tokenize_sft(ex, tokenizer, sp, max_length, max_prompt_length) for ex in exs]


class _Workers:
    """Chunks tokenized in order, at most ``window`` in flight (so reading never runs far ahead of memory).

    The first chunk is tokenized here; the worker processes start only when a second chunk comes (small files
    never pay for them). They are forked, so they inherit the tokenizer instead of unpickling it."""

    def __init__(self, num_proc: int, tokenize: Callable[[list], list]):
        import multiprocessing as mp

        _WORK["tokenize"] = tokenize
        self.num_proc = num_proc if "fork" in mp.get_all_start_methods() else 1  # no fork: tokenize here
        if self.num_proc > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
        self.pool = None
        self.chunks = 0
        self.window = 2 * num_proc
        self.pending: deque = deque()

    def submit(self, chunk: list) -> list:
        """Queue one chunk; returns the results that are ready (in order) once the window is full."""
        self.chunks += 1
        if self.num_proc == 1 or self.chunks == 1:
            return [_tokenize_chunk(chunk)]
        if self.pool is None:
            import multiprocessing as mp

            self.pool = mp.get_context("fork").Pool(self.num_proc)
        self.pending.append(self.pool.apply_async(_tokenize_chunk, (chunk,)))
        out = []
        while len(self.pending) > self.window:
            out.append(self.pending.popleft().get())
        return out

    def drain(self) -> list:
        out = [r.get() for r in self.pending]
        self.pending.clear()
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        _WORK.clear()


# ---------------------------------------------------------------------------------------------------------
# Preparing


def _fsync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _report_json(load: LoadReport, tok: TokenizeReport) -> dict:
    v = load.validation
    return {"source": load.source, "format": load.format, "tokenize": asdict(tok),
            "validation": {"source": v.source, "skip_bad": v.skip_bad, "rows": v.rows, "kept": v.kept,
                           "counts": dict(v.counts), "occurrences": v.occurrences, "keep": v.keep}}


def _report_from_json(d: dict) -> tuple[LoadReport, TokenizeReport]:
    from collections import Counter

    v = d["validation"]
    check = ValidationReport(source=v["source"], skip_bad=v["skip_bad"], rows=v["rows"], kept=v["kept"],
                             counts=Counter(v["counts"]), keep=v["keep"],
                             occurrences={k: [tuple(o) for o in occ] for k, occ in v["occurrences"].items()})
    return LoadReport(source=d["source"], format=d["format"], validation=check), TokenizeReport(**d["tokenize"])


def prepare_data(path: Any, tokenizer: Any, *, kind: str = "preferences", from_preferences: bool = False,
                 format: str = "auto", split: str | None = None, skip_bad: bool = False,
                 max_length: int | None = None, max_prompt_length: int | None = None,
                 num_proc: int | None = None, cache_dir: Path | str | None = None, work_dir: Path | None = None,
                 reuse: bool = False, progress: bool = True, desc: str = "preparing data") -> PreparedData:
    """The tokenized table of ``path`` (see the module doc), from the cache when it holds it.

    cache_dir: where tables are cached (None: no cache). Without a cache the table is written to ``work_dir``
    (default: a temporary folder that lives as long as the table); ``reuse=True`` maps the table already there
    (the other processes of a run whose local main process prepared it). ``num_proc``: worker processes
    (default: the cores available; 1 tokenizes here).
    """
    t0 = time.perf_counter()
    if kind == "preferences":
        detect, convert, key_of = preference_reader(format, len(tokenizer), end_token_ids(tokenizer))
    elif kind == "sft":
        from .sft import sft_reader

        detect, convert, key_of = sft_reader(format, from_preferences, len(tokenizer), end_token_ids(tokenizer))
    elif kind == "unpaired":  # labelled feedback (KTO): a row gives one example, a preference pair two
        from .unpaired import unpaired_reader

        detect, convert, key_of = unpaired_reader(format)
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    options = {"kind": kind, "from_preferences": from_preferences, "format": format, "split": split,
               "skip_bad": skip_bad, "max_length": max_length, "max_prompt_length": max_prompt_length}
    files = input_files(path) if cache_dir is not None else None
    keepalive = None
    if files:
        final = Path(cache_dir) / "data" / cache_key(files, tokenizer, options)
    elif work_dir is not None:
        final = Path(work_dir)
    else:
        keepalive = tempfile.TemporaryDirectory(prefix="prefopt-data-")
        final = Path(keepalive.name) / "table"
    if (files or reuse) and (final / REPORT_FILE).is_file():
        table, meta = _open_prepared(final, keepalive)
        load, tok = _report_from_json(meta["report"])
        return PreparedData(table, load, tok, True, time.perf_counter() - t0, final, bool(files))
    if reuse:
        raise DataError(f"the prepared table is missing from {final} (the local main process should have "
                        "written it)", source=str(path), reason="not_found")

    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        writer = TableWriter(tmp / TABLE_FILE)
        load = new_report(path, format, skip_bad)
        tok = TokenizeReport()
        workers = _Workers(max(1, num_proc or available_cores()),
                           chunk_tokenizer(kind, tokenizer, max_length, max_prompt_length))
        check = load.validation

        def collect(results: list) -> None:
            for batch, truncated, dropped in results:
                writer.write(batch)
                tok.kept += batch.num_rows
                tok.truncated += truncated
                tok.dropped += len(dropped)
                for source in dropped:
                    check.drop("too_long", source)
                    if len(tok.dropped_sources) < 3:
                        tok.dropped_sources.append(source)

        try:
            chunk: list = []
            bar = tqdm(desc=desc, unit=" rows", disable=not progress, delay=2.0, dynamic_ncols=True)
            for ex in iter_examples(path, detect, convert, load, split=split, duplicate_key=key_of):
                bar.update(check.rows - bar.n)
                if check.first_error is not None and not skip_bad:
                    continue  # the run stops at the end of the read: only validate the rest
                if kind == "unpaired":
                    chunk.extend(ex)  # the row's examples
                else:
                    chunk.append(ex)
                if len(chunk) >= CHUNK:
                    collect(workers.submit(chunk))
                    chunk = []
            bar.update(check.rows - bar.n)
            bar.close()
            if check.first_error is None or skip_bad:
                if chunk:
                    collect(workers.submit(chunk))
                collect(workers.drain())
        finally:
            workers.close()
        tok.total = check.kept + tok.dropped
        finish_report(load)  # raises the whole report when a row is bad and skip_bad is off
        digest = writer.close()
        with open(tmp / REPORT_FILE, "w") as f:
            f.write(json.dumps({"digest": digest, "report": _report_json(load, tok), "options": options,
                                "input": str(path)}, default=str))
            f.flush()
            os.fsync(f.fileno())
        if final.exists() and not files:  # a run folder's table from before: replaced, if it is one of ours
            if not set(os.listdir(final)) <= {TABLE_FILE, REPORT_FILE}:  # not a table of ours: never delete it
                raise DataError(f"{final} exists and holds other files than a prepared table; move them, or choose "
                                "another output folder", source=str(path), reason="not_found")
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)  # fails onto a cache entry that another run renamed into place meanwhile
        except OSError:
            if not (files and (final / REPORT_FILE).is_file()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the same inputs, so the same table: use theirs
            table, _ = _open_prepared(final, keepalive)
            return PreparedData(table, load, tok, False, time.perf_counter() - t0, final, True)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    table = TokenizedTable.open(final / TABLE_FILE, digest, keepalive)
    return PreparedData(table, load, tok, False, time.perf_counter() - t0, final, bool(files))


__all__ = ["prepare_data", "PreparedData", "default_cache_dir", "cache_key", "tokenizer_digest", "input_files",
           "PREPARE_VERSION", "available_cores"]

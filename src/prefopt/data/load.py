"""Read raw rows from local files, saved `datasets` directories, in-memory data or the hub.

Every row comes with a ``source`` string ("path:line" for JSON lines, "path[index]" otherwise) so that
errors point at the exact input row. JSON lines are read as bytes and decoded line by line, so a line that is
not UTF-8 is one bad row (reason ``non_utf8``) rather than the end of the read.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".gz")


def iter_rows(path_or_name: Any, split: str | None = None) -> Iterator[tuple[dict, str]]:
    """Yield ``(row, source)`` for every row; raise DataError at the first unreadable row."""
    for row, source in iter_rows_lenient(path_or_name, split):
        if isinstance(row, DataError):
            raise row
        yield row, source


def iter_rows_lenient(path_or_name: Any, split: str | None = None) -> Iterator[tuple[dict | DataError, str]]:
    """Like iter_rows, but a bad row is yielded as a DataError instead of raised, so reading can go on.

    File-level problems (missing file, missing split) still raise.
    """
    if isinstance(path_or_name, (str, Path)):
        path = Path(path_or_name).expanduser()
        if path.is_dir():
            yield from _iter_saved_dataset(path, split)
        elif path.is_file():
            yield from _iter_file(path)
        elif _looks_local(str(path_or_name)):
            raise DataError("file not found (no such local file or directory)", source=str(path_or_name),
                            reason="not_found")
        else:
            yield from _iter_hub(str(path_or_name), split)
    else:
        yield from _iter_memory(path_or_name)


def _looks_local(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.lower().endswith(LOCAL_SUFFIXES)
            or "\\" in name or name.count("/") > 1)


def _check_object(row: Any, source: str) -> dict | DataError:
    if isinstance(row, dict):
        return row
    return DataError(f"row is a JSON {type(row).__name__}, expected an object", source=source, reason="not_an_object")


def _decode(raw: bytes, source: str, first: bool) -> str | DataError:
    """One line's bytes as text; a DataError (reason ``non_utf8``) naming the first bad byte if not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return DataError(f"is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1})",
                         source=source, reason="non_utf8")


def _iter_json_lines(lines: Iterable[bytes], name: str) -> Iterator[tuple[dict | DataError, str]]:
    for lineno, raw in enumerate(lines, start=1):
        source = f"{name}:{lineno}"
        line = _decode(raw, source, lineno == 1)
        if isinstance(line, DataError):
            yield line, source
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield DataError(f"malformed JSON ({e.msg} at column {e.colno})", source=source,
                            reason="malformed_json"), source
            continue
        yield _check_object(row, source), source


def _iter_file(path: Path) -> Iterator[tuple[dict | DataError, str]]:
    name = str(path)
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield row, f"{name}[{index}]"
                index += 1
        return
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:  # bytes: a line that is not UTF-8 is a bad row, not a crash of the whole read
        if suffixes.startswith(".json") and not suffixes.startswith(".jsonl"):
            data = f.read()
            if data.lstrip().startswith((b"[", b"\xef\xbb\xbf[")):  # one JSON array of objects
                try:
                    text = data.decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    line = data.count(b"\n", 0, e.start) + 1
                    raise DataError("is not valid UTF-8", source=f"{name}:{line}", reason="non_utf8") from None
                try:
                    rows = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"malformed JSON array ({e.msg} at line {e.lineno}, column {e.colno})",
                                    source=f"{name}:{e.lineno}", reason="malformed_json") from None
                for i, row in enumerate(rows):
                    yield _check_object(row, f"{name}[{i}]"), f"{name}[{i}]"
                return
            yield from _iter_json_lines(data.split(b"\n"), name)
        else:
            yield from _iter_json_lines(f, name)


def _iter_saved_dataset(path: Path, split: str | None) -> Iterator[tuple[dict, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"directory is not a dataset saved with save_to_disk ({e})", source=str(path),
                        reason="not_found") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(f"split '{split}' not found; available splits: {', '.join(ds)}", source=str(path),
                            reason="missing_split")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield row, f"{path}[{i}]"


def _iter_hub(name: str, split: str | None) -> Iterator[tuple[dict, str]]:
    import datasets  # pragma: no cover - needs network

    ds = datasets.load_dataset(name, split=split or "train")
    for i, row in enumerate(ds):
        yield row, f"{name}[{i}]"


def _iter_memory(data: Any) -> Iterator[tuple[dict | DataError, str]]:
    """A ``datasets.Dataset`` or any iterable of dicts."""
    label = "<dataset>" if hasattr(data, "column_names") else "<memory>"
    for i, row in enumerate(data):
        yield _check_object(row, f"{label}[{i}]"), f"{label}[{i}]"

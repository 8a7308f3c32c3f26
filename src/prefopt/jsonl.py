"""JSON lines files: one JSON object a line, UTF-8, non-ASCII characters written as they are.

    write_jsonl([{"prompt": "Q", "response": "A"}], "out/samples.jsonl")   # creates out/
    rows = read_jsonl("out/samples.jsonl")                                  # [{"prompt": "Q", ...}]

Every JSON lines file prefopt writes goes through ``write_jsonl`` (also ``prefopt.data.write_jsonl``): samples,
labelled pairs, per-row scores, the experiments' stage files. A ``PreferenceExample`` is written as the row
``load_preferences`` reads back: explicit ``{prompt, chosen, rejected}`` for two responses, ranked
``{prompt, responses, ranks}`` (best first) for more. Reading input data (any format, each row with its source
for error messages) is ``prefopt.data.iter_rows``; ``read_jsonl`` is the plain reader for files prefopt wrote.

This module needs neither torch nor the data package, so light modules (the CLI's parser, the experiments'
configs) can import it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data.types import PreferenceExample


def preference_row(ex: PreferenceExample) -> dict[str, Any]:
    """The explicit row {prompt, chosen, rejected} (two responses) or ranked row {prompt, responses, ranks}."""
    if len(ex.responses) == 2:
        return {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}
    return {"prompt": ex.prompt, "responses": ex.responses, "ranks": list(range(1, len(ex.responses) + 1))}


def _line(row: dict[str, Any] | PreferenceExample) -> str:
    if not isinstance(row, dict) and hasattr(row, "responses"):
        row = preference_row(row)
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(rows: Iterable[dict[str, Any] | PreferenceExample], path: str | Path) -> Path:
    """Write one JSON object a line (creating parent folders, replacing the file); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(_line(row))
    return path


def append_jsonl(row: dict[str, Any] | PreferenceExample, path: str | Path) -> Path:
    """Append one JSON object as a line (creating the file and its parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(_line(row))
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every non-blank line of a JSON lines file, parsed."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["write_jsonl", "append_jsonl", "read_jsonl", "preference_row"]

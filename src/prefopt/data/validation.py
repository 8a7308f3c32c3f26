"""The data validation report every data-reading command makes before it trains, scores or samples.

Each bad or suspicious row is counted under a stable reason code (the ``reason`` of the DataError that names
it) and the first few occurrences are kept as ``file:line`` (with the field where there is one)::

    data validation: 13 rows read from d.jsonl: 10 kept, 3 skipped, 1 warning
      malformed_json        1  malformed JSON (skipped): d.jsonl:3
      missing_field         2  missing field (skipped): d.jsonl:4 [rejected], d.jsonl:6 [prompt]
      duplicate             1  duplicate: same prompt and responses (in order) as an earlier row (kept): d.jsonl:12
                               (= d.jsonl:1)

Three kinds of entry:

* **errors** (every kind not named below): without ``skip_bad`` the whole input is still read and the run
  stops with the full report (``DataValidationError``: the first bad row, then counts and first occurrences);
  with it those rows are skipped.
* **warnings** (``WARNINGS``): reported, the row is kept. A duplicate pair (same prompt and same responses, in
  the same order, as an earlier row) is usually a data bug, but harmless to train on.
* **dropped** (``DROPPED``): reported, the row is always dropped and the run goes on, as it did before the
  report existed: ``too_long`` (after tokenization the example cannot fit in max_length: its prompt alone fills
  it, or its responses are identical once cut).

Nothing is dropped without being counted: ``rows == kept + skipped`` (``check``), where ``skipped`` counts
every error and dropped row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import DataError

KINDS = {
    "malformed_json": "malformed JSON",
    "not_an_object": "not a JSON object",
    "non_utf8": "not valid UTF-8",
    "unknown_format": "unknown row format",
    "missing_field": "missing field",
    "empty_field": "empty field",
    "wrong_type": "wrong type",
    "identical_responses": "chosen identical to rejected, or two ranked responses identical: zero gradient",
    "too_few_responses": "fewer than 2 ranked responses",
    "ties": "ties in ranks or scores",
    "length_mismatch": "ranks/scores and responses differ in number",
    "diverging": "chosen and rejected differ before the last assistant turn",
    "missing_marker": "no Assistant marker",
    "duplicate": "duplicate: same prompt and responses (in order) as an earlier row",
    "too_long": "does not fit in max_length after tokenization",
    "bad_token_id": "token id outside the tokenizer's vocabulary",
    "ended_mismatch": "marked as ended with EOS, but the ids do not end with an end token",
}
"""Reason code -> what it means (a code missing here is printed as itself)."""

WARNINGS = frozenset({"duplicate"})
"""Reported, the row is kept."""

DROPPED = frozenset({"too_long"})
"""Reported, the row is dropped whether or not bad rows are skipped."""

KEEP = 3
"""How many occurrences of each kind are kept for the report."""


@dataclass
class ValidationReport:
    """Counts of rows read, kept and reported by kind, with the first ``keep`` occurrences of each kind."""

    source: str = "<data>"
    skip_bad: bool = False
    rows: int = 0
    """Rows read (blank lines are not rows)."""
    kept: int = 0
    """Rows kept (warnings included)."""
    counts: Counter = field(default_factory=Counter)
    occurrences: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    """kind -> first (source, field) pairs; for duplicates the field is the source of the earlier row."""
    first_error: DataError | None = None
    """The DataError of the first bad row (an error kind: not a warning or dropped row)."""
    keep: int = KEEP

    def add(self, kind: str, source: str | None, field: str | None = None) -> None:
        """Count one occurrence of ``kind`` at ``source`` (``file:line``)."""
        self.counts[kind] += 1
        occ = self.occurrences.setdefault(kind, [])
        if len(occ) < self.keep:
            occ.append((source or "?", field))

    def add_error(self, err: DataError) -> None:
        """Count a bad row from its DataError (its ``reason`` is the kind)."""
        self.add(err.reason, err.source, err.field)
        if self.first_error is None and is_error(err.reason):
            self.first_error = err

    def drop(self, kind: str, source: str | None, field: str | None = None) -> None:
        """A row counted as kept turns out unusable (e.g. too long once tokenized): count it under ``kind``."""
        if self.kept <= 0:
            raise AssertionError("ValidationReport.drop: no kept row left to drop")
        self.kept -= 1
        self.add(kind, source, field)

    @property
    def skipped(self) -> int:
        """Rows read but not kept: every error and dropped row (warnings are kept)."""
        return sum(n for k, n in self.counts.items() if k not in WARNINGS)

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.counts.items() if is_error(k))

    @property
    def warnings(self) -> int:
        return sum(n for k, n in self.counts.items() if k in WARNINGS)

    def check(self) -> None:
        """The invariant: every row read is kept or counted as skipped (raises AssertionError otherwise)."""
        if self.rows != self.kept + self.skipped:
            raise AssertionError(f"data validation report does not add up: {self.rows} rows read != {self.kept} "
                                 f"kept + {self.skipped} skipped ({dict(self.counts)})")

    def clean(self) -> bool:
        return not self.counts

    def action(self, kind: str) -> str:
        if kind in WARNINGS:
            return "kept"
        if kind in DROPPED:
            return "dropped"
        return "skipped" if self.skip_bad else "bad"

    def summary(self) -> str:
        """Multi-line: a headline, then one line per kind with its count and first occurrences."""
        head = f"data validation: {self.rows} rows read from {self.source}: {self.kept} kept"
        if self.skip_bad or not self.errors:
            head += f", {self.skipped} skipped"
        else:
            head += f", {self.errors} bad" + (f", {self.skipped - self.errors} dropped"
                                              if self.skipped - self.errors else "")
        if self.warnings:
            head += f", {self.warnings} warning" + ("s" if self.warnings > 1 else "")
        lines = [head]
        width = max((len(k) for k in self.counts), default=0)
        for kind, n in sorted(self.counts.items(), key=lambda kv: (kv[0] in WARNINGS, kv[0] in DROPPED, -kv[1])):
            where = ", ".join(_occurrence(kind, s, f) for s, f in self.occurrences.get(kind, []))
            more = ", ..." if n > len(self.occurrences.get(kind, [])) else ""
            lines.append(f"  {kind:<{width}} {n:>6}  {KINDS.get(kind, kind)} ({self.action(kind)}): {where}{more}")
        return "\n".join(lines)

    __str__ = summary

    def raise_if_bad(self) -> None:
        """Without ``skip_bad``: stop with the full report if any row is bad (``DataValidationError``)."""
        if not self.skip_bad and self.errors:
            raise DataValidationError(self)


def is_error(kind: str) -> bool:
    return kind not in WARNINGS and kind not in DROPPED


def _occurrence(kind: str, source: str, field: str | None) -> str:
    if field is None:
        return source
    return f"{source} (= {field})" if kind == "duplicate" else f"{source} [{field}]"


class DataValidationError(DataError):
    """Bad rows found reading the whole input: names the first (as its DataError did), then the full report.

    ``source``, ``field`` and ``reason`` are those of the first bad row; ``report`` is the ValidationReport.
    """

    def __init__(self, report: ValidationReport):
        first = report.first_error or DataError("bad rows", source=report.source)
        super().__init__("", source=first.source, field=first.field, reason=first.reason)
        self.report = report
        self.first = first
        n = report.errors
        self.args = (f"{first}\n{report.summary()}\n"
                     f"{n} bad row{'s' if n > 1 else ''}; fix {'them' if n > 1 else 'it'}, or pass --skip-bad-rows "
                     "(skip_bad=True) to skip bad rows and go on with the rest",)


__all__ = ["ValidationReport", "DataValidationError", "KINDS", "WARNINGS", "DROPPED", "is_error"]

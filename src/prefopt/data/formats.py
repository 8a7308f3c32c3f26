"""Turn raw rows of the supported preference formats into validated PreferenceExamples.

Formats (detected from the first row, or named):

* ``explicit``: ``{prompt, chosen, rejected}``; strings, or message lists (prompt = messages before the answer).
* ``conversational``: ``{chosen: [messages], rejected: [messages]}``; the prompt is the shared prefix before the
  last assistant message.
* ``implicit``: Anthropic HH transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt runs up to and
  including the last ``"\\n\\nAssistant:"`` marker, which both transcripts must share exactly.
* ``ranked``: ``{prompt, responses, ranks}`` (1 = best) or ``{prompt, responses, scores}`` (higher = better).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError, DataError
from .load import iter_rows_lenient
from .types import PreferenceExample, Text
from .validation import WARNINGS, ValidationReport

FORMATS = ("explicit", "conversational", "implicit", "ranked")
HH_MARKER = "\n\nAssistant:"


def detect_format(row: dict, source: str | None = None) -> str:
    """Name the format of one raw row, or raise DataError."""
    if "responses" in row and ("ranks" in row or "scores" in row):
        return "ranked"
    if "chosen" in row and "rejected" in row:
        if "prompt" in row:
            return "explicit"
        return "conversational" if isinstance(row["chosen"], list) else "implicit"
    raise DataError(f"cannot detect the format from keys {sorted(row)}; expected prompt/chosen/rejected, "
                    "chosen/rejected, or prompt/responses/ranks|scores", source=source, reason="unknown_format")


def to_example(row: dict, source: str, fmt: str) -> PreferenceExample:
    """Validate one raw row of format ``fmt`` and build its PreferenceExample (raises DataError)."""
    if fmt == "explicit" or (fmt == "conversational" and "prompt" in row):
        prompt = text_field(row, "prompt", source)
        responses = [text_field(row, "chosen", source), text_field(row, "rejected", source)]
    elif fmt == "conversational":
        prompt, responses = _split_conversations(row, source)
    elif fmt == "implicit":
        prompt, responses = _split_transcripts(row, source)
    elif fmt == "ranked":
        prompt, responses = text_field(row, "prompt", source), _ranked(row, source)
    else:
        raise ConfigError(f"unknown data format '{fmt}'; choose one of: auto, {', '.join(FORMATS)}")
    kinds = {isinstance(t, list) for t in [prompt, *responses]}
    if len(kinds) > 1:
        raise DataError("mixes plain text and message lists; use strings everywhere or messages everywhere",
                        source=source, field="prompt", reason="wrong_type")
    for i, a in enumerate(responses):
        if any(a == b for b in responses[i + 1:]):
            raise DataError("responses are identical, nothing to prefer", source=source,
                            field="responses" if fmt == "ranked" else "chosen", reason="identical_responses")
    return PreferenceExample(prompt=prompt, responses=responses, source=source)


def _get(row: dict, name: str, source: str) -> Any:
    if name not in row or row[name] is None:
        raise DataError(f"missing (row has {sorted(row)})", source=source, field=name, reason="missing_field")
    return row[name]


def text_field(row: dict, name: str, source: str, value: Any = None) -> Text:
    """A non-empty string or a non-empty list of {role, content} messages."""
    value = _get(row, name, source) if value is None else value
    if isinstance(value, str):
        if not value.strip():
            raise DataError("is empty", source=source, field=name, reason="empty_field")
        _check_utf8(value, name, source)
        return value
    if isinstance(value, list):
        if not value:
            raise DataError("is an empty message list", source=source, field=name, reason="empty_field")
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"messages must be {{'role': str, 'content': str}}, got {m!r:.80}", source=source,
                                field=name, reason="wrong_type")
            _check_utf8(m["content"], name, source)
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"must be a string or a list of messages, got {type(value).__name__}", source=source,
                    field=name, reason="wrong_type")


def _check_utf8(text: str, name: str, source: str) -> None:
    """Text that cannot be written as UTF-8 (a lone surrogate from a JSON escape like "\\ud800") is a bad row
    here, not a crash in the tokenizer later."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"is not valid UTF-8 text ({text[e.start]!r} at position {e.start})", source=source,
                            field=name, reason="non_utf8") from None


def _split_conversations(row: dict, source: str) -> tuple[Text, list[Text]]:
    convs = {name: text_field(row, name, source) for name in ("chosen", "rejected")}
    parts = {}
    for name, conv in convs.items():
        if not isinstance(conv, list):
            raise DataError("must be a list of messages (no prompt field given)", source=source, field=name,
                            reason="wrong_type")
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=-1)
        if last <= 0:
            raise DataError("needs a prompt message followed by an assistant message", source=source, field=name,
                            reason="missing_field")
        parts[name] = (conv[:last], conv[last:])
    prompt = parts["chosen"][0]
    if parts["rejected"][0] != prompt:
        raise DataError("conversations differ before the last assistant message; cannot split a shared prompt",
                        source=source, field="rejected", reason="diverging")
    return prompt, [parts["chosen"][1], parts["rejected"][1]]


def _split_transcripts(row: dict, source: str) -> tuple[str, list[str]]:
    prompts, responses = [], []
    for name in ("chosen", "rejected"):
        text = text_field(row, name, source)
        if not isinstance(text, str):
            raise DataError("must be a transcript string", source=source, field=name, reason="wrong_type")
        cut = text.rfind(HH_MARKER)
        if cut < 0:
            raise DataError(f"has no {HH_MARKER!r} marker", source=source, field=name, reason="missing_marker")
        cut += len(HH_MARKER)
        prompts.append(text[:cut])
        responses.append(text[cut:])
        if not text[cut:].strip():
            raise DataError("response after the last Assistant marker is empty", source=source, field=name,
                            reason="empty_field")
    if prompts[0] != prompts[1]:
        raise DataError("chosen and rejected transcripts differ before their last Assistant turn",
                        source=source, field="rejected", reason="diverging")
    return prompts[0], responses


def _ranked(row: dict, source: str) -> list[Text]:
    responses = _get(row, "responses", source)
    if not isinstance(responses, list):
        raise DataError("must be a list", source=source, field="responses", reason="wrong_type")
    if len(responses) < 2:
        raise DataError(f"needs at least 2 responses, got {len(responses)}", source=source, field="responses",
                        reason="too_few_responses")
    responses = [text_field(row, f"responses[{i}]", source, r) for i, r in enumerate(responses)]
    key = "ranks" if "ranks" in row else "scores"
    values = _get(row, key, source)
    if not (isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in values)):
        raise DataError("must be a list of numbers", source=source, field=key, reason="wrong_type")
    if len(values) != len(responses):
        raise DataError(f"has {len(values)} entries for {len(responses)} responses", source=source, field=key,
                        reason="length_mismatch")
    if len(set(values)) != len(values):
        raise DataError(f"has ties {values}; tied responses cannot be ranked", source=source, field=key,
                        reason="ties")
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=key == "scores")
    return [responses[i] for i in order]


@dataclass
class LoadReport:
    """What load_preferences read: counts of loaded and skipped rows (by reason, with a few example sources).

    ``validation`` is the full report (``data.validation.ValidationReport``: every kind with its first
    occurrences, warnings such as duplicate pairs included); ``loaded``, ``skipped`` and ``examples`` are views
    of it, and ``summary()`` is the one-line version.
    """

    source: str
    format: str | None = None
    validation: ValidationReport = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.validation is None:
            self.validation = ValidationReport(source=self.source)

    @property
    def loaded(self) -> int:
        return self.validation.kept

    @property
    def skipped(self) -> Counter:
        """Rows not loaded, by reason (warnings such as duplicates are loaded, so not here)."""
        return Counter({k: n for k, n in self.validation.counts.items() if k not in WARNINGS})

    @property
    def examples(self) -> dict[str, list[str]]:
        """reason -> the first few sources of skipped rows."""
        return {k: [s for s, _ in occ] for k, occ in self.validation.occurrences.items() if k not in WARNINGS}

    def add_skip(self, err: DataError, keep: int = 3) -> None:
        self.validation.rows += 1
        self.validation.add_error(err)

    def summary(self) -> str:
        total = self.loaded + sum(self.skipped.values())
        text = f"loaded {self.loaded} of {total} rows from {self.source} (format: {self.format})"
        if self.skipped:
            parts = [f"{r}={n} (e.g. {', '.join(self.examples[r])})" for r, n in self.skipped.most_common()]
            text += f"; skipped {sum(self.skipped.values())}: " + "; ".join(parts)
        warnings = {k: n for k, n in self.validation.counts.items() if k in WARNINGS}
        if warnings:
            text += "; warnings: " + "; ".join(f"{k}={n} (kept)" for k, n in warnings.items())
        return text

    __str__ = summary


def _pair_key(ex: PreferenceExample) -> Any:
    return (ex.prompt, ex.responses)


def load_preferences(path: Any, *, format: str = "auto", split: str | None = None, skip_bad: bool = False,
                     limit: int | None = None) -> tuple[list[PreferenceExample], LoadReport]:
    """Load a preference dataset (file, saved dataset dir, hub name, ``datasets.Dataset`` or list of dicts).

    The format is detected from the first readable row unless named. The whole input is validated (see
    ``data.validation``): without ``skip_bad`` any bad row raises DataValidationError (a DataError naming the
    first bad row, with the full report in its message); with it, bad rows are skipped and counted in the
    report. Duplicate pairs are kept and counted as warnings. ``limit`` caps loaded examples.
    """
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"unknown data format '{format}'; choose one of: auto, {', '.join(FORMATS)}")
    return read_examples(path, detect_format, to_example, format=format, split=split, skip_bad=skip_bad,
                         limit=limit, duplicate_key=_pair_key)


def read_examples(path: Any, detect: Callable[[dict, str], str], convert: Callable[[dict, str, str], Any], *,
                  format: str = "auto", split: str | None = None, skip_bad: bool = False, limit: int | None = None,
                  duplicate_key: Callable[[Any], Any] | None = None) -> tuple[list[Any], LoadReport]:
    """Rows -> examples with ``convert(row, source, fmt)``; the format comes from ``detect`` on the first good
    row unless named. Every row is read and validated; bad rows are counted in ``report.validation``, and then
    without ``skip_bad`` the report is raised (DataValidationError), with it they are skipped.
    ``duplicate_key(example)``: examples with equal keys after the first are counted as ``duplicate`` (kept)."""
    label = str(path) if isinstance(path, (str, os.PathLike)) else type(path).__name__
    report = LoadReport(source=label, format=None if format == "auto" else format)
    check = report.validation
    check.skip_bad = skip_bad
    examples: list[Any] = []
    seen: dict[bytes, str] = {}
    for row, source in iter_rows_lenient(path, split):
        if limit is not None and len(examples) >= limit:
            break
        check.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            if report.format is None:
                report.format = detect(row, source)
            example = convert(row, source, report.format)
        except DataError as e:
            check.add_error(e)
            continue
        examples.append(example)
        if duplicate_key is not None:
            digest = hashlib.blake2b(json.dumps(duplicate_key(example), sort_keys=True, ensure_ascii=False)
                                     .encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if digest in seen:
                check.add("duplicate", source, seen[digest])
            else:
                seen[digest] = source
    check.kept = len(examples)
    check.check()
    check.raise_if_bad()
    return examples, report

"""Turn raw rows of the supported preference formats into validated PreferenceExamples.

Formats (detected from the first row, or named):

* ``explicit``: ``{prompt, chosen, rejected}``; strings, or message lists (prompt = messages before the answer).
* ``conversational``: ``{chosen: [messages], rejected: [messages]}``; the prompt is the shared prefix before the
  last assistant message.
* ``implicit``: Anthropic HH transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt runs up to and
  including the last ``"\\n\\nAssistant:"`` marker, which both transcripts must share exactly.
* ``ranked``: ``{prompt, responses, ranks}`` (1 = best) or ``{prompt, responses, scores}`` (higher = better).

Exact samples: an explicit row may also carry ``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
``chosen_ended_with_eos`` and ``rejected_ended_with_eos``, a ranked row ``prompt_ids``, ``response_ids`` (a list of
lists, in the order of ``responses``) and ``responses_ended_with_eos`` (what ``prefopt label`` writes from
``prefopt generate`` samples). Then the ids are used exactly and the texts (optional) are kept for reports.
Ids must be non-empty lists of ints (within the vocabulary when ``load_preferences`` is given ``vocab_size``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..errors import ConfigError, DataError
from .load import iter_rows_lenient
from .types import PreferenceExample, Text
from .validation import WARNINGS, ValidationReport

FORMATS = ("explicit", "conversational", "implicit", "ranked")
HH_MARKER = "\n\nAssistant:"


PAIR_ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
RANKED_ID_FIELDS = ("prompt_ids", "response_ids")


def detect_format(row: dict, source: str | None = None) -> str:
    """Name the format of one raw row, or raise DataError."""
    if ("responses" in row or "response_ids" in row) and ("ranks" in row or "scores" in row):
        return "ranked"
    if all(k in row for k in PAIR_ID_FIELDS):
        return "explicit"
    if "chosen" in row and "rejected" in row:
        if "prompt" in row:
            return "explicit"
        return "conversational" if isinstance(row["chosen"], list) else "implicit"
    raise DataError(f"cannot detect the format from keys {sorted(row)}; expected prompt/chosen/rejected, "
                    "chosen/rejected, or prompt/responses/ranks|scores", source=source, reason="unknown_format")


def ids_field(row: dict, name: str, source: str, value: Any = None, vocab_size: int | None = None) -> list[int]:
    """A non-empty list of token ids (ints, within ``[0, vocab_size)`` when given)."""
    value = _get(row, name, source) if value is None else value
    if not (isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        raise DataError(f"must be a list of token ids (ints), got {value!r:.80}", source=source, field=name,
                        reason="wrong_type")
    if not value:
        raise DataError("is an empty list of token ids", source=source, field=name, reason="empty_field")
    bad = next((t for t in value if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
    if bad is not None:
        raise DataError(f"has token id {bad} outside the vocabulary"
                        + (f" (size {vocab_size})" if vocab_size is not None else ""), source=source, field=name,
                        reason="bad_token_id")
    return list(value)


def _bool_field(row: dict, name: str, source: str, value: Any = None) -> bool:
    value = _get(row, name, source) if value is None else value
    if not isinstance(value, bool):
        raise DataError(f"must be true or false, got {value!r:.80}", source=source, field=name, reason="wrong_type")
    return value


def _has_ids(row: dict, fmt: str) -> bool:
    return any(k in row for k in (PAIR_ID_FIELDS if fmt == "explicit" else RANKED_ID_FIELDS if fmt == "ranked"
                                  else ()))


def _exact(row: dict, source: str, fmt: str, vocab_size: int | None
           ) -> tuple[list[int], list[list[int]], list[bool], list[int] | None]:
    """(prompt ids, response ids, ended_with_eos, best-first order or None) of a row carrying ids."""
    prompt_ids = ids_field(row, "prompt_ids", source, vocab_size=vocab_size)
    if fmt == "explicit":
        ids = [ids_field(row, f"{n}_ids", source, vocab_size=vocab_size) for n in ("chosen", "rejected")]
        ended = [_bool_field(row, f"{n}_ended_with_eos", source) for n in ("chosen", "rejected")]
        return prompt_ids, ids, ended, None
    lists = _get(row, "response_ids", source)
    if not isinstance(lists, list):
        raise DataError("must be a list of lists of token ids", source=source, field="response_ids",
                        reason="wrong_type")
    ids = [ids_field(row, f"response_ids[{i}]", source, r, vocab_size) for i, r in enumerate(lists)]
    flags = _get(row, "responses_ended_with_eos", source)
    if not isinstance(flags, list):
        raise DataError("must be a list of true/false", source=source, field="responses_ended_with_eos",
                        reason="wrong_type")
    ended = [_bool_field(row, f"responses_ended_with_eos[{i}]", source, f) for i, f in enumerate(flags)]
    if len(ended) != len(ids):
        raise DataError(f"has {len(ended)} entries for {len(ids)} response_ids", source=source,
                        field="responses_ended_with_eos", reason="length_mismatch")
    return prompt_ids, ids, ended, _order(row, source, len(ids))


def to_example(row: dict, source: str, fmt: str, vocab_size: int | None = None,
               end_ids: frozenset[int] | None = None) -> PreferenceExample:
    """Validate one raw row of format ``fmt`` and build its PreferenceExample (raises DataError). A row carrying
    token ids (see the module doc) keeps them; ``vocab_size`` bounds them, and with ``end_ids`` (the tokenizer's
    end tokens) a response marked as ended with EOS must end with one of them."""
    if _has_ids(row, fmt):
        return _exact_example(row, source, fmt, vocab_size, end_ids)
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


def _exact_example(row: dict, source: str, fmt: str, vocab_size: int | None,
                   end_ids: frozenset[int] | None = None) -> PreferenceExample:
    prompt_ids, ids, ended, order = _exact(row, source, fmt, vocab_size)
    names = ["chosen_ids", "rejected_ids"] if fmt == "explicit" else [f"response_ids[{i}]" for i in range(len(ids))]
    if end_ids is not None:
        for name, r, done in zip(names, ids, ended):
            if done and r[-1] not in end_ids:
                raise DataError(f"ends with id {r[-1]}, not an end token, but its ended_with_eos flag is true (the "
                                "ids and the flag come from different samples?)", source=source, field=name,
                                reason="ended_mismatch")
    if len(ids) < 2:
        raise DataError(f"needs at least 2 responses, got {len(ids)}", source=source, field="response_ids",
                        reason="too_few_responses")
    # texts are optional next to ids (kept for reports); present ones are validated as usual
    prompt: Text = text_field(row, "prompt", source) if row.get("prompt") is not None else ""
    if fmt == "explicit":
        texts = [text_field(row, n, source) if row.get(n) is not None else "" for n in ("chosen", "rejected")]
    else:
        raw = row.get("responses")
        if raw is None:
            texts = [""] * len(ids)
        elif not isinstance(raw, list) or len(raw) != len(ids):
            raise DataError(f"must be a list of {len(ids)} responses, one per response_ids entry", source=source,
                            field="responses", reason="length_mismatch" if isinstance(raw, list) else "wrong_type")
        else:
            texts = [text_field(row, f"responses[{i}]", source, r) for i, r in enumerate(raw)]
    if order is not None:
        ids, ended, texts = [ids[i] for i in order], [ended[i] for i in order], [texts[i] for i in order]
    for i, a in enumerate(ids):
        if any(a == b for b in ids[i + 1:]):
            raise DataError("responses have identical token ids, nothing to prefer", source=source,
                            field=names[i] if fmt == "explicit" else "response_ids", reason="identical_responses")
    return PreferenceExample(prompt=prompt, responses=texts, source=source, prompt_ids=prompt_ids, response_ids=ids,
                             ended_with_eos=ended)


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
    return [responses[i] for i in _order(row, source, len(responses))]


def _order(row: dict, source: str, n: int) -> list[int]:
    """Indices best first from the row's ranks (1 = best) or scores (higher = better), validated."""
    key = "ranks" if "ranks" in row else "scores"
    values = _get(row, key, source)
    if not (isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in values)):
        raise DataError("must be a list of numbers", source=source, field=key, reason="wrong_type")
    if len(values) != n:
        raise DataError(f"has {len(values)} entries for {n} responses", source=source, field=key,
                        reason="length_mismatch")
    if len(set(values)) != len(values):
        raise DataError(f"has ties {values}; tied responses cannot be ranked", source=source, field=key,
                        reason="ties")
    return sorted(range(len(values)), key=lambda i: values[i], reverse=key == "scores")


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
    if ex.response_ids is not None:
        return (ex.prompt_ids, ex.response_ids)
    return (ex.prompt, ex.responses)


def load_preferences(path: Any, *, format: str = "auto", split: str | None = None, skip_bad: bool = False,
                     limit: int | None = None, vocab_size: int | None = None
                     ) -> tuple[list[PreferenceExample], LoadReport]:
    """Load a preference dataset (file, saved dataset dir, hub name, ``datasets.Dataset`` or list of dicts).

    The format is detected from the first readable row unless named. The whole input is validated (see
    ``data.validation``): without ``skip_bad`` any bad row raises DataValidationError (a DataError naming the
    first bad row, with the full report in its message); with it, bad rows are skipped and counted in the
    report. Duplicate pairs are kept and counted as warnings. ``limit`` caps loaded examples. ``vocab_size``
    (``len(tokenizer)``): token ids carried by exact-sample rows outside ``[0, vocab_size)`` are bad rows
    (``bad_token_id``).
    """
    detect, convert, key = preference_reader(format, vocab_size)
    return read_examples(path, detect, convert, format=format, split=split, skip_bad=skip_bad, limit=limit,
                         duplicate_key=key)


Reader = tuple[Callable[[dict, str], str], Callable[[dict, str, str], Any], Callable[[Any], Any]]
"""``(detect, convert, duplicate_key)``: what ``read_examples`` / ``iter_examples`` need to read one kind of data."""


def preference_reader(format: str = "auto", vocab_size: int | None = None,
                      end_ids: frozenset[int] | None = None) -> Reader:
    """The reader of preference data (``load_preferences``'s rules); ConfigError for an unknown format."""
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"unknown data format '{format}'; choose one of: auto, {', '.join(FORMATS)}")

    def convert(row: dict, source: str, fmt: str) -> PreferenceExample:
        return to_example(row, source, fmt, vocab_size=vocab_size, end_ids=end_ids)

    return detect_format, convert, _pair_key


def read_examples(path: Any, detect: Callable[[dict, str], str], convert: Callable[[dict, str, str], Any], *,
                  format: str = "auto", split: str | None = None, skip_bad: bool = False, limit: int | None = None,
                  duplicate_key: Callable[[Any], Any] | None = None) -> tuple[list[Any], LoadReport]:
    """Rows -> examples with ``convert(row, source, fmt)``; the format comes from ``detect`` on the first good
    row unless named. Every row is read and validated; bad rows are counted in ``report.validation``, and then
    without ``skip_bad`` the report is raised (DataValidationError), with it they are skipped.
    ``duplicate_key(example)``: examples with equal keys after the first are counted as ``duplicate`` (kept)."""
    report = new_report(path, format, skip_bad)
    examples = list(iter_examples(path, detect, convert, report, split=split, limit=limit,
                                  duplicate_key=duplicate_key))
    finish_report(report)
    return examples, report


def new_report(path: Any, format: str, skip_bad: bool) -> LoadReport:
    label = str(path) if isinstance(path, (str, os.PathLike)) else type(path).__name__
    report = LoadReport(source=label, format=None if format == "auto" else format)
    report.validation.skip_bad = skip_bad
    return report


def finish_report(report: LoadReport) -> None:
    """The end of a read: the counts must add up, and without skip_bad a bad row raises the whole report."""
    report.validation.check()
    report.validation.raise_if_bad()


def iter_examples(path: Any, detect: Callable[[dict, str], str], convert: Callable[[dict, str, str], Any],
                  report: LoadReport, *, split: str | None = None, limit: int | None = None,
                  duplicate_key: Callable[[Any], Any] | None = None) -> Iterator[Any]:
    """The examples of ``read_examples`` one at a time, counted in ``report`` as they go (rows read, kept, bad
    rows by kind); the caller ends with ``finish_report``. Only a digest per example is kept for duplicates."""
    check = report.validation
    seen: dict[bytes, str] = {}
    for row, source in iter_rows_lenient(path, split):
        if limit is not None and check.kept >= limit:
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
        check.kept += 1
        if duplicate_key is not None:
            digest = hashlib.blake2b(json.dumps(duplicate_key(example), sort_keys=True, ensure_ascii=False)
                                     .encode("utf-8", "surrogatepass"), digest_size=12).digest()
            if digest in seen:
                check.add("duplicate", source, seen[digest])
            else:
                seen[digest] = source
        yield example

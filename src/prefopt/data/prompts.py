"""Prompts for sampling (``prefopt generate``, PPO rollouts): read from a file, encoded as DPO encodes them.

Sampling and training must agree on the prompt tokens: a response sampled after other prompt ids than the
ones DPO later puts before it is scored in a context it was never drawn in. So there is one reader and one
encoder, and the encoder is ``data.tokenize.encode_prompt`` (BOS once, chat template with the generation
prompt for message lists), truncated as DPO truncates prompts (the end is kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError
from .formats import detect_format, read_examples, text_field, to_example
from .tokenize import SpecialTokens, encode_prompt
from .types import Text
from .validation import ValidationReport


def read_prompts(path: str | Path, split: str | None = None, *, unique: bool = False) -> list[Text]:
    """Prompts from a .txt file (one a line, blank lines skipped) or from rows; the first row says which kind:

    * rows with a ``prompt`` field (a string or a list of {role, content} messages), e.g. ``generate`` input;
    * SFT rows of ``messages``: everything before the last assistant message;
    * any preference format DPO reads: each row's prompt.

    ``unique``: keep a repeated prompt once (first-seen order), e.g. several pairs per prompt for PPO.
    """
    p = Path(path).expanduser()
    prompts: list[Text] = []
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise DataError("file not found", source=str(p), reason="not_found")
        data = p.read_bytes()
        try:
            prompts = [ln for ln in data.decode("utf-8-sig").splitlines() if ln.strip()]
        except UnicodeDecodeError:  # name every line that is not UTF-8, with the same report as other data
            report = ValidationReport(source=str(p))
            for lineno, raw in enumerate(data.split(b"\n"), start=1):
                try:
                    raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    report.rows += 1
                    report.add_error(DataError(f"is not valid UTF-8 (at column {e.start + 1})",
                                               source=f"{p}:{lineno}", reason="non_utf8"))
                else:
                    report.rows += bool(raw.strip())
            report.kept = report.rows - report.skipped
            report.check()
            report.raise_if_bad()
    else:
        # every row is validated first: a bad row stops with the full report (counts and file:line of each kind)
        prompts, _ = read_examples(path, _prompt_kind, _row_prompt, split=split)
    if unique:
        seen: set[str] = set()
        kept = []
        for pr in prompts:
            key = json.dumps(pr, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(pr)
        prompts = kept
    if not prompts:
        raise DataError("no prompts in file", source=str(path), reason="empty_file")
    return prompts


def _prompt_kind(row: dict, source: str) -> str:
    """The first row says which kind: "prompt", "messages", or the preference format of its rows."""
    return "prompt" if "prompt" in row else "messages" if "messages" in row else detect_format(row, source)


def _row_prompt(row: dict, source: str, kind: str) -> Text:
    if kind == "prompt":
        return text_field(row, "prompt", source)
    if kind == "messages":
        return _messages_prompt(row, source)
    return to_example(row, source, kind).prompt


def _messages_prompt(row: dict, source: str) -> list:
    msgs = text_field(row, "messages", source)
    if not isinstance(msgs, list):
        raise DataError("must be a list of {role, content} messages", source=source, field="messages",
                        reason="wrong_type")
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    if last == 0:
        raise DataError("has no message before the first assistant message", source=source, field="messages",
                        reason="missing_field")
    return msgs[:last]


def encode_prompts(prompts: Sequence[Text], tokenizer: Any, max_prompt_length: int | None = None
                   ) -> list[list[int]]:
    """Prompt token ids exactly as DPO's tokenizer makes them (BOS once, chat template for messages); with
    ``max_prompt_length``, cut to its last tokens (BOS kept), as DPO truncates prompts."""
    sp = SpecialTokens.of(tokenizer)
    out = []
    for pr in prompts:
        ids = encode_prompt(pr, tokenizer, sp)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            keep = 1 if sp.bos_id is not None and ids[:1] == [sp.bos_id] else 0
            ids = ids[:keep] + ids[len(ids) - max_prompt_length + keep:]
        out.append(ids)
    return out


__all__ = ["read_prompts", "encode_prompts"]

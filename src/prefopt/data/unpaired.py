"""Unpaired feedback (thumbs up / thumbs down): rows -> UnpairedExample -> TokenizedExample -> KTO batches.

Formats:

* ``unpaired``: ``{prompt, completion, label}`` with ``label`` a JSON boolean (true: desirable). Prompt and
  completion are strings, or message lists (rendered with the chat template, as preference data is).
* any preference format (``explicit``, ``conversational``, ``implicit``, ``ranked``): every row gives two
  examples, its chosen response labelled true and its rejected one false (for ranked rows: the best and the worst
  response). This is how KTO is compared with DPO on the same data.

Tokenization is the preference data's (``data.tokenize``): prompt and completion separately, BOS as the tokenizer
adds it, EOS once at the end of the completion, the same truncation rules; the label rides in
``TokenizedExample.meta["label"]``.

The batches (``collate_kto``) carry, beside the B labelled (prompt, completion) rows, B mismatched rows for KTO's
KL estimate, as in the paper: row j pairs prompt j with completion j-1 of the same batch (cyclically; completion
B-1 for prompt 0), so the KL is estimated from completions the policy did not condition on. A KL row may be longer
than max_length by the difference of two prompts' lengths (nothing is cut from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import ConfigError, DataError
from .collate import collate_preferences
from .formats import FORMATS as PREFERENCE_FORMATS
from .formats import LoadReport, Reader, detect_format, preference_reader, read_examples, text_field
from .tokenize import SpecialTokens, TokenizeReport, tokenize_all, tokenize_example
from .types import PreferenceExample, Text, TokenizedExample

UNPAIRED_FORMATS = ("unpaired",)
LABEL_KEY = "label"


@dataclass
class UnpairedExample:
    """One completion of one prompt with its binary label (``True``: desirable)."""

    prompt: Text
    completion: Text
    label: bool
    source: str = "<memory>"


def detect_unpaired_format(row: dict, source: str | None = None) -> str:
    """``unpaired`` for {prompt, completion, label} rows, else the preference format of the row (or DataError)."""
    if LABEL_KEY in row and "completion" in row and "prompt" in row:
        return "unpaired"
    if LABEL_KEY in row:
        missing = [k for k in ("prompt", "completion") if k not in row]
        raise DataError(f"has a label but no {' or '.join(missing)}; unpaired rows are {{prompt, completion, label}}",
                        source=source, reason="missing_field")
    try:
        return detect_format(row, source)
    except DataError as e:
        raise DataError(f"cannot detect the format from keys {sorted(row)}; expected {{prompt, completion, label}} "
                        "(unpaired feedback) or preference pairs (chosen/rejected)", source=source,
                        reason="unknown_format") from e


def to_unpaired(row: dict, source: str, fmt: str) -> tuple[UnpairedExample, ...]:
    """One row of format ``fmt`` -> its examples (one for an unpaired row, two for a pair); raises DataError."""
    if fmt == "unpaired":
        for k in ("prompt", "completion", LABEL_KEY):
            if k not in row:
                raise DataError("is missing; unpaired rows are {prompt, completion, label}", source=source,
                                field=k, reason="missing_field")
        prompt, completion = text_field(row, "prompt", source), text_field(row, "completion", source)
        if isinstance(prompt, str) != isinstance(completion, str):
            raise DataError("and prompt must both be strings or both message lists", source=source,
                            field="completion", reason="wrong_type")
        label = row[LABEL_KEY]
        if not isinstance(label, bool):
            raise DataError(f"must be true or false (desirable or not), got {label!r}", source=source,
                            field=LABEL_KEY, reason="wrong_type")
        return (UnpairedExample(prompt, completion, label, source),)
    _, convert, _ = preference_reader(fmt)
    ex = convert(row, source, fmt)
    return (UnpairedExample(ex.prompt, ex.chosen, True, f"{source} (chosen)"),
            UnpairedExample(ex.prompt, ex.rejected, False, f"{source} (rejected)"))


def unpaired_reader(format: str = "auto") -> Reader:
    """The reader of unpaired data (``load_unpaired``'s rules); ConfigError for an unknown format."""
    if format != "auto" and format not in UNPAIRED_FORMATS + PREFERENCE_FORMATS:
        raise ConfigError(f"unknown data format '{format}' for unpaired feedback; choose one of: auto, "
                          f"{', '.join(UNPAIRED_FORMATS + PREFERENCE_FORMATS)} (a preference format gives each "
                          "chosen response label true and each rejected one false)")
    return detect_unpaired_format, to_unpaired, lambda exs: [(e.prompt, e.completion, e.label) for e in exs]


def load_unpaired(path: Any, *, format: str = "auto", split: str | None = None, skip_bad: bool = False,
                  limit: int | None = None) -> tuple[list[UnpairedExample], LoadReport]:
    """Load labelled completions (file, saved dataset dir, hub name, ``datasets.Dataset`` or list of dicts).

    Errors, ``skip_bad`` and the validation report behave as in ``load_preferences``; ``limit`` counts rows.
    """
    detect, convert, key = unpaired_reader(format)
    groups, report = read_examples(path, detect, convert, format=format, split=split, skip_bad=skip_bad,
                                   limit=limit, duplicate_key=key)
    return [ex for group in groups for ex in group], report


def tokenize_labelled(ex: UnpairedExample, tokenizer: Any, specials: SpecialTokens, max_length: int | None,
                      max_prompt_length: int | None) -> TokenizedExample | None:
    """One labelled completion (one response; ``meta["label"]``), or None when it cannot fit."""
    tok = tokenize_example(PreferenceExample(ex.prompt, [ex.completion], ex.source), tokenizer,
                           max_length=max_length, max_prompt_length=max_prompt_length, specials=specials)
    if tok is not None:
        tok.meta["label"] = ex.label
    return tok


def tokenize_unpaired(examples: Sequence[UnpairedExample], tokenizer: Any, *, max_length: int | None = None,
                      max_prompt_length: int | None = None) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize labelled completions (one response each; ``meta["label"]``); rows that cannot fit are dropped."""
    sp = SpecialTokens.of(tokenizer)
    return tokenize_all(examples, lambda ex: tokenize_labelled(ex, tokenizer, sp, max_length, max_prompt_length))


KL_PREFIX = "kl_"


def collate_kto(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, Any]:
    """B labelled rows (``input_ids``, ``attention_mask``, ``loss_mask``, ... as ``collate_preferences`` makes
    them with K = 1), ``labels`` [B] (bool), and the B mismatched KL rows under the same keys prefixed ``kl_``
    (row j: prompt j + completion (j-1) mod B). ``kl_batch(batch)`` gives the KL rows as a batch of their own."""
    items = list(batch)
    if not items:
        raise ValueError("cannot collate an empty batch")
    if any(ex.num_responses != 1 or "label" not in ex.meta for ex in items):
        raise ValueError("KTO batches are made of labelled single completions (data.unpaired.tokenize_unpaired)")
    out = collate_preferences(items, pad_token_id)
    shifted = [TokenizedExample(ex.prompt_ids, [items[j - 1].response_ids[0]], source=ex.source)
               for j, ex in enumerate(items)]
    kl = collate_preferences(shifted, pad_token_id)
    out.update({KL_PREFIX + k: v for k, v in kl.items()})
    out["labels"] = torch.tensor([bool(ex.meta["label"]) for ex in items], dtype=torch.bool)
    return out


def kl_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The KL rows of a ``collate_kto`` batch as a plain batch (``input_ids``, ``attention_mask``, ...)."""
    return {k[len(KL_PREFIX):]: v for k, v in batch.items() if k.startswith(KL_PREFIX)}


def main_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The labelled rows of a ``collate_kto`` batch as a plain batch (without the KL rows and labels)."""
    return {k: v for k, v in batch.items() if not k.startswith(KL_PREFIX) and k != "labels"}


__all__ = ["UnpairedExample", "UNPAIRED_FORMATS", "detect_unpaired_format", "to_unpaired", "unpaired_reader",
           "load_unpaired", "tokenize_unpaired", "collate_kto", "kl_batch", "main_batch"]

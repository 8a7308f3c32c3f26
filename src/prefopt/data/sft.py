"""Supervised fine-tuning data: rows -> SFTExample -> TokenizedExample with one response (K = 1).

Formats (detected from the first row, or named with ``format``):

* ``explicit``: ``{prompt, response}`` or ``{prompt, completion}``; strings, or message lists (a string
  response after a message-list prompt is the assistant reply). Loss on the response tokens only.
* ``conversational``: ``{messages: [...]}``, rendered with the tokenizer's chat template. Every assistant turn is
  trained (its content and the end-of-turn EOS); system/user turns and the template's role headers are context.
  With one assistant turn the split is exactly the one ``data.tokenize`` makes for preference data.
* ``text``: ``{text}``; the loss covers every token (there is no prompt).

With ``from_preferences`` any preference file ``load_preferences`` reads is accepted and the CHOSEN response of
each example is the SFT target (the DPO paper's recipe for pi_ref when no SFT model exists).

Tokenization reuses ``data.tokenize``: prompt and response are tokenized separately (exact boundary), BOS is
prepended as the tokenizer would, EOS ends the response once, and truncation follows the same rules. A
multi-turn conversation is tokenized segment by segment; which of its response tokens carry loss is kept in
``TokenizedExample.meta["loss_mask"]`` and applied by ``collate_sft``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import ConfigError, DataError
from .collate import collate_preferences
from .formats import FORMATS as PREFERENCE_FORMATS
from .formats import LoadReport, Reader, preference_reader, read_examples, text_field
from .tokenize import SpecialTokens, TokenizeReport, encode_response, tokenize_all, tokenize_example
from .types import Message, PreferenceExample, Text, TokenizedExample

SFT_FORMATS = ("explicit", "conversational", "text")
RESPONSE_KEYS = ("response", "completion")


@dataclass
class SFTExample:
    """One training target: ``response`` after ``prompt`` ("" for plain text).

    ``conversation`` is set for multi-turn data (more than one assistant turn): the whole conversation up to
    its last assistant turn, every assistant turn of which is trained. ``prompt``/``response`` then hold the
    split at the last assistant turn (what a single-turn reader would see).

    ``prompt_ids``/``response_ids``: the exact token ids of a chosen response read from an exact-sample pair
    (``from_preferences`` on what ``prefopt label`` writes); they are trained as they are, like DPO does.
    """

    prompt: Text
    response: Text
    source: str = "<memory>"
    conversation: list[Message] | None = None
    prompt_ids: list[int] | None = None
    response_ids: list[int] | None = None


# ---------------------------------------------------------------------------------------------------------
# Rows -> SFTExamples


def detect_sft_format(row: dict, source: str | None = None) -> str:
    """Name the SFT format of one raw row, or raise DataError."""
    if "messages" in row:
        return "conversational"
    if "prompt" in row and any(k in row for k in RESPONSE_KEYS):
        return "explicit"
    if "text" in row:
        return "text"
    if "chosen" in row or ("responses" in row and ("ranks" in row or "scores" in row)):
        raise DataError("looks like preference data; to train on its chosen responses use --from-preferences",
                        source=source, reason="unknown_format")
    raise DataError(f"cannot detect the SFT format from keys {sorted(row)}; expected prompt/response, "
                    "prompt/completion, messages, or text", source=source, reason="unknown_format")


def to_sft_example(row: dict, source: str, fmt: str) -> SFTExample:
    """Validate one raw row of SFT format ``fmt`` (raises DataError)."""
    if fmt == "explicit":
        key = next((k for k in RESPONSE_KEYS if k in row), RESPONSE_KEYS[0])
        prompt, response = text_field(row, "prompt", source), text_field(row, key, source)
        if isinstance(prompt, str) and isinstance(response, list):
            raise DataError("is a message list but the prompt is plain text; use messages for both",
                            source=source, field=key, reason="wrong_type")
        return SFTExample(prompt, response, source)
    if fmt == "conversational":
        return _conversation(row, source)
    if fmt == "text":
        text = text_field(row, "text", source)
        if not isinstance(text, str):
            raise DataError("must be a string (use 'messages' for conversations)", source=source, field="text",
                            reason="wrong_type")
        return SFTExample("", text, source)
    raise ConfigError(f"unknown SFT data format '{fmt}'; choose one of: auto, {', '.join(SFT_FORMATS)}")


def _conversation(row: dict, source: str) -> SFTExample:
    messages = text_field(row, "messages", source)
    if not isinstance(messages, list):
        raise DataError("must be a list of {role, content} messages", source=source, field="messages",
                        reason="wrong_type")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError("has no assistant message to train on", source=source, field="messages",
                        reason="missing_field")
    if turns[0] == 0:
        raise DataError("starts with an assistant message; the first assistant turn needs a prompt before it",
                        source=source, field="messages", reason="missing_field")
    last = turns[-1]
    return SFTExample(messages[:last], messages[last:last + 1], source,
                      conversation=messages[:last + 1] if len(turns) > 1 else None)


def load_sft(path: Any, *, format: str = "auto", split: str | None = None, skip_bad: bool = False,
             limit: int | None = None, from_preferences: bool = False) -> tuple[list[SFTExample], LoadReport]:
    """Load SFT examples (file, saved dataset dir, hub name, ``datasets.Dataset`` or list of dicts).

    ``from_preferences``: read preference data (``format`` is then a preference format) and keep the chosen
    responses. Errors, ``skip_bad`` and the validation report (``report.validation``; a duplicate is an example
    with the same prompt and target as an earlier one) behave as in ``load_preferences``.
    """
    detect, convert, key = sft_reader(format, from_preferences)
    return read_examples(path, detect, convert, format=format, split=split, skip_bad=skip_bad, limit=limit,
                         duplicate_key=key)


def sft_reader(format: str = "auto", from_preferences: bool = False, vocab_size: int | None = None,
               end_ids: frozenset[int] | None = None) -> Reader:
    """The reader of SFT data (``load_sft``'s rules): SFT rows, or the chosen responses of preference rows
    (exact-sample ids checked against ``vocab_size`` and ``end_ids`` as ``preference_reader`` does)."""
    if from_preferences:
        detect, to_pref, pair_key = preference_reader(format, vocab_size, end_ids)

        def chosen(row: dict, source: str, fmt: str) -> SFTExample:
            ex = to_pref(row, source, fmt)
            if ex.response_ids is not None:  # an exact sample: its chosen ids, not a re-tokenization of its text
                return SFTExample(ex.prompt, ex.chosen, ex.source, prompt_ids=ex.prompt_ids,
                                  response_ids=ex.response_ids[0])
            return SFTExample(ex.prompt, ex.chosen, ex.source)

        def key(ex: SFTExample) -> Any:
            if ex.response_ids is not None:
                return (ex.prompt_ids, ex.response_ids)
            return pair_key(PreferenceExample(ex.prompt, [ex.response]))

        return detect, chosen, key
    if format != "auto" and format not in SFT_FORMATS:
        hint = " (a preference format: add --from-preferences)" if format in PREFERENCE_FORMATS else ""
        raise ConfigError(f"unknown SFT data format '{format}'{hint}; choose one of: auto, {', '.join(SFT_FORMATS)}")
    return detect_sft_format, to_sft_example, lambda ex: (ex.prompt, ex.response, ex.conversation)


# ---------------------------------------------------------------------------------------------------------
# SFTExamples -> TokenizedExamples


def _chat_segments(messages: list[Message], tokenizer: Any, source: str) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces: context before each assistant turn, the turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("conversational data needs a tokenizer with a chat_template", source=source,
                        reason="no_chat_template")

    def render(msgs: list[Message], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[:i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError("the chat template is not prefix-stable: a rendered conversation does not start with "
                            "the rendering of its earlier turns, so the turn boundaries are ambiguous",
                            source=source, reason="chat_template")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def _tokenize_turns(ex: SFTExample, tokenizer: Any, sp: SpecialTokens, max_length: int | None,
                    max_prompt_length: int | None) -> TokenizedExample | None:
    """A multi-turn conversation: prompt = context before the first assistant turn, response = the rest."""
    assert ex.conversation is not None
    segments = _chat_segments(ex.conversation, tokenizer, ex.source)
    prompt: list[int] = []
    response: list[int] = []
    mask: list[bool] = []
    carry = ""
    for k, (text, trained) in enumerate(segments):
        text, carry = carry + text, ""
        if trained and k == len(segments) - 1:
            ids = encode_response(text, tokenizer, sp)  # the last turn: exactly as data.tokenize does it
        else:
            if trained and text.rstrip().endswith(sp.eos):  # the turn ends at its EOS; what follows is context
                text, carry = text.rstrip(), text[len(text.rstrip()):]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if k == 0:
            head = [] if sp.bos_id is None or ids[:1] == [sp.bos_id] else [sp.bos_id]
            prompt = head + ids
        else:
            response += ids
            mask += [trained] * len(ids)

    keep = 1 if sp.bos_id is not None and prompt[:1] == [sp.bos_id] else 0
    truncated = False
    too_long = max_length is not None and len(prompt) + len(response) > max_length
    if max_prompt_length is not None and len(prompt) > max_prompt_length and (too_long or max_length is None):
        prompt = prompt[:keep] + prompt[len(prompt) - max_prompt_length + keep:]
        truncated = True
    if max_length is not None and len(prompt) + len(response) > max_length:
        room = max_length - len(prompt)
        if room <= 0:
            return None
        response, mask = response[:room], mask[:room]
        truncated = True
    if not any(mask):
        return None
    return TokenizedExample(prompt, [response], source=ex.source, meta={"truncated": truncated, "loss_mask": mask})


def tokenize_sft_example(ex: SFTExample, tokenizer: Any, *, max_length: int | None = None,
                         max_prompt_length: int | None = None) -> TokenizedExample | None:
    """Tokenize one SFT example (K = 1); None when it cannot fit in ``max_length``."""
    return _tokenize_sft(ex, tokenizer, SpecialTokens.of(tokenizer), max_length, max_prompt_length)


def _tokenize_sft(ex: SFTExample, tokenizer: Any, sp: SpecialTokens, max_length: int | None,
                  max_prompt_length: int | None) -> TokenizedExample | None:
    if ex.conversation is not None:
        return _tokenize_turns(ex, tokenizer, sp, max_length, max_prompt_length)
    exact = ex.response_ids is not None
    return tokenize_example(PreferenceExample(ex.prompt, [ex.response], ex.source,
                                              prompt_ids=ex.prompt_ids if exact else None,
                                              response_ids=[ex.response_ids] if exact else None), tokenizer,
                            max_length=max_length, max_prompt_length=max_prompt_length, specials=sp)


def tokenize_sft(examples: Sequence[SFTExample], tokenizer: Any, *, max_length: int | None = None,
                 max_prompt_length: int | None = None) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize many SFT examples; rows that cannot fit are dropped and counted in the report."""
    sp = SpecialTokens.of(tokenizer)
    return tokenize_all(examples, lambda ex: _tokenize_sft(ex, tokenizer, sp, max_length, max_prompt_length))


def collate_sft(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor | int]:
    """``collate_preferences`` with K = 1, plus the per-token loss masks of multi-turn examples."""
    out = collate_preferences(list(batch), pad_token_id)
    if out["num_responses"] != 1:
        raise ValueError(f"SFT examples have one response each, got {out['num_responses']}")
    loss_mask = out["loss_mask"]
    for j, ex in enumerate(batch):
        mask = ex.meta.get("loss_mask")
        if mask is not None:
            start = len(ex.prompt_ids)
            loss_mask[j, start:start + len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return out


__all__ = ["SFTExample", "SFT_FORMATS", "detect_sft_format", "to_sft_example", "load_sft", "tokenize_sft",
           "tokenize_sft_example", "collate_sft"]

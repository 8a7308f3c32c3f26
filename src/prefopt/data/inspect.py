"""``prefopt data inspect``: one data row as the model sees it.

Prints the rendered text (the prompt, then each response, chat templates applied), then every token of
``prompt + response k`` -- index, id, token, which part it belongs to, and [BOS] / [EOS] / [end of turn] /
[special] marks -- with the prompt/response boundary drawn, then what truncation cut and by which limit. The row is
tokenized by the same code as training (``data.tokenize``, ``data.sft``); only the tokenizer is loaded.

    text = inspect_row(InspectConfig(model="out/tiny", data="pairs.jsonl", row=3, max_length=64))
    text = inspect_example(PreferenceExample("Hi", [" a", " b"]), tokenizer)
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import DataError
from .formats import detect_format, to_example
from .load import iter_rows_lenient
from .tokenize import SpecialTokens, _render_chat, split_end_of_turn, tokenize_example
from .types import PreferenceExample, TokenizedExample

RULE = "─" * 100
TEXT_PREVIEW = 160  # characters of cut text shown in the truncation lines


def inspect_row(cfg: Any) -> str:
    """The report of row ``cfg.row`` of ``cfg.data`` (an ``InspectConfig``) with ``cfg.model``'s tokenizer."""
    from ..models import load_tokenizer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    notes = [str(w.message) for w in caught if "pad token" in str(w.message)]
    row, source, fmt = read_row(cfg.data, cfg.row, sft=cfg.sft, format=cfg.data_format, split=cfg.split)
    if cfg.sft:
        from .sft import to_sft_example

        example: Any = to_sft_example(row, source, fmt)
        kind = f"{fmt} SFT row"
    else:
        example = to_example(row, source, fmt)
        kind = f"{fmt} preference row, {len(example.responses)} responses"
    title = f"row {cfg.row} of {cfg.data} ({source}): {kind}; tokenizer {cfg.model}"
    return inspect_example(example, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                           title=title, notes=notes)


def run_inspect(cfg: Any) -> None:
    """The ``prefopt data inspect`` runner: print ``inspect_row(cfg)``."""
    print(inspect_row(cfg))


def read_row(path: Any, index: int, *, sft: bool = False, format: str = "auto", split: str | None = None
             ) -> tuple[dict, str, str]:
    """``(row, source, format)`` of data row ``index`` (from 0); the format is named or, as in training, detected
    from the first row. A row past the end is a DataError naming the file and the row."""
    if sft:
        from .sft import detect_sft_format as detect
    else:
        detect = detect_format
    fmt = None if format == "auto" else format
    count = 0
    for row, source in iter_rows_lenient(path, split):
        if fmt is None and not isinstance(row, DataError):
            fmt = detect(row, source)
        if count == index:
            if isinstance(row, DataError):
                raise row
            return row, source, fmt or detect(row, source)
        count += 1
    rows = f"{count} row{'s' if count != 1 else ''}" + (f" (rows 0 to {count - 1})" if count > 1 else "")
    raise DataError(f"row {index} is past the end: the data has {rows}; --row counts from 0", source=str(path),
                    field="row", reason="row_out_of_range")


# ---------------------------------------------------------------------------------------------------------
# The report


def inspect_example(example: Any, tokenizer: Any, *, max_length: int | None = None,
                    max_prompt_length: int | None = None, title: str = "", notes: list[str] | None = None) -> str:
    """The report of one ``PreferenceExample`` or ``data.sft.SFTExample`` (see the module doc)."""
    from .sft import SFTExample, tokenize_sft_example

    sp = SpecialTokens.of(tokenizer)
    if isinstance(example, SFTExample):
        labels = ["response (SFT target)"]
        pref = PreferenceExample(example.prompt, [example.response], example.source)
        prompt_text, response_texts = _texts(pref, tokenizer, conversation=example.conversation)

        def tokenize(**limits: Any) -> TokenizedExample | None:
            return tokenize_sft_example(example, tokenizer, **limits)
    else:
        k = len(example.responses)
        labels = (["response 0 (chosen)", "response 1 (rejected)"] if k == 2 else
                  [f"response {i} (rank {i + 1})" for i in range(k)])
        prompt_text, response_texts = _texts(example, tokenizer)

        def tokenize(**limits: Any) -> TokenizedExample | None:
            return tokenize_example(example, tokenizer, specials=sp, **limits)

    full = tokenize()
    if full is None:  # without limits only a row with nothing to train on
        raise DataError("has no token to train on", source=example.source, reason="empty_field")
    limited = max_length is not None or max_prompt_length is not None
    cut = tokenize(max_length=max_length, max_prompt_length=max_prompt_length) if limited else full

    out = [title] if title else []
    out += _header(tokenizer, sp, notes or [], max_length, max_prompt_length)
    out += [RULE, "TEXT (what is tokenized; chat templates applied)" if _is_chat(example) else "TEXT", RULE]
    out += _text_block("prompt", prompt_text)
    for label, text in zip(labels, response_texts):
        _, dropped = split_end_of_turn(text, sp)
        out += _text_block(label, text)
        if dropped is not None:
            out.append(f"    ends at its end-of-turn token; {repr(dropped)} after it is not part of the response"
                       if dropped else "    ends with an end-of-turn token: no EOS is appended")
    shown = cut if cut is not None else full
    out += [RULE, "TOKENS (index = position in prompt + response; loss on response tokens)"
            + ("" if cut is not None else " -- before truncation: the row is DROPPED, see below"), RULE]
    out.append(f"{'index':>6} {'id':>7}  {'token':<24} {'part':<24} marks")
    out += _token_lines(shown.prompt_ids, 0, "prompt", tokenizer, sp, prompt_text=prompt_text)
    for k, (label, ids) in enumerate(zip(labels, shown.response_ids)):
        mask = shown.meta.get("loss_mask")
        out.append(f"{'-' * 12} prompt | {label}: {_n(len(ids))}, from index {len(shown.prompt_ids)} "
                   f"{'-' * 12}")
        out += _token_lines(ids, len(shown.prompt_ids), label.split(" (")[0], tokenizer, sp, mask=mask,
                            ended=split_end_of_turn(response_texts[k], sp)[1] is not None)
    out += [RULE, "TRUNCATION", RULE]
    out += _truncation(full, cut, labels, tokenizer, max_length, max_prompt_length)
    return "\n".join(out)


def _is_chat(example: Any) -> bool:
    return isinstance(example.prompt, list)


def _texts(ex: PreferenceExample, tokenizer: Any, conversation: list | None = None) -> tuple[str, list[str]]:
    """The prompt and response texts exactly as tokenized (chat templates rendered)."""
    if conversation is not None:  # multi-turn SFT: context before the first assistant turn, then the rest
        from .sft import _chat_segments

        segments = _chat_segments(conversation, tokenizer, ex.source)
        return segments[0][0], ["".join(text for text, _ in segments[1:])]
    if isinstance(ex.prompt, list):
        return _render_chat(ex, tokenizer)
    return ex.prompt, [r for r in ex.responses if isinstance(r, str)]


def _token_name(tokenizer: Any, token_id: int | None) -> str:
    return "none" if token_id is None else f"{tokenizer.convert_ids_to_tokens(token_id)!r} (id {token_id})"


def _header(tokenizer: Any, sp: SpecialTokens, notes: list[str], max_length: int | None,
            max_prompt_length: int | None) -> list[str]:
    bos = tokenizer.bos_token_id
    bos_text = ("none" if bos is None else _token_name(tokenizer, bos)
                + (", the tokenizer adds it: prefopt puts it once at the start of the prompt" if sp.bos_id is not None
                   else ", not added by the tokenizer (only where the text or chat template writes it)"))
    pad = tokenizer.pad_token_id
    pad_text = _token_name(tokenizer, pad) + (" = EOS; padding is marked by the loss mask, not by this id, so a "
                                              "response's EOS is still scored" if pad == sp.eos_id else "")
    ends = [e for e in sp.ends if e != sp.eos]
    lines = [f"BOS: {bos_text}", f"EOS: {_token_name(tokenizer, sp.eos_id)}", f"pad: {pad_text}"]
    if ends:
        lines.append("a response whose text ends with one of these special tokens ends there and gets no EOS: "
                     + ", ".join(map(repr, ends)))
    lines += [f"note: {n}" for n in notes]
    limits = [f"{name}={value}" for name, value in (("max_length", max_length), ("max_prompt_length",
                                                                                  max_prompt_length)) if value]
    lines.append("limits: " + (", ".join(limits) if limits else "none given (training defaults to the model's "
                                                                  "context size capped at 1024, and half of it for "
                                                                  "the prompt: pass --max-length to see its cuts)"))
    return lines


def _text_block(label: str, text: str) -> list[str]:
    return [f"[{label}] {len(text)} characters:"] + [f"  |{line}" for line in text.split("\n")]


def _token_lines(ids: list[int], start: int, part: str, tokenizer: Any, sp: SpecialTokens, *,
                 prompt_text: str | None = None, mask: list[bool] | None = None, ended: bool = True) -> list[str]:
    """One line per token. ``prompt_text`` is given for the prompt (to tell a BOS prefopt added from one in the
    text); for a response, ``ended`` says whether its text ended with an end token (else EOS was appended)."""
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    specials |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                 if getattr(t, "special", False)}
    end_ids = {tokenizer.convert_tokens_to_ids(e) for e in sp.ends}
    is_prompt = prompt_text is not None
    bos_added = (is_prompt and sp.bos_id is not None and ids[:1] == [sp.bos_id]
                 and tokenizer(prompt_text, add_special_tokens=False)["input_ids"][:1] != [sp.bos_id])
    lines = []
    for j, token_id in enumerate(ids):
        at_end = not is_prompt and j == len(ids) - 1
        if token_id == tokenizer.bos_token_id and token_id != sp.eos_id:
            marks = ["[BOS, added]" if bos_added and j == 0 else "[BOS]"]
        elif token_id == sp.eos_id:
            marks = ["[EOS, appended]" if at_end and not ended else "[EOS]"]
        elif token_id in end_ids and at_end:
            marks = ["[end of turn]"]
        elif token_id in specials:
            marks = ["[special]"]
        else:
            marks = []
        if mask is not None and not mask[j]:
            marks.append("[context: no loss]")
        piece = tokenizer.convert_ids_to_tokens(token_id)
        text = tokenizer.decode([token_id])
        readable = token_id in specials or "▁" in piece or text == piece  # else show the text (byte-level BPE)
        shown = repr(piece) + ("" if readable else f" {text!r}")
        lines.append(f"{start + j:>6} {token_id:>7}  {shown:<24} {part:<24} {' '.join(marks)}".rstrip())
    return lines


def _n(count: int) -> str:
    return f"{count} token{'' if count == 1 else 's'}"


def _preview(tokenizer: Any, ids: list[int]) -> str:
    text = tokenizer.decode(ids)
    return repr(text if len(text) <= TEXT_PREVIEW else text[:TEXT_PREVIEW // 2] + " ... " + text[-TEXT_PREVIEW // 2:])


def _truncation(full: TokenizedExample, cut: TokenizedExample | None, labels: list[str], tokenizer: Any,
                max_length: int | None, max_prompt_length: int | None) -> list[str]:
    p = len(full.prompt_ids)
    longest = max(len(r) for r in full.response_ids)
    if max_length is None and max_prompt_length is None:
        return [f"none: no limits given (prompt {p} + longest response {longest} = {p + longest} tokens)"]
    if cut is None:
        too_long = max_length is not None and p + longest > max_length
        kept = max_prompt_length if (max_prompt_length is not None and p > max_prompt_length
                                     and (too_long or max_length is None)) else p
        if max_length is not None and kept >= max_length:
            how = f"cut to max_prompt_length={max_prompt_length}: {kept} tokens" if kept != p else f"{p} tokens"
            return [f"DROPPED: the prompt ({how}) leaves no room for a response within max_length={max_length}"]
        return [f"DROPPED: cut to max_length={max_length} (prompt {kept} + {max_length - kept} response tokens) the "
                "responses become identical, so there is nothing to prefer"]
    lines = []
    if len(cut.prompt_ids) < p:
        keep = 1 if cut.prompt_ids[:1] == full.prompt_ids[:1] == [tokenizer.bos_token_id] else 0
        removed = full.prompt_ids[keep:p - len(cut.prompt_ids) + keep]
        lines.append(f"prompt: cut from {p} to {_n(len(cut.prompt_ids))} by max_prompt_length={max_prompt_length}"
                     f" (prompt + longest response {p + longest} > max_length={max_length}): its start is removed"
                     + (" after BOS" if keep else "") + f", {_n(len(removed))}: {_preview(tokenizer, removed)}")
    for label, before, after in zip(labels, full.response_ids, cut.response_ids):
        if len(after) < len(before):
            lost = before[len(after):]
            lines.append(f"{label}: cut from {len(before)} to {_n(len(after))} by max_length={max_length} "
                         f"(prompt {len(cut.prompt_ids)} + {len(after)}): lost its last {_n(len(lost))}, "
                         f"including its end token: {_preview(tokenizer, lost)}")
    if not lines:
        total = p + longest
        lines.append(f"none: prompt {p} + longest response {longest} = {total} tokens"
                     + (f" <= max_length={max_length}" if max_length else "")
                     + (f"; prompt <= max_prompt_length={max_prompt_length}" if max_prompt_length
                        and p <= max_prompt_length else ""))
    return lines


__all__ = ["inspect_row", "inspect_example", "read_row", "run_inspect"]

"""Tokenize PreferenceExamples with an exact prompt/response boundary.

The rules (``prefopt data inspect`` shows them at work on one row):

* **Boundary.** The prompt is tokenized on its own (``add_special_tokens=False``). A response is tokenized as the
  *continuation* of its prompt: its ids are the ids of ``prompt_text + response_text`` after the prompt's ids, so
  the concatenation is exactly what the tokenizer gives the whole text. Where the tokenizer would merge tokens
  across the join (the joint ids do not start with the prompt's ids), the response is tokenized apart from the
  prompt, still as continuing text (after an anchor, see ``encode_continuation``): no id ever moves between prompt
  and response. So a SentencePiece tokenizer's start-of-text "▁" (Metaspace ``prepend_scheme`` "first" or
  "always", or a ``Prepend("▁")`` normalizer) is never added to a response: " world" after "Hello" is
  ``▁world`` (one "▁", from its space, never ``▁``, ``▁world``), "world" after "[/INST]" or after "assistant\\n" is
  ``world`` (no "▁" the text does not have), and a response that starts with a space never loses it.
* **BOS once.** BOS is prepended to the prompt when the tokenizer normally adds one (its post-processor does),
  unless the prompt's ids already start with it (a chat template that writes ``bos_token`` into the text).
  Responses never contain a BOS that prefopt or the tokenizer added.
* **End of the response, once.** A response ends with exactly one end token. If the response text ends with a
  special token of the tokenizer other than BOS, pad and unk (a chat template's end of turn: ``<|im_end|>``,
  ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``, or EOS written in plain text) followed only by
  whitespace and further special tokens, the response ends at the first of them: what follows (the template's
  newline before the next turn, an end-of-conversation EOS as in Phi-3's template) is dropped and no EOS is
  appended, even when the tokenizer's ``eos_token`` is another token -- the end of turn is what a chat model
  emits to stop (sampling stops at ``eos_token`` and at every id in the model's
  ``generation_config.eos_token_id``; a model that does not stop there needs its ``eos_token`` set to the
  end-of-turn token). Otherwise the tokenizer's EOS id is appended. A response cut by ``max_length`` loses its
  end token.
* **Message lists.** A message-list prompt is rendered with ``add_generation_prompt=True``, so the prompt ids
  end with the generation prompt (e.g. ``<|im_start|>assistant\\n``); each response's text is the rendering of
  prompt + response minus the prompt's rendering (the template must be prefix-stable), i.e. the assistant
  content and the template's end of turn.
* **Exact samples.** An example that carries token ids (``PreferenceExample.prompt_ids`` / ``response_ids``, from
  ``prefopt generate`` -> ``prefopt label``) is not tokenized: its ids are used as they are. The prompt ids came
  from ``encode_prompt`` (BOS already there once); each response's ids are what was sampled, ending with the end
  token when the sample ended with it and without one when it was cut at ``max_new_tokens`` (no EOS is
  appended). Truncation is the same.
* **Truncation**: see ``tokenize_example``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from .types import Message, PreferenceExample, Text, TokenizedExample

PROGRESS_MIN = 2000


@dataclass
class SpecialTokens:
    bos_id: int | None  # set only when the tokenizer normally adds BOS
    eos_id: int
    eos: str
    turn_ends: tuple[str, ...] = ()
    """Special tokens that can end a response (EOS and the tokenizer's other special tokens except BOS, pad and
    unk), longest first; empty means EOS only."""

    @classmethod
    def of(cls, tokenizer: Any) -> "SpecialTokens":
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos_token; set one (e.g. tokenizer.eos_token = ...)")
        bos = tokenizer.bos_token_id
        adds_bos = (bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
                    and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos])
        return cls(bos if adds_bos else None, tokenizer.eos_token_id, tokenizer.eos_token, _turn_ends(tokenizer))

    @property
    def ends(self) -> tuple[str, ...]:
        return self.turn_ends or (self.eos,)


def end_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids a response may end with: EOS and the tokenizer's other end-of-turn special tokens."""
    sp = SpecialTokens.of(tokenizer)
    ids = {tokenizer.convert_tokens_to_ids(t) for t in sp.ends} | {sp.eos_id}
    return frozenset(i for i in ids if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None))


def _turn_ends(tokenizer: Any) -> tuple[str, ...]:
    """EOS and every special added token that is not BOS, unk or pad (pad only when it is not EOS)."""
    skip = {getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "unk_token_id", None)}
    if getattr(tokenizer, "pad_token_id", None) != tokenizer.eos_token_id:
        skip.add(tokenizer.pad_token_id)
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    names = {tokenizer.eos_token} | {str(t) for i, t in decoder.items()
                                     if getattr(t, "special", False) and i not in skip and str(t)}
    return tuple(sorted(names, key=lambda t: (-len(t), t)))


def split_end_of_turn(text: str, sp: SpecialTokens) -> tuple[str, str | None]:
    """``(body, dropped)``: ``body`` ends at the first end token of ``text``'s trailing run of whitespace and end
    tokens (inclusive); ``dropped`` is the rest of that run. Without such a token: ``(text, None)``."""
    cut, rest = None, len(text)
    while True:
        stripped = text[:rest].rstrip()
        end = next((e for e in sp.ends if stripped.endswith(e)), None)
        if end is None:
            break
        rest = len(stripped) - len(end)
        cut = len(stripped)
    return (text, None) if cut is None else (text[:cut], text[cut:])


def _render_chat(ex: PreferenceExample, tokenizer: Any) -> tuple[str, list[str]]:
    """Render a conversation; each response text is the full rendering minus the prompt rendering."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("conversational data needs a tokenizer with a chat_template", source=ex.source,
                        reason="no_chat_template")
    prompt = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
    responses = []
    for resp in ex.responses:
        msgs: list[Message] = resp if isinstance(resp, list) else [{"role": "assistant", "content": resp}]
        full = tokenizer.apply_chat_template(ex.prompt + msgs, tokenize=False, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError("the chat template is not prefix-stable: rendering prompt + response does not start "
                            "with the rendered prompt (with add_generation_prompt=True), so the boundary is "
                            "ambiguous", source=ex.source, reason="chat_template")
        responses.append(full[len(prompt):])
    return prompt, responses


def encode_prompt(prompt: Text, tokenizer: Any, specials: SpecialTokens | None = None) -> list[int]:
    """Token ids of a prompt, exactly as ``prefopt.data.tokenize_example`` makes the prompt of a DPO example."""
    sp = specials or SpecialTokens.of(tokenizer)
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("a message-list prompt needs a tokenizer with a chat_template", field="prompt",
                            reason="no_chat_template")
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if sp.bos_id is not None and ids[:1] != [sp.bos_id]:
        ids = [sp.bos_id] + ids
    if not ids:
        raise DataError("prompt tokenizes to nothing", field="prompt", reason="empty_field")
    return ids


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


CONTINUATION_ANCHORS = ("\n",)
"""Text put before a response tokenized apart from its prompt (then the EOS string is tried): it makes the
response continuing text (no start-of-text "▁") and is kept only if its ids are a prefix of the joint ids."""


def encode_continuation(text: str, tokenizer: Any, sp: SpecialTokens) -> list[int]:
    """Ids of ``text`` as text that continues something, never merged with what precedes it: the ids of
    ``anchor + text`` after the anchor's ids, for the first anchor ("\\n", then the EOS string) whose ids stay a
    prefix; plain ``tokenizer(text)`` if none does. Equals ``tokenizer(text)`` for byte-level BPE; for
    SentencePiece it leaves out the start-of-text "▁"."""
    for anchor in (*CONTINUATION_ANCHORS, sp.eos):
        head, joint = _ids(tokenizer, [anchor, anchor + text])
        if joint[:len(head)] == head:
            return joint[len(head):]
    return _ids(tokenizer, [text])[0]


def _finish(ids: list[int], ended: bool, sp: SpecialTokens) -> list[int]:
    return ids if ended or (ids and ids[-1] == sp.eos_id) else ids + [sp.eos_id]


def encode_responses(prompt_text: str, texts: Sequence[str], tokenizer: Any, sp: SpecialTokens
                     ) -> tuple[list[int], list[list[int]]]:
    """``(prompt ids without BOS, response ids)``: each response continues ``prompt_text`` and ends with its end
    token once (see the module doc)."""
    splits = [split_end_of_turn(t, sp) for t in texts]
    prompt, *joints = _ids(tokenizer, [prompt_text] + [prompt_text + body for body, _ in splits])
    out = []
    for (body, dropped), joint in zip(splits, joints):
        ids = joint[len(prompt):] if joint[:len(prompt)] == prompt else encode_continuation(body, tokenizer, sp)
        out.append(_finish(ids, dropped is not None, sp))
    return prompt, out


def encode_response(text: str, tokenizer: Any, sp: SpecialTokens, prompt_text: str | None = None) -> list[int]:
    """Ids of one response: the continuation of ``prompt_text`` (without it: ``encode_continuation``), ending
    with its end token once (the template's end of turn, or the appended EOS)."""
    if prompt_text is not None:
        return encode_responses(prompt_text, [text], tokenizer, sp)[1][0]
    body, dropped = split_end_of_turn(text, sp)
    return _finish(encode_continuation(body, tokenizer, sp), dropped is not None, sp)


def tokenize_example(ex: PreferenceExample, tokenizer: Any, *, max_length: int | None = None,
                     max_prompt_length: int | None = None, specials: SpecialTokens | None = None
                     ) -> TokenizedExample | None:
    """Tokenize one example; None when it cannot fit in ``max_length`` (see module doc for the rules).

    Truncation (when prompt + longest response > max_length): the prompt is cut from the start (BOS kept)
    to ``max_prompt_length``, then responses are cut to ``max_length - len(prompt)`` (losing their end token).
    Without ``max_length``, ``max_prompt_length`` alone caps the prompt.
    """
    sp = specials or SpecialTokens.of(tokenizer)
    if ex.response_ids is not None:  # an exact sample: its ids as they are (see the module doc)
        prompt, responses = _exact_ids(ex, len(tokenizer))
    else:
        prompt_text, response_texts = _texts(ex, tokenizer)
        prompt, responses = encode_responses(prompt_text, response_texts, tokenizer, sp)
        prompt = _with_bos(prompt, sp)
    return truncate(ex.source, prompt, responses, sp, max_length, max_prompt_length)


def _texts(ex: PreferenceExample, tokenizer: Any) -> tuple[str, list[str]]:
    if isinstance(ex.prompt, list):
        return _render_chat(ex, tokenizer)
    return ex.prompt, list(ex.responses)


def _with_bos(prompt: list[int], sp: SpecialTokens) -> list[int]:
    return prompt if sp.bos_id is None or prompt[:1] == [sp.bos_id] else [sp.bos_id] + prompt


def truncate(source: str, prompt: list[int], responses: list[list[int]], sp: SpecialTokens,
             max_length: int | None, max_prompt_length: int | None) -> TokenizedExample | None:
    """The length limits applied to tokenized ids (see ``tokenize_example``); None when the example cannot fit."""
    keep = 1 if prompt[:1] == [sp.bos_id] and sp.bos_id is not None else 0  # BOS survives prompt truncation
    longest = max(len(r) for r in responses)
    truncated = False
    too_long = max_length is not None and len(prompt) + longest > max_length
    if max_prompt_length is not None and len(prompt) > max_prompt_length and (too_long or max_length is None):
        prompt = prompt[:keep] + prompt[len(prompt) - max_prompt_length + keep:]  # keep the end of the prompt
        truncated = True
    if max_length is not None and len(prompt) + longest > max_length:
        room = max_length - len(prompt)
        if room <= 0:
            return None
        responses = [r[:room] for r in responses]
        truncated = True
        if len({tuple(r) for r in responses}) < len(responses):  # truncation made responses identical
            return None
    return TokenizedExample(prompt, responses, source=source, meta={"truncated": truncated})


# ---------------------------------------------------------------------------------------------------------
# Many examples at once: the same ids, fewer tokenizer calls and less text tokenized


LINE_SAFE_SPLITS = frozenset({
    # Llama 3 and cl100k (GPT-4)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    # Qwen 2 / 2.5 / 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
})
"""Split regexes checked by hand to cut at every line start (see ``splits_at_line_starts``). Other regexes are
not assumed to: in o200k's (GPT-4o) a run of punctuation may go on across newlines into "/" (its alternative
ending in the class of CR, LF and "/"), so "!" + newline + "//" is one piece there."""


def splits_at_line_starts(tokenizer: Any) -> bool:
    """Whether the tokenizer never merges text across a line start (a "\\n" followed by a non-space character), so
    that ``ids(a + b) == ids(a) + ids(b)`` whenever ``b`` starts such a line.

    True only for byte-level BPE whose pre-tokenizer is GPT-2's ``ByteLevel`` regex or a ``Split`` by one of
    ``LINE_SAFE_SPLITS`` (Llama 3, cl100k, Qwen 2) followed by ``ByteLevel``: every alternative of those regexes
    either excludes "\\n" or is whitespace, which cannot run on into a non-space character, and BPE merges stay
    within a piece. Anything else (another regex, SentencePiece, WordPiece, a normalizer, a prefix space, an
    added token that strips the whitespace before it) answers False and is tokenized the plain way.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    import json

    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - an unreadable spec: take the plain path
        return False
    if spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE":
        return False
    if any(t.get("lstrip") for t in spec.get("added_tokens") or []):
        return False
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    level = [p for p in parts if p.get("type") == "ByteLevel"]
    if not level or level[0].get("add_prefix_space"):
        return False
    if kinds == ["ByteLevel"]:
        return bool(level[0].get("use_regex", True))
    if set(kinds) <= {"Split", "ByteLevel", "Digits"} and not level[0].get("use_regex", True):
        splits = [p for p in parts if p.get("type") == "Split"]
        return bool(splits) and all(p.get("behavior") == "Isolated" and not p.get("invert")
                                    and (p.get("pattern") or {}).get("Regex") in LINE_SAFE_SPLITS for p in splits)
    return False


def line_start_cut(text: str) -> int:
    """The last position p > 0 in ``text`` that starts a line (``text[p - 1] == "\\n"``, ``text[p]`` not
    whitespace); 0 when there is none."""
    p = len(text) - 1
    while True:
        p = text.rfind("\n", 0, p)
        if p < 0:
            return 0
        if p + 1 < len(text) and not text[p + 1].isspace():
            return p + 1


def _fast_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return _ids(tokenizer, texts)


def tokenize_batch(examples: Sequence[PreferenceExample], tokenizer: Any, *, max_length: int | None = None,
                   max_prompt_length: int | None = None, specials: SpecialTokens | None = None,
                   line_cuts: bool | None = None) -> list[TokenizedExample | None]:
    """``[tokenize_example(ex, ...) for ex in examples]``, the same ids, with one tokenizer call for the batch.

    Where the tokenizer splits at line starts (``splits_at_line_starts``; ``line_cuts`` overrides the check), a
    response is tokenized after the prompt's last line only, not after the whole prompt again: the continuation
    rule compares ``ids(prompt + response)`` with ``ids(prompt)``, and both share the ids before that line start,
    so ``ids(tail + response)`` against ``ids(tail)`` gives the same answer for a fraction of the text (HH
    prompts are long and their responses short). An example whose ids do not end with ``ids(tail)`` (which the
    property rules out) is tokenized the plain way.
    """
    sp = specials or SpecialTokens.of(tokenizer)
    cuts_ok = splits_at_line_starts(tokenizer) if line_cuts is None else line_cuts
    plans: list[Any] = []
    texts: list[str] = []
    for ex in examples:
        if ex.response_ids is not None:
            plans.append(None)
            continue
        prompt_text, response_texts = _texts(ex, tokenizer)
        splits = [split_end_of_turn(t, sp) for t in response_texts]
        cut = line_start_cut(prompt_text) if cuts_ok else 0
        tail = prompt_text[cut:]
        start = len(texts)
        texts.append(prompt_text)
        if cut:
            texts.append(tail)
        texts.extend(tail + body for body, _ in splits)
        plans.append((start, bool(cut), prompt_text, splits))
    ids = _fast_ids(tokenizer, texts) if texts else []
    out: list[TokenizedExample | None] = []
    for ex, plan in zip(examples, plans):
        if plan is None:
            prompt, responses = _exact_ids(ex, len(tokenizer))
            out.append(truncate(ex.source, prompt, responses, sp, max_length, max_prompt_length))
            continue
        start, has_cut, prompt_text, splits = plan
        prompt = ids[start]
        head = ids[start + 1] if has_cut else prompt
        joints = ids[start + 1 + has_cut: start + 1 + has_cut + len(splits)]
        if has_cut and prompt[len(prompt) - len(head):] != head:  # not expected: fall back to the plain rule
            tok = tokenize_example(ex, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                   specials=sp)
            out.append(tok)
            continue
        responses = []
        for (body, dropped), joint in zip(splits, joints):
            r = joint[len(head):] if joint[:len(head)] == head else encode_continuation(body, tokenizer, sp)
            responses.append(_finish(r, dropped is not None, sp))
        out.append(truncate(ex.source, _with_bos(prompt, sp), responses, sp, max_length, max_prompt_length))
    return out


def _exact_ids(ex: PreferenceExample, vocab_size: int) -> tuple[list[int], list[list[int]]]:
    """The carried ids of an exact sample, checked against the vocabulary (DataError naming the field)."""
    fields = [("prompt_ids", ex.prompt_ids)] + [(f"response_ids[{i}]", r) for i, r in enumerate(ex.response_ids)]
    for name, ids in fields:
        if not ids:
            raise DataError("is an empty list of token ids", source=ex.source, field=name, reason="empty_field")
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise DataError(f"has token id {bad!r} outside the vocabulary (size {vocab_size})", source=ex.source,
                            field=name, reason="bad_token_id")
    return list(ex.prompt_ids), [list(r) for r in ex.response_ids]


@dataclass
class TokenizeReport:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"tokenized {self.kept} of {self.total} examples ({self.truncated} truncated, {self.dropped} dropped"
        text += f", e.g. {', '.join(self.dropped_sources)})" if self.dropped_sources else ")"
        return text

    __str__ = summary


def tokenize_examples(examples: Sequence[PreferenceExample], tokenizer: Any, *, max_length: int | None = None,
                      max_prompt_length: int | None = None) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize many examples; rows that cannot fit are dropped and counted in the report."""
    sp = SpecialTokens.of(tokenizer)
    return tokenize_all(examples, lambda ex: tokenize_example(ex, tokenizer, max_length=max_length,
                                                              max_prompt_length=max_prompt_length, specials=sp))


def tokenize_all(examples: Sequence[Any], tokenize_one: Callable[[Any], TokenizedExample | None]
                 ) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Apply ``tokenize_one`` to every example, counting truncated and dropped (None) ones."""
    out, report = [], TokenizeReport(total=len(examples))
    for ex in tqdm(examples, desc="tokenizing", disable=len(examples) <= PROGRESS_MIN):
        tok = tokenize_one(ex)
        if tok is None:
            report.dropped += 1
            if len(report.dropped_sources) < 3:
                report.dropped_sources.append(ex.source)
            continue
        report.truncated += tok.meta["truncated"]
        out.append(tok)
    report.kept = len(out)
    return out, report

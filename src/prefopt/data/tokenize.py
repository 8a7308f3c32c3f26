"""Tokenize PreferenceExamples with an exact prompt/response boundary.

The prompt and each response are tokenized separately (``add_special_tokens=False``) and concatenated, so a
merge across the join can never move tokens between prompt and response. BOS is prepended once to the prompt
when the tokenizer normally adds one; EOS ends each response exactly once (unless the response is truncated).
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

    @classmethod
    def of(cls, tokenizer: Any) -> "SpecialTokens":
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos_token; set one (e.g. tokenizer.eos_token = ...)")
        bos = tokenizer.bos_token_id
        adds_bos = (bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
                    and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos])
        return cls(bos if adds_bos else None, tokenizer.eos_token_id, tokenizer.eos_token)


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


def encode_response(text: str, tokenizer: Any, sp: SpecialTokens) -> list[int]:
    if text.rstrip().endswith(sp.eos):  # the template already ends the turn with EOS; drop what follows it
        text = text.rstrip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == sp.eos_id else ids + [sp.eos_id]


def tokenize_example(ex: PreferenceExample, tokenizer: Any, *, max_length: int | None = None,
                     max_prompt_length: int | None = None, specials: SpecialTokens | None = None
                     ) -> TokenizedExample | None:
    """Tokenize one example; None when it cannot fit in ``max_length`` (see module doc for the rules).

    Truncation (when prompt + longest response > max_length): the prompt is cut from the start (BOS kept)
    to ``max_prompt_length``, then responses are cut to ``max_length - len(prompt)`` (losing their EOS).
    Without ``max_length``, ``max_prompt_length`` alone caps the prompt.
    """
    sp = specials or SpecialTokens.of(tokenizer)
    if isinstance(ex.prompt, list):
        prompt_text, response_texts = _render_chat(ex, tokenizer)
    else:
        prompt_text, response_texts = ex.prompt, list(ex.responses)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    head = [] if sp.bos_id is None or prompt[:1] == [sp.bos_id] else [sp.bos_id]
    prompt = head + prompt
    keep = 1 if prompt[:1] == [sp.bos_id] and sp.bos_id is not None else 0  # BOS survives prompt truncation
    responses = [encode_response(t, tokenizer, sp) for t in response_texts]
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
    return TokenizedExample(prompt, responses, source=ex.source, meta={"truncated": truncated})


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

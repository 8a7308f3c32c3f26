"""Sample responses from a causal LM: batched, left-padded, KV-cached, and reproducible per (prompt, sample).

    samples = generate(model, tokenizer, ["Write a review of ..."], num_samples=4, temperature=1.0, seed=0)
    samples[0][3]            # the 4th sample for the first prompt (decoded response only, no prompt)

Sampling runs inside Hugging Face ``generate`` (``use_cache=True``) in its greedy mode with one extra logits
processor that applies temperature, top-k and top-p and then adds Gumbel noise drawn from a generator owned by
the row: the arg-max of ``logits / T + Gumbel`` is an exact draw from ``softmax(logits / T)`` (the Gumbel-max
trick). Every (prompt index, sample index) has its own generator seeded from ``seed``, so the random numbers a
sequence sees do not depend on the batch it lands in: the same seed gives the same samples whatever the batch
size (up to float rounding of batched vs unbatched logits, which can flip a draw only at a near-exact tie).
``temperature == 0`` is plain greedy decoding.

Prompts are tokenized exactly as ``prefopt.data.tokenize`` tokenizes DPO prompts (no special tokens, BOS
prepended once when the tokenizer normally adds one; message lists rendered with the chat template and the
generation prompt), so generated pairs can be labelled and trained on without a tokenization mismatch.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .data.prompts import encode_prompts, read_prompts
from .data.types import Text
from .errors import ConfigError
from .models import evaluating


@dataclass
class Sample:
    """One generated response and where it came from."""

    prompt: Text
    response: str
    prompt_index: int
    sample_index: int
    prompt_tokens: int
    response_tokens: int
    """Generated tokens, counting the final EOS when there is one."""
    ended_with_eos: bool
    """False when the response was cut at max_new_tokens."""
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    response_ids: list[int] = field(default_factory=list, repr=False)
    """Generated ids up to and including the first EOS (no padding)."""

    def row(self, with_ids: bool = False) -> dict[str, Any]:
        """The sample as a JSONL row; ``with_ids`` adds ``prompt_ids`` and ``response_ids`` (the generated ids,
        the final end token included when ``ended_with_eos``), as ``prefopt generate`` writes it, so that
        ``prefopt label`` and ``prefopt dpo`` train on exactly the sampled tokens."""
        d = asdict(self)
        if not with_ids:
            d.pop("prompt_ids")
            d.pop("response_ids")
        return d


# ----------------------------------------------------------------------------------------- sampling

def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one (prompt, sample), independent of batching."""
    digest = hashlib.sha256(f"prefopt-generate:{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def warp_logits(scores: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering; filtered tokens get -inf. [B, V] float32."""
    scores = scores.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        drop_sorted = before >= top_p  # the first token always has before == 0, so at least one survives
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


class SeededSampler:
    """A logits processor for greedy ``generate`` that turns its arg-max into sampling (Gumbel-max), with one
    random generator per row so that each sequence's draws are independent of the batch around it."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int, top_p: float, device: torch.device):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"SeededSampler built for {len(self.generators)} rows got {scores.shape[0]}")
        scores = warp_logits(scores, self.temperature, self.top_k, self.top_p)
        noise = torch.empty_like(scores)
        for row, gen in zip(noise, self.generators):
            row.exponential_(generator=gen)
        return scores - noise.log()  # -log(Exp(1)) is Gumbel(0, 1)


def end_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's ``generation_config.eos_token_id``
    (a list for chat models with several end-of-turn tokens)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    if not ids:
        raise ConfigError("the tokenizer has no eos_token and the model's generation_config no eos_token_id")
    return sorted(ids)


def _check_options(temperature: float, top_p: float, top_k: int, max_new_tokens: int, num_samples: int,
                   batch_size: int) -> None:
    from .config import check_field

    check_field(temperature >= 0, "temperature", temperature, ">= 0 (0 means greedy decoding)")
    check_field(0 < top_p <= 1, "top_p", top_p, "in (0, 1]")
    check_field(top_k >= 0, "top_k", top_k, "an integer >= 0 (0 disables top-k)")
    check_field(max_new_tokens >= 1, "max_new_tokens", max_new_tokens, "an integer >= 1")
    check_field(num_samples >= 1, "num_samples", num_samples, "an integer >= 1")
    check_field(batch_size >= 1, "batch_size", batch_size, "an integer >= 1")


@torch.no_grad()
def sample_ids(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int], *,
               eos_ids: Sequence[int], pad_id: int, bos_id: int | None = None, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 128, batch_size: int = 16,
               progress: bool = False) -> list[list[int]]:
    """One response per prompt: its token ids up to and including the first end token (no padding), in input
    order. ``seeds[j]`` seeds the draws of response j, so the result does not depend on the batching.

    The model's own ``generation_config`` never changes the distribution: every sampling option transformers
    would fill in from it (repetition penalty, n-gram blocking, minimum length, ...) is set to its neutral value
    here, so a response is an exact draw from softmax(logits / temperature) after top-k / top-p -- what PPO's
    log-probs assume.
    """
    from transformers import GenerationConfig, LogitsProcessorList
    from tqdm.auto import tqdm

    if len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seeds")
    eos = set(eos_ids)
    device = next(model.parameters()).device
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=list(eos_ids), pad_token_id=pad_id, bos_token_id=bos_id,
        # neutral values, so that nothing from the model's own generation_config changes the distribution
        temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        min_new_tokens=0, length_penalty=1.0,
    )
    # longest prompts first: less padding per batch; the per-row seeds make the result order-independent
    order = sorted(range(len(prompt_ids)), key=lambda j: (-len(prompt_ids[j]), j))
    out: list[list[int]] = [[] for _ in prompt_ids]
    with evaluating(model):
        bar = tqdm(total=len(order), desc="generating", unit="sample", disable=not progress)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(prompt_ids[j]) for j in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, j in enumerate(chunk):  # left padding: every prompt ends at the last column
                ids = list(prompt_ids[j])
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                attention_mask[r, width - len(ids):] = 1
            processors = None
            if temperature > 0:
                processors = LogitsProcessorList([SeededSampler([seeds[j] for j in chunk], temperature, top_k,
                                                                top_p, device)])
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       generation_config=gen_config, logits_processor=processors)[:, width:].tolist()
            for r, j in enumerate(chunk):
                ids = generated[r]
                end = next((t for t, tok in enumerate(ids) if tok in eos), None)
                out[j] = ids if end is None else ids[:end + 1]
            bar.update(len(chunk))
        bar.close()
    return out


def generate_samples(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Text], *, num_samples: int = 1,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 128,
                     seed: int | None = 0, batch_size: int = 16, progress: bool = False) -> list[Sample]:
    """Generate ``num_samples`` responses for every prompt; returns Samples ordered by (prompt, sample).

    ``seed=None`` draws fresh seeds from torch's global generator (reproducible under ``torch.manual_seed``).
    Calling twice with the same seed and prompts gives the same samples: vary the seed between calls (e.g. a
    PPO step counter) to get new ones.
    """
    _check_options(temperature, top_p, top_k, max_new_tokens, num_samples, batch_size)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    encoded = encode_prompts(prompts, tokenizer)
    eos_ids = end_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    jobs = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
    responses = sample_ids(model, [encoded[i] for i, _ in jobs], [row_seed(seed, i, s) for i, s in jobs],
                           eos_ids=eos_ids, pad_id=pad_id, bos_id=tokenizer.bos_token_id, temperature=temperature,
                           top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress)
    samples = []
    for (i, s), response_ids in zip(jobs, responses):
        ended = bool(response_ids) and response_ids[-1] in eos_ids
        text_ids = response_ids[:-1] if ended else response_ids
        samples.append(Sample(prompt=prompts[i], response=tokenizer.decode(text_ids, skip_special_tokens=True),
                              prompt_index=i, sample_index=s, prompt_tokens=len(encoded[i]),
                              response_tokens=len(response_ids), ended_with_eos=ended,
                              prompt_ids=list(encoded[i]), response_ids=response_ids))
    return samples


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Text], *, num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 128,
             seed: int | None = 0, batch_size: int = 16, progress: bool = False) -> list[list[str]]:
    """Decoded responses (prompt not included, special tokens skipped): ``out[prompt][sample]``.

    See ``generate_samples`` for the token ids, token counts and whether each response ended with EOS.
    """
    samples = generate_samples(model, tokenizer, prompts, num_samples=num_samples, temperature=temperature,
                               top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed,
                               batch_size=batch_size, progress=progress)
    return [[x.response for x in samples[i * num_samples:(i + 1) * num_samples]] for i in range(len(prompts))]


def write_samples(samples: Sequence[Sample], path: str | Path) -> Path:
    from .jsonl import write_jsonl

    """Write the samples as JSONL rows, token ids included (see ``Sample.row``)."""
    return write_jsonl((x.row(with_ids=True) for x in samples), path)


def run_generate(cfg: Any) -> list[Sample]:
    """``prefopt generate``: load model and prompts, sample, write JSONL rows; returns the samples."""
    from .models import load_model, load_tokenizer

    cfg.validate()
    prompts = read_prompts(cfg.prompts)  # data errors before the model is loaded
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device=device)
    samples = generate_samples(model, tokenizer, prompts, num_samples=cfg.num_samples, temperature=cfg.temperature,
                               top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                               batch_size=cfg.batch_size, progress=cfg.progress)
    write_samples(samples, cfg.output)
    eos = sum(x.ended_with_eos for x in samples)
    mean_len = sum(x.response_tokens for x in samples) / len(samples)
    print(f"wrote {len(samples)} samples ({len(prompts)} prompts x {cfg.num_samples}) to {cfg.output}; "
          f"{eos} ended with EOS, {len(samples) - eos} hit max_new_tokens; mean response length {mean_len:.1f} tokens")
    return samples


__all__ = ["Sample", "generate", "generate_samples", "sample_ids", "end_token_ids", "read_prompts", "write_samples",
           "run_generate", "warp_logits", "SeededSampler", "row_seed"]

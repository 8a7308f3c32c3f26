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
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .data.formats import text_field
from .data.load import iter_rows
from .data.tokenize import SpecialTokens, encode_prompt
from .data.types import Text
from .errors import ConfigError, DataError


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

    def row(self) -> dict[str, Any]:
        """The JSONL row written by ``prefopt generate`` (token ids left out)."""
        d = asdict(self)
        d.pop("prompt_ids")
        d.pop("response_ids")
        return d


# ------------------------------------------------------------------------------------------ prompts

def read_prompts(path: str | Path) -> list[Text]:
    """Prompts from a .txt file (one a line, blank lines skipped) or rows with a ``prompt`` field
    (.jsonl/.json/.parquet/...: a string, or a list of {role, content} messages)."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise DataError("file not found", source=str(p), reason="not_found")
        lines = p.read_text(encoding="utf-8").splitlines()
        prompts: list[Text] = [ln for ln in lines if ln.strip()]
    else:
        if not p.exists():
            raise DataError("file not found", source=str(p), reason="not_found")
        prompts = [text_field(row, "prompt", source) for row, source in iter_rows(p)]
    if not prompts:
        raise DataError("no prompts in file", source=str(p), reason="empty_file")
    return prompts


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


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
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
def generate_samples(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Text], *, num_samples: int = 1,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 128,
                     seed: int | None = 0, batch_size: int = 16, progress: bool = False) -> list[Sample]:
    """Generate ``num_samples`` responses for every prompt; returns Samples ordered by (prompt, sample).

    ``seed=None`` draws fresh seeds from torch's global generator (reproducible under ``torch.manual_seed``).
    Calling twice with the same seed and prompts gives the same samples: vary the seed between calls (e.g. a
    PPO step counter) to get new ones.
    """
    from transformers import GenerationConfig
    from tqdm.auto import tqdm

    _check_options(temperature, top_p, top_k, max_new_tokens, num_samples, batch_size)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    sp = SpecialTokens.of(tokenizer)
    encoded = [encode_prompt(p, tokenizer, sp) for p in prompts]
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=eos_ids, pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
        # neutral values, so that nothing from the model's own generation_config changes the distribution
        temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        min_new_tokens=0, length_penalty=1.0,
    )
    # longest prompts first: less padding per batch; the per-row seeds make the result order-independent
    jobs = sorted(((i, s) for i in range(len(prompts)) for s in range(num_samples)),
                  key=lambda js: (-len(encoded[js[0]]), js))
    results: dict[tuple[int, int], Sample] = {}
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(jobs), desc="generating", unit="sample", disable=not progress)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            width = max(len(encoded[i]) for i, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (i, _) in enumerate(chunk):  # left padding: every prompt ends at the last column
                ids = encoded[i]
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                attention_mask[r, width - len(ids):] = 1
            processors = []
            if temperature > 0:
                from transformers import LogitsProcessorList

                processors = LogitsProcessorList([SeededSampler(
                    [row_seed(seed, i, s) for i, s in chunk], temperature, top_k, top_p, device)])
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=gen_config, logits_processor=processors or None)
            generated = out[:, width:].tolist()
            for r, (i, s) in enumerate(chunk):
                ids = generated[r]
                end = next((t for t, tok in enumerate(ids) if tok in eos_ids), None)
                response_ids = ids if end is None else ids[:end + 1]
                text_ids = response_ids if end is None else response_ids[:-1]
                results[(i, s)] = Sample(
                    prompt=prompts[i], response=tokenizer.decode(text_ids, skip_special_tokens=True),
                    prompt_index=i, sample_index=s, prompt_tokens=len(encoded[i]),
                    response_tokens=len(response_ids), ended_with_eos=end is not None,
                    prompt_ids=list(encoded[i]), response_ids=response_ids)
            bar.update(len(chunk))
        bar.close()
    finally:
        model.train(was_training)
    return [results[(i, s)] for i in range(len(prompts)) for s in range(num_samples)]


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for x in samples:
            f.write(json.dumps(x.row(), ensure_ascii=False) + "\n")
    return path


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


__all__ = ["Sample", "generate", "generate_samples", "read_prompts", "encode_prompt", "write_samples",
           "run_generate", "warp_logits", "SeededSampler", "row_seed"]

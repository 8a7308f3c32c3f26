"""The DPO policy as a reward model: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (the paper's implicit reward).

Inputs are tokenized with ``prefopt.data.tokenize_example`` (exactly the DPO training tokenization) and scored
with ``prefopt.logprobs.forward_logps`` (one forward over the response-major concatenated batch). On preference
data (any format ``load_preferences`` reads) it also reports pair accuracy and the mean margin, and with a
trained reward model (``prefopt.rewards.reward_model_fn``) the same numbers for that model on the same rows.

    rewards = implicit_rewards(policy, reference, tokenizer, examples, beta=0.1)   # [N, K]
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .data import collate_preferences, load_preferences, tokenize_example
from .data.collate import to_device
from .data.formats import text_field
from .data.formats import read_examples
from .data.load import iter_rows_lenient
from .data.types import PreferenceExample, Text, TokenizedExample
from .errors import ConfigError, DataError
from .jsonl import write_jsonl
from .logprobs import forward_logps, split_responses
from .models import evaluating


@dataclass
class ScoredExamples:
    """Per example and response (column k = response k, best first for preference data), all [N, K] float32.

    Rows that could not be tokenized within max_length, and columns beyond an example's own K, are NaN.
    """

    policy_logps: Tensor
    reference_logps: Tensor
    rewards: Tensor
    response_tokens: Tensor


def _reference_logps(policy: torch.nn.Module, reference: torch.nn.Module | None, batch: dict) -> Tensor:
    if reference is not None:
        return forward_logps(reference, batch).sum
    from peft import PeftModel

    from .models import reference_mode

    if not isinstance(policy, PeftModel):
        raise ConfigError("no reference model given: pass one (--ref-model), or a LoRA policy whose base is the "
                          "reference.")
    with reference_mode(policy):
        return forward_logps(policy, batch).sum


@torch.no_grad()
def score_examples(policy: torch.nn.Module, reference: torch.nn.Module | None, tokenizer: Any,
                   examples: Sequence[PreferenceExample | TokenizedExample], beta: float, batch_size: int = 8, *,
                   max_length: int | None = None, max_prompt_length: int | None = None,
                   progress: bool = False) -> ScoredExamples:
    """Policy and reference log-probs of every response and the implicit rewards ``beta * (policy - ref)``."""
    from tqdm.auto import tqdm

    if beta <= 0:
        raise ConfigError(f"invalid beta = {beta!r}: must be a positive number.")
    if batch_size < 1:
        raise ConfigError(f"invalid batch_size = {batch_size!r}: must be an integer >= 1.")
    items: list[TokenizedExample | None] = [
        ex if isinstance(ex, TokenizedExample) else
        tokenize_example(ex, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        for ex in examples]
    n = len(items)
    width = max((x.num_responses for x in items if x is not None), default=1)
    out = {name: torch.full((n, width), math.nan) for name in ("policy", "reference", "tokens")}
    by_k: dict[int, list[int]] = {}
    for i, x in enumerate(items):
        if x is not None:
            by_k.setdefault(x.num_responses, []).append(i)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(policy.parameters()).device
    with contextlib.ExitStack() as modes:
        for m in (policy, reference):
            if m is not None:
                modes.enter_context(evaluating(m))
        bar = tqdm(total=sum(len(v) for v in by_k.values()), desc="scoring", unit="example", disable=not progress)
        for k, indices in by_k.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                batch = to_device(collate_preferences([items[i] for i in chunk], pad_id), device)  # type: ignore[misc]
                pol = forward_logps(policy, batch)
                ref = _reference_logps(policy, reference, batch)
                rows = torch.tensor(chunk)
                out["policy"][rows, :k] = pol.by_example(k).sum.float().cpu()
                out["reference"][rows, :k] = split_responses(ref, k).float().cpu()
                out["tokens"][rows, :k] = pol.by_example(k).count.float().cpu()
                bar.update(len(chunk))
        bar.close()
    rewards = beta * (out["policy"] - out["reference"])
    return ScoredExamples(out["policy"], out["reference"], rewards, out["tokens"])


def implicit_rewards(policy: torch.nn.Module, reference: torch.nn.Module | None, tokenizer: Any,
                     examples: Sequence[PreferenceExample | TokenizedExample], beta: float,
                     batch_size: int = 8, **kwargs: Any) -> Tensor:
    """``beta * (log pi(y|x) - log pi_ref(y|x))`` for every response of every example: [N, K] float32 on CPU.

    Column k is response k of the example (best first for preference data). ``reference=None`` with a LoRA
    policy uses the base model (adapters off) as the reference. See ``score_examples`` for the log-probs.
    """
    return score_examples(policy, reference, tokenizer, examples, beta, batch_size, **kwargs).rewards


def pair_metrics(scores: Tensor) -> dict[str, float]:
    """For [N, K] scores of responses ordered best first: accuracy = share of ordered pairs (i < j) with
    score_i > score_j (for K = 2: chosen beats rejected), margin = mean of best minus worst score."""
    correct = total = 0
    margins = []
    for row in scores:
        row = row[~torch.isnan(row)]
        if row.numel() < 2:
            continue
        k = row.numel()
        for i in range(k):
            for j in range(i + 1, k):
                correct += int(row[i] > row[j])
                total += 1
        margins.append(float(row[0] - row[-1]))
    if not total:
        return {"pairs": 0}
    return {"pairs": total, "accuracy": correct / total, "margin": sum(margins) / len(margins)}


# ------------------------------------------------------------------------------------------ files

def read_scoring_data(path: str | Path, data_format: str = "auto") -> tuple[list[PreferenceExample], bool]:
    """Examples to score and whether they are preference data (responses best first).

    Rows ``{prompt, response}`` (e.g. ``prefopt generate`` output) give one response each; anything else is read
    with ``load_preferences`` (explicit, conversational, implicit or ranked rows).
    """
    rows = iter_rows_lenient(path)
    row = next((r for r, _ in rows if isinstance(r, dict)), None)  # the first readable row says which kind
    rows.close()
    if row is None:
        if next(iter(iter_rows_lenient(path)), None) is None:
            raise DataError("no rows", source=str(path), reason="empty_file")
        row = {}  # no readable row at all: read_examples below reports every bad one
    if data_format == "auto" and "response" in row and "chosen" not in row and "responses" not in row:
        def sample(row: dict, source: str, fmt: str) -> PreferenceExample:
            prompt = text_field(row, "prompt", source)
            response = text_field(row, "response", source)
            return PreferenceExample(prompt=prompt, responses=[response], source=source)

        # the same validation report as training data (every bad row counted, then a stop with the report);
        # no duplicate check: several samples of a prompt may well be identical
        examples, _ = read_examples(path, lambda row, source: "samples", sample)
        return examples, False
    examples, report = load_preferences(path, format=data_format)
    print(report.summary())
    return examples, True


def _flat_rm_scores(rm_fn: Any, examples: Sequence[PreferenceExample], batch_size: int) -> Tensor:
    width = max(len(ex.responses) for ex in examples)
    out = torch.full((len(examples), width), math.nan)
    flat = [(i, k) for i, ex in enumerate(examples) for k in range(len(ex.responses))]
    prompts: list[Text] = [examples[i].prompt for i, _ in flat]
    responses: list[Text] = [examples[i].responses[k] for i, k in flat]
    scores = rm_fn(prompts, responses)
    for (i, k), s in zip(flat, scores):
        out[i, k] = float(s)
    return out


def _row(ex: PreferenceExample, i: int, scored: ScoredExamples, rm: Tensor | None) -> dict[str, Any]:
    k = len(ex.responses)

    def col(t: Tensor) -> list[float | None]:
        return [None if math.isnan(v) else v for v in t[i, :k].tolist()]

    row: dict[str, Any] = {"index": i, "source": ex.source, "prompt": ex.prompt, "responses": ex.responses,
                           "implicit_rewards": col(scored.rewards), "policy_logps": col(scored.policy_logps),
                           "reference_logps": col(scored.reference_logps),
                           "response_tokens": [None if v is None else int(v) for v in col(scored.response_tokens)]}
    if rm is not None:
        row["rm_scores"] = col(rm)
    return row


def _fmt(name: str, m: dict[str, float]) -> str:
    if not m.get("pairs"):
        return f"{name}: no pairs"
    return f"{name}: pair accuracy {m['accuracy']:.4f}, mean margin {m['margin']:.4f} over {m['pairs']} pairs"


def run_score(cfg: Any) -> dict[str, Any]:
    """``prefopt score``: implicit rewards of a DPO policy (and optionally an explicit RM) on a file."""
    from .models import load_model, load_tokenizer

    cfg.validate()
    examples, is_pairs = read_scoring_data(cfg.data, cfg.data_format)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device=device)
    reference = load_model(cfg.ref_model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device=device)
    scored = score_examples(policy, reference, tokenizer, examples, cfg.beta, cfg.batch_size,
                            max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, progress=cfg.progress)
    del policy, reference
    rm = None
    if cfg.reward_model:
        from .rewards import call_reward_fn, reward_model_fn

        fn = reward_model_fn(cfg.reward_model, batch_size=cfg.batch_size)
        rm = _flat_rm_scores(lambda p, r: call_reward_fn(fn, p, r, f"reward model {cfg.reward_model}"),
                             examples, cfg.batch_size)
    dropped = int(torch.isnan(scored.rewards[:, 0]).sum())
    finite = scored.rewards[~torch.isnan(scored.rewards)]
    summary: dict[str, Any] = {"examples": len(examples), "dropped": dropped, "beta": cfg.beta,
                               "mean_implicit_reward": float(finite.mean()) if finite.numel() else math.nan}
    lines = [f"scored {len(examples) - dropped} of {len(examples)} examples from {cfg.data} (beta {cfg.beta})"
             + (f"; {dropped} did not fit in max_length" if dropped else "")
             + f"; mean implicit reward {summary['mean_implicit_reward']:.4f}"]
    if is_pairs:
        summary["implicit"] = pair_metrics(scored.rewards)
        lines.append(_fmt("implicit reward (DPO)", summary["implicit"]))
        if rm is not None:
            summary["reward_model"] = pair_metrics(rm)
            lines.append(_fmt("reward model", summary["reward_model"]))
    out = write_jsonl((_row(ex, i, scored, rm) for i, ex in enumerate(examples)), cfg.output)
    print("\n".join(lines) + f"\nwrote per-row scores to {out}")
    return summary


__all__ = ["implicit_rewards", "score_examples", "ScoredExamples", "pair_metrics", "read_scoring_data", "run_score"]

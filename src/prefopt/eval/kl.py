"""Sequence-level KL(pi || pi_ref) estimated from samples of pi, with standard errors clustered by prompt.

For responses y_ij ~ pi(.|x_i) (prompt i, sample j), the per-sample log-ratio

    d_ij = log pi(y_ij | x_i) - log pi_ref(y_ij | x_i)

is an unbiased estimate of KL(pi(.|x_i) || pi_ref(.|x_i)), so its mean over all samples estimates the
prompt-averaged KL (every prompt has the same number of samples, or it is weighted by its samples). Samples of
one prompt are not independent (they share x_i), so the standard error is the cluster-robust one:

    mean = sum_ij d_ij / N,   SE^2 = G / (G - 1) * sum_i (sum_j (d_ij - mean))^2 / N^2

with G prompts (clusters) and N samples. With one sample per prompt it is the usual s / sqrt(N).

Responses must be sampled at temperature 1 without top-k / top-p, so that they are draws from pi itself;
a response cut at ``max_new_tokens`` gives the KL between the distributions of the first tokens (a lower
bound of the full KL). ``best_of_n_kl`` is the closed form for Best-of-N sampling.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..data import collate_preferences
from ..data.collate import to_device
from ..data.types import TokenizedExample
from ..logprobs import forward_logps
from ..models import evaluating


@dataclass
class MeanEstimate:
    """A mean over samples and its standard error clustered by prompt."""

    mean: float
    se: float
    n: int
    """Samples."""
    clusters: int
    """Distinct prompts."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.se:.2g} (n={self.n}, {self.clusters} prompts)"


KLEstimate = MeanEstimate


def clustered_mean(values: Sequence[float] | Tensor, clusters: Sequence[Hashable] | None = None) -> MeanEstimate:
    """Mean of ``values`` and its cluster-robust standard error (clusters: one id per value; None: each value
    its own cluster). SE is NaN with fewer than 2 clusters."""
    vals = [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    if not vals:
        raise ValueError("no values to average")
    ids = list(range(len(vals))) if clusters is None else list(clusters)
    if len(ids) != len(vals):
        raise ValueError(f"{len(vals)} values but {len(ids)} cluster ids")
    n = len(vals)
    mean = math.fsum(vals) / n
    sums: dict[Hashable, float] = {}
    for v, c in zip(vals, ids):
        sums[c] = sums.get(c, 0.0) + (v - mean)
    g = len(sums)
    if g < 2:
        return MeanEstimate(mean, math.nan, n, g)
    var = g / (g - 1) * math.fsum(s * s for s in sums.values()) / (n * n)
    return MeanEstimate(mean, math.sqrt(var), n, g)


def kl_from_logps(policy_logps: Sequence[float] | Tensor, reference_logps: Sequence[float] | Tensor,
                  clusters: Sequence[Hashable] | None = None) -> KLEstimate:
    """KL(pi || pi_ref) from the log-probs of samples of pi under pi and under pi_ref (one value per sample)."""
    p = torch.as_tensor(policy_logps, dtype=torch.float64).reshape(-1)
    q = torch.as_tensor(reference_logps, dtype=torch.float64).reshape(-1)
    if p.shape != q.shape:
        raise ValueError(f"{p.numel()} policy log-probs but {q.numel()} reference log-probs")
    return clustered_mean(p - q, clusters)


@torch.no_grad()
def sequence_logps(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]],
                   response_ids: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16) -> Tensor:
    """log model(response | prompt) of each (prompt ids, response ids), [N] float32 on the CPU.

    Uses the training forward (``logprobs.forward_logps`` over ``collate_preferences`` rows), batched by length.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    items = [TokenizedExample(list(p), [list(r)]) for p, r in zip(prompt_ids, response_ids)]
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids) + len(items[i].response_ids[0]))
    out = torch.empty(len(items), dtype=torch.float32)
    device = next(model.parameters()).device
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = to_device(collate_preferences([items[i] for i in idx], pad_token_id), device)
            out[idx] = forward_logps(model, batch).sum.float().cpu()
    return out


def estimate_kl(policy: torch.nn.Module, reference: torch.nn.Module, samples: Sequence[Any], pad_token_id: int,
                batch_size: int = 16) -> tuple[KLEstimate, Tensor, Tensor]:
    """KL(policy || reference) from ``prefopt.generation.Sample`` s drawn from ``policy`` (temperature 1).

    Returns the estimate (clustered by ``prompt_index``) and the per-sample log-probs under both models.
    """
    prompts = [s.prompt_ids for s in samples]
    responses = [s.response_ids for s in samples]
    if any(not r for r in responses):
        raise ValueError("a sample has no response tokens (sample with max_new_tokens >= 1)")
    lp = sequence_logps(policy, prompts, responses, pad_token_id, batch_size)
    lr = sequence_logps(reference, prompts, responses, pad_token_id, batch_size)
    return kl_from_logps(lp, lr, [s.prompt_index for s in samples]), lp, lr


def best_of_n_kl(n: int) -> float:
    """KL(pi_BoN || pi) = log N - (N - 1) / N for Best-of-N sampling by a reward without ties.

    (With ties the true KL is smaller: this is an upper bound.)
    """
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


__all__ = [
    "KLEstimate",
    "MeanEstimate",
    "best_of_n_kl",
    "clustered_mean",
    "estimate_kl",
    "kl_from_logps",
    "sequence_logps",
]

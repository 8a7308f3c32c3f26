"""Preference losses: summed response log-probs in, per-example losses and detached rewards out.

Notation (all tensors of shape [B]): ``pi_c``/``pi_r`` are the policy's summed log-probs of the chosen
and rejected responses, ``ref_c``/``ref_r`` the reference model's, and

    h   = (pi_c - ref_c) - (pi_r - ref_r)        (log-ratio margin)
    r_c = beta * (pi_c - ref_c),  r_r = beta * (pi_r - ref_r)   (implicit rewards, detached)

Every pairwise loss has the signature of :data:`PairwiseLoss`; look one up with :func:`get_loss`.
Each variant has exactly one name: plain DPO (``sigmoid``) takes no label smoothing; use ``cdpo``
or ``robust`` for the two label-noise variants.

Reference-free DPO: pass zeros as the reference log-probs (an absent/uniform reference), e.g.
``reference_free(policy_chosen_logps)``; then h is the plain policy log-prob margin.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES", "PAIRWISE_LOSSES", "PairwiseLoss", "ListwiseLoss", "get_loss", "loss_names",
    "sigmoid", "cdpo", "robust", "ipo", "ipo_per_token", "hinge", "plackett_luce",
    "chosen_nll", "reference_free",
]


class PairwiseLoss(Protocol):
    def __call__(
        self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *, beta: float,
        label_smoothing: float = 0.0, chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]: ...


ListwiseLoss = Callable[..., tuple[Tensor, Tensor]]
LOSSES: dict[str, Callable[..., tuple[Tensor, ...]]] = {}


def _register(name: str):
    def deco(fn):
        LOSSES[name] = fn
        return fn
    return deco


def _check(beta: float, *tensors: Tensor) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (allowed range: (0, inf)), got {beta}")
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"log-prob tensors must all have the same shape, got {[tuple(x.shape) for x in tensors]}")


def _no_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(
            f"loss '{name}' takes no label_smoothing (got {label_smoothing}); "
            "use 'cdpo' (conservative DPO) or 'robust' (rDPO) for label noise"
        )


def _margin(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Return (h, r_c, r_r) with the rewards detached."""
    _check(beta, pc, pr, rc, rr)
    c, r = pc - rc, pr - rr
    return c - r, (beta * c).detach(), (beta * r).detach()


@_register("sigmoid")
def sigmoid(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
            reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
            chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """DPO (Rafailov et al. 2023): loss = -log sigma(beta * h)."""
    _no_smoothing("sigmoid", label_smoothing)
    h, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    return -F.logsigmoid(beta * h), rc, rr


@_register("cdpo")
def cdpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
         reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
         chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """Conservative DPO, eps in [0, 0.5]: loss = -(1-eps) log sigma(beta h) - eps log sigma(-beta h)."""
    eps = label_smoothing
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"cdpo label_smoothing must be in [0, 0.5], got {eps}")
    h, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h), rc, rr


@_register("robust")
def robust(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
           reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
           chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """rDPO (Chowdhury et al. 2024), flip rate eps in [0, 0.5), unbiased under label noise:
    loss = (-(1-eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)."""
    eps = label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust label_smoothing must be in [0, 0.5), got {eps}")
    h, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return loss, rc, rr


@_register("ipo")
def ipo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
        chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """IPO (Azar et al. 2023) on summed log-probs: loss = (h - 1/(2 beta))^2."""
    _no_smoothing("ipo", label_smoothing)
    h, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    return (h - 1 / (2 * beta)) ** 2, rc, rr


@_register("ipo_per_token")
def ipo_per_token(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                  reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
                  chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """IPO on length-normalised log-ratios (TRL's convention):
    h' = (pi_c - ref_c)/len_c - (pi_r - ref_r)/len_r,  loss = (h' - 1/(2 beta))^2.

    Only the loss is length-normalised: the reported rewards are beta * (pi - ref) on summed log-probs, as for
    every other loss (and as TRL 1.16 reports them for its ``ipo``), so reward metrics compare across losses.
    """
    _no_smoothing("ipo_per_token", label_smoothing)
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("ipo_per_token requires chosen_lengths and rejected_lengths (response token counts)")
    _check(beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
           chosen_lengths, rejected_lengths)
    if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
        raise ValueError("ipo_per_token lengths must be positive token counts")
    c = (policy_chosen_logps - reference_chosen_logps) / chosen_lengths
    r = (policy_rejected_logps - reference_rejected_logps) / rejected_lengths
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    return (c - r - 1 / (2 * beta)) ** 2, chosen_rewards.detach(), rejected_rewards.detach()


@_register("hinge")
def hinge(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
          reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
          chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """SLiC hinge: loss = relu(1 - beta h)."""
    _no_smoothing("hinge", label_smoothing)
    h, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    return torch.relu(1 - beta * h), rc, rr


PAIRWISE_LOSSES: tuple[str, ...] = tuple(LOSSES)


@_register("plackett_luce")
def plackett_luce(policy_logps: Tensor, reference_logps: Tensor, *, beta: float) -> tuple[Tensor, Tensor]:
    """Plackett-Luce DPO (DPO paper, App. A.3) over K ranked responses [B, K], best first.

    With r_k = beta (pi_k - ref_k): loss = -sum_k [r_k - logsumexp(r_k, ..., r_{K-1})].
    Equals ``sigmoid`` at K = 2. Returns (losses [B], rewards [B, K] detached).
    """
    _check(beta, policy_logps, reference_logps)
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise ValueError(f"plackett_luce expects [B, K] log-probs with K >= 2, got {tuple(policy_logps.shape)}")
    r = beta * (policy_logps - reference_logps)
    suffix_lse = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)  # logsumexp(r_k..r_{K-1})
    return -(r - suffix_lse).sum(-1), r.detach()


def loss_names() -> list[str]:
    """All registered loss names (pairwise first, then listwise)."""
    return list(LOSSES)


def get_loss(name: str) -> Callable[..., tuple[Tensor, ...]]:
    """Look up a loss by name; unknown names raise ValueError listing the available ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; available: {', '.join(LOSSES)}") from None


def chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-token NLL of the chosen response, -logps / lengths ([B]); an optional anchor term."""
    if policy_chosen_logps.shape != chosen_lengths.shape:
        raise ValueError("policy_chosen_logps and chosen_lengths must have the same shape")
    return -policy_chosen_logps / chosen_lengths


def reference_free(logps: Tensor) -> Tensor:
    """Zero reference log-probs for reference-free DPO (an absent/uniform reference)."""
    return torch.zeros_like(logps).detach()

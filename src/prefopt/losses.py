"""Preference losses: summed response log-probs in, per-example losses and detached rewards out.

Notation (all tensors of shape [B]): ``pi_c``/``pi_r`` are the policy's summed log-probs of the chosen
and rejected responses, ``ref_c``/``ref_r`` the reference model's, and

    h   = (pi_c - ref_c) - (pi_r - ref_r)        (log-ratio margin)
    r_c = beta * (pi_c - ref_c),  r_r = beta * (pi_r - ref_r)   (implicit rewards, detached)

Every pairwise loss has the signature of :data:`PairwiseLoss`; look one up with :func:`get_loss`.
Each variant has exactly one name: plain DPO (``sigmoid``) takes no label smoothing; use ``cdpo``
or ``robust`` for the two label-noise variants (``exo_pair`` reads it as EXO's epsilon).

Losses that need a hyper-parameter besides beta take it as a keyword argument with TRL 1.16's default
(``discopop``'s ``tau``); ``exo_pair`` reads ``label_smoothing`` as its epsilon (see its docstring).

Not here because they couple the examples of a batch: TRL's ``aot``/``aot_unpaired`` sort log-ratios across the
batch (a per-example loss would then depend on the micro-batch split, which breaks exact gradient accumulation),
and ``bco_pair`` needs a running reward mean (state across steps).

Reference-free losses (:data:`REFERENCE_FREE_LOSSES`: ``simpo``, ``orpo``) read only the policy's log-probs
(their reference arguments are ignored): a run with one loads no reference model and makes no reference pass.

Reference-free DPO: pass zeros as the reference log-probs (an absent/uniform reference), e.g.
``reference_free(policy_chosen_logps)``; then h is the plain policy log-prob margin.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES", "PAIRWISE_LOSSES", "PairwiseLoss", "ListwiseLoss", "get_loss", "loss_names",
    "sigmoid", "cdpo", "robust", "ipo", "ipo_per_token", "hinge", "exo_pair", "nca_pair", "sppo_hard",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "orpo", "plackett_luce", "REFERENCE_FREE_LOSSES",
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


def _length_normalised_margin(name: str, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float,
                              len_c: Tensor | None, len_r: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Return (h', r_c, r_r): h' = (pi_c - ref_c)/len_c - (pi_r - ref_r)/len_r, rewards on summed log-ratios."""
    if len_c is None or len_r is None:
        raise ValueError(f"{name} requires chosen_lengths and rejected_lengths (response token counts)")
    _check(beta, pc, pr, rc, rr, len_c, len_r)
    if (len_c <= 0).any() or (len_r <= 0).any():
        raise ValueError(f"{name} lengths must be positive token counts")
    c, r = pc - rc, pr - rr
    return c / len_c - r / len_r, (beta * c).detach(), (beta * r).detach()


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
    h, chosen_rewards, rejected_rewards = _length_normalised_margin(
        "ipo_per_token", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta, chosen_lengths, rejected_lengths)
    return (h - 1 / (2 * beta)) ** 2, chosen_rewards, rejected_rewards


@_register("hinge")
def hinge(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
          reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
          chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """SLiC hinge: loss = relu(1 - beta h)."""
    _no_smoothing("hinge", label_smoothing)
    h, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    return torch.relu(1 - beta * h), rc, rr


@_register("exo_pair")
def exo_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16),
    K = 2: KL(q || p) with q = (sigma(beta h), sigma(-beta h)) and the smoothed target p = (1 - eps, eps):
    loss = sigma(beta h) (log sigma(beta h) - log(1 - eps)) + sigma(-beta h) (log sigma(-beta h) - log eps).

    eps is ``label_smoothing``, in [0, 0.5]; 0 (the default) means the paper's recommended 1e-3. TRL 1.16 reads
    the same label_smoothing as eps but refuses 0; any eps > 0 gives TRL's loss exactly.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"exo_pair label_smoothing (epsilon) must be in [0, 0.5] (0: 1e-3), got {label_smoothing}")
    eps = label_smoothing or 1e-3
    h, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    z = beta * h
    loss = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return loss, rc, rr


@_register("nca_pair")
def nca_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"), pairwise:
    loss = -log sigma(r_c) - 1/2 log sigma(-r_c) - 1/2 log sigma(-r_r)."""
    _no_smoothing("nca_pair", label_smoothing)
    _, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    zc = beta * (policy_chosen_logps - reference_chosen_logps)
    zr = beta * (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr), rc, rr


@_register("sppo_hard")
def sppo_hard(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
              reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
              chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """SPPO (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", Eq. 4.7) with hard
    win probabilities (1 for chosen, 0 for rejected), as TRL's ``sppo_hard``:
    loss = ((pi_c - ref_c) - 1/(2 beta))^2 + ((pi_r - ref_r) + 1/(2 beta))^2."""
    _no_smoothing("sppo_hard", label_smoothing)
    _, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    c = policy_chosen_logps - reference_chosen_logps
    r = policy_rejected_logps - reference_rejected_logps
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2, rc, rr


@_register("apo_zero")
def apo_zero(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Eq. 7),
    for chosen responses better than the policy's own: loss = (1 - sigma(r_c)) + sigma(r_r)."""
    _no_smoothing("apo_zero", label_smoothing)
    _, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    zc = beta * (policy_chosen_logps - reference_chosen_logps)
    zr = beta * (policy_rejected_logps - reference_rejected_logps)
    return (1 - torch.sigmoid(zc)) + torch.sigmoid(zr), rc, rr


@_register("apo_down")
def apo_down(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), for chosen responses worse than the policy's own:
    loss = sigma(r_c) + (1 - sigma(beta h))."""
    _no_smoothing("apo_down", label_smoothing)
    h, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    zc = beta * (policy_chosen_logps - reference_chosen_logps)
    return torch.sigmoid(zc) + (1 - torch.sigmoid(beta * h)), rc, rr


@_register("discopop")
def discopop(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None, tau: float = 0.05):
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms
    with and for Large Language Models", Eq. 5), temperature tau (TRL's ``discopop_tau``, default 0.05):
    with z = beta h and m = sigma(z / tau): loss = (1 - m) (-log sigma(z)) + m exp(-z)."""
    _no_smoothing("discopop", label_smoothing)
    if not tau > 0:
        raise ValueError(f"discopop tau must be > 0, got {tau}")
    h, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    z = beta * h
    m = torch.sigmoid(z / tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z), rc, rr


@_register("sigmoid_norm")
def sigmoid_norm(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                 reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
                 chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """Length-normalised DPO (TRL's ``sigmoid_norm``; the DPO loss of Rafailov et al. 2023 on per-token
    log-ratios): h' = (pi_c - ref_c)/len_c - (pi_r - ref_r)/len_r, loss = -log sigma(beta h').
    Rewards stay beta * (pi - ref) on summed log-probs, as TRL reports them."""
    _no_smoothing("sigmoid_norm", label_smoothing)
    h, rc, rr = _length_normalised_margin(
        "sigmoid_norm", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta, chosen_lengths, rejected_lengths)
    return -F.logsigmoid(beta * h), rc, rr


def _mean_logps(name: str, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float,
                len_c: Tensor | None, len_r: Tensor | None) -> tuple[Tensor, Tensor]:
    """Return the length-normalised policy log-probs (pi_c/len_c, pi_r/len_r); the reference ones are unused."""
    if len_c is None or len_r is None:
        raise ValueError(f"{name} requires chosen_lengths and rejected_lengths (response token counts)")
    _check(beta, pc, pr, rc, rr, len_c, len_r)
    if (len_c <= 0).any() or (len_r <= 0).any():
        raise ValueError(f"{name} lengths must be positive token counts")
    return pc / len_c, pr / len_r


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both sides of -ln 2 (as TRL's ORPO)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@_register("simpo")
def simpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
          reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
          chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None, gamma: float = 0.5):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6),
    reference-free, target reward margin gamma (TRL's ``simpo_gamma``, default 0.5, on the reward scale):
    loss = -log sigma(beta (pi_c/len_c - pi_r/len_r) - gamma); rewards beta * pi/len (length-normalised, as
    TRL's CPOTrainer reports them). The reference log-probs are ignored."""
    _no_smoothing("simpo", label_smoothing)
    if not gamma >= 0:
        raise ValueError(f"simpo gamma must be >= 0, got {gamma}")
    mc, mr = _mean_logps("simpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                         reference_rejected_logps, beta, chosen_lengths, rejected_lengths)
    return -F.logsigmoid(beta * (mc - mr) - gamma), (beta * mc).detach(), (beta * mr).detach()


@_register("orpo")
def orpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
         reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
         chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eqs. 4-7),
    reference-free, lambda = beta (as TRL's ORPOTrainer). With m = pi/len (mean per-token log-prob) and
    log odds(y) = m - log(1 - exp(m)):
    loss = -m_c - beta log sigma(log odds(y_w) - log odds(y_l)); rewards beta * m.

    The NLL term -m_c is the chosen response's mean per-token NLL of each example; TRL averages the NLL over all
    chosen tokens of a batch instead, which is the same when the chosen responses have equal lengths. The
    reference log-probs are ignored."""
    _no_smoothing("orpo", label_smoothing)
    mc, mr = _mean_logps("orpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                         reference_rejected_logps, beta, chosen_lengths, rejected_lengths)
    log_odds = (mc - mr) - (_log1mexp(mc) - _log1mexp(mr))
    return -mc - beta * F.logsigmoid(log_odds), (beta * mc).detach(), (beta * mr).detach()


PAIRWISE_LOSSES: tuple[str, ...] = tuple(LOSSES)
REFERENCE_FREE_LOSSES: frozenset[str] = frozenset({"simpo", "orpo"})


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

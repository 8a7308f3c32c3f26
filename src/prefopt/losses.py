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

Two kinds of loss reach beyond one example, and say so in their docstrings: ``aot`` and ``aot_pair`` sort
log-ratios across the examples they are given (the micro-batch: their update depends on ``micro_batch_size``,
so exact gradient accumulation needs micro_batch_size = batch_size), and ``bco_pair`` shifts its rewards by a
running reward mean ``delta`` that the caller keeps (``prefopt.train.dpo.RewardShift``) and passes in; the
function itself stays pure.

Weighted combinations (``sigmoid,sft`` with weights 1.0, 0.2) are sums of registered losses:
:func:`parse_loss_spec` reads them and :func:`combine` adds the parts. ``sft`` is the chosen response's
per-token NLL as a loss of its own (for combinations; TRL's MPO recipe is ``sigmoid,bco_pair,sft``).

Unpaired feedback (KTO: each completion labelled desirable or not, no pairs) has its own signature, :func:`kto`,
with its KL reference point from :func:`kto_kl`; it is not in the pairwise registry (``prefopt kto`` runs it).

Modifiers that change the log-probs a loss sees (they need per-token values, so they live beside the losses
rather than in them): :func:`ld_token_weights` (LD-DPO) and :func:`wpo_weights` (WPO).

Reference-free losses (:data:`REFERENCE_FREE_LOSSES`: ``simpo``, ``orpo``, ``sft``) read only the policy's log-probs
(their reference arguments are ignored): a run with one loads no reference model and makes no reference pass.

Reference-free DPO: pass zeros as the reference log-probs (an absent/uniform reference), e.g.
``reference_free(policy_chosen_logps)``; then h is the plain policy log-prob margin.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES", "PAIRWISE_LOSSES", "PairwiseLoss", "ListwiseLoss", "get_loss", "loss_names",
    "sigmoid", "cdpo", "robust", "ipo", "ipo_per_token", "hinge", "exo_pair", "nca_pair", "sppo_hard",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "orpo", "bco_pair", "aot", "aot_pair", "sft",
    "plackett_luce", "REFERENCE_FREE_LOSSES", "BATCH_COUPLED_LOSSES", "chosen_nll", "reference_free",
    "parse_loss_spec", "combine", "ld_token_weights", "wpo_weights", "kto", "kto_kl",
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


@_register("bco_pair")
def bco_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             delta: float | Tensor = 0.0):
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    Eq. 7): the chosen response is a positive, the rejected one a negative of a logistic classifier whose logit
    is the implicit reward shifted by delta:
    loss = -log sigma(r_c - delta) - log sigma(-(r_r - delta)).

    delta is the paper's reward shift, the running mean of (r_c + r_r) / 2 over the training so far; it is state
    across steps, so the caller keeps it (``prefopt.train.dpo.RewardShift``) and passes it in (default 0, the
    value before any step). TRL 1.16's ``bco_pair`` keeps no shift: it is this loss with delta = 0."""
    _no_smoothing("bco_pair", label_smoothing)
    _, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    zc = beta * (policy_chosen_logps - reference_chosen_logps)
    zr = beta * (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(zc - delta) - F.logsigmoid(-(zr - delta)), rc, rr


def _sorted_cdpo(name: str, delta: Tensor, beta: float, eps: float) -> Tensor:
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"{name} label_smoothing must be in [0, 0.5], got {eps}")
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


@_register("aot")
def aot(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
        chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """AOT for paired data (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport"): first-order stochastic dominance of the policy's chosen-over-rejected log-ratio distribution
    over the reference's, by one-dimensional optimal transport, i.e. matching sorted values. With
    u = sort(pi_c - pi_r) and v = sort(ref_c - ref_r) over the batch, the i-th loss is cDPO on u_i - v_i:
    loss_i = -(1 - eps) log sigma(beta (u_i - v_i)) - eps log sigma(-beta (u_i - v_i)), eps = label_smoothing.

    Batch-coupled: loss_i belongs to the i-th quantile, not to example i (only the sum is meaningful); the sort
    runs over the examples passed in, so a run's update depends on micro_batch_size. Rewards are the usual
    per-example beta * (pi - ref). For one pair it is ``cdpo``."""
    _, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    u, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    v, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
    return _sorted_cdpo("aot", u - v, beta, label_smoothing), rc, rr


@_register("aot_pair")
def aot_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """AOT for unpaired data (Melnyk et al. 2024): the distribution of chosen log-ratios must dominate that of
    rejected ones, whichever prompt they came from. With a = sort(pi_c - ref_c) and b = sort(pi_r - ref_r) over
    the batch: loss_i = -(1 - eps) log sigma(beta (a_i - b_i)) - eps log sigma(-beta (a_i - b_i)).

    TRL 1.16 calls this ``aot_unpaired`` (earlier TRL releases called it ``aot_pair``). Batch-coupled like
    ``aot`` (see there); for one pair it is ``cdpo``."""
    _, rc, rr = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta)
    a, _ = torch.sort(policy_chosen_logps - reference_chosen_logps, dim=0)
    b, _ = torch.sort(policy_rejected_logps - reference_rejected_logps, dim=0)
    return _sorted_cdpo("aot_pair", a - b, beta, label_smoothing), rc, rr


@_register("sft")
def sft(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0,
        chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None):
    """The chosen response's NLL per token, -pi_c / len_c, as a loss (the SFT term of a weighted combination such
    as ``sigmoid,sft``; reference-free). Rewards beta * pi / len, as ``orpo``.

    Per example: TRL's ``sft`` part averages over all chosen tokens of a batch instead, which is the same for one
    example, or for chosen responses of equal length."""
    _no_smoothing("sft", label_smoothing)
    mc, mr = _mean_logps("sft", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                         reference_rejected_logps, beta, chosen_lengths, rejected_lengths)
    return -mc, (beta * mc).detach(), (beta * mr).detach()


PAIRWISE_LOSSES: tuple[str, ...] = tuple(LOSSES)
REFERENCE_FREE_LOSSES: frozenset[str] = frozenset({"simpo", "orpo", "sft"})
BATCH_COUPLED_LOSSES: frozenset[str] = frozenset({"aot", "aot_pair"})


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


# ---------------------------------------------------------------------------------------------------------
# Weighted combinations


def parse_loss_spec(loss: str, weights: "Sequence[float | str] | None" = None) -> tuple[tuple[str, float], ...]:
    """``"sigmoid,sft"`` and weights ``[1.0, 0.2]`` -> ``(("sigmoid", 1.0), ("sft", 0.2))``.

    No weights: every part weighs 1. Names must be registered pairwise losses and appear once; there must be as
    many weights as names, each finite and >= 0. ``plackett_luce`` (ranked data) does not combine. ValueError
    otherwise."""
    names = [n.strip() for n in str(loss).split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"loss {loss!r}: expected a name or comma-separated names such as 'sigmoid,sft'")
    for n in names:
        get_loss(n)
    if len(set(names)) != len(names):
        raise ValueError(f"loss {loss!r} names a loss twice; give each part once, with its weight")
    if len(names) > 1 and "plackett_luce" in names:
        raise ValueError("plackett_luce (ranked responses) cannot be combined with pairwise losses")
    if weights is None or len(weights) == 0:
        ws = [1.0] * len(names)
    else:
        try:
            ws = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise ValueError(f"loss_weights {list(weights)!r}: expected numbers") from None
        if len(ws) != len(names):
            raise ValueError(f"loss_weights has {len(ws)} values for {len(names)} losses ({', '.join(names)})")
        if any(not (math.isfinite(w) and w >= 0) for w in ws):
            raise ValueError(f"loss_weights {ws}: each must be a finite number >= 0")
    return tuple(zip(names, ws))


def combine(parts: "Sequence[tuple[str, float]]", policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
            reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, *, beta: float,
            kwargs: "dict[str, dict] | None" = None, **common) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """A weighted sum of pairwise losses: loss = sum_k w_k loss_k (per example, as TRL 1.16's loss lists, whose
    batch loss is sum_k w_k mean(loss_k)). ``kwargs[name]`` holds a part's own keyword arguments (``simpo``'s
    gamma, ``bco_pair``'s delta); ``common`` goes to every part (label_smoothing, lengths).

    Returns (losses, rewards of the first part, ..., {name: that part's unweighted losses, detached})."""
    kwargs = kwargs or {}
    total, parts_out, rewards = None, {}, None
    for name, weight in parts:
        loss, rc, rr = get_loss(name)(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                      reference_rejected_logps, beta=beta, **common, **kwargs.get(name, {}))
        parts_out[name] = loss.detach()
        total = weight * loss if total is None else total + weight * loss
        if rewards is None:
            rewards = (rc, rr)
    return total, rewards[0], rewards[1], parts_out


# ---------------------------------------------------------------------------------------------------------
# Modifiers of the log-probs a loss sees


def ld_token_weights(mask: Tensor, num_responses: int, alpha: float) -> Tensor:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization", Eq. 9): the weight of
    each response token in its response's summed log-prob. The first min(len_c, len_r) response tokens of both
    responses of a pair weigh 1, the tokens past the shorter response's length weigh alpha, so
    log pi = shared + alpha * tail.

    mask: [K*B, T] response-token flags (response-major rows, as the collate functions make them: row k*B + b is
    response k of example b), K = 2. Returns float weights [K*B, T] (0 off the response)."""
    if num_responses != 2:
        raise ValueError(f"LD-DPO weighs the tokens of a pair; got {num_responses} responses per example")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {alpha}")
    mask = mask.bool()
    pos = mask.long().cumsum(-1)  # 1-based position within the response
    lengths = mask.sum(-1).view(2, -1)
    shared = torch.minimum(lengths[0], lengths[1]).repeat(2).unsqueeze(-1)
    w = torch.where(pos <= shared, 1.0, alpha).to(torch.float32)
    return w * mask


def wpo_weights(token_logps: Tensor, token_log_sum_sq: Tensor, mask: Tensor) -> Tensor:
    """WPO (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2 with the
    aligned per-token probabilities of its Sec. 3): how likely the policy is to produce each response itself,
    w(y) = exp(mean_t [log p(y_t) - log sum_v p(v)^2]), per response row, without gradient. A pair's loss is
    multiplied by w(y_c) w(y_r) (as TRL 1.16's ``use_weighting``).

    token_logps, token_log_sum_sq, mask: [N, T] (log p of each label token, log sum_v p_v^2 at that position,
    response-token flags). Returns [N]."""
    mask = mask.to(token_logps.dtype)
    count = mask.sum(-1).clamp(min=1)
    with torch.no_grad():
        return torch.exp(((token_logps - token_log_sum_sq) * mask).sum(-1) / count)


# ---------------------------------------------------------------------------------------------------------
# Unpaired feedback: each completion is labelled desirable or undesirable on its own (no pairs)


def kto_kl(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z_0 (Ethayarajh et al. 2024, Eq. 7): the KL(pi || pi_ref) of a batch, estimated from
    mismatched (prompt, completion) pairs of the batch, as mean(pi - ref) over them, detached and clamped at 0.
    Returns a 0-dim tensor."""
    if policy_kl_logps.shape != reference_kl_logps.shape:
        raise ValueError("policy and reference KL log-probs must have the same shape")
    return (policy_kl_logps - reference_kl_logps).detach().mean().clamp(min=0)


def kto(policy_logps: Tensor, reference_logps: Tensor, desirable: Tensor, *, beta: float, kl: Tensor | float,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eqs. 7-8) on
    unpaired completions [B] with labels ``desirable`` [B] (bool). With r = beta (pi - ref) and z_0 = beta * kl
    (``kto_kl``):

        desirable:   loss = lambda_D (1 - sigma(r - z_0))
        undesirable: loss = lambda_U (1 - sigma(z_0 - r))

    (lambda_D, lambda_U = desirable_weight, undesirable_weight). Returns (losses [B], rewards r [B] detached)."""
    _check(beta, policy_logps, reference_logps)
    if desirable.shape != policy_logps.shape:
        raise ValueError(f"desirable must be a [B] label per completion, got {tuple(desirable.shape)}")
    if not (desirable_weight >= 0 and undesirable_weight >= 0):
        raise ValueError("desirable_weight and undesirable_weight must be >= 0")
    r = beta * (policy_logps - reference_logps)
    z0 = beta * kl
    good = desirable_weight * (1 - torch.sigmoid(r - z0))
    bad = undesirable_weight * (1 - torch.sigmoid(z0 - r))
    return torch.where(desirable.bool(), good, bad), r.detach()

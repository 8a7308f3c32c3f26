"""The pure math of PPO-RLHF (Ziegler et al. 2019; Stiennon et al. 2020), one small function per piece.

Every tensor here is ``[B, T]`` over *response* tokens, right-padded, with ``mask`` (bool or 0/1) marking the
real tokens; a response's tokens are contiguous from position 0. Token ``t`` is the action ``a_t`` taken in
state ``s_t`` (the prompt plus the ``t`` tokens before it).

    rewards, kl = kl_penalized_rewards(logps, ref_logps, scores, mask, kl_coef)   # r_t = -c (log pi - log pi_ref)
    advantages, returns = gae(rewards, values, mask, gamma, lam)                  #       + score at the last token
    advantages = whiten(advantages, mask)
    pg, clipfrac, approx_kl = clipped_policy_loss(new_logps, old_logps, advantages, mask, cliprange)
    vf, vf_clipfrac = clipped_value_loss(new_values, old_values, returns, mask, cliprange_value)

The losses are per sequence (the mean over that sequence's tokens), so a batch loss is the mean over
sequences and any micro-batching of the sequences gives the same gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set (over all of them, or along ``dim``)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked positions (Bessel-corrected unless ``unbiased=False``)."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked positions; padding comes out as 0.

    With ``shift_mean=False`` only the scale changes (the mean is added back), as is usual for rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of each row's last real token, [B] (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def kl_penalized_rewards(logps: Tensor, ref_logps: Tensor, scores: Tensor, mask: Tensor,
                         kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards r_t = -kl_coef (log pi(a_t|s_t) - log pi_ref(a_t|s_t)), plus the score at the last token.

    Returns ``(rewards [B, T], kl [B, T])`` where ``kl`` is the per-token estimate log pi - log pi_ref
    (zero on padding); its sum over a row is the sequence-level KL estimate.
    """
    m = mask.to(logps.dtype)
    kl = (logps - ref_logps) * m
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.index_put((rows, last_token_index(mask)), scores.to(rewards.dtype), accumulate=True)
    return rewards * m, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with V = 0 after the last token (the episode ends there);
    A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V(s_t). Both [B, T], zero on padding.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    returns = (advantages + values) * m
    return advantages.detach(), returns.detach()


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                        cliprange: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate, per sequence.

    loss_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) with rho_t = pi(a_t|s_t) / pi_old(a_t|s_t).
    Returns ``(loss [B], clipfrac [B], approx_kl [B])``: the token means of loss_t, of "the clipped term
    was the larger one", and of 0.5 (log rho_t)^2 (an estimate of KL(pi_old || pi)).
    """
    log_ratio = (logps - old_logps) * mask.to(logps.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, dim=-1)
    clipfrac = masked_mean((clipped > unclipped).to(logps.dtype), mask, dim=-1)
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask, dim=-1)
    return loss, clipfrac.detach(), approx_kl


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       cliprange_value: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss, per sequence: 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

    Returns ``(loss [B], clipfrac [B])`` (token means; clipfrac: the clipped error was the larger one).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask, dim=-1)
    clipfrac = masked_mean((err_clipped > err).to(values.dtype), mask, dim=-1)
    return loss, clipfrac.detach()


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, in float32."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# KL coefficient controllers


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019), section 2.2: steer the KL coefficient towards a target KL.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta (1 + e n_steps / horizon),
    where ``n_steps`` is the number of samples (episodes) since the last update. Too much KL raises beta,
    too little lowers it.
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


__all__ = ["masked_sum", "masked_mean", "masked_var", "whiten", "last_token_index", "kl_penalized_rewards", "gae",
           "clipped_policy_loss", "clipped_value_loss", "entropy_from_logits", "FixedKLController",
           "AdaptiveKLController", "KLController"]

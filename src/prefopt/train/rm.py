"""Bradley-Terry reward-model training on preference pairs (``prefopt rm``).

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` built from a causal LM checkpoint
(``build_reward_model``: for Llama, the transformer's weights plus a fresh linear ``score`` head); the saved
folder loads and scores with ``prefopt.rewards`` (``load_reward_model``, ``score_texts``), which also holds the
forward shared by training and scoring (``sequence_rewards``) and explains where the reward is read.

Loss: -log sigmoid(r_chosen - r_rejected); ranked data (K > 2 responses, best first) averages it over every
ordered pair. Logged: ``loss``, ``accuracy`` (fraction of pairs ordered correctly), ``rewards/chosen``,
``rewards/rejected`` (best and worst response), ``rewards/margins``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor

from ..config import RMConfig
from ..data import collate_preferences
from ..data.table import response_counts
from ..errors import ConfigError
from ..logprobs import split_responses
from ..models import (DTYPES, apply_lora, disable_dropout, enable_gradient_checkpointing, load_tokenizer,
                      load_with_attention, quiet_progress_bars)
from ..rewards import sequence_rewards
from .loop import StepResult, train
from .sharding import use_engine
from .setup import load_preference_items, save_model_and_tokenizer

RM_SUMMARY_KEYS = ("loss", "accuracy", "rewards/margins")


def bradley_terry(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example loss and accuracy from rewards [B, K] of responses ordered best first.

    K = 2: -log sigmoid(r_0 - r_1). K > 2: the mean of that over all K(K-1)/2 ordered pairs.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"a reward-model example needs at least 2 responses, got {k}")
    better, worse = torch.triu_indices(k, k, offset=1, device=rewards.device)
    diff = rewards[:, better] - rewards[:, worse]
    return -F.logsigmoid(diff).mean(-1), (diff > 0).float().mean(-1)


def center_penalty(rewards: Tensor) -> Tensor:
    """Per-example (r_better + r_worse)^2, averaged over the same ordered pairs as ``bradley_terry``: it pulls the
    mean of each pair's rewards to 0 and leaves their difference (what the loss learns) alone."""
    k = rewards.shape[-1]
    better, worse = torch.triu_indices(k, k, offset=1, device=rewards.device)
    return (rewards[:, better] + rewards[:, worse]).pow(2).mean(-1)


class RewardModeling:
    """One micro-batch of Bradley-Terry training: ``step(model, batch) -> StepResult``."""

    unit = "pairs"

    def __init__(self, center_rewards_coefficient: float = 0.0):
        self.center = center_rewards_coefficient

    def step(self, model: torch.nn.Module, batch: dict) -> StepResult:
        rewards = split_responses(sequence_rewards(model, batch), batch["num_responses"])  # [B, K]
        losses, accuracy = bradley_terry(rewards)
        if self.center:
            losses = losses + self.center * center_penalty(rewards)
        r = rewards.detach()
        metrics = {"accuracy": accuracy, "rewards/chosen": r[:, 0], "rewards/rejected": r[:, -1],
                   "rewards/margins": r[:, 0] - r[:, -1]}
        return StepResult(losses, metrics, tokens=batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------------------
# Models


def build_reward_model(path: str, tokenizer: Any, *, dtype: str = "float32", trust_remote_code: bool = False,
                       attn_implementation: str | None = None) -> torch.nn.Module:
    """A sequence-classification model with one output from a causal LM (or reward model) checkpoint.

    The head is new (randomly initialised, seeded by the caller) unless the checkpoint already has one.
    """
    from transformers import AutoModelForSequenceClassification

    with quiet_progress_bars():
        model = load_with_attention(AutoModelForSequenceClassification.from_pretrained, path, attn_implementation,
                                    num_labels=1, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                    use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------------
# The run


def train_rm(cfg: RMConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Load preference data and the model, train the reward model, save it. Returns the loop's summary."""
    cfg.validate()
    accelerator = use_engine(accelerator or Accelerator(mixed_precision=cfg.mixed_precision))
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items = load_preference_items(cfg, tokenizer, accelerator)
    ks = response_counts(train_items, eval_items)
    if len(ks) > 1:
        raise ConfigError(f"every example must have the same number of responses; found {sorted(ks)}.")
    model = build_reward_model(cfg.model, tokenizer, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                               attn_implementation=cfg.attn_implementation)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules, task_type="SEQ_CLS")
    summary = train(cfg, model=model, method=RewardModeling(cfg.center_rewards_coefficient), train_items=train_items,
                    collate=partial(collate_preferences, pad_token_id=tokenizer.pad_token_id),
                    eval_items=eval_items or None, accelerator=accelerator,
                    save_final=lambda out: save_model_and_tokenizer(accelerator.unwrap_model(model), tokenizer, out),
                    summary_keys=RM_SUMMARY_KEYS)
    return summary


__all__ = ["RewardModeling", "bradley_terry", "build_reward_model", "train_rm", "RM_SUMMARY_KEYS"]

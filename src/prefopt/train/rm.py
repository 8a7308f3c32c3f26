"""Bradley-Terry reward models: training on preference pairs, loading, and batched scoring.

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` built from a causal LM checkpoint (for
Llama: ``LlamaForSequenceClassification``, the transformer's weights plus a fresh linear ``score`` head). The
reward r(x, y) is the head's output at the last non-pad token of ``prompt + response + EOS`` (transformers'
own pooling, with ``config.pad_token_id`` set), so the saved folder scores the same under plain transformers.
Prompt and response are tokenized separately and concatenated (``data.tokenize``) in training and in
``score_texts`` alike. (If the tokenizer pads with its EOS token, transformers treats the final EOS as padding
and reads the reward at the token before it: the same in training and scoring.)

Loss: -log sigmoid(r_chosen - r_rejected); ranked data (K > 2 responses, best first) averages it over every
ordered pair. Logged: ``loss``, ``accuracy`` (fraction of pairs ordered correctly), ``rewards/chosen``,
``rewards/rejected`` (best and worst response), ``rewards/margins``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor

from ..config import RMConfig
from ..data import PreferenceExample, collate_preferences
from ..data.tokenize import SpecialTokens, tokenize_example
from ..data.types import Text
from ..errors import ConfigError
from ..logprobs import split_responses
from ..models import (DTYPES, apply_lora, disable_dropout, enable_gradient_checkpointing, load_tokenizer,
                      quiet_progress_bars)
from .loop import StepResult, format_summary, train
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


def sequence_rewards(model: torch.nn.Module, batch: dict) -> Tensor:
    """One forward of the collated rows; the scalar reward of each row, [rows] in float32."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[:, 0].float()


class RewardModeling:
    """One micro-batch of Bradley-Terry training: ``step(model, batch) -> StepResult``."""

    unit = "pairs"

    def __init__(self, center_rewards_coefficient: float = 0.0):
        self.center = center_rewards_coefficient

    def step(self, model: torch.nn.Module, batch: dict) -> StepResult:
        rewards = split_responses(sequence_rewards(model, batch), batch["num_responses"])  # [B, K]
        losses, accuracy = bradley_terry(rewards)
        if self.center:
            losses = losses + self.center * rewards.pow(2).mean(-1)
        r = rewards.detach()
        metrics = {"accuracy": accuracy, "rewards/chosen": r[:, 0], "rewards/rejected": r[:, -1],
                   "rewards/margins": r[:, 0] - r[:, -1]}
        return StepResult(losses, metrics, tokens=batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------------------
# Models


def build_reward_model(path: str, tokenizer: Any, *, dtype: str = "float32", trust_remote_code: bool = False
                       ) -> torch.nn.Module:
    """A sequence-classification model with one output from a causal LM (or reward model) checkpoint.

    The head is new (randomly initialised, seeded by the caller) unless the checkpoint already has one.
    """
    from transformers import AutoModelForSequenceClassification

    with quiet_progress_bars():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(path: str | Path, *, dtype: str = "float32", device: Any = None,
                      trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """A trained reward model (e.g. from 'prefopt rm') and its tokenizer, frozen in eval mode."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    with quiet_progress_bars():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    if model.config.num_labels != 1:
        raise ConfigError(f"{path} is not a reward model: its head has {model.config.num_labels} outputs, not 1.")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    return (model.to(device) if device is not None else model), tokenizer


@torch.no_grad()
def score_texts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Text], responses: Sequence[Text],
                batch_size: int = 8, *, max_length: int | None = None,
                max_prompt_length: int | None = None) -> Tensor:
    """Rewards of (prompt, response) pairs, [N] float32 on the CPU, in input order.

    Each pair is tokenized exactly as in training (prompt and response separately, EOS once; message lists go
    through the chat template) and truncated by the same rules when ``max_length`` is given. Pairs are batched
    by length to limit padding.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    sp = SpecialTokens.of(tokenizer)
    items = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tok = tokenize_example(PreferenceExample(p, [r], f"<pair {i}>"), tokenizer, max_length=max_length,
                               max_prompt_length=max_prompt_length, specials=sp)
        if tok is None:
            raise ConfigError(f"pair {i}: the prompt alone fills max_length ({max_length}); raise max_length")
        items.append(tok)
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids) + len(items[i].response_ids[0]))
    out = torch.empty(len(items), dtype=torch.float32)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate_preferences([items[i] for i in idx], model.config.pad_token_id)
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        out[idx] = sequence_rewards(model, batch).cpu()
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------
# The run


def train_rm(cfg: RMConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Load preference data and the model, train the reward model, save it. Returns the loop's summary."""
    cfg.validate()
    accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items = load_preference_items(cfg, tokenizer, accelerator)
    ks = {ex.num_responses for ex in train_items + eval_items}
    if len(ks) > 1:
        raise ConfigError(f"every example must have the same number of responses; found {sorted(ks)}.")
    model = build_reward_model(cfg.model, tokenizer, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
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
    accelerator.print(format_summary(summary, RM_SUMMARY_KEYS))
    return summary


__all__ = ["RewardModeling", "bradley_terry", "sequence_rewards", "build_reward_model", "load_reward_model",
           "score_texts", "train_rm", "RM_SUMMARY_KEYS"]

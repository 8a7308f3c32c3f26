"""KTO on unpaired feedback (thumbs up / down), on the shared loop.

    labelled rows (prompt_j, completion_j)           -> policy log-probs (grad)  ┐
                                                      -> reference log-probs     ├─> losses.kto -> losses, rewards
    mismatched rows (prompt_j, completion_{j-1}) -> policy and reference, no grad ┘   (KL point: losses.kto_kl)

The KL reference point is estimated per micro-batch (as TRL's KTOTrainer does per device batch), so it depends on
micro_batch_size; it is detached, as in the paper. The reference runs live at every step (a frozen model, or the
LoRA base): the KL rows of a batch depend on which examples share it, so they cannot be cached per example.

Logged per step (means over the step's completions): ``loss``, ``kl`` (the micro-batch's estimate),
``rewards`` (beta (pi - ref)), ``desirable`` (the fraction labelled desirable) and ``rewards/desirable`` /
``rewards/undesirable`` (a completion's reward where it has that label, else 0): the mean reward of the desirable
completions is ``rewards/desirable`` / ``desirable``, of the undesirable ones ``rewards/undesirable`` /
(1 - ``desirable``). ``logps`` is the policy's summed log-prob.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .. import losses as L
from ..config import KTOConfig
from ..data.unpaired import collate_kto, kl_batch, main_batch
from ..logprobs import LogpsFn, forward_logps
from ..models import load_tokenizer
from .dpo import ReferenceFn, adapter_reference, live_reference
from .sharding import configure_deepspeed, describe, place_reference, shard_policy, use_engine
from .loop import StepResult, train
from .setup import load_policy, load_preference_items, save_model_and_tokenizer

KTO_SUMMARY_KEYS = ("loss", "kl", "rewards")


class KTO:
    """One micro-batch of KTO: ``step(model, batch) -> StepResult`` (batches from ``data.unpaired.collate_kto``)."""

    unit = "completions"

    def __init__(self, beta: float, reference: ReferenceFn, *, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, logps_fn: LogpsFn = forward_logps):
        self.beta, self.reference, self.logps_fn = beta, reference, logps_fn
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def step(self, model: torch.nn.Module, batch: dict) -> StepResult:
        rows, kl_rows, labels = main_batch(batch), kl_batch(batch), batch["labels"]
        policy = self.logps_fn(model, rows).sum  # [B]
        with torch.no_grad():
            policy_kl = self.logps_fn(model, kl_rows).sum
            ref = self.reference(model, rows).reshape(-1).to(policy.dtype)
            ref_kl = self.reference(model, kl_rows).reshape(-1).to(policy.dtype)
        kl = L.kto_kl(policy_kl, ref_kl)
        losses, rewards = L.kto(policy, ref, labels, beta=self.beta, kl=kl, desirable_weight=self.desirable_weight,
                                undesirable_weight=self.undesirable_weight)
        good = labels.to(rewards.dtype)
        metrics = {
            "kl": kl.expand_as(rewards),
            "rewards": rewards,
            "desirable": good,
            "rewards/desirable": rewards * good,
            "rewards/undesirable": rewards * (1 - good),
            "logps": policy.detach(),
        }
        tokens = rows["attention_mask"].sum() + kl_rows["attention_mask"].sum()
        return StepResult(losses, metrics, tokens=tokens)


def load_kto_items(cfg: KTOConfig, tokenizer: Any, accelerator: Accelerator):
    """Train and eval completions as memory-mapped tables, prepared and cached like preference data
    (``setup.load_preference_items`` with kind "unpaired"); the label counts printed."""
    train_items, eval_items = load_preference_items(cfg, tokenizer, accelerator, kind="unpaired")
    for what, items in (("train data", train_items), ("eval data", eval_items)):
        if len(items):
            good = int(items.labels().sum())
            accelerator.print(f"{what}: {len(items)} completions, {good} desirable, {len(items) - good} undesirable")
    return train_items, eval_items


def train_kto(cfg: KTOConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Load model and labelled completions, build the reference, train, save. Returns the loop's summary."""
    cfg.validate()
    accelerator = use_engine(accelerator or Accelerator(mixed_precision=cfg.mixed_precision))
    configure_deepspeed(accelerator, cfg)  # before a reference engine is built from its config
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items = load_kto_items(cfg, tokenizer, accelerator)  # checks output_dir and length limits
    policy, ref_model = load_policy(cfg, with_reference=not cfg.lora or bool(cfg.ref_model), ref_model=cfg.ref_model)
    policy = shard_policy(policy, accelerator)  # FSDP2: sharded before any pass (as for DPO)
    if ref_model is not None:
        reference: ReferenceFn = live_reference(place_reference(ref_model, accelerator))  # frozen, placed like it
        where = "the model given by ref_model" if cfg.ref_model else "a frozen copy of the initial policy"
    else:
        reference = adapter_reference(accelerator.unwrap_model)
        where = "the policy with its LoRA adapters switched off"
    accelerator.print(describe(accelerator, where))
    method = KTO(cfg.beta, reference, desirable_weight=cfg.desirable_weight,
                 undesirable_weight=cfg.undesirable_weight)
    return train(cfg, model=policy, method=method, train_items=train_items,
                 collate=partial(collate_kto, pad_token_id=tokenizer.pad_token_id),
                 eval_items=eval_items or None, accelerator=accelerator,
                 save_final=lambda out: save_model_and_tokenizer(accelerator.unwrap_model(policy), tokenizer, out),
                 summary_keys=KTO_SUMMARY_KEYS)


__all__ = ["KTO", "train_kto", "load_kto_items", "KTO_SUMMARY_KEYS"]

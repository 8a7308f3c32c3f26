"""Supervised fine-tuning (SFT): the NLL of response tokens, on the shared loop.

Loss normalisation: an example's loss is its summed response NLL divided by its own number of response
tokens (its mean per-token NLL). The loop averages per-example losses over the ``batch_size`` examples of a
step, so the normaliser never depends on how a step is cut into micro-batches (accumulation is exact) and
every example weighs the same whatever its length. (Dividing by the tokens of a micro-batch instead would make
the update depend on the micro-batch size.)

Logged per step (means over examples): ``loss`` and ``nll_per_token`` (the same number: the mean per-token NLL
of an example), ``ppl`` (the mean of exp(per-token NLL) over examples), ``response_tokens`` (trained tokens
per example) and, from the loop, ``tokens_per_second`` / ``examples_per_second``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..config import SFTConfig
from ..data.sft import collate_sft
from ..logprobs import forward_logps
from .loop import StepResult, train
from .sharding import use_engine
from .setup import load_run_inputs, save_model_and_tokenizer

SFT_SUMMARY_KEYS = ("loss", "nll_per_token", "ppl")
MAX_LOG_PPL = 50.0  # keeps ppl finite (and metrics.jsonl valid JSON) for a diverged model


class SFT:
    """One micro-batch of SFT: ``step(model, batch) -> StepResult`` with per-example mean per-token NLL."""

    unit = "examples"

    def step(self, model: torch.nn.Module, batch: dict) -> StepResult:
        if batch["num_responses"] != 1:
            raise ValueError(f"an SFT batch has one response per example, got {batch['num_responses']}")
        logps = forward_logps(model, batch)  # [B]: summed log-probs of the loss-masked tokens
        count = logps.count.clamp(min=1).to(logps.sum.dtype)
        losses = -logps.sum / count
        nll = losses.detach()
        metrics = {
            "nll_per_token": nll,
            "ppl": torch.exp(nll.clamp(max=MAX_LOG_PPL)),
            "response_tokens": logps.count.float(),
        }
        return StepResult(losses, metrics, tokens=batch["attention_mask"].sum())


def train_sft(cfg: SFTConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Load model and SFT data (or the chosen responses of preference data), train, save. Returns the summary."""
    cfg.validate()
    accelerator = use_engine(accelerator or Accelerator(mixed_precision=cfg.mixed_precision))
    set_seed(cfg.seed)
    run = load_run_inputs(cfg, accelerator, kind="sft", from_preferences=cfg.from_preferences)
    model, tokenizer = run.model, run.tokenizer
    summary = train(cfg, model=model, method=SFT(), train_items=run.train_items,
                    collate=partial(collate_sft, pad_token_id=tokenizer.pad_token_id),
                    eval_items=run.eval_items or None, accelerator=accelerator,
                    save_final=lambda out: save_model_and_tokenizer(accelerator.unwrap_model(model), tokenizer, out),
                    summary_keys=SFT_SUMMARY_KEYS)
    return summary


__all__ = ["SFT", "train_sft", "SFT_SUMMARY_KEYS"]

"""What every training run loads before its first step: tokenizer, data (checked and tokenized), model.

Data problems are found here, before any model is loaded, and reported with file, line and field.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..config import TrainConfig
from ..data import load_preferences, tokenize_examples
from ..data.types import TokenizedExample
from ..errors import ConfigError
from ..models import (apply_lora, disable_dropout, enable_gradient_checkpointing, load_model, load_tokenizer,
                      make_reference, quiet_progress_bars)


@dataclass
class RunInputs:
    model: torch.nn.Module
    tokenizer: Any
    train_items: list[TokenizedExample]
    eval_items: list[TokenizedExample] = field(default_factory=list)
    reference: torch.nn.Module | None = None


def load_preference_items(cfg: TrainConfig, tokenizer: Any, accelerator: Accelerator, *, kind: str = "preferences"
                          ) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Train and eval examples, tokenized with exact prompt/response boundaries.

    kind: "preferences" (K >= 2 ranked responses) or "sft" (one target response each, see data/sft.py).
    """

    def load(path: str, what: str) -> list[TokenizedExample]:
        if kind == "sft":
            from ..data.sft import load_sft, tokenize_sft

            examples, report = load_sft(path, format=cfg.data_format, split=cfg.split, skip_bad=cfg.skip_bad_rows,
                                        from_preferences=getattr(cfg, "from_preferences", False))
            tokenize = tokenize_sft
        else:
            examples, report = load_preferences(path, format=cfg.data_format, split=cfg.split,
                                                skip_bad=cfg.skip_bad_rows)
            tokenize = tokenize_examples
        accelerator.print(f"{what}: {report.summary()}")
        items, tok_report = tokenize(examples, tokenizer, max_length=cfg.max_length,
                                     max_prompt_length=cfg.max_prompt_length)
        if tok_report.truncated or tok_report.dropped:
            accelerator.print(f"{what}: {tok_report.summary()}")
        if not items:
            raise ConfigError(f"{what}: no usable examples in {path}.")
        return items

    train_items = load(cfg.data, "train data")
    eval_items: list[TokenizedExample] = []
    if cfg.eval_data:
        eval_items = load(cfg.eval_data, "eval data")
    elif cfg.eval_fraction > 0:
        order = list(range(len(train_items)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, round(cfg.eval_fraction * len(order)))
        held = set(order[:n_eval])
        eval_items = [x for i, x in enumerate(train_items) if i in held]
        train_items = [x for i, x in enumerate(train_items) if i not in held]
    return train_items, eval_items


def load_policy(cfg: TrainConfig, *, with_reference: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The trainable model (LoRA-wrapped if asked) and, if asked, a frozen reference made before wrapping."""
    if cfg.dtype != "float32" and not cfg.lora:
        warnings.warn(f"dtype={cfg.dtype} trains the weights themselves in {cfg.dtype}: updates much smaller than a "
                      "weight (e.g. at lr 1e-6) round away and most weights never change. For full fine-tuning "
                      "use --dtype float32 --mixed-precision bf16; low-precision weights suit --lora.", stacklevel=2)
    model = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.disable_dropout:
        disable_dropout(model)
    reference = None
    if with_reference:
        ref_path = getattr(cfg, "ref_model", None)
        reference = make_reference(model, ref_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code) \
            if ref_path else make_reference(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    return model, reference


def load_run_inputs(cfg: TrainConfig, accelerator: Accelerator, *, kind: str = "preferences") -> RunInputs:
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if kind not in ("preferences", "sft"):
        raise ValueError(f"unknown run kind {kind!r}")
    train_items, eval_items = load_preference_items(cfg, tokenizer, accelerator, kind=kind)
    # a separate frozen copy is needed only to run the reference live (a LoRA policy is its own reference, and
    # precomputing reads the initial policy once before it changes)
    own_ref = not getattr(cfg, "ref_model", None)
    needs_ref = kind == "preferences" and not getattr(cfg, "reference_free", False) \
        and not (own_ref and (cfg.lora or getattr(cfg, "precomputes_reference", False)))
    model, reference = load_policy(cfg, with_reference=needs_ref)
    return RunInputs(model, tokenizer, train_items, eval_items, reference)


def save_model_and_tokenizer(model: torch.nn.Module, tokenizer: Any, output_dir: Path) -> None:
    """The final model as plain transformers safetensors (LoRA adapters merged; adapters also kept)."""
    output_dir = Path(output_dir)
    with quiet_progress_bars():
        if hasattr(model, "peft_config"):
            model.save_pretrained(output_dir / "adapter", safe_serialization=True)
            model = model.merge_and_unload()
        model.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)

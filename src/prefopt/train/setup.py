"""What every training run loads before its first step: tokenizer, data (checked and tokenized), model.

Data problems are found here, before any model is loaded, and reported with file, line and field.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator

from ..config import TrainConfig, check_length_limits
from ..data.prepare import default_cache_dir, prepare_data
from ..data.table import TokenizedTable
from ..data.types import TokenizedExample
from ..errors import ConfigError
from ..models import (apply_lora, disable_dropout, enable_gradient_checkpointing, load_model, load_tokenizer,
                      is_partitioned, make_reference, quiet_progress_bars)
from .checkpoints import refuse_used_output_dir


@dataclass
class RunInputs:
    model: torch.nn.Module
    tokenizer: Any
    train_items: Sequence[TokenizedExample]
    eval_items: Sequence[TokenizedExample] = field(default_factory=list)
    reference: torch.nn.Module | None = None


MAX_LENGTH_CAP = 1024
"""The default max_length when none is given: the model's context size, but no more than this."""


def context_size(model: str, *, trust_remote_code: bool = False) -> int | None:
    """The longest sequence the model's config says it takes (None when it names none, e.g. ALiBi models)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_length_limits(cfg: TrainConfig, say=print) -> None:
    """Fill the length limits the user left unset, in ``cfg`` itself (so config.yaml records what ran): max_length
    from the model's context size (capped at ``MAX_LENGTH_CAP``), max_prompt_length as half of it; says so."""
    notes = []
    if cfg.max_length is None:
        ctx = context_size(cfg.model, trust_remote_code=cfg.trust_remote_code)
        cfg.max_length = min(ctx, MAX_LENGTH_CAP) if ctx else MAX_LENGTH_CAP
        notes.append(f"max_length {cfg.max_length} (" + (f"the model's context size {ctx}" if ctx else
                                                         "the model names no context size")
                     + (f", capped at {MAX_LENGTH_CAP}" if not ctx or ctx > MAX_LENGTH_CAP else "") + ")")
    if cfg.max_prompt_length is None:
        cfg.max_prompt_length = max(1, cfg.max_length // 2)
        notes.append(f"max_prompt_length {cfg.max_prompt_length} (half of max_length)")
    check_length_limits(cfg.max_length, cfg.max_prompt_length)
    if notes:
        say("length limits: " + "; ".join(notes) + " (--max-length / --max-prompt-length set them)")


def load_preference_items(cfg: TrainConfig, tokenizer: Any, accelerator: Accelerator, *, kind: str = "preferences",
                          from_preferences: bool = False) -> tuple[Sequence[TokenizedExample],
                                                                   Sequence[TokenizedExample]]:
    """Train and eval examples, tokenized with exact prompt/response boundaries, as memory-mapped tables
    (``data.prepare``): read from the cache when it holds them, else prepared by the local main process of each
    node while the other processes wait, then mapped by all.

    kind: "preferences" (K >= 2 ranked responses), "sft" (one target response each, see data/sft.py; with
    ``from_preferences``, the chosen responses of preference data) or "unpaired" (labelled completions for KTO,
    see data/unpaired.py).
    """

    refuse_used_output_dir(cfg)
    resolve_length_limits(cfg, accelerator.print)
    cache = None if cfg.no_data_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()

    def load(path: str, what: str) -> TokenizedTable:
        main = accelerator.is_local_main_process
        with accelerator.local_main_process_first():
            prepared = prepare_data(
                path, tokenizer, kind=kind, from_preferences=from_preferences, format=cfg.data_format,
                split=cfg.split, skip_bad=cfg.skip_bad_rows, max_length=cfg.max_length,
                max_prompt_length=cfg.max_prompt_length, num_proc=cfg.num_proc, cache_dir=cache,
                work_dir=Path(cfg.output_dir) / "tokenized" / what.split()[0], reuse=not main,
                progress=cfg.progress and main, desc=f"{what}: reading and tokenizing")
        report, tok_report = prepared.load_report, prepared.tokenize_report
        accelerator.print(f"{what}: {report.summary()}")
        if tok_report.truncated or tok_report.dropped:
            accelerator.print(f"{what}: {tok_report.summary()}")
        check = report.validation  # the data validation report: reading, then tokenization drops
        check.check()
        if not check.clean():
            accelerator.print(f"{what}: {check.summary()}")
        if not len(prepared.table):
            raise ConfigError(f"{what}: no usable examples in {path}.\n{check.summary()}")
        how = ("read from the cache" if prepared.cached and prepared.in_cache else
               "prepared" + (" and cached" if prepared.in_cache else ""))
        accelerator.print(f"{what}: {len(prepared.table)} examples {how} in {prepared.seconds:.1f} s "
                          f"({prepared.location}" + ("; --no-data-cache skips the cache)" if cache else ")"))
        return prepared.table

    if cfg.streaming and kind == "unpaired":
        raise ConfigError("streaming is not built for labelled feedback (KTO) yet: leave --streaming off (the data "
                          "is prepared once into a memory-mapped table and cached, which scales to millions of rows).")
    if cfg.streaming:
        from ..data.stream import StreamedExamples

        train_items: Sequence[TokenizedExample] = StreamedExamples(
            cfg.data, tokenizer, kind=kind, from_preferences=from_preferences, format=cfg.data_format, split=cfg.split, skip_bad=cfg.skip_bad_rows,
            max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed, batch_size=cfg.batch_size)
        accelerator.print(f"train data: streamed from {cfg.data} as training goes (shuffle buffer "
                          f"{cfg.shuffle_buffer:,}; rows are validated and tokenized when the steps reach them)")
    else:
        train_items = load(cfg.data, "train data")
    eval_items: Sequence[TokenizedExample] = []
    if cfg.eval_data:
        eval_items = load(cfg.eval_data, "eval data")
    elif cfg.eval_fraction > 0:
        order = list(range(len(train_items)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, round(cfg.eval_fraction * len(order)))
        held = set(order[:n_eval])
        eval_items = train_items.select(sorted(held))
        train_items = train_items.select(i for i in range(len(train_items)) if i not in held)
    return train_items, eval_items


def load_policy(cfg: TrainConfig, *, with_reference: bool, ref_model: str | None = None
                ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The trainable model (LoRA-wrapped if asked) and, if asked, a frozen reference: ``ref_model`` loaded, or a
    copy of the policy made before wrapping."""
    if cfg.dtype != "float32" and not cfg.lora:
        warnings.warn(f"dtype={cfg.dtype} trains the weights themselves in {cfg.dtype}: updates much smaller than a "
                      "weight (e.g. at lr 1e-6) round away and most weights never change. For full fine-tuning "
                      "use --dtype float32 --mixed-precision bf16; low-precision weights suit --lora.", stacklevel=2)
    model = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                       attn_implementation=cfg.attn_implementation)
    if cfg.disable_dropout:
        disable_dropout(model)
    reference = None
    if with_reference:
        # a model loaded in ZeRO-3 partitions has empty tensors of its own: its copy is loaded again instead
        source = ref_model or (cfg.model if is_partitioned(model) else None)
        reference = make_reference(model, source, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                   attn_implementation=cfg.attn_implementation) if source else make_reference(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    return model, reference


def load_run_inputs(cfg: TrainConfig, accelerator: Accelerator, *, kind: str = "preferences",
                    from_preferences: bool = False, with_reference: bool = False, ref_model: str | None = None
                    ) -> RunInputs:
    """Tokenizer, data (checked before any model is loaded), the policy and, when the method asks for one, a
    frozen reference model (the method decides: see ``train.dpo.reference_source``)."""
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if kind not in ("preferences", "sft"):
        raise ValueError(f"unknown run kind {kind!r}")
    train_items, eval_items = load_preference_items(cfg, tokenizer, accelerator, kind=kind,
                                                    from_preferences=from_preferences)
    model, reference = load_policy(cfg, with_reference=with_reference, ref_model=ref_model)
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

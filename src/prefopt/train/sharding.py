"""Sharded training through accelerate's own engines: which engine runs, where the models live, lockstep passes.

prefopt has no distribution layer of its own. ``accelerate launch --config_file examples/accelerate/<x>.yaml``
picks the engine (DDP or FSDP2; DeepSpeed ZeRO is refused for now, see ``use_engine``) and ``Accelerator.prepare``
applies it to the policy and its optimizer. What this module adds is what a DPO run needs beyond one prepared model:

* **The reference model under FSDP2.** A live reference is sharded exactly like the policy (accelerate's own
  ``fsdp2_prepare_model``, the function ``prepare`` uses), frozen, in eval mode and never in the optimizer; so each
  rank holds 1/N of its weights instead of a whole copy. The precomputed reference (the default) needs no second
  model: the policy is sharded first and the one pass before training runs through it.
* **Lockstep passes.** A sharded forward gathers each layer's weights from every rank, so every rank must run the
  same number of forwards (and backwards) or the run hangs. Where ranks hold different numbers of examples (an eval
  set or a last batch that does not divide by the number of processes) the short ranks run filler micro-batches
  whose results are thrown away (``lockstep_chunks``).
* **The final model.** Under FSDP the model's own ``state_dict`` is sharded; ``gathered_for_save`` gathers the
  full one (a collective: every rank calls it) and has rank 0's ``save_pretrained`` write it, so the final folder
  is a plain transformers one.
* **FSDP2 on CPU.** accelerate routes FSDP only on accelerators (on CPU its state stays ``MULTI_CPU``), while
  torch's ``fully_shard`` runs on CPU with gloo. ``use_engine`` turns accelerate's own FSDP2 path on there when the
  launch asked for FSDP (``ACCELERATE_USE_FSDP``), so the same code is tested on CPU that runs on GPUs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..errors import ConfigError


def _fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def use_engine(accelerator: Accelerator) -> Accelerator:
    """Make accelerate run the engine the launch asked for; on CPU that means turning its FSDP path on (see the
    module docstring). Idempotent; returns the accelerator."""
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("DeepSpeed ZeRO is not supported by prefopt's training loop yet (the loop accumulates and "
                          "clips gradients itself, which DeepSpeed's engine wants to own). Shard with FSDP2 instead: "
                          "accelerate launch --config_file examples/accelerate/fsdp2.yaml ...")
    if (_fsdp_requested() and accelerator.device.type == "cpu" and accelerator.num_processes > 1
            and state.distributed_type == DistributedType.MULTI_CPU):
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` sets
        if plugin.fsdp_version != 2:
            raise ConfigError("FSDP on CPU runs only as FSDP2 (fsdp_version: 2); FSDP1 needs GPUs.")
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        from accelerate.state import PartialState

        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        # every AcceleratorState() copies PartialState's fields back in: record it there too, as accelerate does
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def engine(accelerator: Accelerator) -> str:
    """The engine a run uses, in words: "single process", "DDP", "FSDP2", "FSDP1", "DeepSpeed ZeRO-<stage>"."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "FSDP2" if accelerator.is_fsdp2 else "FSDP1"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "DDP" if accelerator.num_processes > 1 else "single process"


def is_fsdp2(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2


def is_sharded(accelerator: Accelerator) -> bool:
    """The weights are split across ranks, so every forward is a collective (FSDP, DeepSpeed ZeRO-3)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return True
    return kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3


def sharding(accelerator: Accelerator) -> str:
    """How the weights, gradients and optimizer state are laid out, in words (for the start-of-run line)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        full = plugin.reshard_after_forward is True or str(plugin.sharding_strategy).endswith(".FULL_SHARD")
        wrap = ", ".join(plugin.transformer_cls_names_to_wrap or []) or str(plugin.auto_wrap_policy or "none")
        return (f"{'full shard' if full else 'shard grad/optimizer'} over {accelerator.num_processes} processes, "
                f"auto-wrap {wrap}")
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        what = {1: "optimizer state", 2: "optimizer state and gradients", 3: "weights, gradients and optimizer state"}
        return f"{what.get(stage, 'nothing')} partitioned over {accelerator.num_processes} processes"
    return "none (every process holds the whole model)"


def check_supported(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Refuse, before any compute, what is not built under a sharding engine yet."""
    if accelerator.distributed_type == DistributedType.FSDP and hasattr(model, "peft_config"):
        raise ConfigError("LoRA under FSDP is not supported yet; train LoRA adapters with DDP (examples/accelerate/"
                          "ddp.yaml): the frozen base needs no optimizer state, so it rarely needs sharding.")


def shard_policy(policy: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Under FSDP2, shard the policy now (before its optimizer exists) so a pass before training, the precomputed
    reference, runs through the sharded model; ``Accelerator.prepare`` later keeps it as it is. Else: the policy
    on the device."""
    use_engine(accelerator)
    check_supported(policy, accelerator)
    if is_fsdp2(accelerator):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, policy)
    if accelerator.distributed_type == DistributedType.FSDP:
        return policy  # FSDP1 wraps at prepare; a pass before it runs unsharded
    return policy.to(accelerator.device)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights FSDP2 keeps after a forward without backward (the root and the output layers
    stay gathered after their forward): afterwards every parameter is its shard again, as ``prepare``, the
    optimizer and the state-dict functions expect."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def place_reference(reference: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """A live reference model: frozen (no grad, never in an optimizer), eval mode, and under FSDP2 sharded exactly
    like the policy; otherwise on the device whole."""
    use_engine(accelerator)
    reference.requires_grad_(False)
    reference.eval()
    if is_fsdp2(accelerator):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        reference = fsdp2_prepare_model(accelerator, reference)
        reference.eval()
        return reference
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"a live reference model under {engine(accelerator)} is not supported; use the "
                          "precomputed reference (the default: leave --precompute-ref unset) or FSDP2.")
    return reference.to(accelerator.device)


def lockstep_chunks(indices: Sequence[int], size: int, accelerator: Accelerator, *, most: int,
                    filler: int = 0) -> list[tuple[list[int], bool]]:
    """``indices`` cut into micro-batches of ``size``, as (chunk, real) pairs. When every forward is a collective
    (``is_sharded``) the list is padded with (``[filler]``, False) to ``most`` examples' worth of micro-batches, the
    same on every rank, so ranks holding fewer examples still join each collective; the caller runs a filler chunk
    and drops its result."""
    chunks = [(list(indices[i:i + size]), True) for i in range(0, len(indices), size)]
    if is_sharded(accelerator) and accelerator.num_processes > 1:
        chunks += [([filler], False)] * (math.ceil(most / size) - len(chunks))
    return chunks


def rank_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """The [start, end) of rank's contiguous share of n items: the first n % world ranks take one more."""
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def gathered_for_save(model: torch.nn.Module, accelerator: Accelerator) -> contextlib.AbstractContextManager:
    """Every rank enters (a collective under FSDP). Inside, on the main process, ``model.save_pretrained`` writes the
    full (gathered, CPU) state dict instead of the model's sharded one; elsewhere the model is untouched."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return contextlib.nullcontext()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = accelerator.unwrap_model(model)
    if hasattr(inner, "peft_config"):
        raise ConfigError("saving a LoRA model trained under FSDP is not supported yet; train LoRA with DDP.")
    full = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (lm_head = embed_tokens) comes back once per name: keep the name the model's own
    # (deduplicated) parameters use, as an unsharded save_pretrained writes it
    own = {n for n, _ in inner.named_parameters()} | {n for n, _ in inner.named_buffers()}
    full = {k: v for k, v in full.items() if k in own}
    return _saving_state(inner, full if accelerator.is_main_process else None)


@contextlib.contextmanager
def _saving_state(model: torch.nn.Module, state: dict[str, Any] | None) -> Iterator[None]:
    if state is None:
        yield
        return
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, state_dict=state)
    try:
        yield
    finally:
        del model.save_pretrained


def describe(accelerator: Accelerator, reference: str) -> str:
    """The start-of-run line: engine, processes, sharding, where the reference lives."""
    return (f"engine: {engine(accelerator)}, {accelerator.num_processes} process(es); sharding: "
            f"{sharding(accelerator)}; reference: {reference}")


__all__ = ["use_engine", "check_supported", "engine", "is_fsdp2", "is_sharded", "sharding", "shard_policy", "reshard", "place_reference",
           "lockstep_chunks", "rank_share", "gathered_for_save", "describe"]

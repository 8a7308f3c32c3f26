"""Sharded training through accelerate's own engines: which engine runs, where the models live, lockstep passes.

prefopt has no distribution layer of its own. ``accelerate launch --config_file examples/accelerate/<x>.yaml``
picks the engine (DDP, FSDP2, DeepSpeed ZeRO-2/3) and ``Accelerator.prepare`` applies it to the policy and its
optimizer. What this module adds is what a DPO run needs beyond one prepared model:

* **The reference model.** Under FSDP2 a live reference is sharded exactly like the policy (accelerate's own
  ``fsdp2_prepare_model``, the function ``prepare`` uses), frozen, in eval mode and never in the optimizer, so each
  rank holds 1/N of its weights instead of a whole copy. Under DeepSpeed it is an inference engine with no
  optimizer (ZeRO-3: partitioned like the policy). The precomputed reference (the default) needs no second model:
  the pass runs through the policy as the engine holds it (FSDP2: sharded first; DeepSpeed: after ``prepare``,
  since the engine's cast and partitioned model exists only from there, see ``train.loop.start_run``).
* **LoRA under FSDP2.** The peft wrapper and the transformers model inside it are both sharded (``shard_lora``),
  so the log-prob code, which looks through the wrapper, always finds a sharded model; the final adapters and
  merged model are written from an unsharded replica holding the gathered state.
* **Accumulation under DeepSpeed.** The engine owns accumulation and clipping: ``configure_deepspeed`` sets them
  from prefopt's options, ``micro_batch`` marks the step's last micro-batch as the engine's boundary and the loss
  is not divided again (``backward``), so DeepSpeed computes the update one process computes.
* **Lockstep passes.** A sharded forward gathers each layer's weights from every rank, so every rank must run the
  same number of forwards (and backwards) or the run hangs. Where ranks hold different numbers of examples (an eval
  set or a last batch that does not divide by the number of processes) the short ranks run filler micro-batches
  whose results are thrown away (``lockstep_chunks``).
* **The final model.** Under FSDP and ZeRO-3 the model's own ``state_dict`` is sharded; ``gathered_for_save``
  gathers the full one (a collective: every rank calls it) and has rank 0's ``save_pretrained`` write it, so the
  final folder is a plain transformers one.
* **CPU runs of the GPU engines.** accelerate routes FSDP and DeepSpeed only on accelerators (on CPU its state
  stays ``MULTI_CPU``), while torch's ``fully_shard`` and DeepSpeed's CPU accelerator run on CPU with gloo.
  ``use_engine`` turns accelerate's own path on there when the launch asked for it (``ACCELERATE_USE_FSDP``,
  ``ACCELERATE_USE_DEEPSPEED``), so the same code is tested on CPU that runs on GPUs.
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


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _deepspeed_on_cpu(accelerator: Accelerator) -> None:
    """What ``AcceleratorState`` does for a DeepSpeed launch on GPUs, done on CPU processes (gloo)."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin

    state = accelerator.state
    plugin = DeepSpeedPlugin()  # from the ACCELERATE_DEEPSPEED_* variables `accelerate launch` sets
    plugin.set_mixed_precision(accelerator.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state.distributed_type = DistributedType.DEEPSPEED
    state._mixed_precision = "no"  # the engine casts the model itself (the config's bf16/fp16 section)
    accelerator.native_amp = False
    accelerator.deepspeed_engine_wrapped = None
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED


def use_engine(accelerator: Accelerator) -> Accelerator:
    """Make accelerate run the engine the launch asked for; on CPU that means turning its FSDP path on (see the
    module docstring). Idempotent; returns the accelerator."""
    state = accelerator.state
    if (_deepspeed_requested() and accelerator.device.type == "cpu" and accelerator.num_processes > 1
            and state.distributed_type == DistributedType.MULTI_CPU):
        _deepspeed_on_cpu(accelerator)
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
    """Refuse, before any compute, what is not built under a sharding engine yet: LoRA under FSDP1 (under FSDP2 a
    peft model is sharded by ``shard_lora``)."""
    if accelerator.distributed_type == DistributedType.FSDP and _is_peft(model) and not accelerator.is_fsdp2:
        raise ConfigError("LoRA under FSDP1 is not supported; shard LoRA with FSDP2 (examples/accelerate/fsdp2.yaml) "
                          "or train the adapters with DDP (examples/accelerate/ddp.yaml).")
    if zero_stage(accelerator) == 3 and hasattr(model, "peft_config"):
        raise ConfigError("LoRA under DeepSpeed ZeRO-3 is not supported (merging adapters into partitioned weights); "
                          "use ZeRO-2 (examples/accelerate/zero2.yaml: the frozen base has no optimizer state to "
                          "partition) or FSDP2.")


def shard_policy(policy: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Under FSDP2, shard the policy now (before its optimizer exists) so a pass before training, the precomputed
    reference, runs through the sharded model; ``Accelerator.prepare`` later keeps it as it is. Else: the policy
    on the device."""
    use_engine(accelerator)
    check_supported(policy, accelerator)
    if is_fsdp2(accelerator):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return shard_lora(policy, accelerator) if _is_peft(policy) else fsdp2_prepare_model(accelerator, policy)
    if accelerator.distributed_type == DistributedType.FSDP:
        return policy  # FSDP1 wraps at prepare; a pass before it runs unsharded
    if is_deepspeed(accelerator):
        return policy  # deepspeed.initialize (at prepare) casts, places and partitions it; passes run after that
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
    if is_deepspeed(accelerator):
        return _deepspeed_reference(reference, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
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
    full (gathered, CPU) state dict instead of the model's sharded one; elsewhere the model is untouched. A LoRA
    model's ``save_pretrained`` (the adapters) and ``merge_and_unload`` are those of an unsharded copy holding it."""
    if is_deepspeed(accelerator):
        inner, state = accelerator.unwrap_model(model), _deepspeed_full_state(model, accelerator)
        if _is_peft(inner) and state is not None:  # ZeRO-2 LoRA: adapters and merge from the float32 weights
            return _saving_through(inner, _unsharded_peft(inner, state))
        return _saving_state(inner, state, write_dtype=True)
    if accelerator.distributed_type != DistributedType.FSDP:
        return contextlib.nullcontext()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = accelerator.unwrap_model(model)
    full = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (lm_head = embed_tokens) comes back once per name: keep the name the model's own
    # (deduplicated) parameters use, as an unsharded save_pretrained writes it
    own = {n for n, _ in inner.named_parameters()} | {n for n, _ in inner.named_buffers()}
    full = {k: v for k, v in full.items() if k in own}
    if _is_peft(inner) and accelerator.is_main_process:  # LoRA: save_pretrained and merge_and_unload, unsharded
        return _saving_through(inner, _unsharded_peft(inner, full))
    return _saving_state(inner, full if accelerator.is_main_process else None)


@contextlib.contextmanager
def _saving_state(model: torch.nn.Module, state: dict[str, Any] | None, *, write_dtype: bool = False
                  ) -> Iterator[None]:
    """Inside, ``model.save_pretrained`` writes ``state``. ``write_dtype``: the folder's config.json names the
    state's dtype (transformers writes the module's, which under DeepSpeed is the engine's 16-bit copy)."""
    if state is None:
        yield
        return
    save = functools.partial(type(model).save_pretrained, model, state_dict=state)
    if write_dtype:
        save = functools.partial(_save_with_dtype, save, state)
    model.save_pretrained = save
    try:
        yield
    finally:
        del model.save_pretrained


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def shard_lora(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """A peft (LoRA) model under FSDP2, sharded in two levels: the transformers model inside it exactly as a plain
    policy (accelerate's ``fsdp2_prepare_model``: decoder layers, embeddings and head; each layer's frozen base
    weights and its adapters in one group, only the adapters trainable), then the peft wrapper as the root, holding
    no parameters of its own. Any other model, or one sharded already, is returned as it is.

    Why not the wrapper alone, as ``Accelerator.prepare`` would shard it: the log-probs look through the wrapper
    (``models.unwrap_model``) and must find a sharded model there, or they run the transformers model's own forward
    outside the root's (a head check), which FSDP2's lazy init refuses ("already lazily initialized ... requires
    running forward through the root module first"). And a wrapper sharded after a forward ran would make a second
    root. So both levels are sharded here, before any pass; ``prepare`` then keeps the model as it is."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not (is_fsdp2(use_engine(accelerator)) and _is_peft(model)) or isinstance(model, FSDPModule):
        return model
    fsdp2_prepare_model(accelerator, model.get_base_model())
    # the root: the same mesh, precision and offload as the groups inside (accelerate's auto-wrap cannot run a
    # second time: the sharded layers' classes are renamed FSDP<name>, so it no longer finds them)
    plugin, mesh = accelerator.state.fsdp_plugin, getattr(accelerator, "torch_device_mesh", None)
    fully_shard(model, mesh=mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
                mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(), offload_policy=plugin.cpu_offload)
    return model


def _unsharded_peft(model: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
    """An unsharded peft model shaped like ``model`` and holding ``state`` (the gathered full state dict, on CPU):
    built on the meta device, so it costs no memory beyond ``state``. Its ``merge_and_unload`` merges on one process,
    which the sharded model cannot (each merge would be a collective only rank 0 joins)."""
    import copy

    from peft import get_peft_model

    base, name = model.get_base_model(), model.active_adapter
    with torch.device("meta"):
        replica = get_peft_model(type(base)(copy.deepcopy(base.config)), copy.deepcopy(model.peft_config[name]),
                                 adapter_name=name)
    replica.load_state_dict(state, strict=False, assign=True)
    for key, buffer in model.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state
        if key not in state:
            owner, _, leaf = key.rpartition(".")
            replica.get_submodule(owner).register_buffer(leaf, buffer.detach().cpu().clone(), persistent=False)
    replica.get_base_model().tie_weights()
    left = [n for n, t in (*replica.named_parameters(), *replica.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"the gathered LoRA model lacks {left[:5]}: its state dict does not match the model")
    return replica


@contextlib.contextmanager
def _saving_through(model: torch.nn.Module, replica: torch.nn.Module) -> Iterator[None]:
    """Inside, ``model.save_pretrained`` (the adapters) and ``model.merge_and_unload`` (the merged model) are the
    unsharded replica's."""
    model.save_pretrained, model.merge_and_unload = replica.save_pretrained, replica.merge_and_unload
    try:
        yield
    finally:
        del model.save_pretrained, model.merge_and_unload


def describe(accelerator: Accelerator, reference: str) -> str:
    """The start-of-run line: engine, processes, sharding, where the reference lives."""
    return (f"engine: {engine(accelerator)}, {accelerator.num_processes} process(es); sharding: "
            f"{sharding(accelerator)}; reference: {reference}")



# ---------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else 0


def deepspeed_weights(accelerator: Accelerator) -> str:
    """The dtype the DeepSpeed engine keeps the module's weights in ("bfloat16", "float16"; "float32" also when
    not under DeepSpeed): in its 16-bit modes the forward runs on those weights, not under autocast."""
    if not is_deepspeed(accelerator):
        return "float32"
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        if ds.get(key, {}).get("enabled") is True:
            return name
    return "float32"


def configure_deepspeed(accelerator: Accelerator, cfg: Any) -> None:
    """Give the engine the run's batch and clipping before ``deepspeed.initialize``: DeepSpeed owns accumulation and
    clipping, and prefopt's options (batch_size, micro_batch_size, max_grad_norm) say what they are, so a config
    file's values never silently disagree with them (a differing one is replaced, and the start line says so).
    Idempotent."""
    if not is_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    world = accelerator.num_processes
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size "
                          f"({cfg.micro_batch_size}) x processes ({world}).")
    if ds.get("zero_optimization", {}).get("compute_grad_norm") is False:
        raise ConfigError("the DeepSpeed config sets zero_optimization.compute_grad_norm: false; prefopt reads the "
                          "engine's gradient norm to stop (or skip) a non-finite step: remove that setting.")
    wanted = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size,
              "gradient_accumulation_steps": cfg.batch_size // (cfg.micro_batch_size * world),
              "train_batch_size": cfg.batch_size, "gradient_clipping": float(cfg.max_grad_norm)}
    replaced = [f"{k} {ds[k]} -> {v}" for k, v in wanted.items()
                if ds.get(k, "auto") != "auto" and ds[k] != v and k != "gradient_accumulation_steps"]
    if ds.get("gradient_accumulation_steps", "auto") not in ("auto", 1, wanted["gradient_accumulation_steps"]):
        replaced.append(f"gradient_accumulation_steps {ds['gradient_accumulation_steps']} -> "
                        f"{wanted['gradient_accumulation_steps']}")
    ds.update(wanted)
    ds["zero_allow_untested_optimizer"] = True  # prefopt's own AdamW / RMSprop, wrapped by ZeRO
    # with optimizer offload accelerate would swap in DeepSpeed's CPU Adam, a new optimizer the schedule (built on
    # prefopt's) would not drive: keep prefopt's optimizer, which runs on the offloaded partitions as it is
    ds["zero_force_ds_cpu_optimizer"] = False
    if ds.get("bf16", {}).get("enabled") is True:  # a non-finite step is skipped by the engine, never applied
        ds["bf16"]["check_grad_overflow"] = True
    if not getattr(plugin, "_prefopt_configured", False):
        plugin._prefopt_configured = True
        accelerator.print(f"DeepSpeed ZeRO-{plugin.zero_stage}: the engine accumulates {wanted['gradient_accumulation_steps']} "
                          f"micro-batches of {cfg.micro_batch_size} and clips at {cfg.max_grad_norm or 'never'} "
                          "(from --batch-size, --micro-batch-size, --max-grad-norm)"
                          + (f"; replaced in the DeepSpeed config: {', '.join(replaced)}" if replaced else ""))


@contextlib.contextmanager
def micro_batch(accelerator: Accelerator, model: torch.nn.Module, last: bool) -> Iterator[None]:
    """The context of one micro-batch's forward and backward: gradients are synchronised only after the step's
    last one. DDP: ``no_sync`` before it. DeepSpeed: the engine's accumulation boundary is the last micro-batch
    (``sync_gradients``, which accelerate's backward hands to the engine, and the engine steps there), so a short
    last step of an epoch, with fewer micro-batches than the configured accumulation, still ends at its last."""
    if is_deepspeed(accelerator):
        gradient_state = accelerator.gradient_state
        gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            gradient_state._set_sync_gradients(True)
    elif last:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """``accelerator.backward``; the loop already scales each micro-batch's loss by the step's size, so the
    DeepSpeed engine must not divide it by its accumulation steps again."""
    if is_deepspeed(accelerator):
        accelerator.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def engine_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """DeepSpeed: the global gradient norm (before clipping) of the step the engine just took or skipped (it skips
    one whose gradients are not finite)."""
    norm = model.get_global_grad_norm()
    if norm is None:
        raise RuntimeError("the DeepSpeed engine reported no gradient norm for the step")
    return torch.as_tensor(float(norm), dtype=torch.float64)


def _deepspeed_reference(reference: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """A frozen model as a DeepSpeed inference engine with no optimizer: under ZeRO-3 its weights are partitioned
    like the policy's (each forward gathers them layer by layer); under ZeRO-1/2 it is whole, in the engine's
    precision, as the policy's weights are. Returns the engine's module (the engine is kept on it)."""
    import copy

    import deepspeed

    plugin = accelerator.state.deepspeed_plugin
    config = copy.deepcopy(plugin.deepspeed_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero = config.get("zero_optimization", {})
    if plugin.zero_stage == 3:
        zero = {k: v for k, v in zero.items() if v != "auto" and not k.startswith("offload_optimizer")}
    else:
        zero = {"stage": 0}
    config["zero_optimization"] = zero
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    engine.eval()
    module = engine.module
    object.__setattr__(module, "_deepspeed_engine", engine)  # kept alive with the module, not a submodule
    return module


def _deepspeed_full_state(model: torch.nn.Module, accelerator: Accelerator) -> dict[str, Any] | None:
    """The trained model's full state on rank 0 (None elsewhere; a collective: every rank calls it): each trained
    parameter from the engine's float32 master weights (in 16-bit modes the module holds only a bf16/fp16 copy,
    and without this the final model would be saved in 16 bits where DDP and FSDP2 save float32), each frozen one
    as the module holds it (ZeRO-3: gathered one parameter at a time)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from ..models import gathered_parameter

    inner = accelerator.unwrap_model(model)
    keys = set(inner.state_dict())
    main = accelerator.is_main_process
    state: dict[str, Any] = {}
    for name, p in inner.named_parameters():  # the same order on every rank: each gather is a collective
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:  # frozen, or a float32 engine without a separate master copy: the module's own weight
            with gathered_parameter(p):
                full = p.detach().clone()
        if main:
            state[name] = full.detach().cpu().clone()
    if not main:
        return None
    for name, b in inner.named_buffers():
        if name in keys:
            state[name] = b.detach().cpu().clone()
    return state


def _save_with_dtype(save: Any, state: dict[str, Any], folder: Any, *args: Any, **kwargs: Any) -> None:
    import json
    from pathlib import Path

    save(folder, *args, **kwargs)
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    config = Path(folder) / "config.json"
    if floats and config.is_file():
        dtype = max(set(floats), key=floats.count)  # the dtype most tensors have
        data = json.loads(config.read_text())
        data["dtype"] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

__all__ = ["is_deepspeed", "zero_stage", "deepspeed_weights", "configure_deepspeed", "micro_batch", "backward", "engine_grad_norm",
           "use_engine", "check_supported", "engine", "is_fsdp2", "is_sharded", "sharding", "shard_policy", "reshard", "place_reference",
           "lockstep_chunks", "rank_share", "gathered_for_save", "shard_lora", "describe"]

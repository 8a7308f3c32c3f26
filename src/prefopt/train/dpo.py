"""DPO and its family: the per-batch step, the reference model, and the run that wires them to the loop.

    policy log-probs (one concatenated forward)  ┐
    reference log-probs (live, adapters-off,      ├─> prefopt.losses.<name>  ─> losses, rewards, metrics
        precomputed, or zero if reference-free)  ┘
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .. import losses as L
from ..config import DPOConfig
from ..data.types import TokenizedExample
from ..errors import ConfigError
from ..logprobs import LogpsFn, LogpsMode, forward_logps
from ..models import evaluating, model_fingerprint, reference_mode, unwrap_model
from ..packing import check_layout_support
from .loop import StepResult, micro_batches, to_device, train
from .setup import load_run_inputs, save_model_and_tokenizer

ReferenceFn = Callable[[torch.nn.Module, dict], Tensor]
"""(policy, batch) -> reference summed log-probs [B, K] (no grad)."""

DPO_SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins")


class DPO:
    """One micro-batch of a preference loss: ``step(model, batch) -> StepResult``."""

    unit = "pairs"

    def __init__(self, loss: str, beta: float, reference: ReferenceFn, *, label_smoothing: float = 0.0,
                 nll_weight: float = 0.0, simpo_gamma: float = 0.5, logps_fn: LogpsFn = forward_logps):
        self.logps_fn = logps_fn  # how ResponseLogps are computed (plain or a fast path; same numbers)
        self.loss_name, self.loss_fn = loss, L.get_loss(loss)
        self.beta, self.label_smoothing, self.nll_weight = beta, label_smoothing, nll_weight
        self.reference = reference
        self.loss_kwargs = {"gamma": simpo_gamma} if loss == "simpo" else {}

    def step(self, model: torch.nn.Module, batch: dict) -> StepResult:
        k = batch["num_responses"]
        aux_coef = router_aux_loss_coef(model)
        with capture_aux_loss(model if aux_coef else None) as aux:
            policy = self.logps_fn(model, batch).by_example(k)  # [B, K]
        with torch.no_grad():
            ref = self.reference(model, batch).to(policy.sum.dtype)
        if self.loss_name == "plackett_luce":
            losses, rewards = self.loss_fn(policy.sum, ref, beta=self.beta)
            chosen_r, rejected_r = rewards[:, 0], rewards[:, -1]
        else:
            if k != 2:
                raise ConfigError(f"loss '{self.loss_name}' compares pairs; data with {k} ranked responses needs "
                                  "--loss plackett_luce.")
            losses, chosen_r, rejected_r = self.loss_fn(
                policy.sum[:, 0], policy.sum[:, 1], ref[:, 0], ref[:, 1], beta=self.beta,
                label_smoothing=self.label_smoothing, chosen_lengths=policy.count[:, 0],
                rejected_lengths=policy.count[:, 1], **self.loss_kwargs)
        if self.nll_weight:
            losses = losses + self.nll_weight * L.chosen_nll(policy.sum[:, 0], policy.count[:, 0])
        extra = {}
        if aux_coef:  # a MoE whose config asks for its router load-balancing loss: one value per forward
            losses = losses + aux_coef * aux.value
            extra["aux_loss"] = aux.value.detach().expand_as(losses)
        logps = policy.sum.detach()
        metrics = {
            "rewards/chosen": chosen_r,
            "rewards/rejected": rejected_r,
            "rewards/margins": chosen_r - rejected_r,
            "rewards/accuracies": (chosen_r > rejected_r).float(),
            "logps/chosen": logps[:, 0],
            "logps/rejected": logps[:, -1],
            "grad_weight": torch.sigmoid(rejected_r - chosen_r),
            **extra,
        }
        return StepResult(losses, metrics, tokens=batch["attention_mask"].sum())


def router_aux_loss_coef(model: torch.nn.Module) -> float:
    """The weight of a mixture-of-experts model's router load-balancing loss when its config asks for that loss
    (``output_router_logits``; as transformers adds it to the LM loss), else 0."""
    cfg = getattr(unwrap_model(model), "config", None)
    if not getattr(cfg, "output_router_logits", False):
        return 0.0
    return float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0)


class capture_aux_loss(contextlib.AbstractContextManager):
    """Inside the block, ``.value`` is the ``aux_loss`` of the model's last forward (``None`` model: off)."""

    def __init__(self, model: torch.nn.Module | None):
        self.value: Tensor | None = None
        self._handle = None
        if model is not None:
            self._handle = unwrap_model(model).register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if getattr(output, "aux_loss", None) is not None:
            self.value = output.aux_loss.float()

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
        if exc[0] is None and self._handle is not None and self.value is None:
            raise RuntimeError("the model's config asks for its router aux loss, but its forward returned none")


# ---------------------------------------------------------------------------------------------------------
# Reference log-probs: four sources, one signature


def live_reference(ref_model: torch.nn.Module, logps_fn: LogpsFn = forward_logps) -> ReferenceFn:
    """A frozen model of its own (a copy of the initial policy, or --ref-model)."""
    return lambda policy, batch: logps_fn(ref_model, batch).by_example(batch["num_responses"]).sum


def adapter_reference(unwrap: Callable[[torch.nn.Module], torch.nn.Module],
                      logps_fn: LogpsFn = forward_logps) -> ReferenceFn:
    """LoRA: the policy itself with its adapters disabled (no second copy of the weights)."""

    def fn(policy: torch.nn.Module, batch: dict) -> Tensor:
        with reference_mode(unwrap(policy)):
            return logps_fn(policy, batch).by_example(batch["num_responses"]).sum

    return fn


def precomputed_reference(policy: torch.nn.Module, batch: dict) -> Tensor:
    """Reads the ``reference_logps`` [B, K] that the collate function attached from the cache."""
    return batch["reference_logps"]


def zero_reference(policy: torch.nn.Module, batch: dict) -> Tensor:
    """Reference-free DPO: a uniform reference, log pi_ref = 0."""
    k = batch["num_responses"]
    return torch.zeros(batch["input_ids"].shape[0] // k, k, device=batch["input_ids"].device)


def make_collate(pad_token_id: int, *, packing: bool = False, prefix_sharing: bool = False,
                 mode: LogpsMode | None = None) -> Callable[[Sequence[TokenizedExample]], dict]:
    """The batches of a log-prob mode (``mode``, or the one of packing / prefix_sharing: ``LogpsMode.collate``),
    plus the cached reference log-probs when the examples carry them (after ``precompute_reference``)."""
    collate = (mode or LogpsMode(packing=packing, prefix_sharing=prefix_sharing)).collate(pad_token_id)

    def fn(examples: Sequence[TokenizedExample]) -> dict:
        batch = collate(list(examples))
        if examples and "reference_logps" in examples[0].meta:
            batch["reference_logps"] = torch.stack([ex.meta["reference_logps"] for ex in examples])
        return batch

    return fn


REFERENCE_SOURCES = {
    "none": "reference-free: log pi_ref = 0",
    "adapters": "the policy with its LoRA adapters switched off",
    "ref_model": "the model given by ref_model",
    "initial_policy": "the initial policy itself, read once before training (no copy)",
    "copy": "a frozen copy of the initial policy",
}


def reference_source(cfg: DPOConfig) -> str:
    """Where a DPO run's reference log-probs come from (a key of ``REFERENCE_SOURCES``): decided here only.

    A separate frozen model is loaded only for "ref_model" and "copy"; "initial_policy" is the precomputed pass
    over the policy before its first update, and "adapters" needs no second copy of the weights either.
    """
    if cfg.reference_free or cfg.loss in L.REFERENCE_FREE_LOSSES:
        return "none"
    if cfg.ref_model:
        return "ref_model"
    if cfg.lora:
        return "adapters"
    return "initial_policy" if cfg.precomputes_reference else "copy"


def data_fingerprint(items: Sequence[TokenizedExample]) -> str:
    h = hashlib.sha256()
    for ex in items:
        h.update(repr((ex.prompt_ids, ex.response_ids)).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt"))


def precompute_reference(reference: ReferenceFn, policy: torch.nn.Module, items: Sequence[TokenizedExample],
                         collate: Callable, *, micro_batch_size: int, accelerator: Accelerator,
                         cache_dir: Path, model_key: str, progress: bool = True) -> tuple[Tensor, Path, bool]:
    """Reference log-probs of every example, [N, K], from the disk cache or one pass over the data.

    The cache file is keyed by the reference model's weights and the exact token ids, so a changed model
    or changed data (or truncation settings) gives a new key. With several processes each computes every
    n-th example and the shards are gathered, so no process waits on another's whole pass; every node's local
    main process writes the file (nodes need not share a file system). Returns (logps, cache path, was_cached).
    """
    from accelerate.utils import gather_object

    key = hashlib.sha256(f"{model_key}|{data_fingerprint(items)}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"ref-logps-{key}.safetensors"
    here = path.is_file()
    everywhere = all(gather_object([here])) if accelerator.num_processes > 1 else here
    if everywhere:
        return load_file(str(path))["reference_logps"], path, True
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    rows: list[Tensor] = []
    with evaluating(policy), torch.no_grad():
        for chunk in tqdm(micro_batches(mine, micro_batch_size), desc="reference log-probs",
                          disable=not progress, dynamic_ncols=True):
            batch = to_device(collate([items[i] for i in chunk]), accelerator.device)
            with accelerator.autocast():
                rows.extend(reference(policy, batch).float().cpu())
    shard = list(zip(mine, rows))
    gathered = gather_object(shard) if accelerator.num_processes > 1 else shard
    logps = torch.empty(len(items), items[0].num_responses if items else 0)
    for i, row in gathered:
        logps[i] = row
    if accelerator.is_local_main_process and not here:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # runs may share the cache
        save_file({"reference_logps": logps.contiguous()}, str(tmp))
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    return logps, path, False


# ---------------------------------------------------------------------------------------------------------
# The run


def train_dpo(cfg: DPOConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Load model and data, build the reference, train, save. Returns the loop's summary."""
    cfg.validate()
    accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    source = reference_source(cfg)
    run = load_run_inputs(cfg, accelerator, kind="preferences", with_reference=source in ("ref_model", "copy"),
                          ref_model=cfg.ref_model)
    policy, tokenizer = run.model, run.tokenizer
    ks = {ex.num_responses for ex in run.train_items + run.eval_items}
    if len(ks) > 1:
        raise ConfigError(f"every example must have the same number of responses; found {sorted(ks)}.")
    if ks != {2} and cfg.loss != "plackett_luce":
        raise ConfigError(f"the data ranks {ks.pop()} responses per prompt; use --loss plackett_luce "
                          f"(loss '{cfg.loss}' compares pairs).")

    mode = LogpsMode.from_config(cfg)
    accelerator.print(mode.describe(policy, cfg.micro_batch_size * max(ks, default=2) * cfg.max_length))
    logps_fn = mode.logps_fn()
    if source == "none":
        reference: ReferenceFn = zero_reference
    elif source == "adapters":
        reference = adapter_reference(accelerator.unwrap_model, logps_fn)
    elif source == "initial_policy":
        reference = live_reference(policy, logps_fn)
    else:
        reference = live_reference(run.reference.to(accelerator.device), logps_fn)
    if mode.layout is not None and router_aux_loss_coef(policy):
        raise ConfigError(f"{type(unwrap_model(policy)).__name__} adds its router load-balancing loss "
                          "(config.output_router_logits), which is computed over the tokens of a forward: the "
                          f"'{mode.layout}' layout holds other tokens than the plain batch (no padding, a prompt "
                          "once per pair), so it would change the loss. Use the plain layout (no --packing / "
                          "--prefix-sharing), or set output_router_logits false in the model's config.")
    if mode.layout is not None:  # a layout the model cannot run exactly is refused here, before any compute
        for model in (policy, run.reference):
            if model is not None:
                check_layout_support(model, mode.layout)
    collate = make_collate(tokenizer.pad_token_id, mode=mode)
    accelerator.print(f"reference: {REFERENCE_SOURCES[source]}"
                      + (", log-probs precomputed before training" if cfg.precomputes_reference else ""))

    if cfg.precomputes_reference:
        # the key holds everything that can change the numbers: weights, precision and the log-prob mode
        model_key = model_fingerprint(run.reference if run.reference is not None else policy)
        model_key += f"|{cfg.dtype}|{cfg.mixed_precision}|{mode.key}"
        all_items = run.train_items + run.eval_items
        logps, path, cached = precompute_reference(
            reference, policy.to(accelerator.device), all_items, collate, micro_batch_size=cfg.micro_batch_size * 2,
            accelerator=accelerator, cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
            model_key=model_key, progress=cfg.progress and accelerator.is_local_main_process)
        for ex, row in zip(all_items, logps):
            ex.meta["reference_logps"] = row
        accelerator.print(f"reference log-probs: {'read from cache' if cached else 'computed and cached'} {path}")
        reference = precomputed_reference
        run.reference = None  # the frozen copy is no longer needed: free its memory

    method = DPO(cfg.loss, cfg.beta, reference, label_smoothing=cfg.label_smoothing, nll_weight=cfg.nll_weight,
                 simpo_gamma=cfg.simpo_gamma, logps_fn=logps_fn)
    return train(cfg, model=policy, method=method, train_items=run.train_items, collate=collate,
                 eval_items=run.eval_items or None, accelerator=accelerator,
                 save_final=lambda out: save_model_and_tokenizer(accelerator.unwrap_model(policy), tokenizer, out),
                 summary_keys=DPO_SUMMARY_KEYS)


__all__ = ["DPO", "train_dpo", "live_reference", "adapter_reference", "precomputed_reference", "zero_reference",
           "precompute_reference", "make_collate", "data_fingerprint", "reference_source", "REFERENCE_SOURCES",
           "DPO_SUMMARY_KEYS"]

"""DPO and its family: the per-batch step, the reference model, and the run that wires them to the loop.

    policy log-probs (one concatenated forward)  ┐
    reference log-probs (live, adapters-off,      ├─> prefopt.losses.<name>  ─> losses, rewards, metrics
        precomputed, or zero if reference-free)  ┘
"""

from __future__ import annotations

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
from ..data import collate_preferences
from ..data.types import TokenizedExample
from ..errors import ConfigError
from ..logprobs import LogpsFn, forward_logps, logps_fn_from_config
from ..models import model_fingerprint, reference_mode
from .loop import StepResult, format_summary, micro_batches, to_device, train
from .setup import load_run_inputs, save_model_and_tokenizer

ReferenceFn = Callable[[torch.nn.Module, dict], Tensor]
"""(policy, batch) -> reference summed log-probs [B, K] (no grad)."""

DPO_SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins")


class DPO:
    """One micro-batch of a preference loss: ``step(model, batch) -> StepResult``."""

    unit = "pairs"

    def __init__(self, loss: str, beta: float, reference: ReferenceFn, *, label_smoothing: float = 0.0,
                 nll_weight: float = 0.0, logps_fn: LogpsFn = forward_logps):
        self.logps_fn = logps_fn  # how ResponseLogps are computed (plain or a fast path; same numbers)
        self.loss_name, self.loss_fn = loss, L.get_loss(loss)
        self.beta, self.label_smoothing, self.nll_weight = beta, label_smoothing, nll_weight
        self.reference = reference

    def step(self, model: torch.nn.Module, batch: dict) -> StepResult:
        k = batch["num_responses"]
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
                rejected_lengths=policy.count[:, 1])
        if self.nll_weight:
            losses = losses + self.nll_weight * L.chosen_nll(policy.sum[:, 0], policy.count[:, 0])
        logps = policy.sum.detach()
        metrics = {
            "rewards/chosen": chosen_r,
            "rewards/rejected": rejected_r,
            "rewards/margins": chosen_r - rejected_r,
            "rewards/accuracies": (chosen_r > rejected_r).float(),
            "logps/chosen": logps[:, 0],
            "logps/rejected": logps[:, -1],
            "grad_weight": torch.sigmoid(rejected_r - chosen_r),
        }
        return StepResult(losses, metrics, tokens=batch["attention_mask"].sum())


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


def make_collate(pad_token_id: int, *, packing: bool = False, prefix_sharing: bool = False
                 ) -> Callable[[Sequence[TokenizedExample]], dict]:
    """Plain padded batches; with packing / prefix_sharing also the layout the fast paths read (prefopt.packing)."""
    from ..packing import build_layout

    def collate(examples: Sequence[TokenizedExample]) -> dict:
        batch = collate_preferences(list(examples), pad_token_id)
        if packing or prefix_sharing:
            batch.update(build_layout(list(examples), packing=packing, prefix_sharing=prefix_sharing,
                                      pad_token_id=pad_token_id))
        if examples and "reference_logps" in examples[0].meta:
            batch["reference_logps"] = torch.stack([ex.meta["reference_logps"] for ex in examples])
        return batch

    return collate


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
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        for chunk in tqdm(micro_batches(mine, micro_batch_size), desc="reference log-probs",
                          disable=not progress, dynamic_ncols=True):
            batch = to_device(collate([items[i] for i in chunk]), accelerator.device)
            with accelerator.autocast():
                rows.extend(reference(policy, batch).float().cpu())
    policy.train(was_training)
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
    run = load_run_inputs(cfg, accelerator, kind="preferences")
    policy, tokenizer = run.model, run.tokenizer
    ks = {ex.num_responses for ex in run.train_items + run.eval_items}
    if len(ks) > 1:
        raise ConfigError(f"every example must have the same number of responses; found {sorted(ks)}.")
    if ks != {2} and cfg.loss != "plackett_luce":
        raise ConfigError(f"the data ranks {ks.pop()} responses per prompt; use --loss plackett_luce "
                          f"(loss '{cfg.loss}' compares pairs).")

    logps_fn = logps_fn_from_config(cfg)  # plain, or packed / prefix-shared / chunked (issue 5)
    if cfg.reference_free:
        reference: ReferenceFn = zero_reference
    elif cfg.lora and not cfg.ref_model:
        reference = adapter_reference(accelerator.unwrap_model, logps_fn)
    elif run.reference is None:  # precompute from the initial policy itself: no copy of the weights is made
        reference = live_reference(policy, logps_fn)
    else:
        reference = live_reference(run.reference.to(accelerator.device), logps_fn)
    collate = make_collate(tokenizer.pad_token_id, packing=cfg.packing, prefix_sharing=cfg.prefix_sharing)

    if cfg.precomputes_reference:
        model_key = model_fingerprint(run.reference if run.reference is not None else policy)
        model_key += f"|{cfg.dtype}|{cfg.mixed_precision}"
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
                 logps_fn=logps_fn)
    summary = train(cfg, model=policy, method=method, train_items=run.train_items, collate=collate,
                    eval_items=run.eval_items or None, accelerator=accelerator,
                    save_final=lambda out: save_model_and_tokenizer(accelerator.unwrap_model(policy), tokenizer, out),
                    summary_keys=DPO_SUMMARY_KEYS)
    accelerator.print(format_summary(summary, DPO_SUMMARY_KEYS))
    return summary


__all__ = ["DPO", "train_dpo", "live_reference", "adapter_reference", "precomputed_reference", "zero_reference",
           "precompute_reference", "make_collate", "data_fingerprint", "DPO_SUMMARY_KEYS"]

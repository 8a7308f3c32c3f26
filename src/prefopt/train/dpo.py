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
from ..data.prepare import default_cache_dir
from ..data.table import Chain, fingerprint, response_counts, with_reference
from ..data.types import TokenizedExample
from ..errors import ConfigError
from ..logprobs import LogpsFn, LogpsMode, ResponseLogps, forward_logps, split_responses
from ..models import evaluating, model_fingerprint, reference_mode, unwrap_model
from ..packing import check_layout_support
from .checkpoints import load_state_into
from .loop import StepResult, to_device, train
from .sharding import (configure_deepspeed, deepspeed_weights, describe, is_deepspeed, lockstep_chunks, place_reference, reshard,
                       shard_policy, use_engine)
from .setup import load_run_inputs, save_model_and_tokenizer

ReferenceFn = Callable[[torch.nn.Module, dict], Tensor]
"""(policy, batch) -> reference summed log-probs [B, K] (no grad)."""

DPO_SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins")


class DPO:
    """One micro-batch of a preference loss: ``step(model, batch) -> StepResult``.

    ``loss`` is a registered loss or several joined by commas with ``loss_weights`` (each part is logged as
    ``loss/<name>``). Modifiers: ``wpo`` (each pair's loss times the policy's WPO weights of its two responses),
    ``ld_alpha`` (LD-DPO: give ``logps_fn = ld_logps_fn(alpha)`` here and to the reference), ``ref_sync``
    (TR-DPO: the reference moves at step ends). State across steps (BCO's reward shift, the last reference sync)
    is advanced by ``end_of_step`` and saved with checkpoints through ``state_dict``/``load_state_dict``.
    """

    unit = "pairs"

    def __init__(self, loss: str, beta: float, reference: ReferenceFn, *, label_smoothing: float = 0.0,
                 nll_weight: float = 0.0, simpo_gamma: float = 0.5, logps_fn: LogpsFn = forward_logps,
                 loss_weights: Sequence[float | str] | None = None, wpo: bool = False,
                 ld_alpha: float | None = None, ref_sync: "ReferenceSync | None" = None):
        self.logps_fn = logps_fn  # how ResponseLogps are computed (plain or a fast path; same numbers)
        self.parts = L.parse_loss_spec(loss, loss_weights)
        self.loss_name = loss
        self.loss_fn = L.get_loss(self.parts[0][0])
        self.beta, self.label_smoothing, self.nll_weight = beta, label_smoothing, nll_weight
        self.reference = reference
        names = [n for n, _ in self.parts]
        self.loss_kwargs = {"gamma": simpo_gamma} if "simpo" in names else {}
        self.wpo, self.ld_alpha, self.ref_sync = wpo, ld_alpha, ref_sync
        if ld_alpha is not None and logps_fn is forward_logps:  # else the policy's log-probs would be plain DPO's
            raise ConfigError("ld_alpha: pass logps_fn=ld_logps_fn(ld_alpha) here and to the reference "
                              "(live_reference(ref, ld_logps_fn(ld_alpha))), as train_dpo does.")
        if wpo and set(names) & L.BATCH_COUPLED_LOSSES:
            raise ConfigError("wpo weighs each pair's loss, but aot / aot_pair sort the pairs of a batch.")
        self.reward_shift = RewardShift() if "bco_pair" in names else None

    def step(self, model: torch.nn.Module, batch: dict) -> StepResult:
        k = batch["num_responses"]
        aux_coef = router_aux_loss_coef(model)
        pair_weights = None
        with capture_aux_loss(model if aux_coef else None) as aux:
            if self.wpo:
                out, row_weights = token_level_logps(model, batch, ld_alpha=self.ld_alpha, wpo=True)
                policy = out.by_example(k)  # [B, K]
                w = split_responses(row_weights, k)
                pair_weights = w[:, 0] * w[:, 1]
            else:
                policy = self.logps_fn(model, batch).by_example(k)  # [B, K]
        with torch.no_grad():
            ref = self.reference(model, batch).to(policy.sum.dtype)
        parts: dict[str, Tensor] = {}
        if self.loss_name == "plackett_luce":
            losses, rewards = self.loss_fn(policy.sum, ref, beta=self.beta)
            chosen_r, rejected_r = rewards[:, 0], rewards[:, -1]
        else:
            if k != 2:
                raise ConfigError(f"loss '{self.loss_name}' compares pairs; data with {k} ranked responses needs "
                                  "--loss plackett_luce.")
            kwargs: dict[str, dict] = {"simpo": self.loss_kwargs}
            if self.reward_shift is not None:
                kwargs["bco_pair"] = {"delta": self.reward_shift.value}
            if pair_weights is not None:  # WPO weighs every part (as TRL's use_weighting)
                losses, chosen_r, rejected_r, parts = self._weighted_parts(policy, ref, kwargs, pair_weights)
            else:
                losses, chosen_r, rejected_r, parts = L.combine(
                    self.parts, policy.sum[:, 0], policy.sum[:, 1], ref[:, 0], ref[:, 1], beta=self.beta,
                    kwargs=kwargs, label_smoothing=self.label_smoothing, chosen_lengths=policy.count[:, 0],
                    rejected_lengths=policy.count[:, 1])
            if self.reward_shift is not None:  # what end_of_step folds into the shift (from training steps only)
                rc = self.beta * (policy.sum[:, 0] - ref[:, 0]).detach()
                rr = self.beta * (policy.sum[:, 1] - ref[:, 1]).detach()
                parts[RewardShift.METRIC] = (rc + rr) / 2
        if self.nll_weight:
            losses = losses + self.nll_weight * L.chosen_nll(policy.sum[:, 0], policy.count[:, 0])
        extra = {}
        if len(self.parts) > 1:
            extra.update({f"loss/{name}": v for name, v in parts.items() if name != RewardShift.METRIC})
        if RewardShift.METRIC in parts:
            extra[RewardShift.METRIC] = parts[RewardShift.METRIC]
        if pair_weights is not None:
            extra["wpo_weight"] = pair_weights.detach()
        if self.reward_shift is not None:
            extra["bco/reward_shift"] = torch.full_like(losses.detach(), self.reward_shift.value)
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

    def _weighted_parts(self, policy, ref: Tensor, kwargs: dict, pair_weights: Tensor):
        total, parts, rewards = None, {}, None
        for name, weight in self.parts:
            loss, rc, rr = L.get_loss(name)(
                policy.sum[:, 0], policy.sum[:, 1], ref[:, 0], ref[:, 1], beta=self.beta,
                label_smoothing=self.label_smoothing, chosen_lengths=policy.count[:, 0],
                rejected_lengths=policy.count[:, 1], **kwargs.get(name, {}))
            loss = loss * pair_weights
            parts[name] = loss.detach()
            total = weight * loss if total is None else total + weight * loss
            rewards = rewards or (rc, rr)
        return total, rewards[0], rewards[1], parts

    # state across optimizer steps: called by the training loop

    def end_of_step(self, model: torch.nn.Module, accelerator: Accelerator, step: int, sums: Any = None) -> None:
        """After optimizer step ``step`` (1-based): fold the step's rewards (``sums``: its ``MetricSums`` over every
        process) into BCO's shift; sync the reference when due."""
        if self.reward_shift is not None and sums is not None:
            self.reward_shift.update(sums.sums.get(RewardShift.METRIC, 0.0), sums.examples)
        if self.ref_sync is not None:
            self.ref_sync.after_step(accelerator.unwrap_model(model), step)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.reward_shift is not None:
            state["bco_reward_shift"] = self.reward_shift.state_dict()
        if self.ref_sync is not None:
            state["ref_synced_at"] = self.ref_sync.synced_at
        return state

    def load_state_dict(self, state: dict[str, Any], model: torch.nn.Module, accelerator: Accelerator) -> None:
        """On resume (the moving reference's weights: ``load_files``)."""
        if self.reward_shift is not None and "bco_reward_shift" in state:
            self.reward_shift.load_state_dict(state["bco_reward_shift"])
        if self.ref_sync is not None:
            self.ref_sync.synced_at = state.get("ref_synced_at", 0)

    def save_files(self, folder: Path, model: torch.nn.Module, accelerator: Accelerator) -> None:
        """TR-DPO: the moving reference's weights go into each checkpoint, so a resumed run continues with the
        reference an uninterrupted one has."""
        if self.ref_sync is not None:
            self.ref_sync.save(folder / ReferenceSync.FILE, accelerator)

    def load_files(self, folder: Path, model: torch.nn.Module, accelerator: Accelerator) -> None:
        if self.ref_sync is None:
            return
        if (folder / ReferenceSync.FILE).is_file():
            self.ref_sync.load(folder / ReferenceSync.FILE)
            return
        # a checkpoint written before the reference was part of one: restart it from the resumed policy
        self.ref_sync.sync(accelerator.unwrap_model(model), mix=1.0)
        accelerator.print(f"ref_sync_every: {folder} holds no reference weights; the reference restarts from the "
                          "resumed policy (exact only if that step was a hard-sync step)")


class RewardShift:
    """BCO's reward shift delta: the mean of (r_c + r_r) / 2 over every training pair of the finished steps.

    Each step logs the per-pair value as the metric ``bco/pair_reward``; the loop hands the step's sums over its
    examples (all processes, filler micro-batches excluded) to ``DPO.end_of_step``, which adds them here. So within
    a step the shift is fixed and the update does not depend on how the step is cut into micro-batches or
    processes. The first step uses 0. Saved with checkpoints (``state_dict``)."""

    METRIC = "bco/pair_reward"

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def update(self, total: float, count: float) -> None:
        self.total += float(total)
        self.count += int(round(count))

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])


class ReferenceSync:
    """TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"): every ``every``
    optimizer steps, ref <- mix * policy + (1 - mix) * ref, parameter by parameter (mix 1: the hard update)."""

    def __init__(self, reference: torch.nn.Module, every: int, mix: float):
        if every < 1 or not 0 < mix <= 1:
            raise ConfigError(f"ref sync needs every >= 1 and mix in (0, 1], got every={every}, mix={mix}")
        self.reference, self.every, self.mix = reference, every, mix
        self.synced_at = 0

    def check(self, policy: torch.nn.Module) -> None:
        ours = {n: p.shape for n, p in unwrap_model(policy).named_parameters()}
        theirs = {n: p.shape for n, p in self.reference.named_parameters()}
        if ours != theirs:
            raise ConfigError("ref_sync_every mixes the policy's weights into the reference, so both must have the "
                              "same parameters; the reference model (ref_model) has others.")

    def sync(self, policy: torch.nn.Module, mix: float | None = None) -> None:
        mix = self.mix if mix is None else mix
        # FSDP2: a module that ran a forward without backward keeps some weights gathered (plain tensors beside
        # the other's shards); as shards on both sides the mix is shard by shard, on every rank
        reshard(self.reference)
        reshard(policy)
        src = dict(unwrap_model(policy).named_parameters())
        with torch.no_grad():
            for name, p in self.reference.named_parameters():
                if name not in src or src[name].shape != p.shape:  # e.g. a sharded (FSDP) policy
                    raise RuntimeError(f"ref sync: the policy's parameter {name!r} is missing or has another shape "
                                       "than the reference's (sharded parameters are not supported)")
                q = src[name].detach().to(p.device, p.dtype)
                if mix == 1.0:
                    p.copy_(q)
                else:
                    p.mul_(1.0 - mix).add_(q, alpha=mix)

    FILE = "reference.safetensors"

    def _full_state(self) -> dict[str, Tensor]:
        """The reference's whole state (a collective when it is sharded: every rank calls it), on CPU."""
        if any(hasattr(p, "full_tensor") for p in self.reference.parameters()):  # FSDP2
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            reshard(self.reference)

            return get_model_state_dict(self.reference, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
        state, seen = {}, set()
        for k, v in self.reference.state_dict().items():
            if v.untyped_storage().data_ptr() in seen:  # a tied weight: written once, re-tied on load
                continue
            seen.add(v.untyped_storage().data_ptr())
            state[k] = v.detach().cpu().contiguous()
        return state

    def save(self, path: Path, accelerator: Accelerator) -> None:
        sharded = any(hasattr(p, "full_tensor") for p in self.reference.parameters())
        if not (sharded or accelerator.is_main_process):
            return  # nothing to gather: only the main process reads and writes
        state = self._full_state()
        if accelerator.is_main_process:  # sharded: a gathered tied weight may come back under both names
            save_file({k: v.contiguous().clone() if sharded else v for k, v in state.items()}, str(path))

    def load(self, path: Path) -> None:
        state = load_file(str(path))
        if any(hasattr(p, "full_tensor") for p in self.reference.parameters()):  # FSDP2: sharded as it loads
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.reference, state, options=StateDictOptions(full_state_dict=True))
            return
        try:
            load_state_into(self.reference, state, f"resume: {path}")
        except RuntimeError as e:  # e.g. resumed with another --ref-model
            raise ConfigError(f"{e}: resume with the reference model the run was started with") from e

    def after_step(self, policy: torch.nn.Module, step: int) -> None:
        if step % self.every == 0:
            self.sync(policy)
            self.synced_at = step


def token_level_logps(model: torch.nn.Module, batch: dict, *, ld_alpha: float | None = None,
                      wpo: bool = False) -> tuple[ResponseLogps, Tensor | None]:
    """Summed response log-probs from full logits of the plain padded batch, with the per-token modifiers:
    LD-DPO's token weights (``ld_alpha``: the tokens past the shorter response of a pair weigh alpha) and WPO's
    row weights (``wpo``: exp(mean log p - log sum_v p_v^2), no gradient). Returns (logps [K*B], weights or None);
    counts stay the real response lengths."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    labels, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
    log_norm = torch.logsumexp(logits, dim=-1)
    per_token = (logits.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1) - log_norm) * mask
    weights = None
    if wpo:
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * logits.detach(), dim=-1) - 2 * log_norm.detach()
            weights = L.wpo_weights(per_token.detach(), log_sum_sq, mask)
    if ld_alpha is not None:
        per_token = per_token * L.ld_token_weights(mask, batch["num_responses"], ld_alpha)
    return ResponseLogps(per_token.sum(-1), mask.sum(-1)), weights


def ld_logps_fn(alpha: float) -> LogpsFn:
    """LD-DPO's log-probs as a ``LogpsFn`` (for the policy and the reference alike)."""
    return lambda model, batch: token_level_logps(model, batch, ld_alpha=alpha)[0]


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


def reference_place(source: str, precomputed: bool) -> str:
    """Where a run's reference lives, for the start-of-run line (``source``: a key of ``REFERENCE_SOURCES``)."""
    if source == "none":
        return "none (reference-free)"
    if source == "adapters":
        return "LoRA adapters off (the policy itself)" + ("; log-probs precomputed before training" if precomputed
                                                          else "")
    model = {"ref_model": "the ref_model", "copy": "a copy of the policy",
             "initial_policy": "the policy itself (no copy)"}[source]
    if precomputed:
        return f"precomputed: one pass through {model} before training" + (
            ", then freed" if source != "initial_policy" else "")
    return f"live: {model}, frozen, placed like the policy (sharded under FSDP2)"


def reference_source(cfg: DPOConfig) -> str:
    """Where a DPO run's reference log-probs come from (a key of ``REFERENCE_SOURCES``): decided here only.

    A separate frozen model is loaded only for "ref_model" and "copy"; "initial_policy" is the precomputed pass
    over the policy before its first update, and "adapters" needs no second copy of the weights either.
    """
    if cfg.reference_free or cfg.reference_free_loss:
        return "none"
    if cfg.ref_model:
        return "ref_model"
    if cfg.lora:
        return "adapters"
    return "initial_policy" if cfg.precomputes_reference else "copy"


def data_fingerprint(items: Sequence[TokenizedExample]) -> str:
    """A digest of exactly the token ids of ``items`` (a table names its own without reading its rows)."""
    return fingerprint(items)


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
        # a sharded policy: every rank runs as many forwards; the filler chunks' rows fall off the zip below
        most = -(-len(items) // accelerator.num_processes)
        for chunk, _ in tqdm(lockstep_chunks(mine, micro_batch_size, accelerator, most=most),
                             desc="reference log-probs", disable=not progress, dynamic_ncols=True):
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
    accelerator = use_engine(accelerator or Accelerator(mixed_precision=cfg.mixed_precision))
    configure_deepspeed(accelerator, cfg)  # before a reference engine is built from its config
    set_seed(cfg.seed)
    source = reference_source(cfg)
    run = load_run_inputs(cfg, accelerator, kind="preferences", with_reference=source in ("ref_model", "copy"),
                          ref_model=cfg.ref_model)
    policy, tokenizer = shard_policy(run.model, accelerator), run.tokenizer  # FSDP2: sharded before any pass
    ks = response_counts(run.train_items, run.eval_items)
    if len(ks) > 1:
        raise ConfigError(f"every example must have the same number of responses; found {sorted(ks)}.")
    if ks != {2} and cfg.loss != "plackett_luce":
        raise ConfigError(f"the data ranks {ks.pop()} responses per prompt; use --loss plackett_luce "
                          f"(loss '{cfg.loss}' compares pairs).")

    coupled = sorted({name for name, _ in cfg.loss_parts} & L.BATCH_COUPLED_LOSSES)
    if coupled and cfg.micro_batch_size * accelerator.num_processes < cfg.batch_size:
        accelerator.print(f"note: {', '.join(coupled)} sort log-ratios within each micro-batch of "
                          f"{cfg.micro_batch_size} pairs, not over the step's {cfg.batch_size}: the update depends on "
                          "micro_batch_size (batch_size / processes sorts each process's whole share of a step)")
    mode = LogpsMode.from_config(cfg)
    accelerator.print(mode.describe(policy, cfg.micro_batch_size * max(ks, default=2) * cfg.max_length))
    logps_fn = mode.logps_fn()
    if cfg.ld_alpha is not None:  # LD-DPO: the same token weights for the policy and the reference
        logps_fn = ld_logps_fn(cfg.ld_alpha)
    if cfg.ld_alpha is not None or cfg.wpo:
        accelerator.print("log-probs: wpo / ld_alpha read per-token values from the full logits of each "
                          "micro-batch (no LM-head chunking)")
    if source == "none":
        reference: ReferenceFn = zero_reference
    elif source == "adapters":
        reference = adapter_reference(accelerator.unwrap_model, logps_fn)
    elif source == "initial_policy":
        reference = live_reference(policy, logps_fn)
    else:
        run.reference = place_reference(run.reference, accelerator)  # FSDP2: sharded like the policy, frozen
        reference = live_reference(run.reference, logps_fn)
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
    after_prepare = None  # DeepSpeed: the precomputed pass, once the engine holds the policy
    accelerator.print(f"reference: {REFERENCE_SOURCES[source]}"
                      + (", log-probs precomputed before training" if cfg.precomputes_reference else ""))
    accelerator.print(describe(accelerator, reference_place(source, cfg.precomputes_reference)))

    if cfg.precomputes_reference:
        # the key holds everything that can change the numbers: weights, precision and the log-prob mode
        model_key = model_fingerprint(run.reference if run.reference is not None else policy)
        model_key += f"|{cfg.dtype}|{cfg.mixed_precision}|{mode.key}"
        kernel = getattr(unwrap_model(policy).config, "_attn_implementation", None)
        if kernel not in (None, "sdpa"):  # another attention kernel rounds differently (sdpa: as keys before)
            model_key += f"|attn={kernel}"
        weights = deepspeed_weights(accelerator)
        if weights != "float32":  # the DeepSpeed engine's 16-bit weights, not autocast: other numbers
            model_key += f"|deepspeed {weights} weights"
        if cfg.ld_alpha is not None:
            model_key += f"|ld_alpha={cfg.ld_alpha}"
        all_items = Chain(run.train_items, run.eval_items)
        pending = {"reference": reference}  # dropped once the pass ran: the frozen copy's memory is freed

        def reference_pass(model: torch.nn.Module) -> Tensor:
            found, path, cached = precompute_reference(
                pending.pop("reference"), model, all_items, collate, micro_batch_size=cfg.micro_batch_size * 2,
                accelerator=accelerator, cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
                model_key=model_key, progress=cfg.progress and accelerator.is_local_main_process)
            accelerator.print(f"reference log-probs: {'read from cache' if cached else 'computed and cached'} {path}")
            return found

        if is_deepspeed(accelerator):
            # the engine's model (cast to its precision, ZeRO-3: partitioned) exists only from prepare on: the pass
            # runs there, through the initial weights, and fills the rows the examples already point at
            logps = torch.full((len(all_items), max(ks, default=2)), float("nan"))  # a row read early shows
            after_prepare = lambda model: logps.copy_(reference_pass(accelerator.unwrap_model(model)))  # noqa: E731
        else:
            logps = reference_pass(policy)
        n_train = len(run.train_items)  # kept beside the tables as one tensor, not per row
        run.train_items = with_reference(run.train_items, logps[:n_train])
        run.eval_items = with_reference(run.eval_items, logps[n_train:]) if len(run.eval_items) else run.eval_items
        reference = precomputed_reference
        run.reference = None

    ref_sync = None
    if cfg.ref_sync_every:  # validate() made sure the reference is a model of its own, run live
        if is_deepspeed(accelerator):  # ZeRO-3's tensors are empty partitions; ZeRO-2 mixes 16-bit engine copies
            raise ConfigError("ref_sync_every (TR-DPO) under DeepSpeed is not supported: the engine's weights are "
                              "partitioned (ZeRO-3) or 16-bit copies of its master weights; use DDP or FSDP2.")
        ref_sync = ReferenceSync(run.reference, cfg.ref_sync_every, cfg.ref_sync_mix)
        ref_sync.check(policy)
    method = DPO(cfg.loss, cfg.beta, reference, label_smoothing=cfg.label_smoothing, nll_weight=cfg.nll_weight,
                 simpo_gamma=cfg.simpo_gamma, logps_fn=logps_fn, loss_weights=cfg.loss_weights, wpo=cfg.wpo,
                 ld_alpha=cfg.ld_alpha, ref_sync=ref_sync)
    return train(cfg, model=policy, method=method, train_items=run.train_items, collate=collate,
                 eval_items=run.eval_items or None, accelerator=accelerator,
                 save_final=lambda out: save_model_and_tokenizer(accelerator.unwrap_model(policy), tokenizer, out),
                 summary_keys=DPO_SUMMARY_KEYS, after_prepare=after_prepare)


__all__ = ["DPO", "train_dpo", "live_reference", "adapter_reference", "precomputed_reference", "zero_reference",
           "precompute_reference", "make_collate", "data_fingerprint", "reference_source", "REFERENCE_SOURCES",
           "DPO_SUMMARY_KEYS", "RewardShift", "ReferenceSync", "token_level_logps", "ld_logps_fn"]

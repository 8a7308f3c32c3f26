"""The one training loop every method shares: accumulation, clipping, schedule, logging, eval, checkpoints.

A method (DPO, SFT, RM, ...) supplies ``step(model, batch) -> StepResult``: per-example losses and
per-example metrics for one micro-batch. The loop owns everything else:

* the global batch (``batch_size`` examples per optimizer step, whatever the number of processes) is cut into
  micro-batches; each micro-batch adds ``sum(losses) / batch_size`` to the gradient, so one micro-batch of 8
  and eight of 1 give the same update;
* the data order is a function of (seed, step) alone, so a resumed run sees exactly the batches an
  uninterrupted one would;
* checkpoints (``train/checkpoints.py``) hold the model (safetensors), optimizer, scheduler, RNG states and the
  step; they are written to a temporary folder, fsynced, given a manifest (sizes, sha256) last and renamed, so a
  kill never leaves a half-written checkpoint and a damaged one is skipped on resume; the final model is written
  the same way;
* the engine (DDP, FSDP2) is accelerate's; ``train/sharding.py`` adds what sharding needs on top: every process
  runs as many micro-batches as the others (filler ones of weight 0 where an epoch's last step or an eval set does
  not divide), checkpoints go through ``torch.distributed.checkpoint`` and the final model is gathered on rank 0;
* SIGINT and SIGTERM stop at the next step boundary with a checkpoint (``train/signals.py``); a non-finite
  gradient norm stops the run (or skips the step) before the optimizer step, naming the examples.

A method whose outer loop is not "a batch of examples per step" (PPO: sample, then several epochs of
minibatch updates) does not copy this loop: it builds its own from the same parts, ``start_run`` and the
``Run`` it returns (``optimizer_step``, ``log.step_done``, ``end_of_step``, ``finish``). Whatever those parts
learn (a new checkpoint format, a stop on a signal, a check for non-finite values) every method then has.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

from ..config import TrainConfig, save_config
from ..data.collate import to_device
from ..errors import ConfigError, PrefoptError
from ..jsonl import append_jsonl
from ..models import evaluating, quiet_progress_bars
from .checkpoints import (Checkpointer, clear_previous_run, config_differences, find_checkpoint,
                          load_model_weights, previous_run, refuse_used_output_dir, resume_from, save_final_model, step_dirs,
                          verify_checkpoint, write_atomic)
from .sharding import (backward, check_supported, configure_deepspeed, engine_grad_norm, gathered_for_save, is_deepspeed,
                       lockstep_chunks, micro_batch, rank_share, reshard, shard_lora, use_engine)
from .signals import StopAtStepEnd, StopOnSignal, StopRequested


@dataclass
class StepResult:
    """What a method returns for one micro-batch."""

    losses: Tensor
    """Per-example losses [b] (with grad when training)."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Per-example metric values [b], averaged over the examples of a step by the loop."""
    tokens: int | Tensor = 0
    """Non-padding tokens the forward passes processed (for tokens_per_second)."""


class Method(Protocol):
    """Optional hooks ``train()`` calls when a method has them: ``end_of_step(model, accelerator, step, sums)``
    after each optimizer step (``sums``: the step's ``MetricSums`` over its examples on every process),
    ``state_dict()`` (saved in each checkpoint) and ``load_state_dict(state, model, accelerator)`` on resume;
    ``save_files(folder, model, accelerator)`` (every rank; tensors of its own into each checkpoint folder) and
    ``load_files(folder, model, accelerator)`` on resume, after ``load_state_dict``."""

    unit: str  # what an example is called in throughput metrics: "pairs", "examples", ...

    def step(self, model: torch.nn.Module, batch: dict) -> StepResult: ...


class BatchSchedule:
    """Which examples form optimizer step s: a seeded permutation per epoch, cut into global batches.

    ``keep_tail``: an epoch ends with a smaller step holding the last ``num_items % batch_size`` examples, so it
    covers every example exactly once; without it that partial batch is dropped."""

    def __init__(self, num_items: int, batch_size: int, seed: int, *, keep_tail: bool = False):
        if num_items < batch_size:
            raise ConfigError(f"batch_size ({batch_size}) is larger than the training set ({num_items} examples).")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.steps_per_epoch = -(-num_items // batch_size) if keep_tail else num_items // batch_size
        self._perm: tuple[int, Tensor] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_items, generator=g))
        return self._perm[1][within * self.batch_size:(within + 1) * self.batch_size].tolist()


def micro_batches(items: Sequence[int], size: int) -> list[Sequence[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The fused kernel updates every parameter in one pass: on CPU about 10x faster than the default multi-tensor
    # AdamW for a 27M-parameter model, and it makes no full-size temporaries (lower peak memory).
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                  for p in params)
    if fusable:
        try:
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, ValueError):  # a build without the fused kernel: the default below
            pass
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))


class MetricSums:
    """Sums of per-example metric values (and of examples, tokens, seconds) over micro-batches and steps.

    Values stay on the device while a step runs and are read back once, in ``reduce``/``means``: no host
    synchronisation per micro-batch.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.examples = 0.0
        self.tokens: Any = 0.0
        self.seconds = 0.0

    def add(self, result: StepResult) -> None:
        values = {"loss": result.losses, **result.metrics}
        for k, v in values.items():
            v = v.detach().float().sum()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.examples += result.losses.numel()
        self.tokens = self.tokens + result.tokens

    def _read_back(self) -> None:
        """Turn the on-device sums into Python floats with one transfer."""
        keys = [k for k, v in self.sums.items() if isinstance(v, Tensor)]
        if keys or isinstance(self.tokens, Tensor):
            parts = [self.sums[k].double().reshape(1) for k in keys]
            parts.append(torch.as_tensor(self.tokens, dtype=torch.float64).reshape(1).to(
                parts[0].device if parts else "cpu"))
            values = torch.cat(parts).tolist()
            self.sums.update(zip(keys, values[:-1]))
            self.tokens = values[-1]

    def merge(self, other: "MetricSums") -> None:
        """Add another's sums into these (e.g. one reduced step into a logging window)."""
        other._read_back()
        self._read_back()
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.examples += other.examples
        self.tokens += other.tokens
        self.seconds += other.seconds

    def reduce(self, accelerator: Accelerator, *, keys_may_differ: bool = False) -> "MetricSums":
        """Sum over processes. ``keys_may_differ``: some processes may have seen no example (an eval set smaller
        than the number of processes), so the metric names are agreed first (a missing one counts 0)."""
        self._read_back()
        if accelerator.num_processes == 1:
            return self
        keys = sorted(self.sums)
        if keys_may_differ:
            from accelerate.utils import gather_object

            keys = sorted(set().union(*gather_object([keys])))
        vec = torch.tensor([self.sums.get(k, 0.0) for k in keys] + [self.examples, self.tokens], dtype=torch.float64,
                           device=accelerator.device)
        vec = accelerator.reduce(vec, reduction="sum")
        out = MetricSums()
        out.sums.update(zip(keys, vec[:-2].tolist()))
        out.examples, out.tokens, out.seconds = float(vec[-2]), float(vec[-1]), self.seconds
        return out

    def means(self, unit: str, prefix: str = "") -> dict[str, float]:
        self._read_back()
        n = max(self.examples, 1.0)
        row = {f"{prefix}{k}": v / n for k, v in self.sums.items()}
        if self.seconds > 0:
            row[f"{prefix}{unit}_per_second"] = self.examples / self.seconds
            row[f"{prefix}tokens_per_second"] = self.tokens / self.seconds
        return row


def write_summary(output_dir: Path, *, steps: int, total_steps: int, resumed_from: int | None, seconds: float,
                  train_row: dict, eval_row: dict | None, main_process: bool = True) -> dict[str, Any]:
    summary = {"steps": steps, "total_steps": total_steps, "resumed_from": resumed_from,
               "seconds": round(seconds, 2), "train": train_row, "eval": eval_row, "output_dir": str(output_dir)}
    if main_process:
        write_atomic(output_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """``<output_dir>/metrics.jsonl``, one JSON object per logged step; optional TensorBoard mirror."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():  # drop rows logged after the checkpoint
            rows = [line for line in self.path.read_text().splitlines() if self._row_step(line) <= resume_step]
            write_atomic(self.path, "".join(r + "\n" for r in rows))
        elif resume_step is None and self.path.is_file():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("tensorboard logging needs the tensorboard package: "
                                  "pip install 'prefopt[tensorboard]'") from e
            self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    @staticmethod
    def _row_step(line: str) -> float:
        """The step of a row; a blank or torn line (the process was killed while appending it) counts as after
        every step, so a resume drops it."""
        try:
            return json.loads(line).get("step", 0) if line.strip() else math.inf
        except ValueError:
            return math.inf

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_jsonl(row, self.path)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class RunLog:
    """What a run shows and records: the progress bar, ``metrics.jsonl``, the logging window and the last rows.

    Each optimizer-step boundary hands ``step_done`` the step's numbers; every ``log_every`` steps (and at the
    last) the window becomes one row. Two kinds of numbers: ``sums`` (per-example sums, averaged over the
    examples of the window: losses, rewards, throughput) and ``scalars`` (one value per step: averaged over the
    steps of the window), with ``last`` values (learning rate, gradient norm) taken from the window's last step.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, output_dir: Path, *, total_steps: int,
                 start_step: int, resumed: bool, unit: str, summary_keys: Sequence[str], desc: str = "train",
                 bar_unit: str = "step"):
        self.cfg, self.unit, self.summary_keys = cfg, unit, tuple(summary_keys)
        self.metrics = MetricsLog(output_dir, accelerator.is_main_process, cfg.tensorboard,
                                  start_step if resumed else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit=bar_unit, dynamic_ncols=True,
                        disable=not (cfg.progress and accelerator.is_local_main_process))
        self.total_steps = total_steps
        self.window, self.window_scalars = MetricSums(), []
        self.last_row: dict[str, Any] = {}
        self.last_eval: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}
        """Values every row carries as they stand at the row's step (e.g. ``nonfinite_skips``)."""
        self.started = time.perf_counter()

    def step_done(self, step: int, epoch: int, *, sums: MetricSums | None = None,
                  scalars: dict[str, float] | None = None, last: dict[str, Any] | None = None) -> dict | None:
        """Add one finished optimizer step; returns the row when one was written."""
        if sums is not None:
            self.window.merge(sums)
        if scalars:
            self.window_scalars.append(scalars)
        row = None
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            row = {"step": step, "epoch": epoch}
            if self.window_scalars:
                n = len(self.window_scalars)
                row.update({k: sum(s[k] for s in self.window_scalars) / n for k in self.window_scalars[0]})
            row.update(self.window.means(self.unit))
            row.update({k: float(v) for k, v in (last or {}).items()})
            row.update(self.extra)
            self.metrics.write(row)
            self.last_row = row
            self.window, self.window_scalars = MetricSums(), []
            rate = row.get(f"{self.unit}_per_second", 0)
            self.bar.set_postfix({k.split("/")[-1]: f"{row[k]:.4g}" for k in self.summary_keys if k in row}
                                 | {f"{self.unit}/s": f"{rate:.3g}"}, refresh=False)
        self.bar.update(1)
        return row

    def eval_row(self, row: dict[str, Any]) -> None:
        self.metrics.write(row)
        self.last_eval = row

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


# ---------------------------------------------------------------------------------------------------------
# A run: the parts every method's loop shares


class NonFiniteError(PrefoptError):
    """A NaN or Inf loss or gradient norm stopped the run before its optimizer step (the CLI exits 2)."""


def _test_nan_step() -> int | None:
    """TEST HOOK, not for normal use: ``PREFOPT_TEST_NAN_AT_STEP=k`` makes the loss of (1-based) step k NaN."""
    hook = os.environ.get("PREFOPT_TEST_NAN_AT_STEP")
    return int(hook) if hook else None


class Run:
    """One training run's shared state and its step-boundary work; every method's loop is built on it.

    ``start_run`` builds the optimizer and schedule, prepares them with ``accelerate``, resumes from a checkpoint
    and opens the log. A method's loop then does its own forward/backward work and calls ``optimizer_step`` (clip,
    check for non-finite values, step, schedule), ``log.step_done`` and ``end_of_step`` (eval and checkpoint when
    due, a stop on SIGINT/SIGTERM), all inside ``with run.stop_on_interrupt():``, and ends with ``finish`` (final
    eval, final model, summary). So logging, checkpoints and resume are written once, for DPO, SFT, RM and PPO.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, params: list[torch.nn.Parameter], *,
                 total_steps: int, checkpoint_state: Callable[[int], dict], unit: str, summary_keys: Sequence[str],
                 desc: str, bar_unit: str):
        self.cfg, self.accelerator = cfg, accelerator
        self.model, self.optimizer, self.scheduler, self.params = model, optimizer, scheduler, params
        self.output_dir = Path(cfg.output_dir)
        self.total_steps, self.summary_keys = total_steps, tuple(summary_keys)
        self._checkpoint_state = checkpoint_state
        self.checkpoint_files: Callable[[Path], None] | None = None
        """A method's own files for each checkpoint (``Checkpointer.save``'s ``files``)."""
        self._check_output_dir()
        self.checkpointer = Checkpointer(self.output_dir, cfg.keep_checkpoints)
        self.resumed_from, self.state = resume_from(cfg, self.output_dir, accelerator, model, optimizer, scheduler)
        self.start_step = self.step = self.state.get("step", 0)
        self.nonfinite_skips = self.state.get("nonfinite_skips", 0)
        self.nonfinite_in_a_row = self.state.get("nonfinite_in_a_row", 0)
        if self.resumed_from is not None and (self.output_dir / "config.yaml").is_file():
            diff = config_differences(cfg, self.output_dir / "config.yaml")
            if diff:
                accelerator.print("warning: resuming with options that differ from the run's config.yaml: "
                                  + "; ".join(diff))
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
        self.log = RunLog(cfg, accelerator, self.output_dir, total_steps=total_steps, start_step=self.start_step,
                          resumed=self.resumed_from is not None, unit=unit, summary_keys=summary_keys, desc=desc,
                          bar_unit=bar_unit)
        if cfg.on_nonfinite == "skip":
            self.log.extra["nonfinite_skips"] = self.nonfinite_skips
        self._stop = StopOnSignal(self.save_checkpoint, accelerator, self.log)
        if self.resumed_from is not None:
            accelerator.print(f"resumed from {self.resumed_from} at step {self.start_step}/{total_steps}")

    def _check_output_dir(self) -> None:
        """A new run (no resume) never mixes with another run's checkpoints or final model: it stops before
        writing anything, or with ``overwrite`` first clears what that run wrote."""
        refuse_used_output_dir(self.cfg)
        if self.cfg.resume or previous_run(self.output_dir) is None:
            return
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            removed = clear_previous_run(self.output_dir)
            self.accelerator.print(f"overwrite: removed {', '.join(removed)} from {self.output_dir}")
        self.accelerator.wait_for_everyone()

    @property
    def loss_scaling(self) -> bool:
        """fp16 mixed precision with a gradient scaler (whose overflow steps are expected, not errors): torch's, or
        the DeepSpeed engine's own (its config's fp16 section)."""
        if is_deepspeed(self.accelerator):
            return bool(self.accelerator.state.deepspeed_plugin.deepspeed_config.get("fp16", {}).get("enabled"))
        return getattr(self.accelerator, "scaler", None) is not None

    def optimizer_step(self, blame: Callable[[], str] | None = None) -> tuple[Tensor, float]:
        """Clip the accumulated gradients, check them, step the optimizer and the schedule, clear the gradients.

        A non-finite gradient norm (a NaN or Inf loss makes one too) raises ``NonFiniteError`` before the
        optimizer step, or with ``on_nonfinite: skip`` skips the step (gradients cleared, optimizer and schedule
        untouched). ``blame()`` (called only then) names the data of the step, e.g. its examples' sources.
        Returns (the global gradient norm before clipping, as a tensor; the learning rate this step used)."""
        if is_deepspeed(self.accelerator):  # the engine clipped and stepped (or skipped a non-finite step) already
            grad_norm = engine_grad_norm(self.model)
        elif self.cfg.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # a sharded (DTensor) norm: the global one
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        finite = bool(torch.isfinite(grad_norm))  # the one host synchronisation of the check
        if finite:
            self.nonfinite_in_a_row = 0
        elif self.loss_scaling and self.nonfinite_in_a_row < self.cfg.max_nonfinite_skips:
            # fp16 loss scaling: an overflow is routine; the scaler skips this update and lowers its scale (it
            # must see the step, or its next unscale fails). Only a run of them is a real non-finite loss.
            self.nonfinite_in_a_row += 1
            finite = True
        else:
            self._nonfinite(float(grad_norm), blame)
        if finite:
            self.optimizer.step()
            if not getattr(self.optimizer, "step_was_skipped", False):  # a loss scaler's overflow skips the update:
                self.scheduler.step()  # the schedule follows the updates applied
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def _nonfinite(self, value: float, blame: Callable[[], str] | None) -> None:
        step = self.step + 1
        where = blame() if blame is not None else f"the data of step {step}"
        what = f"step {step}: the gradient norm is {value} (a NaN or Inf loss or gradient); data: {where}"
        if self.loss_scaling:
            what += f" (the fp16 loss scaler had already skipped {self.nonfinite_in_a_row} steps in a row)"
        if self.cfg.on_nonfinite == "skip":
            self.nonfinite_skips += 1
            self.nonfinite_in_a_row += 1
            self.log.extra["nonfinite_skips"] = self.nonfinite_skips
            if self.nonfinite_in_a_row <= self.cfg.max_nonfinite_skips:
                self.accelerator.print(f"warning: {what}: optimizer step skipped "
                                       f"({self.nonfinite_skips} skipped so far)", flush=True)
                return
            what += f"; {self.nonfinite_in_a_row} optimizer steps in a row were non-finite " \
                    f"(max_nonfinite_skips = {self.cfg.max_nonfinite_skips})"
        self.optimizer.zero_grad(set_to_none=True)
        self.log.close()
        ckpts = step_dirs(self.output_dir)
        last = f"The last checkpoint, {ckpts[-1]}, is intact (continue with --resume auto)" if ckpts \
            else "No checkpoint was written"
        hint = "" if self.cfg.on_nonfinite == "skip" else "; --on-nonfinite skip skips such steps instead"
        raise NonFiniteError(f"stopped before the optimizer step: {what}. {last}{hint}.")

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint at the current step boundary (model, optimizer, schedule, RNG, method state)."""
        return self.checkpointer.save(self.step, self.accelerator, self.model, self.optimizer, self.scheduler,
                                      {"total_steps": self.total_steps, "nonfinite_skips": self.nonfinite_skips,
                                       "nonfinite_in_a_row": self.nonfinite_in_a_row,
                                       **self._checkpoint_state(self.step)}, files=self.checkpoint_files)

    def stop_on_interrupt(self) -> StopOnSignal:
        """The context the step loop runs in: SIGINT/SIGTERM stop at the next step boundary with a checkpoint."""
        return self._stop

    def end_of_step(self, run_eval: Callable[[], dict] | None) -> None:
        """At an optimizer-step boundary: evaluate and checkpoint when due, then honour a stop signal."""
        cfg, step = self.cfg, self.step
        if run_eval is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
            self.log.eval_row(run_eval())
        if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
            self.save_checkpoint()
        self._stop.check()

    def _save_final(self, save_final: Callable[[Path], None] | None) -> None:
        def write(folder: Path) -> None:
            if save_final is not None:
                save_final(folder)
            else:
                with quiet_progress_bars():
                    self.accelerator.unwrap_model(self.model).save_pretrained(folder, safe_serialization=True)

        save_final_model(self.output_dir, self.step, write)

    def finish(self, run_eval: Callable[[], dict] | None, save_final: Callable[[Path], None] | None = None
               ) -> dict[str, Any]:
        """The final evaluation, the final model (``save_final(folder)`` on the main process, default
        ``save_pretrained``; written atomically, see ``_save_final``), ``summary.json``; prints the summary and
        returns it."""
        self.log.bar.close()
        if run_eval is not None:
            self.log.eval_row(run_eval())
        self.log.close()
        elapsed = time.perf_counter() - self.log.started
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        with gathered_for_save(self.model, accelerator):  # under FSDP every rank joins the gather
            if accelerator.is_main_process:
                self._save_final(save_final)
        summary = write_summary(self.output_dir, steps=self.step, total_steps=self.total_steps,
                                resumed_from=self.start_step if self.resumed_from else None, seconds=elapsed,
                                train_row=self.log.last_row, eval_row=self.log.last_eval,
                                main_process=accelerator.is_main_process)
        if self.cfg.on_nonfinite == "skip":
            if self.nonfinite_skips:
                accelerator.print(f"{self.nonfinite_skips} optimizer step(s) skipped for non-finite values")
        accelerator.wait_for_everyone()
        accelerator.print(format_summary(summary, self.summary_keys))
        return summary


def start_run(cfg: TrainConfig, model: torch.nn.Module, accelerator: Accelerator, *, total_steps: int, unit: str,
              summary_keys: Sequence[str] = ("loss",), checkpoint_state: Callable[[int], dict] = lambda step: {},
              desc: str = "train", bar_unit: str = "step",
              after_prepare: Callable[[torch.nn.Module], None] | None = None) -> Run:
    """Optimizer and schedule over the trainable parameters, both prepared by ``accelerate``, the resumed state
    (``run.state``: the checkpoint's trainer state, {} on a fresh start) and the log.

    ``checkpoint_state(step)`` adds a method's own state to each checkpoint's ``trainer_state.json`` (read back
    from ``run.state`` on resume). ``after_prepare(model)`` runs on the prepared model before a checkpoint is
    loaded into it: a pass that must see the initial weights as the engine holds them (DeepSpeed's cast and
    partitioned model exists only from ``prepare`` on)."""
    use_engine(accelerator)
    check_supported(model, accelerator)
    model = shard_lora(model, accelerator)  # LoRA under FSDP2: sharded in two levels before prepare (see there)
    configure_deepspeed(accelerator, cfg)
    reshard(model)  # a model sharded early (a pass before training) is handed over as shards
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters.")
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP replaces the parameters with sharded ones (the optimizer is switched to them by prepare): clip those
    params = [p for p in model.parameters() if p.requires_grad]
    if after_prepare is not None:
        after_prepare(model)
    return Run(cfg, accelerator, model, optimizer, scheduler, params, total_steps=total_steps,
               checkpoint_state=checkpoint_state, unit=unit, summary_keys=summary_keys, desc=desc, bar_unit=bar_unit)


# ---------------------------------------------------------------------------------------------------------
# The loop of the per-example methods (DPO and its family, SFT, RM)


def evaluate(model, method: Method, items: Sequence[Any], collate: Callable[[Sequence[Any]], dict],
             micro_batch_size: int, accelerator: Accelerator, desc: str = "eval") -> MetricSums:
    """Run the method's step without gradients over every eval example (sharded across processes)."""
    model = accelerator.unwrap_model(model)  # no DDP collectives: shards may differ in size (or be empty)
    sums = MetricSums()
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    most = math.ceil(len(items) / accelerator.num_processes)  # a sharded model: every rank runs as many forwards
    with evaluating(model), torch.no_grad():
        for chunk, real in lockstep_chunks(mine, micro_batch_size, accelerator, most=most):
            batch = to_device(collate([items[i] for i in chunk]), accelerator.device)
            with accelerator.autocast():
                result = method.step(model, batch)
            if real:
                sums.add(result)
    reshard(model)
    return sums.reduce(accelerator, keys_may_differ=True)


def train(cfg: TrainConfig, *, model: torch.nn.Module, method: Method, train_items: Sequence[Any],
          collate: Callable[[Sequence[Any]], dict], eval_items: Sequence[Any] | None = None,
          accelerator: Accelerator | None = None, save_final: Callable[[Path], None] | None = None,
          summary_keys: Sequence[str] = ("loss",),
          after_prepare: Callable[[torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Train ``model`` with ``method`` on ``train_items``; returns a summary dict (also in summary.json).

    Each epoch covers every example exactly once: its last step holds the ``len % batch_size`` examples left over
    (a smaller step, its loss the mean over those examples), split across the processes as evenly as it goes. A
    process with fewer micro-batches in such a step runs filler ones with weight 0, so every process joins each
    gradient synchronisation (DDP) and each sharded forward and backward (FSDP)."""
    accelerator = use_engine(accelerator or Accelerator(mixed_precision=cfg.mixed_precision))
    world = accelerator.num_processes
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size "
                          f"({cfg.micro_batch_size}) x processes ({world}).")
    streamed = hasattr(train_items, "restore")  # data.stream: read as training goes, indexed by stream position
    schedule = train_items.schedule(cfg.batch_size) if streamed else \
        BatchSchedule(len(train_items), cfg.batch_size, cfg.seed, keep_tail=True)
    total_steps = cfg.max_steps or cfg.epochs * schedule.steps_per_epoch
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    accelerator.print(f"global batch {cfg.batch_size} = micro-batch {cfg.micro_batch_size} x accumulation {accum} "
                      f"x processes {world}")
    method_state = getattr(method, "state_dict", None)  # a method's own state across steps (optional)
    run = start_run(cfg, model, accelerator, total_steps=total_steps, unit=method.unit, summary_keys=summary_keys,
                    checkpoint_state=lambda step: {"epoch": schedule.epoch_of(step), "seed": cfg.seed,
                                                   **({"method": method_state()} if method_state else {}),
                                                   **(train_items.state(step) if streamed else {})},
                    after_prepare=after_prepare)
    model = run.model
    if hasattr(method, "save_files"):  # a method's own files in each checkpoint (e.g. a moving reference)
        run.checkpoint_files = lambda folder: method.save_files(folder, model, accelerator)
    if run.resumed_from is not None and hasattr(method, "load_state_dict"):
        method.load_state_dict(run.state.get("method", {}), model, accelerator)
    if run.resumed_from is not None and hasattr(method, "load_files"):
        method.load_files(run.resumed_from, model, accelerator)
    if run.resumed_from is not None and streamed:
        train_items.restore(run.state)  # the stream continues at the row after the checkpoint's step
    end_of_step = getattr(method, "end_of_step", None)  # called after each optimizer step (see Method)

    def run_eval() -> dict:
        return {"step": run.step, **evaluate(model, method, eval_items, collate, cfg.micro_batch_size,
                                             accelerator).means(method.unit, prefix="eval/")}

    nan_step = _test_nan_step()
    model.train()
    rank = accelerator.process_index
    with run.stop_on_interrupt():
        while run.step < total_steps:
            t0 = time.perf_counter()
            global_idx = schedule.indices(run.step)
            start, end = rank_share(len(global_idx), rank, world)
            chunks = micro_batches(global_idx[start:end], cfg.micro_batch_size)
            if world > 1:  # the same number of micro-batches on every process (a short last step)
                most = math.ceil(math.ceil(len(global_idx) / world) / cfg.micro_batch_size)
                chunks = [(c, True) for c in chunks] + [([global_idx[0]], False)] * (most - len(chunks))
            else:
                chunks = [(c, True) for c in chunks]
            real = [c for c, is_real in chunks if is_real]
            scale = world / len(global_idx)  # the step's loss is the mean over its examples
            step_sums = MetricSums()
            loss_sums: list[Tensor] = []  # per micro-batch, on the device: read back only to name a bad one
            for i, (chunk, is_real) in enumerate(chunks):
                batch = to_device(collate([train_items[j] for j in chunk]), accelerator.device)
                with micro_batch(accelerator, model, last=i == len(chunks) - 1):  # gradients synced after the last
                    with accelerator.autocast():
                        result = method.step(model, batch)
                    if nan_step == run.step + 1 and i == 0:  # the PREFOPT_TEST_NAN_AT_STEP test hook
                        result.losses = result.losses * float("nan")
                    backward(accelerator, result.losses.sum() * (scale if is_real else 0.0))
                if is_real:
                    step_sums.add(result)
                    loss_sums.append(result.losses.detach().float().sum())
            grad_norm, lr = run.optimizer_step(
                blame=lambda: _blame_micro_batches(loss_sums, real, train_items, rank, world))
            run.step += 1
            step_sums.seconds = time.perf_counter() - t0
            step_sums = step_sums.reduce(accelerator)
            if end_of_step is not None:  # the step's metric sums over its real examples, all processes
                end_of_step(model, accelerator, run.step, step_sums)
            run.log.step_done(run.step, schedule.epoch_of(run.step - 1), sums=step_sums,
                              last={"lr": lr, "grad_norm": grad_norm})
            run.end_of_step(run_eval if eval_items else None)
    if streamed:  # its rows were validated as the steps read them: report what was skipped or dropped
        accelerator.print(train_items.summary())
    return run.finish(run_eval if eval_items else None, save_final)


def _sources(items: Sequence[Any], indices: Sequence[int], limit: int = 8) -> str:
    names = [getattr(items[j], "source", None) or f"example #{j}" for j in indices]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _blame_micro_batches(loss_sums: Sequence[Tensor], chunks: Sequence[Sequence[int]], items: Sequence[Any],
                         rank: int, world: int) -> str:
    """The step's first micro-batch with a non-finite loss, with its examples' sources (file:line)."""
    values = torch.stack(loss_sums).tolist()
    where = f" on process {rank}" if world > 1 else ""
    for i, (v, chunk) in enumerate(zip(values, chunks)):
        if not math.isfinite(v):
            return (f"micro-batch {i + 1}/{len(chunks)}{where} has loss sum {v}; its examples: "
                    f"{_sources(items, chunk)}")
    every = [j for chunk in chunks for j in chunk]
    return f"the losses{where} are finite, the gradient is not; the step's examples: {_sources(items, every)}"


def format_summary(summary: dict[str, Any], keys: Sequence[str]) -> str:
    """A few readable lines for the end of a run."""
    lines = [f"finished {summary['steps']} steps in {summary['seconds']:.1f} s -> {summary['output_dir']}"]
    for name in ("train", "eval"):
        row = summary.get(name) or {}
        prefix = "eval/" if name == "eval" else ""
        vals = [(k, row.get(prefix + k)) for k in keys]
        vals = [f"{k}={v:.4f}" for k, v in vals if isinstance(v, (int, float)) and not math.isnan(v)]
        if vals:
            lines.append(f"  {name:5s} (step {row.get('step')}): " + "  ".join(vals))
    return "\n".join(lines)


__all__ = ["StepResult", "Method", "BatchSchedule", "StopAtStepEnd", "StopOnSignal", "StopRequested",
           "NonFiniteError", "verify_checkpoint", "previous_run", "clear_previous_run", "Run", "RunLog", "start_run",
           "train", "evaluate", "format_summary", "MetricSums", "Checkpointer", "find_checkpoint", "load_model_weights", "build_optimizer",
           "build_scheduler"]

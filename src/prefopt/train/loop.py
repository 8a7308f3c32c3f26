"""The one training loop every method shares: accumulation, clipping, schedule, logging, eval, checkpoints.

A method (DPO, SFT, RM, ...) supplies ``step(model, batch) -> StepResult``: per-example losses and
per-example metrics for one micro-batch. The loop owns everything else:

* the global batch (``batch_size`` examples per optimizer step, whatever the number of processes) is cut into
  micro-batches; each micro-batch adds ``sum(losses) / batch_size`` to the gradient, so one micro-batch of 8
  and eight of 1 give the same update;
* the data order is a function of (seed, step) alone, so a resumed run sees exactly the batches an
  uninterrupted one would;
* checkpoints hold the model (safetensors), optimizer, scheduler, RNG states and the step; they are written
  to a temporary folder and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import signal
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from ..config import TrainConfig, save_config
from ..errors import ConfigError
from ..models import quiet_progress_bars


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
    unit: str  # what an example is called in throughput metrics: "pairs", "examples", ...

    def step(self, model: torch.nn.Module, batch: dict) -> StepResult: ...


class BatchSchedule:
    """Which examples form optimizer step s: a seeded permutation per epoch, cut into global batches."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if num_items < batch_size:
            raise ConfigError(f"batch_size ({batch_size}) is larger than the training set ({num_items} examples).")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.steps_per_epoch = num_items // batch_size  # the last partial batch of an epoch is dropped
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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


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

    def reduce(self, accelerator: Accelerator) -> "MetricSums":
        """Sum over processes."""
        self._read_back()
        if accelerator.num_processes == 1:
            return self
        keys = sorted(self.sums)
        vec = torch.tensor([self.sums[k] for k in keys] + [self.examples, self.tokens], dtype=torch.float64,
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


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str, output_dir: Path) -> Path | None:
    if resume == "auto":
        ckpts = _checkpoint_dirs(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume: {path} is not a prefopt checkpoint (no trainer_state.json). "
                          f"Use a folder under {output_dir / 'checkpoints'} or 'auto'.")
    return path


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load weights written by ``save_pretrained`` (full model or peft adapters) into ``model`` in place."""
    if hasattr(model, "load_saved_weights"):  # a wrapper that saves more than one module (PPO's value head)
        model.load_saved_weights(directory)
        return
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


class Checkpointer:
    def __init__(self, output_dir: Path, keep: int):
        self.output_dir, self.keep = output_dir, keep

    def save(self, step: int, accelerator: Accelerator, model, optimizer, scheduler, extra: dict) -> Path:
        final = self.output_dir / "checkpoints" / f"step-{step:07d}"
        if (final / "trainer_state.json").is_file():  # this step boundary is saved already
            return final
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with quiet_progress_bars():
                accelerator.unwrap_model(model).save_pretrained(tmp / "model", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        accelerator.wait_for_everyone()
        rank = accelerator.process_index
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-{rank}.pt")
        (tmp / f"python_rng-{rank}.json").write_text(json.dumps(random.getstate()))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            if self.keep:
                for old in _checkpoint_dirs(self.output_dir)[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(path: Path, accelerator: Accelerator, model, optimizer, scheduler) -> dict:
        load_model_weights(accelerator.unwrap_model(model), path / "model")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rank = accelerator.process_index
        if (path / f"rng-{rank}.pt").is_file():
            rng = torch.load(path / f"rng-{rank}.pt", weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            state = json.loads((path / f"python_rng-{rank}.json").read_text())
            random.setstate((state[0], tuple(state[1]), state[2]))
        return json.loads((path / "trainer_state.json").read_text())


class StopAtStepEnd:
    """Ctrl-C asks the loop to stop after the step in progress; ``check()`` at each step boundary then saves a
    checkpoint there and raises KeyboardInterrupt, so a resumed run continues exactly. A second Ctrl-C stops at
    once (the last checkpoint stays as it was). Across processes the request is shared at every step."""

    def __init__(self, save: Callable[[], Path], accelerator: Accelerator, *to_close: Any):
        self.save, self.accelerator, self.to_close = save, accelerator, to_close
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.accelerator.print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: stop now)")

    def __enter__(self) -> "StopAtStepEnd":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C then stops at once
            self._previous = None
        return self

    def check(self) -> None:
        requested = self.requested
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(requested)], device=self.accelerator.device)
            requested = bool(self.accelerator.reduce(flag, reduction="sum").item())
        if requested:
            for obj in self.to_close:
                obj.close()
            path = self.save()
            self.accelerator.print(f"stopped: checkpoint {path}; continue with --resume auto (same output dir)")
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def resume_from(cfg: TrainConfig, output_dir: Path, accelerator: Accelerator, model, optimizer, scheduler
                ) -> tuple[Path | None, dict]:
    """Load the checkpoint named by ``cfg.resume`` (or the latest, for 'auto') into the training state; returns
    its path and trainer state ({} when there is nothing to resume)."""
    ckpt_path = find_checkpoint(cfg.resume, output_dir) if cfg.resume else None
    if ckpt_path is None:
        return None, {}
    return ckpt_path, Checkpointer.load(ckpt_path, accelerator, model, optimizer, scheduler)


def end_of_step(cfg: TrainConfig, step: int, total_steps: int, run_eval: Callable[[], dict] | None,
                log: "MetricsLog", save_now: Callable[[], Path], stop: StopAtStepEnd) -> dict | None:
    """At an optimizer-step boundary: evaluate and checkpoint when due, then honour a Ctrl-C. Returns the eval
    row if one ran."""
    row = None
    if run_eval is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
        row = run_eval()
        log.write(row)
    if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
        save_now()
    stop.check()
    return row


def write_summary(output_dir: Path, *, steps: int, total_steps: int, resumed_from: int | None, seconds: float,
                  train_row: dict, eval_row: dict | None, main_process: bool = True) -> dict[str, Any]:
    summary = {"steps": steps, "total_steps": total_steps, "resumed_from": resumed_from,
               "seconds": round(seconds, 2), "train": train_row, "eval": eval_row, "output_dir": str(output_dir)}
    if main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        elif resume_step is None and self.path.is_file():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("tensorboard logging needs the tensorboard package: "
                                  "pip install 'prefopt[tensorboard]'") from e
            self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------------------
# The loop


def evaluate(model, method: Method, items: Sequence[Any], collate: Callable[[Sequence[Any]], dict],
             micro_batch_size: int, accelerator: Accelerator, desc: str = "eval") -> MetricSums:
    """Run the method's step without gradients over every eval example (sharded across processes)."""
    model = accelerator.unwrap_model(model)  # no DDP collectives: shards may differ in size (or be empty)
    was_training = model.training
    model.eval()
    sums = MetricSums()
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    with torch.no_grad():
        for chunk in micro_batches(mine, micro_batch_size):
            batch = to_device(collate([items[i] for i in chunk]), accelerator.device)
            with accelerator.autocast():
                sums.add(method.step(model, batch))
    model.train(was_training)
    return sums.reduce(accelerator)


def train(cfg: TrainConfig, *, model: torch.nn.Module, method: Method, train_items: Sequence[Any],
          collate: Callable[[Sequence[Any]], dict], eval_items: Sequence[Any] | None = None,
          accelerator: Accelerator | None = None, save_final: Callable[[Path], None] | None = None,
          summary_keys: Sequence[str] = ("loss",)) -> dict[str, Any]:
    """Train ``model`` with ``method`` on ``train_items``; returns a summary dict (also in summary.json)."""
    accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
    output_dir = Path(cfg.output_dir)
    world = accelerator.num_processes
    per_process = cfg.batch_size // world
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size "
                          f"({cfg.micro_batch_size}) x processes ({world}).")
    schedule = BatchSchedule(len(train_items), cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * schedule.steps_per_epoch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters.")
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)

    ckpt_path, state = resume_from(cfg, output_dir, accelerator, model, optimizer, scheduler)
    start_step = state.get("step", 0)
    checkpointer = Checkpointer(output_dir, cfg.keep_checkpoints)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    log = MetricsLog(output_dir, accelerator.is_main_process, cfg.tensorboard,
                     start_step if ckpt_path is not None else None)
    if ckpt_path is not None:
        accelerator.print(f"resumed from {ckpt_path} at step {start_step}/{total_steps}")

    unit = method.unit
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_local_main_process))
    window, last_eval, last_row = MetricSums(), None, {}
    started = time.perf_counter()
    step = start_step

    def checkpoint_state() -> dict:
        return {"total_steps": total_steps, "epoch": schedule.epoch_of(step), "seed": cfg.seed}

    def run_eval_now() -> dict:
        return {"step": step, **evaluate(model, method, eval_items, collate, cfg.micro_batch_size,
                                         accelerator).means(unit, prefix="eval/")}

    run_eval = run_eval_now if eval_items else None
    model.train()
    save_now = lambda: checkpointer.save(step, accelerator, model, optimizer, scheduler, checkpoint_state())  # noqa: E731
    with StopAtStepEnd(save_now, accelerator, bar, log) as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            global_idx = schedule.indices(step)
            mine = global_idx[accelerator.process_index * per_process:(accelerator.process_index + 1) * per_process]
            chunks = micro_batches(mine, cfg.micro_batch_size)
            step_sums = MetricSums()
            for i, chunk in enumerate(chunks):
                batch = to_device(collate([train_items[j] for j in chunk]), accelerator.device)
                sync = contextlib.nullcontext() if i == len(chunks) - 1 else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        result = method.step(model, batch)
                    accelerator.backward(result.losses.sum() * (world / cfg.batch_size))
                step_sums.add(result)
            if cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_sums.seconds = time.perf_counter() - t0

            reduced = step_sums.reduce(accelerator)
            for k, v in reduced.sums.items():
                window.sums[k] = window.sums.get(k, 0.0) + v
            window.examples += reduced.examples
            window.tokens += reduced.tokens
            window.seconds += reduced.seconds
            if step % cfg.log_every == 0 or step == total_steps:
                row = {"step": step, "epoch": schedule.epoch_of(step - 1), **window.means(unit),
                       "lr": lr, "grad_norm": float(grad_norm)}
                log.write(row)
                last_row = row
                window = MetricSums()
                bar.set_postfix({k.split("/")[-1]: f"{row[k]:.4g}" for k in summary_keys if k in row}
                                | {f"{unit}/s": f"{row.get(f'{unit}_per_second', 0):.3g}"}, refresh=False)
            bar.update(1)

            last_eval = end_of_step(cfg, step, total_steps, run_eval, log, save_now, stop) or last_eval
    bar.close()

    if run_eval is not None:
        last_eval = run_eval()
        log.write(last_eval)
    log.close()
    elapsed = time.perf_counter() - started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if save_final is not None:
            save_final(output_dir)
        else:
            accelerator.unwrap_model(model).save_pretrained(output_dir, safe_serialization=True)
    summary = write_summary(output_dir, steps=step, total_steps=total_steps,
                            resumed_from=start_step if ckpt_path else None, seconds=elapsed, train_row=last_row,
                            eval_row=last_eval, main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    return summary


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


__all__ = ["StepResult", "Method", "BatchSchedule", "StopAtStepEnd", "train", "evaluate", "format_summary", "MetricSums",
           "Checkpointer", "find_checkpoint", "load_model_weights", "build_optimizer", "build_scheduler"]

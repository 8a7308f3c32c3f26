"""Checkpoints and the run folder: what a run leaves on disk, written so that no kill can leave it half-written.

A checkpoint (``checkpoints/step-NNNNNNN/``) holds the model (safetensors), optimizer, scheduler, RNG states and
the trainer state. It is written into a temporary folder; every file and folder is fsynced, then a manifest
(each file's name, size and sha256) is written LAST and fsynced, and only then is the folder renamed into place.
So a kill at any moment leaves either no checkpoint folder or a complete one, and a file damaged later (a full
disk, a bad copy) is caught by the manifest: ``--resume auto`` skips such a checkpoint, naming the file, and
takes the newest one that verifies. The final model is written the same way (``final.json`` last). Under FSDP
the model and optimizer go into ``sharded/`` instead, each rank writing its shards (``SHARDED_DIR``); under
DeepSpeed ZeRO into ``deepspeed/``, written by the engine (``ZERO_DIR``).

The run folder: a new run refuses a folder that holds another run (``previous_run``) unless asked to resume or
to overwrite it (``clear_previous_run`` deletes only what prefopt wrote), and a resume warns about the options
that differ from the run's saved ``config.yaml`` (``config_differences``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import Tensor

from ..config import TrainConfig
from ..errors import ConfigError
from ..models import quiet_progress_bars


# ---------------------------------------------------------------------------------------------------------
# Checkpoints

MANIFEST = "manifest.json"
FINAL_MARKER = "final.json"
# ``Run.finish`` writes FINAL_MARKER last, once the final model is complete in output_dir (it lists its files).


def _fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; a folder that cannot be opened (Windows) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder (deepest first), ``root`` included."""
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        else:
            _fsync_path(p)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        _fsync_path(d)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_manifest(root: Path, exclude: Sequence[str] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """{relative posix path: {size, sha256}} of every file under ``root``."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return files


def write_atomic(path: Path, text: str) -> None:
    """Write a small file through a temporary one, fsync it, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def verify_files(root: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """None when every listed file is present with its size and sha256; else what is wrong, naming the file."""
    for rel, want in files.items():
        p = root / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{rel} is {size} bytes, the manifest says {want['size']}"
        if _sha256(p) != want["sha256"]:
            return f"{rel} does not match its sha256 in the manifest (corrupted)"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint; else the problem, naming the file.

    A checkpoint written by this version has ``manifest.json`` (written last, before the folder is renamed into
    place): every file it lists must be there with its size and sha256. A checkpoint from an older prefopt has
    no manifest; it is accepted when it has its trainer_state.json (it cannot be checked further)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None if (path / "trainer_state.json").is_file() else "trainer_state.json is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    return verify_files(path, files)


def step_dirs(output_dir: Path) -> list[Path]:
    """Every ``checkpoints/step-NNNNNNN`` folder (never a ``.tmp`` one), oldest first, verified or not."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The checkpoints that verify (see ``verify_checkpoint``), oldest first."""
    return [p for p in step_dirs(output_dir) if verify_checkpoint(p) is None]


def _show(path: Path, output_dir: Path) -> str:
    try:
        return path.relative_to(output_dir).as_posix()
    except ValueError:
        return str(path)


def find_checkpoint(resume: str, output_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: for 'auto', the newest one that verifies (each one skipped is reported with
    the reason, naming the file); else the given folder, which must verify (ConfigError naming the file)."""
    if resume == "auto":
        for path in reversed(step_dirs(output_dir)):
            problem = verify_checkpoint(path)
            if problem is None:
                if not (path / MANIFEST).is_file():
                    log(f"note: {_show(path, output_dir)} has no {MANIFEST} (written by an older prefopt): "
                        f"resuming from it unverified")
                return path
            log(f"skipped {_show(path, output_dir)}: {problem}")
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file() and not (path / MANIFEST).is_file():
        raise ConfigError(f"resume: {path} is not a prefopt checkpoint (no trainer_state.json). "
                          f"Use a folder under {output_dir / 'checkpoints'} or 'auto'.")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ConfigError(f"resume: checkpoint {path} is damaged: {problem}. Use another checkpoint, or 'auto' "
                          f"(the newest one that verifies).")
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
    load_state_into(model, state, f"checkpoint {directory}")


def load_state_into(model: torch.nn.Module, state: dict[str, Tensor], what: str) -> None:
    """``state`` into ``model`` in place, every key matching but tied weights (re-tied after); a RuntimeError
    naming ``what`` otherwise."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])  # a list, or a dict keyed by the tied names
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{what} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


SHARDED_DIR = "sharded"
"""A checkpoint's model and optimizer written under FSDP: torch.distributed.checkpoint's files, one per rank plus
its ``.metadata``. The keys are the parameters' plain names and the shards are resharded on load, so such a
checkpoint resumes on another number of processes, and also in a run that does not shard at all. (With several
nodes, ``output_dir`` must be a file system every node sees.)"""


ZERO_DIR = "deepspeed"
"""A checkpoint's model and optimizer written under DeepSpeed ZeRO: the engine's own ``save_checkpoint`` files
(tag ``state``: the module's weights and each rank's optimizer partition). They resume under DeepSpeed on the same
number of processes (ZeRO partitions the optimizer state by rank; DeepSpeed's ``ds_to_universal`` converts a
checkpoint for another count)."""
ZERO_TAG = "state"


def _deepspeed(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def save_zero(directory: Path, engine) -> None:
    """The engine's model and optimizer state (a collective: every rank writes its partition)."""
    engine.save_checkpoint(str(directory), tag=ZERO_TAG, save_latest=False)


def load_zero(directory: Path, engine, accelerator: Accelerator) -> None:
    """Load what ``save_zero`` wrote, on the same number of processes (checked first, naming both counts)."""
    partitioned = any((directory / ZERO_TAG).glob("zero_pp_rank_*_model_states.pt"))  # only ZeRO-3 writes these
    stage = accelerator.state.deepspeed_plugin.zero_stage
    if partitioned != (stage == 3):
        raise ConfigError(f"resume: {directory.parent} was written under DeepSpeed "
                          f"{'ZeRO-3' if partitioned else 'ZeRO-1/2'} and this run is ZeRO-{stage}; resume it with "
                          "the stage that wrote it.")
    written = len(list((directory / ZERO_TAG).glob("*optim_states.pt")))
    if written != accelerator.num_processes:
        raise ConfigError(f"resume: {directory.parent} was written by {written} DeepSpeed processes and this run has "
                          f"{accelerator.num_processes}; a ZeRO checkpoint resumes on the same number of processes "
                          "(convert it with DeepSpeed's ds_to_universal for another count).")
    # DeepSpeed reads its own files with torch.load (pickles): this run's checkpoint, verified by its manifest
    path, _ = engine.load_checkpoint(str(directory), tag=ZERO_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")


def sharded_state(accelerator: Accelerator) -> bool:
    """Checkpoints of this run hold sharded state (FSDP) rather than one gathered model file."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _state_dicts(model: torch.nn.Module, optimizer) -> tuple[Any, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around the torch optimizer
    return get_model_state_dict(model), get_optimizer_state_dict(model, optim)


def save_sharded(directory: Path, model: torch.nn.Module, optimizer) -> None:
    """Model and optimizer state through ``torch.distributed.checkpoint`` (a collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = _state_dicts(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: torch.nn.Module, optimizer) -> None:
    """Load what ``save_sharded`` wrote into ``model`` and ``optimizer``, resharded to this run's layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state["optimizer"])


def _test_pause_in_save(step: int) -> None:
    """TEST HOOK, not for normal use: ``PREFOPT_TEST_PAUSE_IN_SAVE=<seconds>`` (every save) or
    ``<seconds>@<step>`` (only the save of that step) makes ``Checkpointer.save`` sleep after writing about half
    of a checkpoint's files (the model and the optimizer state), so a test can kill the process inside a save."""
    hook = os.environ.get("PREFOPT_TEST_PAUSE_IN_SAVE")
    if not hook:
        return
    seconds, _, at = hook.partition("@")
    if not at or int(at) == step:
        time.sleep(float(seconds))


class Checkpointer:
    """Writes ``checkpoints/step-NNNNNNN/`` crash-safely (see the comment above ``MANIFEST``) and keeps the
    ``keep`` newest checkpoints that verify (a damaged one never counts towards them)."""

    def __init__(self, output_dir: Path, keep: int):
        self.output_dir, self.keep = output_dir, keep
        self._verified: set[Path] = set()  # checkpoints this run wrote or checked: not hashed again

    def save(self, step: int, accelerator: Accelerator, model, optimizer, scheduler, extra: dict,
             files: Callable[[Path], None] | None = None) -> Path:
        """``files(folder)``: a method's own files (every rank calls it: it may gather; the main process writes),
        written into the checkpoint before its manifest."""
        final = self.output_dir / "checkpoints" / f"step-{step:07d}"
        if final in self._verified and final.is_dir():  # this step boundary is saved already
            return final
        tmp = final.with_name(final.name + ".tmp")
        if _deepspeed(accelerator):
            # the engine writes its own files, each rank its optimizer partition
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            save_zero(tmp / ZERO_DIR, model)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _test_pause_in_save(step)
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        elif sharded_state(accelerator):
            # every rank writes its own shards of the model and optimizer (torch.distributed.checkpoint)
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            save_sharded(tmp / SHARDED_DIR, accelerator.unwrap_model(model), optimizer)
            if accelerator.is_main_process:
                _test_pause_in_save(step)
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        elif accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with quiet_progress_bars():
                accelerator.unwrap_model(model).save_pretrained(tmp / "model", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            _test_pause_in_save(step)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        accelerator.wait_for_everyone()
        if files is not None:
            files(tmp)
        rank = accelerator.process_index
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-{rank}.pt")
        (tmp / f"python_rng-{rank}.json").write_text(json.dumps(random.getstate()))
        _fsync_path(tmp / f"rng-{rank}.pt")
        _fsync_path(tmp / f"python_rng-{rank}.json")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
            _fsync_tree(tmp)
            manifest = {"step": step, "files": _file_manifest(tmp)}
            with open(tmp / MANIFEST, "w") as f:  # last: a folder with a manifest is complete
                f.write(json.dumps(manifest, indent=1))
                f.flush()
                os.fsync(f.fileno())
            _fsync_path(tmp)
            shutil.rmtree(final, ignore_errors=True)  # a damaged checkpoint of the same step (resumed before it)
            tmp.rename(final)
            _fsync_path(final.parent)
            self._verified.add(final)
            self.prune()
        accelerator.wait_for_everyone()
        self._verified.add(final)
        return final

    def prune(self) -> None:
        """Delete checkpoints older than the ``keep`` newest that verify (damaged ones among them too)."""
        if not self.keep:
            return
        dirs, good = step_dirs(self.output_dir), 0
        for i in range(len(dirs) - 1, -1, -1):
            path = dirs[i]
            if path in self._verified or verify_checkpoint(path) is None:
                self._verified.add(path)
                good += 1
                if good == self.keep:
                    for old in dirs[:i]:
                        shutil.rmtree(old, ignore_errors=True)
                        self._verified.discard(old)
                    return

    @staticmethod
    def load(path: Path, accelerator: Accelerator, model, optimizer, scheduler) -> dict:
        if (path / ZERO_DIR).is_dir() or _deepspeed(accelerator):
            if not (path / ZERO_DIR).is_dir() or not _deepspeed(accelerator):
                raise ConfigError(f"resume: {path} was written {'without' if _deepspeed(accelerator) else 'under'} "
                                  "DeepSpeed; resume a checkpoint under the engine that wrote it (DeepSpeed ZeRO "
                                  "checkpoints hold the engine's own partitioned files).")
            load_zero(path / ZERO_DIR, model, accelerator)
        elif (path / SHARDED_DIR).is_dir():  # written under FSDP; loads on any number of processes, sharded or not
            load_sharded(path / SHARDED_DIR, accelerator.unwrap_model(model), optimizer)
        elif sharded_state(accelerator):
            raise ConfigError(f"resume: {path} was written without FSDP (one gathered model file); resume it "
                              "without FSDP (one process or DDP). Checkpoints written under FSDP resume anywhere.")
        else:
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


def save_final_model(output_dir: Path, step: int, write: Callable[[Path], None]) -> None:
    """The final model, atomically: ``write(folder)`` fills ``.final.tmp/``, which is fsynced and moved into
    ``output_dir``, then ``final.json`` (its files, sizes, sha256) is written last. A crash before final.json leaves
    the checkpoints as they were: ``--resume auto`` continues from the last one and finishes again."""
    out = output_dir
    (out / FINAL_MARKER).unlink(missing_ok=True)
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    files = _file_manifest(tmp, exclude=())
    for entry in sorted(tmp.iterdir()):
        dest = out / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    tmp.rmdir()
    _fsync_path(out)
    write_atomic(out / FINAL_MARKER, json.dumps({"step": step, "files": files}, indent=1))


def resume_from(cfg: TrainConfig, output_dir: Path, accelerator: Accelerator, model, optimizer, scheduler
                ) -> tuple[Path | None, dict]:
    """Load the checkpoint named by ``cfg.resume`` (or, for 'auto', the newest one that verifies) into the
    training state; returns its path and trainer state ({} when there is nothing to resume)."""
    ckpt_path = find_checkpoint(cfg.resume, output_dir, log=accelerator.print) if cfg.resume else None
    if ckpt_path is None:
        return None, {}
    return ckpt_path, Checkpointer.load(ckpt_path, accelerator, model, optimizer, scheduler)




# ---------------------------------------------------------------------------------------------------------
# The run folder


# Keys of config.yaml a resume may change without a warning (output_dir: a run folder may be moved or copied).
RESUME_MAY_DIFFER = frozenset({"max_steps", "epochs", "resume", "overwrite", "progress", "output_dir"})
# What a final model save writes besides the files final.json lists (older runs have no final.json).
_FINAL_MODEL_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                         "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                         "vocab.json", "merges.txt", "added_tokens.json", "kl_controller.json", "adapter")
_RUN_FILES = ("checkpoints", ".final.tmp", "metrics.jsonl", ".metrics.jsonl.tmp", "summary.json", FINAL_MARKER,
              "config.yaml", "tensorboard")


def previous_run(output_dir: Path) -> str | None:
    """What in ``output_dir`` belongs to another run (its checkpoints or final model); None when nothing does."""
    if step_dirs(output_dir):
        return "checkpoints (checkpoints/step-*)"
    for name, what in ((FINAL_MARKER, "a final model"), ("summary.json", "a finished run")):
        if (output_dir / name).is_file():
            return f"{what} ({name})"
    if output_dir.is_dir() and any(output_dir.glob("*.safetensors")):
        return "model weights (*.safetensors)"
    return None


def refuse_used_output_dir(cfg: TrainConfig) -> None:
    """A new run (no ``resume``, no ``overwrite``) into a folder that holds another run stops here, before anything
    is loaded or written (the trainers call this first; ``start_run`` checks again); so does ``--resume auto`` on
    a finished run that left no checkpoint (it would train from scratch over that run's model)."""
    output_dir = Path(cfg.output_dir)
    if cfg.resume == "auto" and not cfg.overwrite and not step_dirs(output_dir) \
            and any((output_dir / name).is_file() for name in (FINAL_MARKER, "summary.json")):
        raise ConfigError(f"--resume auto: {output_dir} holds a finished run and no checkpoint to resume from; "
                          "training again would replace its model. Use --overwrite to start over, or another "
                          "--output-dir.")
    if cfg.resume or cfg.overwrite:
        return
    found = previous_run(output_dir)
    if found is not None:
        raise ConfigError(f"output_dir {output_dir} holds another run's {found}. Continue that run with "
                          f"--resume auto, start over with --overwrite (deletes that run's checkpoints, model, "
                          f"metrics and summary), or choose another --output-dir.")


def clear_previous_run(output_dir: Path) -> list[str]:
    """Delete what a previous prefopt run wrote in ``output_dir`` (checkpoints, the final model's files,
    metrics.jsonl, summary.json, config.yaml, tensorboard/); nothing else. Returns the names removed."""
    names = set(_RUN_FILES)
    marker = output_dir / FINAL_MARKER
    if marker.is_file():
        try:
            names |= {f.split("/")[0] for f in json.loads(marker.read_text())["files"]}
        except (ValueError, KeyError, TypeError):
            pass
    if marker.is_file() or (output_dir / "summary.json").is_file():  # a finished run: its final model's files
        for pattern in _FINAL_MODEL_PATTERNS:
            names |= {p.name for p in output_dir.glob(pattern)}
    removed = []
    for name in sorted(names):
        p = output_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def config_differences(cfg: TrainConfig, saved: Path) -> list[str]:
    """'key: saved -> now' for each option that differs from the run's saved config.yaml (bar RESUME_MAY_DIFFER)."""
    import yaml

    from ..config.loading import to_dict

    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    new = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in RESUME_MAY_DIFFER and old.get(k) != new.get(k)]



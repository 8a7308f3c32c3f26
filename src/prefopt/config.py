"""Typed run configurations: dataclasses loadable from YAML and overridable from the command line.

Every training method has one dataclass. Fields shared by all methods live in ``TrainConfig``; a method's
config adds its own. The CLI builds its flags from these fields (``--micro-batch-size`` for
``micro_batch_size``), so a field documented here is a flag, a YAML key and a Python argument at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

C = TypeVar("C", bound="TrainConfig")

OPTIMIZERS = ("rmsprop", "adamw")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """Options of the shared training loop (every method has these)."""

    model: str = ""
    """Path (or hub name, when online) of the causal LM to train."""
    data: str = ""
    """Training data: a .jsonl/.jsonl.gz/.json/.parquet file, a datasets directory, or a hub name."""
    output_dir: str = ""
    """Where the final model, metrics.jsonl and checkpoints/ go."""
    eval_data: str | None = None
    """Held-out data in the same formats; evaluated every eval_every steps and at the end."""
    eval_fraction: float = 0.0
    """If no eval_data: hold out this fraction of the training rows (seeded) for evaluation."""
    data_format: str = "auto"
    """Row format: auto, explicit, conversational, implicit, ranked (preference data)."""
    skip_bad_rows: bool = False
    """Skip malformed rows (and print how many and why) instead of stopping at the first."""
    split: str | None = None
    """Split to read from a datasets directory or hub dataset (default: train)."""
    max_length: int = 512
    """Longest prompt + response in tokens; longer rows are truncated (prompt first, from its start)."""
    max_prompt_length: int = 256
    """Longest prompt kept when a row must be truncated (its end is kept)."""

    lr: float = 1e-6
    optimizer: str = "rmsprop"
    """rmsprop (the DPO paper's choice) or adamw."""
    weight_decay: float = 0.0
    warmup_steps: int = 150
    """Linear learning-rate warm-up from 0, then constant (as in the paper's reference implementation)."""
    max_grad_norm: float = 10.0
    """Clip the global gradient norm to this (0 disables)."""
    batch_size: int = 64
    """Global examples per optimizer step, the same whatever the number of processes."""
    micro_batch_size: int = 8
    """Examples per forward pass on one process; batch_size must be a multiple of micro_batch_size x processes."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs when set."""
    epochs: int = 1

    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: only the final model)."""
    keep_checkpoints: int = 2
    """Keep this many most recent checkpoints (0 keeps all)."""
    log_every: int = 1
    """Write a metrics.jsonl row every N optimizer steps (averaged over them)."""
    resume: str | None = None
    """A checkpoint directory to resume from, or 'auto' for the latest in output_dir/checkpoints."""
    seed: int = 0
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    mixed_precision: str = "no"
    """accelerate autocast: no, bf16 or fp16 (parameters stay in dtype)."""
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    """Set every dropout probability of the policy to 0 (as in the paper's reference implementation)."""
    trust_remote_code: bool = False
    tensorboard: bool = False
    """Also log to TensorBoard under output_dir/tensorboard (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar."""

    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights; the reference is the base with adapters disabled."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None

    def validate(self) -> None:
        """Raise ConfigError naming the field and what is allowed."""
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"'{name}' is required (flag --{name.replace('_', '-')} or YAML key {name}).")
        _check(self.lr > 0, "lr", self.lr, "a positive number")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        _check(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", self.mixed_precision, "no, bf16 or fp16")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "an integer >= 1")
        _check(self.batch_size % self.micro_batch_size == 0, "batch_size", self.batch_size,
               f"a multiple of micro_batch_size ({self.micro_batch_size})")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0 disables clipping)")
        _check(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "in [0, 1)")
        _check(self.max_length >= 2, "max_length", self.max_length, "an integer >= 2")
        _check(0 < self.max_prompt_length < self.max_length, "max_prompt_length", self.max_prompt_length,
               f"between 1 and max_length - 1 ({self.max_length - 1})")
        for name in ("eval_every", "save_every", "keep_checkpoints"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        _check(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")


@dataclass
class DPOConfig(TrainConfig):
    """DPO and its family of preference losses."""

    ref_model: str | None = None
    """Reference model path; default: a frozen copy of the initial policy (or, with LoRA, the base model)."""
    loss: str = "sigmoid"
    """Preference loss by name: sigmoid (the paper's DPO), cdpo, robust, ipo, ipo_per_token, hinge,
    plackett_luce (ranked data; K = 2 equals sigmoid)."""
    beta: float = 0.1
    """Strength of the KL constraint (the paper's beta; IPO's tau)."""
    label_smoothing: float = 0.0
    """Label-noise rate epsilon for cdpo (in [0, 0.5]) and robust (in [0, 0.5))."""
    nll_weight: float = 0.0
    """Weight of an extra per-token NLL (SFT) term on the chosen response."""
    reference_free: bool = False
    """Use a uniform reference (log pi_ref = 0): no reference model at all."""
    precompute_ref: bool = False
    """Compute the reference log-probs in one pass before training and cache them on disk."""
    cache_dir: str | None = None
    """Where precomputed reference log-probs are cached (default: $PREFOPT_CACHE or ~/.cache/prefopt)."""

    def validate(self) -> None:
        super().validate()
        from .losses import loss_names

        _check(self.loss in loss_names(), "loss", self.loss, f"one of {', '.join(loss_names())}")
        _check(self.beta > 0, "beta", self.beta, "a positive number (the paper uses 0.1 to 0.5)")
        if self.loss == "cdpo":
            _check(0 <= self.label_smoothing <= 0.5, "label_smoothing", self.label_smoothing, "in [0, 0.5] for cdpo")
        elif self.loss == "robust":
            _check(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "in [0, 0.5) for robust")
        else:
            _check(self.label_smoothing == 0, "label_smoothing", self.label_smoothing,
                   f"0 for loss '{self.loss}' (label smoothing belongs to cdpo and robust)")
        _check(self.nll_weight >= 0, "nll_weight", self.nll_weight, ">= 0")
        if self.reference_free and (self.ref_model or self.precompute_ref):
            raise ConfigError("reference_free uses no reference model: drop ref_model / precompute_ref.")


# --- method configs added by other modules go below this line (one block each) ---
# [anchor: sft-rm configs]
# [anchor: ppo config]
# [anchor: generate/label/score configs]


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name} = {value!r}: must be {allowed}.")


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML file + overrides -> dataclass


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for X | None annotations."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"invalid {name} = None: a value is required.")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            return str(value)
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
    except (TypeError, ValueError):
        pass
    else:
        return value
    tname = getattr(base, "__name__", str(base))
    raise ConfigError(f"invalid {name} = {value!r}: expected {tname}.")


def from_dict(cls: type[C], values: dict[str, Any], *, origin: str = "config") -> C:
    """Build and validate a config; unknown keys are errors with a suggestion."""
    types_ = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types_:
            close = difflib.get_close_matches(name, types_, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{origin}: unknown key '{key}' for {cls.__name__}.{hint} "
                              f"Valid keys: {', '.join(sorted(types_))}.")
        kwargs[name] = coerce(name, types_[name], value)
    config = cls(**kwargs)
    config.validate()
    return config


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Read a YAML file (optional), apply overrides (e.g. from the command line), validate."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of option: value at the top level.")
        values.update(loaded)
    values.update(overrides or {})
    return from_dict(cls, values, origin=str(path) if path else "config")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) for --help, read from the source."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


__all__ = ["TrainConfig", "DPOConfig", "load_config", "from_dict", "save_config", "to_dict", "coerce",
           "field_types", "field_docs", "OPTIMIZERS", "DTYPES", "field"]

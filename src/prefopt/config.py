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
        check_field(self.lr > 0, "lr", self.lr, "a positive number")
        check_field(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        check_field(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        check_field(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", self.mixed_precision, "no, bf16 or fp16")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_field(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "an integer >= 1")
        check_field(self.batch_size % self.micro_batch_size == 0, "batch_size", self.batch_size,
               f"a multiple of micro_batch_size ({self.micro_batch_size})")
        check_field(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        check_field(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check_field(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        check_field(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0 disables clipping)")
        check_field(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "in [0, 1)")
        check_field(self.max_length >= 2, "max_length", self.max_length, "an integer >= 2")
        check_field(0 < self.max_prompt_length < self.max_length, "max_prompt_length", self.max_prompt_length,
               f"between 1 and max_length - 1 ({self.max_length - 1})")
        for name in ("eval_every", "save_every", "keep_checkpoints"):
            check_field(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        check_field(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        check_field(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check_field(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")


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
    precompute_ref: bool | None = None
    """Compute the reference log-probs in one pass before training and cache them on disk (default: on whenever
    there is a reference; false: run the reference live at every step)."""
    cache_dir: str | None = None
    """Where precomputed reference log-probs are cached (default: $PREFOPT_CACHE or ~/.cache/prefopt)."""
    packing: bool = False
    """Pack all sequences of a micro-batch into one row (no pad tokens; attention never crosses sequences)."""
    prefix_sharing: bool = False
    """Compute each prompt once for its K responses (responses see the prompt, never each other)."""
    logps_chunk_size: int = 0
    """Compute log-probs through the LM head this many positions at a time, so the full logits tensor never
    exists (0: off)."""

    @property
    def precomputes_reference(self) -> bool:
        """precompute_ref as it takes effect: None (the default) means on, and a reference-free run has none."""
        return self.precompute_ref is not False and not self.reference_free

    def validate(self) -> None:
        super().validate()
        from .losses import loss_names

        check_field(self.loss in loss_names(), "loss", self.loss, f"one of {', '.join(loss_names())}")
        check_field(self.beta > 0, "beta", self.beta, "a positive number (the paper uses 0.1 to 0.5)")
        if self.loss == "cdpo":
            check_field(0 <= self.label_smoothing <= 0.5, "label_smoothing", self.label_smoothing, "in [0, 0.5] for cdpo")
        elif self.loss == "robust":
            check_field(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "in [0, 0.5) for robust")
        else:
            check_field(self.label_smoothing == 0, "label_smoothing", self.label_smoothing,
                   f"0 for loss '{self.loss}' (label smoothing belongs to cdpo and robust)")
        check_field(self.nll_weight >= 0, "nll_weight", self.nll_weight, ">= 0")
        if self.reference_free and (self.ref_model or self.precompute_ref is True):
            raise ConfigError("reference_free uses no reference model: drop ref_model / precompute_ref.")


# --- method configs added by other modules go below this line (one block each) ---
# [anchor: sft-rm configs]
@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: next-token NLL on response tokens only (prompt tokens are masked).

    Each example's loss is its summed response NLL divided by its own number of response tokens (the mean
    per-token NLL of that example); the loop averages these over the examples of a step, so every example
    weighs the same and gradient accumulation is exact whatever the micro-batch size.
    """

    data_format: str = "auto"
    """Row format: auto, explicit ({prompt, response} or {prompt, completion}), conversational ({messages}: every
    assistant turn is trained), text ({text}: loss on all tokens). With from_preferences: a preference format
    (auto, explicit, conversational, implicit, ranked)."""
    from_preferences: bool = False
    """Train on the chosen responses of a preference file (any format dpo reads): the DPO paper's way to get a
    reference model when no SFT model exists."""

    def validate(self) -> None:
        super().validate()
        from .data.formats import FORMATS
        from .data.sft import SFT_FORMATS

        formats = FORMATS if self.from_preferences else SFT_FORMATS
        what = "preference" if self.from_preferences else "SFT"
        check_field(self.data_format in ("auto", *formats), "data_format", self.data_format,
               f"one of auto, {', '.join(formats)} ({what} data)")


@dataclass
class RMConfig(TrainConfig):
    """Bradley-Terry reward model: a scalar head on a causal LM, trained with -log sigmoid(r_chosen - r_rejected)."""

    lr: float = 1e-5
    """Learning rate (the fresh reward head needs more than the policy rate DPO uses)."""
    optimizer: str = "adamw"
    """rmsprop or adamw."""
    center_rewards_coefficient: float = 0.0
    """Weight of an extra mean(r^2) penalty over the responses of an example, keeping rewards centred on 0
    (0 disables). Ranked data (K > 2) trains on every ordered pair of its responses."""

    def validate(self) -> None:
        super().validate()
        check_field(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", self.center_rewards_coefficient,
               ">= 0 (0 disables)")

# [anchor: ppo config]
@dataclass
class PPOConfig(TrainConfig):
    """PPO-RLHF (Ziegler et al. 2019), the baseline of the DPO paper: sample, score, KL-penalise, clip.

    One *step* is one PPO iteration: sample responses to ``rollout_batch_size`` prompts, score them, then run
    ``ppo_epochs`` passes of minibatch updates (``batch_size`` rollouts per optimizer step, in micro-batches of
    ``micro_batch_size``). ``max_steps`` counts iterations; without it, ``epochs`` passes over the prompts.
    ``save_every`` and ``log_every`` count iterations too; ``warmup_steps`` counts optimizer steps.
    """

    lr: float = 1e-5
    """Learning rate of the policy and its value head."""
    optimizer: str = "adamw"
    """rmsprop or adamw (PPO's usual choice)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimizer steps, then constant."""
    batch_size: int = 16
    """Rollouts per PPO minibatch (one optimizer step); rollout_batch_size must be a multiple of it."""
    micro_batch_size: int = 4
    """Rollouts per forward pass; batch_size must be a multiple of it."""

    reward_model: str | None = None
    """A reward model written by 'prefopt rm' (scores prompt + response); give this or reward_fn."""
    reward_fn: str | None = None
    """A Python reward function 'package.module:function' or 'path/to/file.py:function' taking
    (prompts, responses) and returning one float per response; give this or reward_model."""
    kl_coef: float = 0.05
    """Coefficient of the per-token KL penalty -kl_coef (log pi - log pi_ref) (the initial one if adaptive_kl)."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019) instead of keeping it fixed."""
    target_kl: float = 6.0
    """Target sequence-level KL (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in rollouts) of the adaptive controller: larger changes kl_coef more slowly."""
    gamma: float = 1.0
    """Discount factor of the per-token rewards."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO ratio clip epsilon of the policy loss."""
    cliprange_value: float = 0.2
    """Clip of the value change around the rollout's values in the value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    ppo_epochs: int = 4
    """Passes of minibatch updates over each rollout batch."""
    rollout_batch_size: int = 64
    """Prompts sampled (one response each) per PPO iteration."""
    max_new_tokens: int = 64
    """Longest sampled response in tokens (responses end at EOS or here)."""
    temperature: float = 1.0
    """Sampling temperature (the log-probs of the PPO update use the same temperature)."""
    whiten_advantages: bool = True
    """Normalise the advantages of each rollout batch to mean 0, std 1."""

    def validate(self) -> None:
        super().validate()
        if self.reward_model and self.reward_fn:  # neither: train_ppo checks (it also takes a Python callable)
            raise ConfigError("give one of reward_model (--reward-model PATH) and reward_fn "
                              "(--reward-fn module:function), not both.")
        if self.reward_fn and ":" not in self.reward_fn:
            raise ConfigError(f"invalid reward_fn = {self.reward_fn!r}: must be 'module:function' or "
                              "'path/to/file.py:function'.")
        check_field(self.kl_coef >= 0, "kl_coef", self.kl_coef, ">= 0")
        if self.adaptive_kl:
            check_field(self.kl_coef > 0, "kl_coef", self.kl_coef, "> 0 with adaptive_kl (it is scaled multiplicatively)")
        check_field(self.target_kl > 0, "target_kl", self.target_kl, "a positive number")
        check_field(self.kl_horizon >= 1, "kl_horizon", self.kl_horizon, "an integer >= 1")
        check_field(0 <= self.gamma <= 1, "gamma", self.gamma, "in [0, 1]")
        check_field(0 <= self.lam <= 1, "lam", self.lam, "in [0, 1]")
        check_field(self.cliprange > 0, "cliprange", self.cliprange, "a positive number")
        check_field(self.cliprange_value > 0, "cliprange_value", self.cliprange_value, "a positive number")
        check_field(self.vf_coef >= 0, "vf_coef", self.vf_coef, ">= 0")
        check_field(self.ppo_epochs >= 1, "ppo_epochs", self.ppo_epochs, "an integer >= 1")
        check_field(self.rollout_batch_size >= 1, "rollout_batch_size", self.rollout_batch_size, "an integer >= 1")
        check_field(self.rollout_batch_size % self.batch_size == 0, "rollout_batch_size", self.rollout_batch_size,
               f"a multiple of batch_size ({self.batch_size})")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check_field(self.temperature > 0, "temperature", self.temperature, "a positive number")


# [anchor: generate/label/score configs]
DEVICES_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps"


def _required(cfg: Any, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name):
            raise ConfigError(f"'{name}' is required (flag --{name.replace('_', '-')} or YAML key {name}).")


@dataclass
class GenerateConfig:
    """prefopt generate: sample responses to prompts (prefopt.generation)."""

    model: str = ""
    """Path of the causal LM to sample from (its tokenizer is loaded from the same path)."""
    prompts: str = ""
    """Prompts: .txt (one a line) or .jsonl/.json/.parquet rows with a 'prompt' field (text or message list)."""
    output: str = ""
    """JSONL file of rows {prompt, response, prompt_index, sample_index, prompt_tokens, response_tokens,
    ended_with_eos}."""
    num_samples: int = 1
    """Responses sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1 disables)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 disables)."""
    max_new_tokens: int = 128
    """Longest response in tokens (responses end at EOS or here)."""
    seed: int = 0
    """Each (prompt, sample) gets its own generator seeded from this: same seed, same samples, any batch size
    (exactly in float32; bf16/fp16 rounding of batched logits can change a few)."""
    batch_size: int = 16
    """Sequences generated together (left-padded, KV-cached)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps."""
    trust_remote_code: bool = False
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        _required(self, "model", "prompts", "output")
        check_field(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        check_field(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 means greedy decoding)")
        check_field(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        check_field(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 disables top-k)")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_field(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        check_field(bool(self.device), "device", self.device, DEVICES_HELP)


@dataclass
class LabelConfig:
    """prefopt label: score sampled responses and write preference pairs or rankings (prefopt.label)."""

    samples: str = ""
    """Sample rows {prompt, response} (as written by 'prefopt generate'), grouped by prompt."""
    output: str = ""
    """JSONL of pairs {prompt, chosen, rejected, chosen_score, rejected_score}, or with ranking rows
    {prompt, responses, scores} (best first)."""
    reward_fn: str | None = None
    """A Python reward 'module:function' or 'path/to/file.py:function' taking (prompts, responses) and
    returning one float per response; give this or reward_model."""
    reward_model: str | None = None
    """A reward model written by 'prefopt rm'; give this or reward_fn."""
    ranking: bool = False
    """Write one ranked row of all distinct responses per prompt (for plackett_luce) instead of pairs."""
    all_pairs: bool = False
    """Write every ordered pair of a prompt's responses instead of only best vs worst."""
    min_margin: float = 0.0
    """Write a pair only if chosen_score - rejected_score > min_margin (ties are never ordered)."""
    batch_size: int = 16
    """Responses scored per reward-model forward pass."""

    def validate(self) -> None:
        _required(self, "samples", "output")
        if bool(self.reward_model) == bool(self.reward_fn):
            raise ConfigError("give exactly one of reward_model (--reward-model PATH) and reward_fn "
                              "(--reward-fn module:function).")
        if self.reward_fn and ":" not in self.reward_fn:
            raise ConfigError(f"invalid reward_fn = {self.reward_fn!r}: must be 'module:function' or "
                              "'path/to/file.py:function'.")
        if self.ranking and self.all_pairs:
            raise ConfigError("ranking and all_pairs exclude each other: ranking writes one row of all responses.")
        check_field(self.min_margin >= 0, "min_margin", self.min_margin, ">= 0")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")


@dataclass
class ScoreConfig:
    """prefopt score: the DPO policy as a reward model, beta * (log pi - log pi_ref) (prefopt.score)."""

    model: str = ""
    """The DPO-trained policy (its tokenizer is used for both models)."""
    ref_model: str = ""
    """The reference model the policy was trained against."""
    data: str = ""
    """Rows {prompt, response} (e.g. 'prefopt generate' output) or preference data in any format DPO reads;
    for preference data pair accuracy and mean margin are reported too."""
    output: str = ""
    """JSONL of per-row implicit rewards, policy and reference log-probs (and reward-model scores)."""
    beta: float = 0.1
    """The beta the policy was trained with."""
    reward_model: str | None = None
    """Also score the rows with this reward model ('prefopt rm') to compare with the implicit reward."""
    data_format: str = "auto"
    """Row format: auto, explicit, conversational, implicit, ranked."""
    batch_size: int = 8
    """Examples per forward pass."""
    max_length: int | None = None
    """Truncate as DPO training did (prompt + response tokens); default: no truncation."""
    max_prompt_length: int | None = None
    """Longest prompt kept when a row must be truncated (as in DPO training)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps."""
    trust_remote_code: bool = False
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        _required(self, "model", "ref_model", "data", "output")
        check_field(self.beta > 0, "beta", self.beta, "a positive number")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_field(self.max_length is None or self.max_length >= 2, "max_length", self.max_length, "an integer >= 2")
        if self.max_prompt_length is not None:
            upper = self.max_length - 1 if self.max_length else None
            check_field(self.max_prompt_length >= 1 and (upper is None or self.max_prompt_length <= upper),
                   "max_prompt_length", self.max_prompt_length,
                   f"between 1 and max_length - 1 ({upper})" if upper else "an integer >= 1")
        check_field(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        check_field(bool(self.device), "device", self.device, DEVICES_HELP)


def check_field(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name} = {value!r}: must be {allowed}.")


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML file + overrides -> dataclass


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for X | None annotations."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    base, optional = unwrap_optional(tp)
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


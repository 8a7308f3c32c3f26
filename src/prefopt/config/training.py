"""Training configs: ``TrainConfig`` (the shared loop) and one subclass per training method."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .loading import DTYPES, check_field, check_length_limits, check_required, check_reward_fn

OPTIMIZERS = ("rmsprop", "adamw")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


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
    """Skip bad rows (reported by kind, with the first few as file:line) instead of stopping with that report."""
    split: str | None = None
    """Split to read from a datasets directory or hub dataset (default: train)."""
    max_length: int | None = None
    """Longest prompt + response in tokens; longer rows are truncated (prompt first, from its start). Default:
    the model's context size, capped at 1024 (printed at start)."""
    max_prompt_length: int | None = None
    """Longest prompt kept when a row must be truncated (its end is kept). Default: half of max_length."""
    num_proc: int | None = None
    """Processes that tokenize the data (default: the cores available; 1: tokenize in the main process)."""
    streaming: bool = False
    """Read, validate and tokenize the training data as training goes instead of preparing it first (sets larger
    than memory or disk): needs max_steps; a shuffle buffer instead of a global shuffle; the reference runs live."""
    shuffle_buffer: int = 10000
    """With streaming: examples held in the seeded shuffle buffer (0 or 1: file order)."""
    no_data_cache: bool = False
    """Do not read or write the tokenized-data cache (the table is then written to OUTPUT_DIR/tokenized/)."""
    cache_dir: str | None = None
    """Where tokenized data and precomputed reference log-probs are cached (default: $PREFOPT_CACHE or
    ~/.cache/prefopt)."""

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
    """A checkpoint directory to resume from, or 'auto' for the newest one in output_dir/checkpoints whose
    manifest verifies (damaged ones are skipped, naming the file)."""
    overwrite: bool = False
    """Start a new run in an output_dir that holds another run's checkpoints or final model, first deleting what
    that run wrote (checkpoints, model files, metrics.jsonl, summary.json); without it such a run stops."""
    on_nonfinite: str = "stop"
    """A NaN or Inf loss or gradient norm: stop (before the optimizer step, naming the step and its examples) or
    skip (that optimizer step is skipped; metrics.jsonl counts them as nonfinite_skips)."""
    max_nonfinite_skips: int = 10
    """With on_nonfinite=skip: the most optimizer steps in a row that may be skipped; one more stops the run. With
    fp16 loss scaling, also the most overflow steps in a row left to the gradient scaler (which skips them and
    lowers its scale) before a non-finite value counts as a real one."""
    seed: int = 0
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    mixed_precision: str = "no"
    """accelerate autocast: no, bf16 or fp16 (parameters stay in dtype)."""
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    """The attention kernel the model is loaded with (transformers' attn_implementation): sdpa, eager,
    flash_attention_2, flash_attention_3 or flex_attention; unset: the model's own default (sdpa where it
    exists)."""
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
        check_required(self, "model", "data", "output_dir")
        check_field(self.lr > 0, "lr", self.lr, "a positive number")
        check_field(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        check_field(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        check_field(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", self.mixed_precision, "no, bf16 or fp16")
        check_field(self.attn_implementation in (None, *ATTN_IMPLEMENTATIONS), "attn_implementation",
                    self.attn_implementation, f"one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_field(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "an integer >= 1")
        check_field(self.batch_size % self.micro_batch_size == 0, "batch_size", self.batch_size,
               f"a multiple of micro_batch_size ({self.micro_batch_size})")
        check_field(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        check_field(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check_field(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        check_field(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0 disables clipping)")
        check_field(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "in [0, 1)")
        check_length_limits(self.max_length, self.max_prompt_length)
        check_field(self.num_proc is None or self.num_proc >= 1, "num_proc", self.num_proc,
                    "an integer >= 1 (or unset: the cores available)")
        if self.streaming:
            check_field(self.max_steps is not None, "max_steps", self.max_steps,
                        "set with --streaming (a stream's length is known only once it has been read)")
            check_field(not self.eval_fraction, "eval_fraction", self.eval_fraction,
                        "0 with --streaming (a stream has no random hold-out); give --eval-data instead")
            check_field(self.shuffle_buffer >= 0, "shuffle_buffer", self.shuffle_buffer, "an integer >= 0")
        for name in ("eval_every", "save_every", "keep_checkpoints"):
            check_field(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        check_field(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        check_field(self.on_nonfinite in ("stop", "skip"), "on_nonfinite", self.on_nonfinite, "stop or skip")
        check_field(self.max_nonfinite_skips >= 1, "max_nonfinite_skips", self.max_nonfinite_skips,
                    "an integer >= 1")
        check_field(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check_field(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")


@dataclass
class DPOConfig(TrainConfig):
    """DPO and its family of preference losses."""

    ref_model: str | None = None
    """Reference model path; default: a frozen copy of the initial policy (or, with LoRA, the base model)."""
    loss: str = "sigmoid"
    """Preference loss by name: sigmoid (the paper's DPO), cdpo, robust, ipo, ipo_per_token, hinge, exo_pair,
    nca_pair, sppo_hard, apo_zero, apo_down, discopop, sigmoid_norm, bco_pair, aot, aot_pair, simpo, orpo and sft
    (reference-free: no reference model is loaded and none may be given), plackett_luce (ranked data; K = 2 equals
    sigmoid); or several joined by commas, summed with loss_weights (sigmoid,bco_pair,sft is TRL's MPO)."""
    beta: float = 0.1
    """Strength of the KL constraint (the paper's beta; IPO's tau)."""
    label_smoothing: float = 0.0
    """Label-noise rate epsilon for cdpo (in [0, 0.5]) and robust (in [0, 0.5)); EXO's epsilon for exo_pair
    (in [0, 0.5]; 0 means the paper's 1e-3)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (>= 0; TRL's simpo_gamma, on the reward scale, not divided by beta);
    used only by loss simpo."""
    nll_weight: float = 0.0
    """Weight of an extra per-token NLL (SFT) term on the chosen response."""
    reference_free: bool = False
    """Use a uniform reference (log pi_ref = 0): no reference model at all."""
    precompute_ref: bool | None = None
    """Compute the reference log-probs in one pass before training and cache them on disk (default: on whenever
    there is a reference; false: run the reference live at every step)."""
    packing: bool = False
    """Pack all sequences of a micro-batch into one row (no pad tokens; attention never crosses sequences)."""
    prefix_sharing: bool = False
    """Compute each prompt once for its K responses (responses see the prompt, never each other)."""
    logps_chunk_size: int | None = None
    """Compute log-probs through the LM head this many positions at a time, so the full logits tensor never
    exists (0: off; default: auto, by logits_memory_mb, decided per micro-batch)."""
    logits_memory_mb: float = 256.0
    """The most memory the log-prob pass may hold at once for logits (the logits and their float32 log-softmax
    buffers: about 20 bytes per response position per vocabulary entry); a micro-batch above it runs the LM head
    in chunks of positions (used when logps_chunk_size is auto)."""
    loss_weights: list[str] | None = None
    """Weights of the parts of a combined loss (loss: sigmoid,sft with loss_weights: 1.0,0.2): the loss is
    sum_k w_k loss_k and each part is logged as loss/<name>. Default: 1 for every part."""
    wpo: bool = False
    """WPO (Zhou et al. 2024): multiply each pair's loss by how likely the policy is to produce each of its two
    responses, exp(mean per-token log p - log sum_v p_v^2) (no gradient). Needs the plain log-prob layout."""
    ld_alpha: float | None = None
    """LD-DPO (Liu et al. 2024): the log-prob tokens of a response past the shorter response of its pair weigh
    ld_alpha in [0, 1] (policy and reference alike; 1 is plain DPO). Needs the plain log-prob layout."""
    ref_sync_every: int = 0
    """TR-DPO (Gorbatovski et al. 2024): every N optimizer steps move the reference towards the policy,
    ref <- mix * policy + (1 - mix) * ref (0: a fixed reference). Needs a live reference model of its own
    (no LoRA adapters, no precomputed reference log-probs)."""
    ref_sync_mix: float = 1.0
    """TR-DPO's alpha in (0, 1]: 1 is the hard update (the reference becomes the policy), less a soft one."""

    @property
    def loss_parts(self) -> tuple[tuple[str, float], ...]:
        """The (name, weight) parts of ``loss``: one part of weight 1 for a single loss."""
        from ..losses import parse_loss_spec

        try:
            return parse_loss_spec(self.loss, self.loss_weights)
        except ValueError as e:
            raise ConfigError(f"invalid loss = {self.loss!r} (loss_weights = {self.loss_weights}): {e}") from None

    @property
    def reference_free_loss(self) -> bool:
        """Every part of the loss reads only the policy's log-probs (no reference is loaded or computed)."""
        from ..losses import REFERENCE_FREE_LOSSES

        return all(name in REFERENCE_FREE_LOSSES for name, _ in self.loss_parts)

    @property
    def precomputes_reference(self) -> bool:
        """precompute_ref as it takes effect: None (the default) means on; a reference-free run or loss has none,
        and neither has a run whose reference moves (ref_sync_every)."""
        return (self.precompute_ref is not False and not self.reference_free
                and not self.reference_free_loss and not self.ref_sync_every and not self.streaming)

    def validate(self) -> None:
        super().validate()
        from ..losses import loss_names

        names = [n.strip() for n in self.loss.split(",")]
        for name in names:
            check_field(name in loss_names(), "loss", self.loss,
                        f"one of {', '.join(loss_names())}, or several joined by commas (sigmoid,sft)")
        parts = self.loss_parts
        check_field(self.beta > 0, "beta", self.beta, "a positive number (the paper uses 0.1 to 0.5)")
        smoothing = {"cdpo": (0.5, True, "in [0, 0.5] for cdpo"), "robust": (0.5, False, "in [0, 0.5) for robust"),
                     "exo_pair": (0.5, True, "in [0, 0.5] for exo_pair (0: the EXO paper's 1e-3)"),
                     "aot": (0.5, True, "in [0, 0.5] for aot"), "aot_pair": (0.5, True, "in [0, 0.5] for aot_pair")}
        users = [n for n in names if n in smoothing]
        others = [n for n in names if n not in smoothing]
        for name in users:
            top, closed, what = smoothing[name]
            ok = 0 <= self.label_smoothing and (self.label_smoothing <= top if closed else self.label_smoothing < top)
            check_field(ok, "label_smoothing", self.label_smoothing, what)
        if self.label_smoothing != 0 and others:
            check_field(False, "label_smoothing", self.label_smoothing,
                   f"0 for loss '{others[0]}' (label smoothing belongs to cdpo and robust, "
                   "is EXO's epsilon for exo_pair and AOT's for aot and aot_pair)")
        check_field(self.ld_alpha is None or 0 <= self.ld_alpha <= 1, "ld_alpha", self.ld_alpha,
                    "in [0, 1] (LD-DPO's weight of the tokens past the shorter response) or none")
        check_field(self.ref_sync_every >= 0, "ref_sync_every", self.ref_sync_every, "an integer >= 0 (0: off)")
        check_field(0 < self.ref_sync_mix <= 1, "ref_sync_mix", self.ref_sync_mix,
                    "in (0, 1] (1: hard update, the reference becomes the policy)")
        if len(parts) > 1 or self.wpo or self.ld_alpha is not None:
            if "plackett_luce" in names:
                raise ConfigError("plackett_luce (ranked data) takes no wpo / ld_alpha modifier.")
        if self.wpo and any(n in ("aot", "aot_pair") for n in names):
            raise ConfigError("wpo weighs each pair's loss, but aot / aot_pair sort the pairs of a batch (a loss "
                              "value belongs to a quantile, not a pair): drop wpo or use another loss.")
        if (self.wpo or self.ld_alpha is not None) and (self.packing or self.prefix_sharing):
            raise ConfigError("wpo and ld_alpha need per-token log-probs of the plain layout: drop packing / "
                              "prefix_sharing.")
        if self.ref_sync_every:
            why = ("ref_sync_every (TR-DPO) updates the reference model during training, which makes precomputed "
                   "reference log-probs stale")
            if self.precompute_ref is True:
                raise ConfigError(f"{why}: drop precompute_ref (the reference then runs live at every step).")
            if self.reference_free or self.reference_free_loss:
                raise ConfigError("ref_sync_every (TR-DPO) needs a reference model; this run has none "
                                  "(reference_free or a reference-free loss).")
            if self.lora:
                raise ConfigError("ref_sync_every (TR-DPO) needs a reference model of its own; with lora the "
                                  "reference is the base model with adapters off, which cannot move.")
        if self.streaming and self.precompute_ref is True:
            raise ConfigError("streaming reads the data as training goes, so there is no pass over it to precompute "
                              "reference log-probs in: drop precompute_ref (the reference then runs live).")
        check_field(self.simpo_gamma >= 0, "simpo_gamma", self.simpo_gamma, ">= 0 (SimPO's target reward margin)")
        check_field(self.nll_weight >= 0, "nll_weight", self.nll_weight, ">= 0")
        check_field(self.logps_chunk_size is None or self.logps_chunk_size >= 0, "logps_chunk_size",
                    self.logps_chunk_size, "an integer >= 0 (0: off) or none (auto, by logits_memory_mb)")
        check_field(0 < self.logits_memory_mb < float("inf"), "logits_memory_mb", self.logits_memory_mb,
                    "a positive number of MB")
        if self.reference_free and (self.ref_model or self.precompute_ref is True):
            raise ConfigError("reference_free uses no reference model: drop ref_model / precompute_ref.")
        if self.reference_free_loss and (self.ref_model or self.precompute_ref is True):
            raise ConfigError(f"loss '{self.loss}' is reference-free and uses no reference model: "
                              "drop ref_model / precompute_ref.")


@dataclass
class KTOConfig(TrainConfig):
    """KTO (Ethayarajh et al. 2024) on unpaired feedback: each completion is labelled desirable or not.

    Data: {prompt, completion, label: true|false} rows, or preference pairs (each chosen response true, each
    rejected one false). KTO's KL reference point is estimated per micro-batch from mismatched (prompt, completion)
    pairs of that micro-batch, so micro_batch_size must be at least 2. The reference runs live (a frozen copy of the
    initial policy, ref_model, or with LoRA the base model).
    """

    data_format: str = "auto"
    """Row format: auto, unpaired ({prompt, completion, label}), or a preference format (explicit,
    conversational, implicit, ranked: chosen responses desirable, rejected ones not)."""
    ref_model: str | None = None
    """Reference model path; default: a frozen copy of the initial policy (or, with LoRA, the base model)."""
    beta: float = 0.1
    """KTO's beta: rewards are beta * (log pi - log pi_ref)."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of a desirable completion's loss (the paper keeps lambda_D n_D / (lambda_U n_U) in
    [1, 4/3] when the labels are unbalanced)."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of an undesirable completion's loss."""
    micro_batch_size: int = 8
    """Completions per forward pass (>= 2: KTO's KL estimate pairs each prompt with another completion of the
    micro-batch)."""

    def validate(self) -> None:
        super().validate()
        from ..data.formats import FORMATS

        check_field(self.data_format in ("auto", "unpaired", *FORMATS), "data_format", self.data_format,
                    f"one of auto, unpaired, {', '.join(FORMATS)}")
        check_field(self.beta > 0, "beta", self.beta, "a positive number")
        check_field(self.desirable_weight >= 0, "desirable_weight", self.desirable_weight, ">= 0")
        check_field(self.undesirable_weight >= 0, "undesirable_weight", self.undesirable_weight, ">= 0")
        check_field(self.desirable_weight + self.undesirable_weight > 0, "desirable_weight",
                    self.desirable_weight, "> 0 when undesirable_weight is 0")
        check_field(self.micro_batch_size >= 2, "micro_batch_size", self.micro_batch_size,
                    "an integer >= 2 (KTO estimates its KL term from mismatched pairs within a micro-batch)")


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
        from ..data.formats import FORMATS
        from ..data.sft import SFT_FORMATS

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
    """Weight of an extra (r_chosen + r_rejected)^2 penalty per pair, keeping rewards centred on 0 without
    penalising their margin (0 disables). Ranked data (K > 2) trains on every ordered pair of its responses, and
    the penalty averages over the same pairs."""

    def validate(self) -> None:
        super().validate()
        check_field(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", self.center_rewards_coefficient,
               ">= 0 (0 disables)")


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
        check_reward_fn(self.reward_fn)
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

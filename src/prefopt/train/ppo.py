"""PPO-RLHF, the baseline of the DPO paper: sample from the policy, score, penalise KL, update with clipped PPO.

One iteration (one *step* in metrics.jsonl and checkpoints):

    prompts --generate (policy, sampling)--> responses --reward fn / reward model--> scores
    policy + value head, frozen reference (no grad) -> log pi, V, log pi_ref on the response tokens
    r_t = -kl_coef (log pi - log pi_ref) + score at the last token;  GAE -> advantages (whitened), returns
    ppo_epochs x minibatches of batch_size rollouts: clipped policy loss + vf_coef * clipped value loss

Design: the value function is a linear head on the policy's final hidden states (``PolicyWithValueHead``,
one shared trunk, as in Ziegler et al. 2019), not a second model: half the memory and forwards, and the
value loss is scaled down by ``vf_coef`` so it does not dominate the shared trunk. The reference is a frozen
copy of the initial policy (with LoRA: the policy with its adapters disabled). The final policy is saved with
``save_pretrained`` (plain transformers loads it) and the value head beside it in
``value_head/value_head.safetensors``.

Rollouts are sampled by ``prefopt.generation.sample_ids``, the sampler ``prefopt generate`` uses: an exact draw from
softmax(logits / T) whatever the model's own generation_config says, ending at any of the model's end tokens, and
seeded by (seed, iteration) so a resumed run samples what an uninterrupted one would. The run is the shared
loop's (``train.loop.start_run``: optimizer, schedule, resume, log, checkpoints, Ctrl-C, final save and summary);
only the outer loop (rollout, then several epochs of minibatch updates) is PPO's own. Runs on a single process.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import rl
from ..config import PPOConfig
from ..data.prompts import encode_prompts, read_prompts
from ..data.types import Text
from ..errors import ConfigError
from ..generation import end_token_ids, row_seed, sample_ids
from ..logprobs import token_logps
from ..models import evaluating, load_tokenizer, reference_mode
from ..rewards import RewardFn, call_reward_fn, load_reward_fn, reward_model_fn
from .checkpoints import load_model_weights, refuse_used_output_dir
from .loop import BatchSchedule, MetricSums, StepResult, micro_batches, start_run, to_device
from .sharding import is_deepspeed, use_engine
from .setup import load_policy, resolve_length_limits, save_model_and_tokenizer

VALUE_HEAD_DIR = "value_head"
VALUE_HEAD_FILE = "value_head.safetensors"
PPO_METRIC_KEYS = ("reward", "kl", "entropy", "clipfrac", "value_loss", "policy_loss", "approx_kl", "kl_coef",
                   "response_length")
PPO_SUMMARY_KEYS = ("reward", "kl", "kl_coef", "response_length")


# ---------------------------------------------------------------------------------------------------------
# The model: policy + value head


class PolicyWithValueHead(nn.Module):
    """A causal LM with a linear value head on its final hidden states: ``forward -> (logits, values)``.

    ``save_pretrained(dir)`` writes the LM exactly as transformers does (so ``AutoModelForCausalLM`` loads it)
    and the head to ``dir/value_head/value_head.safetensors``; ``load_saved_weights(dir)`` reads both back
    (the shared Checkpointer uses it).
    """

    def __init__(self, policy: nn.Module, hidden_size: int | None = None):
        super().__init__()
        self.policy = policy
        hidden = hidden_size or policy.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        directory = Path(directory)
        self.policy.save_pretrained(directory, **kwargs)
        save_value_head(self.value_head, directory)

    def load_saved_weights(self, directory: str | Path) -> None:
        directory = Path(directory)
        load_model_weights(self.policy, directory)
        self.value_head.load_state_dict(load_file(str(directory / VALUE_HEAD_DIR / VALUE_HEAD_FILE)))


def save_value_head(head: nn.Linear, directory: Path) -> Path:
    path = Path(directory) / VALUE_HEAD_DIR
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path / VALUE_HEAD_FILE))
    (path / "config.json").write_text(json.dumps({"hidden_size": head.in_features, "out_features": 1}) + "\n")
    return path / VALUE_HEAD_FILE


def load_value_head(directory: str | Path) -> nn.Linear:
    """The value head saved beside a PPO model (``directory`` is the model folder)."""
    path = Path(directory) / VALUE_HEAD_DIR
    info = json.loads((path / "config.json").read_text())
    head = nn.Linear(info["hidden_size"], 1)
    head.load_state_dict(load_file(str(path / VALUE_HEAD_FILE)))
    return head


# ---------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    """One prompt, one sampled response and everything PPO needs about its tokens ([T] each)."""

    prompt_ids: list[int]
    response_ids: list[int]
    logps: Tensor | None = None
    values: Tensor | None = None
    ref_logps: Tensor | None = None
    entropy: Tensor | None = None
    score: float = 0.0
    advantages: Tensor | None = None
    returns: Tensor | None = None


def collate_rollouts(items: Sequence[Rollout], pad_token_id: int) -> dict:
    """[left-padded prompt | right-padded response] rows; response-token tensors [b, T] padded with 0.

    ``position_ids`` count real tokens only, as generate does for left-padded prompts.
    """
    P = max(len(r.prompt_ids) for r in items)
    T = max(len(r.response_ids) for r in items)
    b = len(items)
    input_ids = torch.full((b, P + T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, P + T), dtype=torch.long)
    response_mask = torch.zeros((b, T), dtype=torch.bool)
    for i, r in enumerate(items):
        p, n = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, P - p:P] = torch.tensor(r.prompt_ids)
        input_ids[i, P:P + n] = torch.tensor(r.response_ids)
        attention_mask[i, P - p:P + n] = 1
        response_mask[i, :n] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0), "response_mask": response_mask,
             "prompt_width": P}
    for name, key in (("logps", "old_logps"), ("values", "old_values"), ("advantages", "advantages"),
                      ("returns", "returns")):
        if getattr(items[0], name) is not None:
            t = torch.zeros((b, T), dtype=torch.float32)
            for i, r in enumerate(items):
                v = getattr(r, name)
                t[i, :v.numel()] = v
            batch[key] = t
    return batch


def response_logits(logits: Tensor, batch: dict, temperature: float) -> Tensor:
    """The logits that predict each response token, [b, T, V], divided by the sampling temperature."""
    P, T = batch["prompt_width"], batch["response_mask"].shape[1]
    out = logits[:, P - 1:P - 1 + T]
    return out / temperature if temperature != 1.0 else out


def response_token_logps(logits: Tensor, batch: dict, temperature: float) -> Tensor:
    """log pi(a_t | s_t) of each response token, [b, T] (0 on padding)."""
    P, mask = batch["prompt_width"], batch["response_mask"]
    labels = batch["input_ids"][:, P:P + mask.shape[1]].masked_fill(~mask, 0)
    return token_logps(response_logits(logits, batch, temperature), labels) * mask


def policy_forward(model: nn.Module, batch: dict, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs [b, T], values [b, T], response logits [b, T, V]) of the policy with its value head."""
    logits, values = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    P, T = batch["prompt_width"], batch["response_mask"].shape[1]
    v = values[:, P - 1:P - 1 + T].float() * batch["response_mask"]
    return response_token_logps(logits, batch, temperature), v, response_logits(logits, batch, temperature)


class PPOStep:
    """One micro-batch of the PPO update: per-rollout losses (clipped policy + vf_coef * clipped value)."""

    unit = "rollouts"

    def __init__(self, cliprange: float, cliprange_value: float, vf_coef: float, temperature: float):
        self.cliprange, self.cliprange_value = cliprange, cliprange_value
        self.vf_coef, self.temperature = vf_coef, temperature

    def step(self, model: nn.Module, batch: dict) -> StepResult:
        logps, values, _ = policy_forward(model, batch, self.temperature)
        mask = batch["response_mask"]
        pg, clipfrac, approx_kl = rl.clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                                         self.cliprange)
        vf, vf_clipfrac = rl.clipped_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                self.cliprange_value)
        metrics = {"policy_loss": pg.detach(), "value_loss": vf.detach(), "clipfrac": clipfrac,
                   "approx_kl": approx_kl, "value_clipfrac": vf_clipfrac}
        return StepResult(pg + self.vf_coef * vf, metrics, tokens=batch["attention_mask"].sum())


ReferenceLogps = Callable[[dict], Tensor]


class RolloutMaker:
    """Sample, score and annotate rollouts (log-probs, values, reference log-probs, entropy) without grad."""

    def __init__(self, cfg: PPOConfig, model: PolicyWithValueHead, reference: ReferenceLogps, tokenizer: Any,
                 reward_fn: RewardFn, device: torch.device):
        self.cfg, self.model, self.reference, self.tokenizer = cfg, model, reference, tokenizer
        self.reward_fn, self.device = reward_fn, device
        self.eos_ids = end_token_ids(model.policy, tokenizer)  # every end-of-turn token the model knows

    def __call__(self, prompts: Sequence[Text], prompt_ids: Sequence[list[int]], seed: int,
                 autocast: Callable[[], Any]) -> list[Rollout]:
        """Rollouts for these prompts; ``seed`` (with each prompt's index) seeds its response's draws."""
        cfg, tok = self.cfg, self.tokenizer
        with autocast():
            responses = sample_ids(self.model.policy, prompt_ids, [row_seed(seed, i, 0) for i in range(len(prompt_ids))],
                                   eos_ids=self.eos_ids, pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                                   temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size)
        rollouts = [Rollout(p, r) for p, r in zip(prompt_ids, responses)]
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        scores = torch.tensor(call_reward_fn(self.reward_fn, list(prompts), texts), dtype=torch.float32)
        with evaluating(self.model), torch.no_grad():
            for chunk in micro_batches(rollouts, cfg.micro_batch_size):
                batch = to_device(collate_rollouts(chunk, tok.pad_token_id), self.device)
                with autocast():
                    logps, values, logits = policy_forward(self.model, batch, cfg.temperature)
                    ref = self.reference(batch)
                entropy = rl.entropy_from_logits(logits)
                for i, r in enumerate(chunk):
                    n = len(r.response_ids)
                    r.logps, r.values = logps[i, :n].float().cpu(), values[i, :n].float().cpu()
                    r.ref_logps, r.entropy = ref[i, :n].float().cpu(), entropy[i, :n].cpu()
        for r, s in zip(rollouts, scores.tolist()):
            r.score = s
        return rollouts


def pad_stack(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D tensors into [B, T] with a bool mask."""
    T = max(r.numel() for r in rows)
    out = torch.zeros(len(rows), T)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
        mask[i, :r.numel()] = True
    return out, mask


def compute_advantages(rollouts: Sequence[Rollout], kl_coef: float, gamma: float, lam: float,
                       whiten_advantages: bool) -> dict[str, float]:
    """Fill advantages and returns of every rollout; returns the iteration's rollout statistics."""
    logps, mask = pad_stack([r.logps for r in rollouts])
    ref, _ = pad_stack([r.ref_logps for r in rollouts])
    values, _ = pad_stack([r.values for r in rollouts])
    entropy, _ = pad_stack([r.entropy for r in rollouts])
    scores = torch.tensor([r.score for r in rollouts])
    rewards, kl = rl.kl_penalized_rewards(logps, ref, scores, mask, kl_coef)
    advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = rl.whiten(advantages, mask)
    for i, r in enumerate(rollouts):
        n = len(r.response_ids)
        r.advantages, r.returns = advantages[i, :n].clone(), returns[i, :n].clone()
    seq_kl = kl.sum(-1)
    return {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": float(seq_kl.mean()), "entropy": float(rl.masked_mean(entropy, mask)),
            "response_length": float(mask.sum(-1).float().mean()),
            "non_score_reward": float((-kl_coef * seq_kl).mean())}


# ---------------------------------------------------------------------------------------------------------
# The run


def _reference_fn(cfg: PPOConfig, model: PolicyWithValueHead, reference: nn.Module | None) -> ReferenceLogps:
    if reference is None:  # LoRA: the policy with adapters disabled
        def fn(batch: dict) -> Tensor:
            with reference_mode(model.policy):
                out = model.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   position_ids=batch["position_ids"], use_cache=False)
            return response_token_logps(out.logits, batch, cfg.temperature)
    else:
        def fn(batch: dict) -> Tensor:
            out = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"], use_cache=False)
            return response_token_logps(out.logits, batch, cfg.temperature)
    return fn


def _minibatch_order(seed: int, step: int, epoch: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_ppo(cfg: PPOConfig, accelerator: Accelerator | None = None, *,
              reward_fn: RewardFn | None = None) -> dict[str, Any]:
    """Load policy, reference and prompts; run PPO iterations; save. Returns a summary (also summary.json).

    ``reward_fn`` (a Python callable) overrides ``cfg.reward_fn`` / ``cfg.reward_model``.
    """
    cfg.validate()
    if reward_fn is None and not (cfg.reward_fn or cfg.reward_model):
        raise ConfigError("give a reward: --reward-model PATH or --reward-fn module:function.")
    accelerator = use_engine(accelerator or Accelerator(mixed_precision=cfg.mixed_precision))
    if is_deepspeed(accelerator):
        raise ConfigError("PPO under DeepSpeed is not supported (four models, its own minibatch loop); run it "
                          "with DDP (examples/accelerate/ddp.yaml) or FSDP2.")
    if accelerator.num_processes > 1:
        raise ConfigError("prefopt ppo runs on a single process for now; launch it without accelerate/torchrun.")
    set_seed(cfg.seed)
    device = accelerator.device
    if reward_fn is None and cfg.reward_fn:  # a bad reward spec fails before anything heavy is loaded
        reward_fn = load_reward_fn(cfg.reward_fn)

    refuse_used_output_dir(cfg)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prompts = read_prompts(cfg.data, cfg.split, unique=True)
    eval_prompts: list[Text] = []
    if cfg.eval_data:
        eval_prompts = read_prompts(cfg.eval_data, cfg.split, unique=True)
    elif cfg.eval_fraction > 0:
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = max(1, round(cfg.eval_fraction * len(prompts)))
        eval_prompts = [prompts[i] for i in sorted(order[:n_eval])]
        prompts = [prompts[i] for i in sorted(order[n_eval:])]
    resolve_length_limits(cfg, accelerator.print)
    prompt_ids = encode_prompts(prompts, tokenizer, cfg.max_prompt_length)
    eval_ids = encode_prompts(eval_prompts, tokenizer, cfg.max_prompt_length)
    accelerator.print(f"prompts: {len(prompts)} for training, {len(eval_prompts)} for evaluation")
    if len(prompts) < cfg.rollout_batch_size:
        raise ConfigError(f"rollout_batch_size ({cfg.rollout_batch_size}) is larger than the number of prompts "
                          f"({len(prompts)}).")
    schedule = BatchSchedule(len(prompts), cfg.rollout_batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * schedule.steps_per_epoch

    if reward_fn is None:
        reward_fn = reward_model_fn(cfg.reward_model, batch_size=cfg.micro_batch_size, device=device,
                                    max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    lm, reference = load_policy(cfg, with_reference=not cfg.lora)
    model = PolicyWithValueHead(lm).to(device)
    if reference is not None:
        reference = reference.to(device)
    kl_ctl: rl.KLController = (rl.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
                               if cfg.adaptive_kl else rl.FixedKLController(cfg.kl_coef))
    run = start_run(cfg, model, accelerator, total_steps=total_steps, unit=PPOStep.unit,
                    summary_keys=PPO_SUMMARY_KEYS, desc="ppo", bar_unit="iter",
                    checkpoint_state=lambda step: {"epoch": schedule.epoch_of(step), "seed": cfg.seed,
                                                   "kl_controller": kl_ctl.state_dict()})
    if run.state:
        kl_ctl.load_state_dict(run.state["kl_controller"])
    model = run.model
    core: PolicyWithValueHead = accelerator.unwrap_model(model)
    make_rollouts = RolloutMaker(cfg, core, _reference_fn(cfg, core, reference), tokenizer, reward_fn, device)
    method = PPOStep(cfg.cliprange, cfg.cliprange_value, cfg.vf_coef, cfg.temperature)

    def evaluate() -> dict[str, Any]:
        rollouts = []
        for chunk in micro_batches(list(range(len(eval_ids))), cfg.rollout_batch_size):
            rollouts += make_rollouts([eval_prompts[i] for i in chunk], [eval_ids[i] for i in chunk],
                                      _rollout_seed(cfg.seed, run.step, "eval", chunk[0]), accelerator.autocast)
        stats = compute_advantages(rollouts, kl_ctl.value, cfg.gamma, cfg.lam, False)
        return {"step": run.step, **{f"eval/{k}": stats[k] for k in ("reward", "kl", "entropy", "response_length")}}

    model.train()
    with run.stop_on_interrupt():
        while run.step < total_steps:
            t0 = time.perf_counter()
            idx = schedule.indices(run.step)
            rollouts = make_rollouts([prompts[i] for i in idx], [prompt_ids[i] for i in idx],
                                     _rollout_seed(cfg.seed, run.step, "train"), accelerator.autocast)
            kl_coef = kl_ctl.value
            stats = compute_advantages(rollouts, kl_coef, cfg.gamma, cfg.lam, cfg.whiten_advantages)
            t_rollout = time.perf_counter() - t0

            sums = MetricSums()
            grad_norms = []
            for epoch in range(cfg.ppo_epochs):
                order = _minibatch_order(cfg.seed, run.step, epoch, len(rollouts))
                for minibatch in micro_batches(order, cfg.batch_size):
                    for chunk in micro_batches(minibatch, cfg.micro_batch_size):
                        batch = to_device(collate_rollouts([rollouts[j] for j in chunk], tokenizer.pad_token_id),
                                          device)
                        with accelerator.autocast():
                            result = method.step(model, batch)
                        accelerator.backward(result.losses.sum() / len(minibatch))
                        sums.add(result)
                    grad_norm, lr = run.optimizer_step(blame=lambda: f"the rollouts of iteration {run.step + 1}")
                    grad_norms.append(float(grad_norm))
            kl_ctl.update(stats["kl"], n_steps=len(rollouts))
            run.step += 1
            seconds = time.perf_counter() - t0
            run.log.step_done(run.step, schedule.epoch_of(run.step - 1), scalars={
                **stats, "kl_coef": kl_coef, **sums.means(method.unit), "lr": lr,
                "grad_norm": sum(grad_norms) / len(grad_norms), "rollout_seconds": t_rollout,
                "rollouts_per_second": len(rollouts) / seconds})
            run.end_of_step(evaluate if eval_ids else None)

    def save_final(output_dir: Path) -> None:
        save_value_head(core.value_head, output_dir)
        save_model_and_tokenizer(core.policy, tokenizer, output_dir)
        (output_dir / "kl_controller.json").write_text(json.dumps(kl_ctl.state_dict()) + "\n")

    return run.finish(evaluate if eval_ids else None, save_final)


def _rollout_seed(seed: int, step: int, split: str, offset: int = 0) -> int:
    """The sampling seed of one rollout batch: a function of (seed, iteration), so a resumed run samples what an
    uninterrupted one would."""
    return row_seed(seed, step, {"train": 0, "eval": 1}[split] * 1_000_003 + offset)


__all__ = ["PolicyWithValueHead", "PPOStep", "Rollout", "RolloutMaker", "train_ppo", "collate_rollouts",
           "policy_forward", "compute_advantages", "save_value_head", "load_value_head", "PPO_METRIC_KEYS",
           "VALUE_HEAD_DIR", "VALUE_HEAD_FILE"]

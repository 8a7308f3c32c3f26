"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, Figure 2): reward against KL.

    prefopt experiment sentiment --output-dir runs/sentiment                          # built-in corpus
    prefopt experiment sentiment --data ../shared/data/rt-polarity --output-dir runs/rt

Stages (run by ``experiments.stages.Stages``: each in ``<output_dir>/<stage>/``, finished with a ``done``
marker; a rerun skips finished stages whose settings are unchanged and reruns those whose settings, or whose
inputs, changed):

    data      split the reviews: ~50% SFT text (its prefixes are the training prompts), ~40% classifier
              training, the rest held out (classifier accuracy; its prefixes are the evaluation prompts)
    reward    the ground truth: the corpus's exact valence, or a TF-IDF + logistic-regression classifier
              (log-odds) trained on the classifier split; its held-out accuracy is reported
    sft       a fresh model (``models.init_model``, tokenizer trained on the SFT text), then ``prefopt sft``
    samples   ``samples_per_prompt`` completions per training prompt from pi_SFT (temperature 1)
    pairs     best vs worst sample of each prompt by the ground-truth reward (``prefopt.label``)
    dpo-beta* ``prefopt dpo`` on the pairs, one run per beta
    rm        a Bradley-Terry reward model on the pairs (``prefopt rm``), for PPO-RM
    ppo-rm-kl*, ppo-gt-kl*   ``prefopt ppo`` from pi_SFT with the learned RM / with the ground-truth reward
    eval-*    per policy, on held-out prompts: mean ground-truth reward, KL(pi || pi_SFT) from samples (clustered
              SEs), mean completion length, share of completions ending with EOS
    best-of-n Best-of-N from pi_SFT (selected by the ground-truth reward or the RM); KL = log N - (N-1)/N
    temperatures-*   per policy (pi_SFT, each DPO and PPO run, Best-of-N) and for a pi_SFT baseline: samples of
              held-out prompts at each of ``temperatures``; each policy's sample is judged against the baseline's
              of the same prompt and temperature by the ground-truth reward (higher wins, equal ties)
    report    results.json, results.md and reward_vs_kl.png; temperatures.json, temperatures.md and
              win_rate_vs_temperature.png (win rate against pi_SFT by temperature, 95 % intervals)

Python: ``run_sentiment(SentimentConfig(output_dir=..., ...))``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import check_field
from ..errors import ConfigError
from ..jsonl import read_jsonl, write_jsonl
from . import corpus as corpus_mod
from .reward import (
    ClassifierReward,
    CorpusReward,
    read_polarity_dir,
    split_reviews,
    train_classifier,
)
from .stages import Stages

METHODS = ("dpo", "ppo-rm", "ppo-gt", "best-of-n")
SPLIT = (0.5, 0.4, 0.1)  # SFT text, classifier training, held out


@dataclass
class SentimentConfig:
    """prefopt experiment sentiment: SFT -> samples -> pairs -> DPO / PPO / Best-of-N -> reward vs KL."""

    output_dir: str = ""
    """Where every stage writes its folder (a rerun skips finished stages)."""
    data: str | None = None
    """A folder of rt-polarity-style *.pos / *.neg files (one review a line); default: the built-in corpus."""
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods to run: dpo, ppo-rm, ppo-gt, best-of-n (pi_SFT is always evaluated)."""
    corpus_size: int = 8000
    """Reviews generated for the built-in corpus (ignored with --data)."""
    prompt_words_min: int = 2
    """Prompts are the first k words of a review, k drawn in [prompt_words_min, prompt_words_max]."""
    prompt_words_max: int = 4

    size: str = "small"
    """Model size for models.init_model: tiny, small or medium."""
    vocab_size: int = 4096
    """Tokenizer vocabulary cap (the tokenizer is trained on the SFT text)."""
    max_length: int = 128
    """Longest prompt + response in tokens (SFT, DPO, RM)."""
    sft_steps: int | None = None
    """SFT optimizer steps (default: sft_epochs over the SFT text)."""
    sft_epochs: int = 3
    sft_lr: float = 1e-3
    sft_batch_size: int = 32

    num_prompts: int = 800
    """Training prompts sampled from pi_SFT (one pair each) and used by PPO."""
    samples_per_prompt: int = 4
    """Completions per training prompt; the pair is the best vs the worst of them."""
    max_new_tokens: int = 48
    """Longest sampled completion in tokens (everywhere: samples, PPO rollouts, evaluation)."""
    generation_batch_size: int = 64

    betas: list[float] = field(default_factory=lambda: [0.1, 0.5])
    """DPO betas (one run each)."""
    dpo_steps: int | None = None
    """DPO optimizer steps (default: dpo_epochs over the pairs)."""
    dpo_epochs: int = 3
    dpo_lr: float = 5e-5
    dpo_batch_size: int = 16
    dpo_warmup_steps: int = 10

    kl_coefs: list[float] = field(default_factory=lambda: [0.05, 0.2])
    """PPO KL-penalty coefficients (one PPO-RM and one PPO-GT run each)."""
    ppo_steps: int = 40
    """PPO iterations (each: rollout_batch_size prompts, ppo_epochs passes)."""
    ppo_lr: float = 1e-5
    ppo_rollout_batch_size: int = 64
    ppo_batch_size: int = 16
    ppo_epochs: int = 4
    rm_epochs: int = 2
    rm_lr: float = 1e-4
    rm_batch_size: int = 16

    best_of_n: list[int] = field(default_factory=lambda: [4, 16])
    """N values of the Best-of-N baseline."""
    bon_selector: str = "ground_truth"
    """Best-of-N picks by: ground_truth (oracle) or reward_model (needs the ppo-rm method's RM)."""

    eval_prompts: int = 200
    """Held-out prompts per evaluated policy."""
    eval_samples: int = 4
    """Samples per evaluation prompt (the KL's SE is clustered by prompt)."""
    temperatures: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """Sampling temperatures of the win-rate figure: every policy against pi_SFT sampled at the same temperature,
    judged by the ground-truth reward ('none': no figure)."""
    temperature_prompts: int | None = None
    """Held-out prompts used by the win-rate figure (default: all evaluation prompts)."""
    temperature_samples: int = 1
    """Samples per prompt and temperature in the win-rate figure (several: the interval is clustered by prompt)."""
    micro_batch_size: int = 16
    """Examples per forward pass in training and scoring."""
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("'output_dir' is required (flag --output-dir).")
        self.methods = [str(m).strip() for m in self.methods]
        for m in self.methods:
            check_field(m in METHODS, "methods", m, f"among {', '.join(METHODS)}")
        self.betas = _numbers("betas", self.betas, float)
        self.kl_coefs = _numbers("kl_coefs", self.kl_coefs, float)
        self.best_of_n = _numbers("best_of_n", self.best_of_n, int)
        if self.temperatures in ("", [], ["none"]) or str(self.temperatures).strip().lower() == "none":
            self.temperatures = []
        else:
            self.temperatures = _numbers("temperatures", self.temperatures, float)
        check_field(all(math.isfinite(t) and t >= 0 for t in self.temperatures), "temperatures", self.temperatures,
                    "numbers >= 0 (0 means greedy decoding), or none")
        check_field(len(set(self.temperatures)) == len(self.temperatures), "temperatures", self.temperatures,
                    "distinct numbers")
        check_field(self.temperature_prompts is None or self.temperature_prompts >= 1, "temperature_prompts",
                    self.temperature_prompts, "an integer >= 1 (or none)")
        check_field(self.temperature_samples >= 1, "temperature_samples", self.temperature_samples, "an integer >= 1")
        from ..models import MODEL_SIZES

        check_field(self.size in MODEL_SIZES, "size", self.size, f"one of {', '.join(MODEL_SIZES)}")
        check_field(all(b > 0 for b in self.betas), "betas", self.betas, "positive numbers")
        check_field(all(c >= 0 for c in self.kl_coefs), "kl_coefs", self.kl_coefs, "numbers >= 0")
        check_field(all(n >= 1 for n in self.best_of_n), "best_of_n", self.best_of_n, "integers >= 1")
        check_field(self.bon_selector in ("ground_truth", "reward_model"), "bon_selector", self.bon_selector,
               "ground_truth or reward_model")
        if self.bon_selector == "reward_model" and "best-of-n" in self.methods and "ppo-rm" not in self.methods:
            raise ConfigError("bon_selector reward_model needs the reward model of the ppo-rm method: add ppo-rm to "
                              "methods or use bon_selector ground_truth.")
        check_field(1 <= self.prompt_words_min <= self.prompt_words_max, "prompt_words_min", self.prompt_words_min,
               f"between 1 and prompt_words_max ({self.prompt_words_max})")
        check_field(self.samples_per_prompt >= 2, "samples_per_prompt", self.samples_per_prompt, "an integer >= 2")
        for name in ("corpus_size", "num_prompts", "eval_prompts", "eval_samples", "max_new_tokens", "sft_epochs",
                     "sft_batch_size", "dpo_epochs", "dpo_batch_size", "ppo_steps", "ppo_rollout_batch_size",
                     "ppo_batch_size", "ppo_epochs", "rm_epochs", "rm_batch_size", "generation_batch_size",
                     "micro_batch_size", "vocab_size"):
            check_field(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check_field(self.max_length > self.max_new_tokens, "max_length", self.max_length,
               f"larger than max_new_tokens ({self.max_new_tokens})")
        for name in ("sft_steps", "dpo_steps"):
            check_field(getattr(self, name) is None or getattr(self, name) >= 1, name, getattr(self, name),
                   "an integer >= 1 (or none)")
        check_field(self.ppo_rollout_batch_size % self.ppo_batch_size == 0, "ppo_rollout_batch_size",
               self.ppo_rollout_batch_size, f"a multiple of ppo_batch_size ({self.ppo_batch_size})")


def _numbers(name: str, values: Any, kind: type) -> list:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    try:
        out = [kind(float(v)) if kind is int and float(v).is_integer() else kind(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"invalid {name} = {values!r}: must be a comma-separated list of "
                          f"{'integers' if kind is int else 'numbers'}, e.g. --{name.replace('_', '-')} "
                          f"{'4,16' if kind is int else '0.1,0.5'}.") from None
    if not out:
        raise ConfigError(f"invalid {name}: give at least one value.")
    return out


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _prompts(texts: Sequence[str], n: int, cfg: SentimentConfig, salt: str) -> list[str]:
    """Prefixes of the first n texts that are longer than their prefix (so a completion exists)."""
    rng = random.Random(f"prefopt-prompts:{cfg.seed}:{salt}")
    out = []
    for text in texts:
        words = text.split()
        k = rng.randint(cfg.prompt_words_min, cfg.prompt_words_max)
        if len(words) > k:
            out.append(" ".join(words[:k]))
        if len(out) == n:
            break
    return out


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_lm(path: str | Path):
    from ..models import load_model, load_tokenizer

    return load_model(path, device=_device()), load_tokenizer(path)


def _free(*_: Any) -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _summary_numbers(summary: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": summary.get("steps"), "seconds": summary.get("seconds")}
    for part in ("train", "eval"):
        row = summary.get(part) or {}
        for k in keys:
            for name in (k, f"eval/{k}"):
                if isinstance(row.get(name), (int, float)):
                    out[f"{part}/{k}"] = row[name]
    return out


# ---------------------------------------------------------------------------------------------------------
# The experiment


class SentimentExperiment:
    def __init__(self, cfg: SentimentConfig, log: Callable[[str], None] = print):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log
        self.stages = Stages(self.out, log)
        self._reward: Any = None

    # -- data and reward ------------------------------------------------------------------------------

    def stage_data(self) -> dict[str, Any]:
        cfg = self.cfg
        key = {"data": str(Path(cfg.data).resolve()) if cfg.data else None, "seed": cfg.seed,
               "corpus_size": None if cfg.data else cfg.corpus_size, "num_prompts": cfg.num_prompts,
               "eval_prompts": cfg.eval_prompts, "words": [cfg.prompt_words_min, cfg.prompt_words_max]}

        def run(d: Path) -> dict[str, Any]:
            if cfg.data:
                reviews = read_polarity_dir(cfg.data)
            else:
                reviews = [(r.text, r.label) for r in corpus_mod.generate_reviews(cfg.corpus_size, cfg.seed)]
            sft, clf, held = split_reviews(reviews, SPLIT, cfg.seed)
            write_jsonl([{"text": t} for t, _ in sft], d / "sft.jsonl")
            write_jsonl([{"text": t, "label": y} for t, y in clf], d / "classifier_train.jsonl")
            write_jsonl([{"text": t, "label": y} for t, y in held], d / "heldout.jsonl")
            train_prompts = _prompts([t for t, _ in sft], cfg.num_prompts, cfg, "train")
            eval_prompts = _prompts([t for t, _ in held], cfg.eval_prompts, cfg, "eval")
            if len(train_prompts) < cfg.num_prompts or len(eval_prompts) < cfg.eval_prompts:
                self.log(f"[data] note: only {len(train_prompts)} training / {len(eval_prompts)} evaluation "
                         f"prompts available (asked for {cfg.num_prompts} / {cfg.eval_prompts})")
            write_jsonl([{"prompt": p} for p in train_prompts], d / "prompts_train.jsonl")
            write_jsonl([{"prompt": p} for p in eval_prompts], d / "prompts_eval.jsonl")
            return {"source": cfg.data or f"built-in corpus ({cfg.corpus_size} reviews, seed {cfg.seed})",
                    "reviews": len(reviews), "sft_texts": len(sft), "classifier_train": len(clf),
                    "heldout": len(held), "train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts)}

        return self.stages.run("data", key, run)

    def stage_reward(self) -> dict[str, Any]:
        cfg = self.cfg

        def run(d: Path) -> dict[str, Any]:
            if not cfg.data:
                held = read_jsonl(self.out / "data" / "heldout.jsonl")
                # how well the exact reward separates the latent labels (for comparison with a classifier)
                acc = sum((corpus_mod.valence(r["text"]) > 0) == bool(r["label"]) for r in held) / max(len(held), 1)
                return {**CorpusReward().info(), "valence_sign_accuracy_on_latent_labels": round(acc, 4)}
            clf = self._fit_classifier()
            self.log(f"[reward] classifier held-out accuracy {clf.accuracy:.4f} ({clf.test_size} reviews)")
            return clf.info()

        return self.stages.run("reward", {"kind": "classifier" if cfg.data else "corpus"}, run, after=["data"])

    def _fit_classifier(self) -> ClassifierReward:
        """The ground-truth classifier, fit on the data stage's split (deterministic for the seed, ~2 s). It is
        refit rather than unpickled, so no code is ever loaded from an output directory."""
        train = read_jsonl(self.out / "data" / "classifier_train.jsonl")
        test = read_jsonl(self.out / "data" / "heldout.jsonl")
        return train_classifier([r["text"] for r in train], [r["label"] for r in train],
                                [r["text"] for r in test], [r["label"] for r in test], seed=self.cfg.seed)

    @property
    def reward_fn(self) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
        if self._reward is None:
            self._reward = self._fit_classifier() if self.cfg.data else CorpusReward()
        return self._reward

    # -- SFT, samples, pairs --------------------------------------------------------------------------

    @property
    def sft_model(self) -> Path:
        return self.out / "sft" / "model"

    def stage_sft(self) -> dict[str, Any]:
        cfg = self.cfg
        key = {k: getattr(cfg, k) for k in ("size", "vocab_size", "max_length", "sft_steps", "sft_epochs", "sft_lr",
                                            "sft_batch_size", "micro_batch_size", "seed")}

        def run(d: Path) -> dict[str, Any]:
            from ..config import SFTConfig
            from ..models import init_model
            from ..train.sft import SFT_SUMMARY_KEYS, train_sft

            texts = [r["text"] for r in read_jsonl(self.out / "data" / "sft.jsonl")]
            init = init_model(cfg.size, d / "init", corpus=texts, vocab_size=cfg.vocab_size, seed=cfg.seed)
            mb = min(cfg.micro_batch_size, cfg.sft_batch_size)
            sft_cfg = SFTConfig(model=str(init), data=str(self.out / "data" / "sft.jsonl"), output_dir=str(d / "model"),
                                data_format="text", optimizer="adamw", lr=cfg.sft_lr, warmup_steps=20,
                                batch_size=cfg.sft_batch_size, micro_batch_size=_divisor(cfg.sft_batch_size, mb),
                                max_steps=cfg.sft_steps, epochs=cfg.sft_epochs, max_length=cfg.max_length,
                                max_prompt_length=cfg.max_length // 2, seed=cfg.seed, log_every=10,
                                progress=cfg.progress, eval_fraction=0.02)
            summary = train_sft(sft_cfg)
            info = json.loads((init / "prefopt_model.json").read_text())
            return {**_summary_numbers(summary, SFT_SUMMARY_KEYS), "parameters": info["parameters"],
                    "vocab_size": info["vocab_size"]}

        return self.stages.run("sft", key, run, after=["data"])

    def stage_samples(self) -> dict[str, Any]:
        cfg = self.cfg
        key = {"n": cfg.samples_per_prompt, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}

        def run(d: Path) -> dict[str, Any]:
            from ..generation import generate_samples, write_samples

            prompts = [r["prompt"] for r in read_jsonl(self.out / "data" / "prompts_train.jsonl")]
            model, tok = _load_lm(self.sft_model)
            samples = generate_samples(model, tok, prompts, num_samples=cfg.samples_per_prompt, temperature=1.0,
                                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                       batch_size=cfg.generation_batch_size, progress=cfg.progress)
            write_samples(samples, d / "samples.jsonl")
            return {"samples": len(samples), "prompts": len(prompts),
                    "eos_share": sum(s.ended_with_eos for s in samples) / len(samples),
                    "mean_length": sum(s.response_tokens for s in samples) / len(samples)}

        return self.stages.run("samples", key, run, after=["sft"])

    def stage_pairs(self) -> dict[str, Any]:
        def run(d: Path) -> dict[str, Any]:
            from ..label import PromptGroup, make_rows, score_groups

            groups: dict[int, PromptGroup] = {}
            duplicates = empty = 0
            # the pairs carry the sampled token ids, so DPO trains on exactly what pi_SFT sampled (no
            # re-tokenization, no EOS added to a sample cut at max_new_tokens)
            for row in read_jsonl(self.out / "samples" / "samples.jsonl"):
                g = groups.setdefault(row["prompt_index"], PromptGroup(row["prompt"], prompt_ids=row["prompt_ids"],
                                                                       response_ids=[], ended_with_eos=[]))
                if not row["response"].strip():  # an immediate EOS: preference data needs a non-empty response
                    empty += 1
                    continue
                if row["response_ids"] in g.response_ids:
                    duplicates += 1
                    continue
                g.responses.append(row["response"])
                g.response_ids.append(row["response_ids"])
                g.ended_with_eos.append(row["ended_with_eos"])
                g.sources.append(f"sample {row['prompt_index']}/{row['sample_index']}")
            group_list = list(groups.values())
            score_groups(group_list, self.reward_fn, batch_size=1024, name="ground-truth reward")
            rows, report = make_rows(group_list)
            report.duplicates = duplicates
            write_jsonl(rows, d / "pairs.jsonl")
            self.log(f"[pairs] {report.summary()}" + (f"; {empty} empty responses left out" if empty else ""))
            if len(rows) < 2:
                raise ConfigError("fewer than 2 preference pairs: sample more prompts (--num-prompts) or more "
                                  "completions per prompt (--samples-per-prompt)")
            mean = lambda xs: sum(xs) / len(xs)
            return {"pairs": len(rows), "skipped_ties": report.skipped_ties, "skipped_single": report.skipped_single,
                    "duplicates": duplicates, "empty": empty, "mean_chosen_reward": mean([r["chosen_score"] for r in rows]),
                    "mean_rejected_reward": mean([r["rejected_score"] for r in rows])}

        return self.stages.run("pairs", {"exact_ids": True}, run, after=["samples", "reward"])

    # -- methods ----------------------------------------------------------------------------------------

    def _pair_count(self) -> int:
        return len(read_jsonl(self.out / "pairs" / "pairs.jsonl"))

    def stage_dpo(self, beta: float) -> str:
        cfg = self.cfg
        name = f"dpo-beta{beta:g}"
        key = {"beta": beta, **{k: getattr(cfg, k) for k in ("dpo_steps", "dpo_epochs", "dpo_lr", "dpo_batch_size",
                                                             "dpo_warmup_steps", "micro_batch_size", "max_length")}}

        def run(d: Path) -> dict[str, Any]:
            from ..config import DPOConfig
            from ..train.dpo import DPO_SUMMARY_KEYS, train_dpo

            batch = min(cfg.dpo_batch_size, self._pair_count())
            dpo_cfg = DPOConfig(model=str(self.sft_model), data=str(self.out / "pairs" / "pairs.jsonl"),
                                output_dir=str(d / "model"), loss="sigmoid", beta=beta, optimizer="adamw",
                                lr=cfg.dpo_lr, warmup_steps=cfg.dpo_warmup_steps, batch_size=batch,
                                micro_batch_size=_divisor(batch, cfg.micro_batch_size), max_steps=cfg.dpo_steps,
                                epochs=cfg.dpo_epochs, max_length=cfg.max_length,
                                max_prompt_length=cfg.max_length // 2, seed=cfg.seed, log_every=5,
                                progress=cfg.progress, packing=True, cache_dir=str(self.out / "cache"))
            # packing + the precomputed reference (the default): the same losses as the plain path, less work
            return _summary_numbers(train_dpo(dpo_cfg), DPO_SUMMARY_KEYS)

        self.stages.run(name, key, run, after=["pairs", "sft"])
        return name

    def stage_rm(self) -> str:
        cfg = self.cfg
        key = {k: getattr(cfg, k) for k in ("rm_epochs", "rm_lr", "rm_batch_size", "micro_batch_size", "max_length")}

        def run(d: Path) -> dict[str, Any]:
            from ..config import RMConfig
            from ..train.rm import RM_SUMMARY_KEYS, train_rm

            n = self._pair_count()
            batch = min(cfg.rm_batch_size, max(1, int(n * 0.9)))
            rm_cfg = RMConfig(model=str(self.sft_model), data=str(self.out / "pairs" / "pairs.jsonl"),
                              output_dir=str(d / "model"), lr=cfg.rm_lr, warmup_steps=10, batch_size=batch,
                              micro_batch_size=_divisor(batch, cfg.micro_batch_size), epochs=cfg.rm_epochs,
                              max_length=cfg.max_length, max_prompt_length=cfg.max_length // 2, seed=cfg.seed,
                              eval_fraction=0.1 if n >= 20 else 0.0, log_every=5, progress=cfg.progress)
            return _summary_numbers(train_rm(rm_cfg), RM_SUMMARY_KEYS)

        self.stages.run("rm", key, run, after=["pairs", "sft"])
        return "rm"

    def stage_ppo(self, kl_coef: float, reward: str) -> str:
        cfg = self.cfg
        name = f"ppo-{reward}-kl{kl_coef:g}"
        key = {"kl_coef": kl_coef, "reward": reward, **{k: getattr(cfg, k) for k in (
            "ppo_steps", "ppo_lr", "ppo_rollout_batch_size", "ppo_batch_size", "ppo_epochs", "micro_batch_size",
            "max_new_tokens", "max_length")}}

        def run(d: Path) -> dict[str, Any]:
            from ..config import PPOConfig
            from ..train.ppo import PPO_SUMMARY_KEYS, train_ppo

            prompts = self.out / "data" / "prompts_train.jsonl"
            rollout = cfg.ppo_rollout_batch_size
            n_prompts = len({r["prompt"] for r in read_jsonl(prompts)})  # train_ppo keeps each prompt once
            if n_prompts < rollout:
                rollout = max(cfg.ppo_batch_size * (n_prompts // cfg.ppo_batch_size), 1)
            batch = min(cfg.ppo_batch_size, rollout)
            ppo_cfg = PPOConfig(model=str(self.sft_model), data=str(prompts), output_dir=str(d / "model"),
                                reward_model=str(self.out / "rm" / "model") if reward == "rm" else None,
                                kl_coef=kl_coef, lr=cfg.ppo_lr, max_steps=cfg.ppo_steps, rollout_batch_size=rollout,
                                batch_size=batch, micro_batch_size=_divisor(batch, cfg.micro_batch_size),
                                ppo_epochs=cfg.ppo_epochs, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                max_length=cfg.max_length, max_prompt_length=cfg.max_length // 2, seed=cfg.seed,
                                log_every=1, progress=cfg.progress)
            summary = train_ppo(ppo_cfg, reward_fn=self.reward_fn if reward == "gt" else None)
            return _summary_numbers(summary, PPO_SUMMARY_KEYS)

        self.stages.run(name, key, run, after=["sft", "reward"] + (["rm"] if reward == "rm" else []))
        return name

    # -- evaluation -------------------------------------------------------------------------------------

    def _eval_key(self) -> dict[str, Any]:
        return {k: getattr(self.cfg, k) for k in ("eval_samples", "max_new_tokens", "seed", "micro_batch_size")}

    def stage_eval(self, policy: str, method: str, setting: str) -> dict[str, Any]:
        """Evaluate ``<policy>/model`` (or pi_SFT for policy "sft") against pi_SFT on the evaluation prompts."""
        cfg = self.cfg

        def run(d: Path) -> dict[str, Any]:
            from ..eval.kl import clustered_mean, estimate_kl
            from ..generation import generate_samples

            prompts = [r["prompt"] for r in read_jsonl(self.out / "data" / "prompts_eval.jsonl")]
            model, tok = _load_lm(self.out / policy / "model")
            t0 = time.perf_counter()
            samples = generate_samples(model, tok, prompts, num_samples=cfg.eval_samples, temperature=1.0,
                                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7919,
                                       batch_size=cfg.generation_batch_size, progress=cfg.progress)
            gen_seconds = time.perf_counter() - t0
            reference = model if policy == "sft" else _load_lm(self.sft_model)[0]
            kl, lp, lr = estimate_kl(model, reference, samples, tok.pad_token_id, batch_size=cfg.micro_batch_size)
            rewards = self.reward_fn([s.prompt for s in samples], [s.response for s in samples])
            clusters = [s.prompt_index for s in samples]
            write_jsonl([{**s.row(), "reward": r, "logp": float(a), "ref_logp": float(b)}
                          for s, r, a, b in zip(samples, rewards, lp, lr)], d / "samples.jsonl")
            _free(model, reference)
            return {"method": method, "setting": setting, "policy": policy,
                    "reward": clustered_mean(rewards, clusters).to_dict(), "kl": kl.to_dict(),
                    "mean_length": sum(s.response_tokens for s in samples) / len(samples),
                    "eos_share": sum(s.ended_with_eos for s in samples) / len(samples),
                    "sampling_seconds": gen_seconds}

        after = ["data", "reward", "sft"] + ([policy] if policy != "sft" else [])
        return self.stages.run(f"eval-{policy}", self._eval_key(), run, after=after)

    def stage_best_of_n(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        key = {**self._eval_key(), "best_of_n": cfg.best_of_n, "selector": cfg.bon_selector}

        def run(d: Path) -> dict[str, Any]:
            from ..eval.kl import best_of_n_kl, clustered_mean
            from ..generation import generate_samples

            prompts = [r["prompt"] for r in read_jsonl(self.out / "data" / "prompts_eval.jsonl")]
            n_max = max(cfg.best_of_n)
            model, tok = _load_lm(self.sft_model)
            t0 = time.perf_counter()
            samples = generate_samples(model, tok, prompts, num_samples=n_max, temperature=1.0,
                                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 104729,
                                       batch_size=cfg.generation_batch_size, progress=cfg.progress)
            gen_seconds = time.perf_counter() - t0
            _free(model)
            texts = ([s.prompt for s in samples], [s.response for s in samples])
            true_r = self.reward_fn(*texts)
            if cfg.bon_selector == "reward_model":
                from ..rewards import reward_model_fn

                select_r = reward_model_fn(str(self.out / "rm" / "model"), batch_size=cfg.micro_batch_size)(*texts)
            else:
                select_r = true_r
            rows = []
            for n in sorted(cfg.best_of_n):
                picked = []
                for i in range(len(prompts)):
                    group = range(i * n_max, i * n_max + n)
                    picked.append(max(group, key=lambda j: select_r[j]))
                est = clustered_mean([true_r[j] for j in picked])  # one pick per prompt: each its own cluster
                exact = best_of_n_kl(n)
                rows.append({"method": "best-of-n", "setting": f"N={n}", "policy": f"best-of-{n}",
                             "reward": est.to_dict(), "kl": {"mean": exact, "se": 0.0, "n": len(picked),
                                                             "clusters": len(picked)},
                             "kl_exact": True, "selector": cfg.bon_selector,
                             "mean_length": sum(samples[j].response_tokens for j in picked) / len(picked),
                             "eos_share": sum(samples[j].ended_with_eos for j in picked) / len(picked),
                             # the cost of Best-of-N is sampling (N per prompt) and scoring, at inference time
                             "train_seconds": 0.0, "sampling_seconds": gen_seconds * n / n_max})
            write_jsonl([{**s.row(), "reward": r, "selector_score": q} for s, r, q in zip(samples, true_r, select_r)],
                         d / "samples.jsonl")
            return {"rows": rows}

        after = ["data", "reward", "sft"] + (["rm"] if cfg.bon_selector == "reward_model" else [])
        return self.stages.run("best-of-n", key, run, after=after)["rows"]

    # -- win rate against pi_SFT over sampling temperatures ---------------------------------------------
    #
    # The paper's temperature figure: each policy and pi_SFT are sampled on the same held-out prompts at the same
    # temperature, and the ground-truth reward judges each (policy, pi_SFT) pair of one prompt and sample index:
    # the higher reward wins, an equal one is a tie. pi_SFT as a policy is sampled with another seed than the
    # baseline, so against itself it is a fair coin (0.5), not a column of ties. Sampling is one stage per policy
    # (a new beta samples only the new policy); the judging is cheap and redone by every run.

    def _temperature_key(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"temperatures": cfg.temperatures, "prompts": cfg.temperature_prompts,
                "samples": cfg.temperature_samples, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}

    def _temperature_prompts(self) -> list[str]:
        prompts = [r["prompt"] for r in read_jsonl(self.out / "data" / "prompts_eval.jsonl")]
        return prompts[: self.cfg.temperature_prompts] if self.cfg.temperature_prompts else prompts

    def _sample_at_temperatures(self, model_dir: Path, seed: int, num_samples: int) -> list[dict[str, Any]]:
        """Rows {temperature, prompt, response, prompt_index, sample_index, ..., reward} of one model."""
        from ..generation import generate_samples

        cfg = self.cfg
        prompts = self._temperature_prompts()
        model, tok = _load_lm(model_dir)
        rows: list[dict[str, Any]] = []
        for k, t in enumerate(cfg.temperatures):
            samples = generate_samples(model, tok, prompts, num_samples=num_samples, temperature=t,
                                       max_new_tokens=cfg.max_new_tokens, seed=seed + 1009 * k,
                                       batch_size=cfg.generation_batch_size, progress=cfg.progress)
            rewards = self.reward_fn([s.prompt for s in samples], [s.response for s in samples])
            rows += [{"temperature": t, **s.row(), "reward": float(r)} for s, r in zip(samples, rewards)]
        _free(model)
        return rows

    def stage_temperature_samples(self, policy: str) -> str:
        """Samples of ``<policy>/model`` (pi_SFT for "sft"; pi_SFT with the baseline's seed for "baseline") at
        every temperature, with their ground-truth rewards."""
        cfg = self.cfg
        name = f"temperatures-{policy}"
        seed = cfg.seed + (TEMPERATURE_BASELINE_SEED if policy == "baseline" else TEMPERATURE_POLICY_SEED)

        def run(d: Path) -> dict[str, Any]:
            model_dir = self.sft_model if policy in ("sft", "baseline") else self.out / policy / "model"
            rows = self._sample_at_temperatures(model_dir, seed, cfg.temperature_samples)
            write_jsonl(rows, d / "samples.jsonl")
            return {"samples": len(rows)}

        after = ["data", "reward", "sft"] + ([] if policy in ("sft", "baseline") else [policy])
        self.stages.run(name, self._temperature_key(), run, after=after)
        return name

    def stage_temperature_best_of_n(self) -> str:
        """max(best_of_n) pi_SFT samples per (prompt, sample index) at every temperature; for each N, the pick of
        the first N by the Best-of-N selector (the ground truth or the RM), in ``picks.jsonl``."""
        cfg = self.cfg
        name = "temperatures-best-of-n"
        key = {**self._temperature_key(), "best_of_n": cfg.best_of_n, "selector": cfg.bon_selector}

        def run(d: Path) -> dict[str, Any]:
            n_max, k = max(cfg.best_of_n), cfg.temperature_samples
            rows = self._sample_at_temperatures(self.sft_model, cfg.seed + TEMPERATURE_POLICY_SEED, n_max * k)
            if cfg.bon_selector == "reward_model":
                from ..rewards import reward_model_fn

                rm = reward_model_fn(str(self.out / "rm" / "model"), batch_size=cfg.micro_batch_size)
                scores = rm([r["prompt"] for r in rows], [r["response"] for r in rows])
            else:
                scores = [r["reward"] for r in rows]
            by_key = {(r["temperature"], r["prompt_index"], r["sample_index"]): (r, q) for r, q in zip(rows, scores)}
            n_prompts = len(self._temperature_prompts())
            picks = []
            for t in cfg.temperatures:
                for i in range(n_prompts):
                    for s in range(k):
                        for n in sorted(cfg.best_of_n):
                            group = [by_key[(t, i, s * n_max + j)] for j in range(n)]
                            row, score = max(group, key=lambda g: g[1])  # the first of equal scores
                            picks.append({"temperature": t, "n": n, "prompt": row["prompt"], "prompt_index": i,
                                          "sample_index": s, "picked": row["sample_index"],
                                          "response": row["response"], "reward": row["reward"],
                                          "selector_score": float(score)})
            write_jsonl([{**r, "selector_score": float(q)} for r, q in zip(rows, scores)], d / "samples.jsonl")
            write_jsonl(picks, d / "picks.jsonl")
            return {"samples": len(rows), "picks": len(picks)}

        after = ["data", "reward", "sft"] + (["rm"] if cfg.bon_selector == "reward_model" else [])
        self.stages.run(name, key, run, after=after)
        return name

    def stage_temperatures(self, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
        """Sample every policy of ``rows`` (the reward-vs-KL rows: pi_SFT, DPO, PPO, Best-of-N) and pi_SFT at each
        temperature, judge them, and write temperatures.json, temperatures.md and win_rate_vs_temperature.png
        into the report folder."""
        cfg = self.cfg
        baseline = read_jsonl(self.out / self.stage_temperature_samples("baseline") / "samples.jsonl")
        policies: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        bon_picks: list[dict[str, Any]] | None = None
        for row in rows:
            if row["method"] == "best-of-n":
                if bon_picks is None:
                    bon_picks = read_jsonl(self.out / self.stage_temperature_best_of_n() / "picks.jsonl")
                n = int(row["setting"].split("=")[1])
                policies.append((row, [p for p in bon_picks if p["n"] == n]))
            else:
                samples = read_jsonl(self.out / self.stage_temperature_samples(row["policy"]) / "samples.jsonl")
                policies.append((row, samples))
        table = temperature_table(policies, baseline, cfg.temperatures, seed=cfg.seed)
        reward_name = "classifier log-odds" if cfg.data else "exact corpus valence"
        table["judge"] = f"ground-truth reward ({reward_name}): higher wins, equal is a tie"
        table["prompts"] = len(self._temperature_prompts())
        table["samples_per_prompt"] = cfg.temperature_samples
        d = self.out / "report"
        d.mkdir(parents=True, exist_ok=True)
        json_path, md_path, png = d / "temperatures.json", d / "temperatures.md", d / "win_rate_vs_temperature.png"
        json_path.write_text(json.dumps(_finite_json(table), indent=2) + "\n")
        md_path.write_text(temperature_markdown(table))
        plot_win_rate_vs_temperature(table, png)
        self.log(f"[temperatures] {md_path}  {json_path}  {png}")
        return {"json": str(json_path), "markdown": str(md_path), "plot": str(png)}

    # -- the whole run ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "experiment.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        data = self.stage_data()
        reward_info = self.stage_reward()
        sft = self.stage_sft()
        rows: list[dict[str, Any]] = []
        rows.append({**self.stage_eval("sft", "sft", "π_SFT"), "train_seconds": self.stages.seconds["sft"]})
        pair_info: dict[str, Any] = {}
        if "dpo" in cfg.methods or "ppo-rm" in cfg.methods:
            self.stage_samples()
            pair_info = self.stage_pairs()
        if "dpo" in cfg.methods:
            for beta in cfg.betas:
                name = self.stage_dpo(beta)
                rows.append({**self.stage_eval(name, "dpo", f"β={beta:g}"), "train_seconds": self.stages.seconds[name]})
        if "ppo-rm" in cfg.methods:
            self.stage_rm()
            for c in cfg.kl_coefs:
                name = self.stage_ppo(c, "rm")
                rows.append({**self.stage_eval(name, "ppo-rm", f"kl_coef={c:g}"),
                             "train_seconds": self.stages.seconds[name] + self.stages.seconds["rm"]})
        if "ppo-gt" in cfg.methods:
            for c in cfg.kl_coefs:
                name = self.stage_ppo(c, "gt")
                rows.append({**self.stage_eval(name, "ppo-gt", f"kl_coef={c:g}"),
                             "train_seconds": self.stages.seconds[name]})
        if "best-of-n" in cfg.methods:
            if cfg.bon_selector == "reward_model":
                self.stage_rm()
            rows.extend(self.stage_best_of_n())
        temperatures = self.stage_temperatures(rows) if cfg.temperatures else {}
        meta = {"data": data["source"], **{k: v for k, v in reward_info.items() if v is not None},
                "model": f"{cfg.size} ({sft.get('parameters', 0) / 1e6:.2f}M parameters)",
                "sft": f"{sft.get('steps')} steps in {self.stages.seconds['sft']:.0f} s, final loss "
                       f"{sft.get('train/loss', math.nan):.3f}",
                "training prompts": f"{data['train_prompts']} x {cfg.samples_per_prompt} samples"
                                    + (f" -> {pair_info['pairs']} pairs (best vs worst)" if pair_info else ""),
                "evaluation": f"{data['eval_prompts']} held-out prompts x {cfg.eval_samples} samples, temperature 1, "
                              f"max {cfg.max_new_tokens} new tokens; KL(π‖π_SFT) and reward: mean ± SE clustered by "
                              "prompt",
                **({"win rate vs temperature": f"every policy against π_SFT at temperatures "
                    f"{', '.join(f'{t:g}' for t in cfg.temperatures)}, judged by the ground truth: "
                    f"{Path(temperatures['markdown']).name}, {Path(temperatures['plot']).name}"}
                   if temperatures else {}),
                "shared stage times (s)": ", ".join(f"{s} {self.stages.seconds[s]:.0f}" for s in
                                                    ("sft", "samples", "pairs", "rm") if s in self.stages.seconds)}
        report = self.stage_report(rows, meta)
        total = time.perf_counter() - started
        return {"rows": rows, "meta": meta, **report, "temperatures": temperatures, "seconds": total,
                "skipped": list(self.stages.skipped), "ran": list(self.stages.ran)}

    def stage_report(self, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, str]:
        from ..eval.plots import plot_reward_vs_kl
        from ..eval.report import write_report

        notes = ["Train time: the method's own stage (wall clock, this machine); PPO-RM includes its reward "
                 "model; π_SFT's is the SFT stage. Shared stages (SFT, sampling, labelling) are listed above.",
                 "Best-of-N: KL is the closed form log N − (N−1)/N (an upper bound when rewards tie); its cost is "
                 "N samples per prompt at inference."]
        reward_name = "classifier log-odds" if self.cfg.data else "exact corpus valence"
        # the report is cheap: rewritten every run, so it always shows the current rows
        d = self.out / "report"
        d.mkdir(parents=True, exist_ok=True)
        json_path, md_path = write_report(rows, d, meta=meta, title="Sentiment experiment: reward vs KL",
                                          notes=notes)
        png = plot_reward_vs_kl(rows, d / "reward_vs_kl.png", title="Controlled sentiment generation",
                                reward_label=f"mean ground-truth reward ({reward_name})")
        (d / "done").write_text(json.dumps({"rows": len(rows)}) + "\n")
        self.log(f"[report] {md_path}  {json_path}  {png}")
        return {"json": str(json_path), "markdown": str(md_path), "plot": str(png)}


TEMPERATURE_POLICY_SEED = 15485863
"""Seed offsets of the temperature figure's samples: every policy shares one (common random numbers across
policies), the pi_SFT baseline has its own, so pi_SFT against the baseline compares independent samples."""
TEMPERATURE_BASELINE_SEED = 32452843


def judge_by_reward(policy_reward: float, baseline_reward: float) -> str:
    """The ground-truth judge's verdict: the higher reward wins, an equal one is a tie."""
    if policy_reward > baseline_reward:
        return "policy"
    return "baseline" if policy_reward < baseline_reward else "tie"


def temperature_table(policies: Sequence[tuple[dict[str, Any], Sequence[dict[str, Any]]]],
                      baseline: Sequence[dict[str, Any]], temperatures: Sequence[float], *,
                      seed: int = 0) -> dict[str, Any]:
    """Win rate of each policy against the baseline at each temperature. ``policies``: (a reward-vs-KL row with
    policy, method and setting; its sample rows), sample rows being {temperature, prompt_index, sample_index,
    reward}; each is judged against the baseline row of the same temperature, prompt and sample index
    (``eval.winrate.summarize_verdicts``, clustered by prompt)."""
    from ..eval.winrate import summarize_verdicts

    base = {(r["temperature"], r["prompt_index"], r["sample_index"]): r["reward"] for r in baseline}
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan
    out = []
    for info, samples in policies:
        per_t = []
        for t in temperatures:
            mine = [r for r in samples if r["temperature"] == t]
            missing = [r for r in mine if (t, r["prompt_index"], r["sample_index"]) not in base]
            if missing:
                raise ValueError(f"{info['policy']}: no baseline sample for temperature {t}, prompt "
                                 f"{missing[0]['prompt_index']}, sample {missing[0]['sample_index']}")
            opponents = [base[(t, r["prompt_index"], r["sample_index"])] for r in mine]
            verdicts = [judge_by_reward(r["reward"], b) for r, b in zip(mine, opponents)]
            s = summarize_verdicts(verdicts, [r["prompt_index"] for r in mine], seed=seed)
            per_t.append({"temperature": t, **s.as_dict(), "mean_reward": mean([r["reward"] for r in mine]),
                          "baseline_mean_reward": mean(opponents)})
        out.append({"policy": info["policy"], "method": info["method"], "setting": info["setting"],
                    "per_temperature": per_t})
    return {"baseline": "π_SFT sampled at the same temperature (another seed)", "temperatures": list(temperatures),
            "rows": out}


def _finite_json(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_json(v) for v in x]
    return x


def _rate(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"


def temperature_markdown(table: dict[str, Any]) -> str:
    temps = table["temperatures"]
    lines = ["# Win rate against π_SFT by sampling temperature", "",
             f"Judge: {table.get('judge', 'ground-truth reward')}. Baseline: {table['baseline']}. "
             f"{table.get('prompts', '?')} held-out prompts x {table.get('samples_per_prompt', '?')} sample(s) per "
             "temperature; win rate (ties count half) [95 % interval]; the last column is the win rate at the "
             "highest temperature minus the one at the lowest.", "",
             "| method | setting | " + " | ".join(f"T={t:g}" for t in temps) + " | change |",
             "|---|---|" + "---:|" * (len(temps) + 1)]
    for row in table["rows"]:
        pts = row["per_temperature"]
        cells = [f"{_rate(p['win_rate'])} [{_rate(p['ci_low'])}, {_rate(p['ci_high'])}]" for p in pts]
        first, last = pts[0]["win_rate"], pts[-1]["win_rate"]
        change = last - first if first is not None and last is not None else math.nan
        lines.append(f"| {row['method']} | {row['setting']} | " + " | ".join(cells) +
                     (" | –" if not math.isfinite(change) else f" | {change:+.2f}") + " |")
    lines += ["", "Wins / ties / losses per cell (policy against π_SFT):", "",
              "| method | setting | " + " | ".join(f"T={t:g}" for t in temps) + " |",
              "|---|---|" + "---:|" * len(temps)]
    for row in table["rows"]:
        lines.append(f"| {row['method']} | {row['setting']} | " +
                     " | ".join(f"{p['wins']}/{p['ties']}/{p['losses']}" for p in row["per_temperature"]) + " |")
    return "\n".join(lines) + "\n"


PLOT_STYLE = {"sft": ("grey", "-"), "dpo": ("tab:blue", "-"), "ppo-gt": ("tab:orange", "--"),
              "ppo-rm": ("tab:green", "-."), "best-of-n": ("tab:purple", ":")}


def plot_win_rate_vs_temperature(table: dict[str, Any], path: str | Path, *,
                                 title: str = "Win rate against π_SFT (ground-truth judge)") -> Path:
    """One line per policy: win rate against temperature with its 95 % interval as error bars (lines of one
    method share a colour family and a line style; points are spread a little along x so the bars stay apart)."""
    from matplotlib import colors

    from ..eval.plots import plot_win_rates

    rows, temps = table["rows"], table["temperatures"]
    span = (max(temps) - min(temps)) or 1.0
    seen: dict[str, int] = {}
    lines = []
    for j, row in enumerate(rows):
        colour, style = PLOT_STYLE.get(row["method"], ("black", "-"))
        shade = seen.get(row["method"], 0)
        seen[row["method"]] = shade + 1
        rgb = tuple(c + (1 - c) * min(0.45 * shade, 0.7) for c in colors.to_rgb(colour))  # later settings lighter
        lines.append({"label": f"{row['method']} {row['setting']}", "points": row["per_temperature"],
                      "color": rgb, "linestyle": style, "dx": (j - (len(rows) - 1) / 2) * 0.012 * span})
    return plot_win_rates(lines, path, title=title, xlabel="sampling temperature (policy and π_SFT alike)",
                          ylabel="win rate against π_SFT (ties count half)", size=(8.0, 5.0), dpi=100,
                          legend_outside=True, xticks=temps)


def _divisor(batch: int, micro: int) -> int:
    """The largest micro-batch <= micro that divides batch."""
    micro = max(1, min(micro, batch))
    while batch % micro:
        micro -= 1
    return micro


def run_sentiment(cfg: SentimentConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the experiment; returns {rows, meta, json, markdown, plot, temperatures, seconds, skipped,
    ran} (temperatures: the win-rate table's json, markdown and plot paths; empty without temperatures)."""
    return SentimentExperiment(cfg, log).run()


__all__ = ["METHODS", "SentimentConfig", "SentimentExperiment", "run_sentiment", "temperature_table",
           "temperature_markdown", "plot_win_rate_vs_temperature", "judge_by_reward"]

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
    report    results.json, results.md and reward_vs_kl.png

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
            for row in read_jsonl(self.out / "samples" / "samples.jsonl"):
                g = groups.setdefault(row["prompt_index"], PromptGroup(row["prompt"]))
                if not row["response"].strip():  # an immediate EOS: preference data needs a non-empty response
                    empty += 1
                    continue
                if row["response"] in g.responses:
                    duplicates += 1
                    continue
                g.responses.append(row["response"])
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

        return self.stages.run("pairs", {}, run, after=["samples", "reward"])

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
        meta = {"data": data["source"], **{k: v for k, v in reward_info.items() if v is not None},
                "model": f"{cfg.size} ({sft.get('parameters', 0) / 1e6:.2f}M parameters)",
                "sft": f"{sft.get('steps')} steps in {self.stages.seconds['sft']:.0f} s, final loss "
                       f"{sft.get('train/loss', math.nan):.3f}",
                "training prompts": f"{data['train_prompts']} x {cfg.samples_per_prompt} samples"
                                    + (f" -> {pair_info['pairs']} pairs (best vs worst)" if pair_info else ""),
                "evaluation": f"{data['eval_prompts']} held-out prompts x {cfg.eval_samples} samples, temperature 1, "
                              f"max {cfg.max_new_tokens} new tokens; KL(π‖π_SFT) and reward: mean ± SE clustered by "
                              "prompt",
                "shared stage times (s)": ", ".join(f"{s} {self.stages.seconds[s]:.0f}" for s in
                                                    ("sft", "samples", "pairs", "rm") if s in self.stages.seconds)}
        report = self.stage_report(rows, meta)
        total = time.perf_counter() - started
        return {"rows": rows, "meta": meta, **report, "seconds": total, "skipped": list(self.stages.skipped),
                "ran": list(self.stages.ran)}

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


def _divisor(batch: int, micro: int) -> int:
    """The largest micro-batch <= micro that divides batch."""
    micro = max(1, min(micro, batch))
    while batch % micro:
        micro -= 1
    return micro


def run_sentiment(cfg: SentimentConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the experiment; returns {rows, meta, json, markdown, plot, seconds, skipped, ran}."""
    return SentimentExperiment(cfg, log).run()


__all__ = ["METHODS", "SentimentConfig", "SentimentExperiment", "run_sentiment"]

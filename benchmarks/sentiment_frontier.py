"""The DPO paper's sentiment frontier (Figure 2) on rt-polarity: DPO against PPO, reward against KL.

Not a test; run by hand from the repository root:

    python benchmarks/sentiment_frontier.py                 # 3 seeds, 800 prompts x 4 samples (hours on 2 cores)
    python benchmarks/sentiment_frontier.py --quick         # tiny budget, 1 seed: checks the pipeline end to end
    python benchmarks/sentiment_frontier.py --seeds 1 --set kl_coefs=0.05,0.2 --output-dir runs/f1   # one seed, changed budget
    python benchmarks/sentiment_frontier.py --merge runs/f0,runs/f1,runs/f2 --output-dir runs/f   # seeds run apart -> one report

Each seed is one ``prefopt experiment sentiment`` run (``prefopt.experiments.sentiment``) on
``../shared/data/rt-polarity``: a fresh Llama-style model SFT'd on half of the reviews, a TF-IDF + logistic
regression classifier trained on 40% of them as the ground-truth reward (log-odds; its held-out accuracy is
reported), completions of training prefixes sampled from pi_SFT and labelled best vs worst, then DPO at several
betas, PPO with a learned reward model and PPO with the ground-truth reward at several KL coefficients, and
Best-of-N from pi_SFT. Every policy is evaluated on held-out prefixes: mean reward and KL(pi || pi_SFT)
estimated from samples (SE clustered by prompt). Runs are resumable: rerunning the same command skips the
finished stages of every seed.

Reported (``<out>/frontier.json`` and ``<out>/frontier.md``, plus every seed's own report and a combined plot):

* reward by KL bin for each method, over all seeds and settings (mean of the points in the bin, their count);
* every point: method, setting, seed, reward ± SE, KL ± SE, training wall time;
* mean training wall time per method and setting;
* pair accuracy on held-out pairs (best vs worst of pi_SFT's samples for the evaluation prefixes, by the
  ground-truth reward) of each DPO policy's implicit reward beta (log pi - log pi_SFT) (``prefopt.score``) and of
  the explicit reward model used by PPO-RM;
* win rate of every policy against pi_SFT at sampling temperatures 0.25-1 (the paper's temperature figure),
  judged by the ground-truth classifier, per seed (``win_rate_vs_temperature_seed<k>.png`` beside the report).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RT = REPO.parent / "shared" / "data" / "rt-polarity"
KL_BINS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, math.inf)

FULL = dict(size="small", num_prompts=800, samples_per_prompt=4, eval_prompts=500, eval_samples=4,
            max_new_tokens=48, sft_epochs=3, sft_lr=1e-3, betas=[0.05, 0.1, 0.25, 0.5, 1.0], dpo_lr=5e-5,
            dpo_batch_size=16, dpo_epochs=3, kl_coefs=[0.02, 0.05, 0.1, 0.2], ppo_steps=60, ppo_lr=1e-5,
            ppo_rollout_batch_size=64, ppo_batch_size=16, ppo_epochs=4, rm_epochs=2, best_of_n=[2, 4, 16, 64],
            generation_batch_size=128, temperature_prompts=200)
QUICK = dict(size="tiny", num_prompts=128, samples_per_prompt=4, eval_prompts=64, eval_samples=2,
             max_new_tokens=32, sft_steps=150, sft_lr=3e-3, betas=[0.1, 0.5], dpo_lr=5e-4, dpo_batch_size=16,
             dpo_steps=30, kl_coefs=[0.05, 0.2], ppo_steps=6, ppo_lr=5e-5, ppo_rollout_batch_size=32,
             ppo_batch_size=16, ppo_epochs=2, rm_epochs=2, rm_lr=3e-4, best_of_n=[4, 16], generation_batch_size=128,
             max_length=96, temperature_prompts=64, temperature_samples=1)


def heldout_pairs(seed_dir: Path) -> list[Any]:
    """Best vs worst (by the ground-truth reward) of pi_SFT's evaluation samples of each prompt."""
    from prefopt.data.types import PreferenceExample

    groups: dict[int, list[dict]] = {}
    for line in (seed_dir / "eval-sft" / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["response"].strip():
            groups.setdefault(row["prompt_index"], []).append(row)
    pairs = []
    for rows in groups.values():
        best = max(rows, key=lambda r: r["reward"])
        worst = min(rows, key=lambda r: r["reward"])
        if best["reward"] > worst["reward"] and best["response"] != worst["response"]:
            pairs.append(PreferenceExample(best["prompt"], [best["response"], worst["response"]],
                                           f"prompt {best['prompt_index']}"))
    return pairs


def pair_accuracies(seed_dir: Path, betas: list[float], with_rm: bool) -> dict[str, Any]:
    """Implicit-reward accuracy of each DPO policy (prefopt.score) and the RM's accuracy on held-out pairs."""
    import torch

    from prefopt.models import load_model, load_tokenizer
    from prefopt.score import pair_metrics, score_examples

    pairs = heldout_pairs(seed_dir)
    out: dict[str, Any] = {"heldout_pairs": len(pairs)}
    if not pairs:
        return out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = load_model(seed_dir / "sft" / "model", device=device)
    tokenizer = load_tokenizer(seed_dir / "sft" / "model")
    for beta in betas:
        policy_dir = seed_dir / f"dpo-beta{beta:g}" / "model"
        if not policy_dir.is_dir():
            continue
        policy = load_model(policy_dir, device=device)
        scored = score_examples(policy, reference, tokenizer, pairs, beta, batch_size=16)
        out[f"dpo β={beta:g}"] = pair_metrics(scored.rewards)
        del policy
    if with_rm and (seed_dir / "rm" / "model").is_dir():
        from prefopt.rewards import reward_model_fn

        rm = reward_model_fn(str(seed_dir / "rm" / "model"), batch_size=16)
        scores = rm([p.prompt for p in pairs for _ in range(2)], [r for p in pairs for r in p.responses])
        out["reward model"] = pair_metrics(torch.tensor(scores).view(-1, 2))
    return out


def kl_bins(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    methods = sorted({p["method"] for p in points if p["method"] != "sft"})
    for lo, hi in zip(KL_BINS, KL_BINS[1:]):
        row: dict[str, Any] = {"kl_bin": f"[{lo:g}, {hi:g})"}
        for m in methods:
            rewards = [p["reward"]["mean"] for p in points if p["method"] == m and lo <= p["kl"]["mean"] < hi]
            row[m] = {"mean_reward": statistics.fmean(rewards), "points": len(rewards)} if rewards else None
        rows.append(row)
    return rows


def markdown(summary: dict[str, Any]) -> str:
    methods = sorted({p["method"] for p in summary["points"] if p["method"] != "sft"})
    lines = [f"Seeds {summary['seeds']}, data {summary['data']}, budget {summary['budget']}; "
             f"total wall time {summary['seconds'] / 60:.1f} min; device {summary['device']}.", ""]
    lines.append("Mean ground-truth reward by KL(π‖π_SFT) bin (points in the bin), all seeds and settings:")
    lines.append("")
    lines.append("| KL bin (nats) | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---:|" * len(methods))
    for row in summary["kl_bins"]:
        cells = [f"{row[m]['mean_reward']:+.2f} ({row[m]['points']})" if row.get(m) else "–" for m in methods]
        lines.append(f"| {row['kl_bin']} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | method | setting | reward | KL (nats) | train time (s) |", "|---|---|---|---:|---:|---:|"]
    for p in summary["points"]:
        kl = f"{p['kl']['mean']:.2f}" + (" (formula)" if p.get("kl_exact") else f" ± {p['kl']['se']:.2f}")
        lines.append(f"| {p['seed']} | {p['method']} | {p['setting']} | {p['reward']['mean']:+.2f} ± "
                     f"{p['reward']['se']:.2f} | {kl} | {p.get('train_seconds', 0):.0f} |")
    lines += ["", "Held-out pair accuracy (best vs worst of π_SFT samples by the ground truth): DPO implicit reward "
              "β(log π − log π_SFT) vs the PPO reward model:", ""]
    for seed, acc in summary["accuracy"].items():
        parts = [f"{k} {v['accuracy']:.3f}" for k, v in acc.items() if isinstance(v, dict) and "accuracy" in v]
        lines.append(f"- seed {seed} ({acc.get('heldout_pairs', 0)} pairs): " + ", ".join(parts))
    for seed, info in summary["reward"].items():
        lines.append(f"- seed {seed} ground truth: {info}")
    for seed, table in summary.get("temperatures", {}).items():
        lines += ["", f"Seed {seed}: " + table["markdown"].split("\n", 2)[2].strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and budget, one seed")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--data", default=str(RT), help="rt-polarity-style folder (*.pos / *.neg)")
    parser.add_argument("--output-dir", default=None, help="default runs/sentiment_frontier[_quick]")
    parser.add_argument("--methods", default="dpo,ppo-rm,ppo-gt,best-of-n")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a budget entry (a SentimentConfig field; lists comma-separated), repeatable")
    parser.add_argument("--merge", default=None, metavar="DIRS",
                        help="comma-separated output dirs of runs made apart (e.g. one seed each): combine their "
                             "frontier.json into one report in --output-dir, without running anything")
    args = parser.parse_args(argv)
    if args.merge:
        return merge([Path(d) for d in args.merge.split(",")], Path(args.output_dir or "runs/sentiment_frontier"))

    import torch

    from prefopt.experiments.sentiment import SentimentConfig, run_sentiment

    if not Path(args.data).is_dir():
        print(f"rt-polarity not found at {args.data} (it lives in ../shared/data beside the repository)",
              file=sys.stderr)
        return 2
    budget = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in budget and key not in SentimentConfig.__dataclass_fields__:
            parser.error(f"--set {item}: unknown key {key!r}")
        budget[key] = [float(v) if "." in v else int(v) for v in value.split(",")] if "," in value or \
            isinstance(budget.get(key), list) else (float(value) if "." in value else int(value))
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    out = Path(args.output_dir or ("runs/sentiment_frontier_quick" if args.quick else "runs/sentiment_frontier"))
    methods = args.methods.split(",")
    started = time.perf_counter()
    points, accuracy, reward_info, temperatures = [], {}, {}, {}
    for seed in seeds:
        cfg = SentimentConfig(output_dir=str(out / f"seed{seed}"), data=args.data, seed=seed, methods=methods,
                              progress=False, **budget)  # type: ignore[arg-type]
        result = run_sentiment(cfg)
        for row in result["rows"]:
            points.append({**row, "seed": seed})
        reward_info[seed] = {k: v for k, v in result["meta"].items() if "classifier" in k or k == "reward"}
        accuracy[seed] = pair_accuracies(out / f"seed{seed}", cfg.betas, "ppo-rm" in methods)
        if result.get("temperatures"):
            paths = result["temperatures"]
            temperatures[seed] = {"table": json.loads(Path(paths["json"]).read_text()),
                                  "markdown": Path(paths["markdown"]).read_text()}
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths["plot"], out / f"win_rate_vs_temperature_seed{seed}.png")
    summary = {"seeds": seeds, "data": args.data,
               "budget": ("quick" if args.quick else "full") + (" with " + ", ".join(args.set) if args.set else ""),
               "config": budget,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "seconds": time.perf_counter() - started, "points": points, "kl_bins": kl_bins(points),
               "accuracy": accuracy, "reward": reward_info, "temperatures": temperatures}
    return write_outputs(summary, out)


def write_outputs(summary: dict[str, Any], out: Path) -> int:
    from prefopt.eval.plots import plot_reward_vs_kl

    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    md = markdown(summary)
    (out / "frontier.md").write_text(md)
    plot_reward_vs_kl(summary["points"], out / "frontier.png", title="rt-polarity: reward vs KL (all seeds)",
                      reward_label="classifier log-odds (ground truth)")
    print(md)
    print(f"wrote {out / 'frontier.json'}, {out / 'frontier.md'}, {out / 'frontier.png'}")
    return 0


def merge(dirs: list[Path], out: Path) -> int:
    """One report from several runs' frontier.json (e.g. seeds run as separate processes)."""
    parts = [json.loads((d / "frontier.json").read_text()) for d in dirs]
    points = [p for s in parts for p in s["points"]]
    summary = {"seeds": [x for s in parts for x in s["seeds"]], "data": parts[0]["data"],
               "budget": parts[0]["budget"], "config": parts[0]["config"], "device": parts[0]["device"],
               "seconds": max(s["seconds"] for s in parts), "points": points, "kl_bins": kl_bins(points),
               "accuracy": {k: v for s in parts for k, v in s["accuracy"].items()},
               "reward": {k: v for s in parts for k, v in s["reward"].items()},
               "temperatures": {k: v for s in parts for k, v in s.get("temperatures", {}).items()}}
    return write_outputs(summary, out)


if __name__ == "__main__":
    sys.exit(main())

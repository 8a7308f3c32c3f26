"""Reward against KL(pi || pi_ref), one series per method (the DPO paper's Figure 2, left)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKERS = {"sft": "s", "dpo": "o", "ppo-rm": "^", "ppo-gt": "v", "best-of-n": "D"}


def _finite(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not math.isnan(x) else 0.0


def plot_reward_vs_kl(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "Reward vs KL",
                      reward_label: str = "mean ground-truth reward") -> Path:
    """Points and lines per method and seed (rows as in ``eval.report``), error bars = clustered SE; each point is
    annotated with its setting (beta, kl_coef, N) and, with several seeds, the seed. Written with the
    non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    methods: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        methods.setdefault(str(r["method"]), []).append(r)
    for method, items in methods.items():
        # one line per seed (rows from several seeds share a colour and a legend entry, never a line)
        seeds: dict[Any, list[dict[str, Any]]] = {}
        for r in items:
            seeds.setdefault(r.get("seed"), []).append(r)
        color = None
        for i, (seed, group) in enumerate(sorted(seeds.items(), key=lambda kv: str(kv[0]))):
            group = sorted(group, key=lambda r: r["kl"]["mean"])
            xs = [r["kl"]["mean"] for r in group]
            ys = [r["reward"]["mean"] for r in group]
            xerr = [_finite(r["kl"].get("se")) for r in group]
            yerr = [_finite(r["reward"].get("se")) for r in group]
            line = ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker=MARKERS.get(method, "o"),
                               linestyle="-" if len(xs) > 1 else "none", capsize=3, color=color,
                               label=method if i == 0 else None, alpha=0.9)
            color = line.lines[0].get_color()
            for x, y, r in zip(xs, ys, group):
                if r.get("setting"):
                    label = str(r["setting"]) + (f" s{seed}" if len(seeds) > 1 and seed is not None else "")
                    ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
    ax.set_xlabel("KL(π ‖ π_ref) (nats per sequence)")
    ax.set_ylabel(reward_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["plot_reward_vs_kl"]

"""Plots: reward against KL(pi || pi_ref), one series per method (the DPO paper's Figure 2, left), win rate against
sampling temperature (its Figure 3: ``prefopt eval`` and the sentiment experiment), and training curves from runs'
``metrics.jsonl``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKERS = {"sft": "s", "dpo": "o", "ppo-rm": "^", "ppo-gt": "v", "best-of-n": "D"}


def _finite(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not math.isnan(x) else 0.0


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` (making its folder) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_win_rates(lines: Sequence[dict[str, Any]], path: str | Path, *, title: str,
                   xlabel: str = "sampling temperature", ylabel: str = "win rate (ties count half)",
                   size: tuple[float, float] = (7.0, 4.5), dpi: int = 100, legend_outside: bool = False,
                   xticks: Sequence[float] | None = None) -> Path:
    """Win rate against sampling temperature, one line per entry of ``lines``: ``{"label", "points"}`` with points
    ``{"temperature", "win_rate", "ci_low", "ci_high"}`` (the 95 % interval drawn as error bars; points without a
    finite win rate left out), and optional ``color``, ``linestyle`` and ``dx`` (a shift along x that keeps
    overlapping bars apart). Even (0.5) is dashed. The PNG is ``size`` x ``dpi`` pixels."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    for line in lines:
        pts = [p for p in line["points"] if p.get("win_rate") is not None and math.isfinite(p["win_rate"])]
        if not pts:
            continue
        ys = [p["win_rate"] for p in pts]
        ax.errorbar([p["temperature"] + line.get("dx", 0.0) for p in pts], ys,
                    yerr=[[max(0.0, y - p["ci_low"]) for y, p in zip(ys, pts)],
                          [max(0.0, p["ci_high"] - y) for y, p in zip(ys, pts)]],
                    color=line.get("color"), linestyle=line.get("linestyle", "-"), marker="o",
                    markersize=4 if legend_outside else 6, capsize=3 if legend_outside else 4, label=line["label"])
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="even (0.5)")
    if xticks is not None:
        ax.set_xticks(list(xticks))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend_outside:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    else:
        ax.legend(loc="best")
    return save_figure(fig, path)


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
    return save_figure(fig, path)


# Training curves ------------------------------------------------------------------------------------------------

#: Metric groups drawn on one figure each (file stem, title, keys); keys not listed here get a figure of their own.
CURVE_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "Loss", ("loss",)),
    ("rewards", "Implicit rewards", ("rewards/margins", "rewards/chosen", "rewards/rejected")),
    ("accuracy", "Accuracy", ("rewards/accuracies", "accuracy")),
    ("logps", "Log-probabilities", ("logps/chosen", "logps/rejected")),
)
#: Not plotted: the x axis, and timing/throughput (they measure the machine, not the training).
_SKIPPED = {"step", "epoch", "elapsed", "time", "timestamp"}
CURVE_SIZE = (8.0, 4.8)  # inches, at CURVE_DPI: PNGs of 800 x 480 pixels
CURVE_DPI = 100


def _skipped(key: str) -> bool:
    return key in _SKIPPED or key.endswith(("_per_second", "_seconds", "/time"))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<run_dir>/metrics.jsonl``. A truncated last line (a run killed mid-write) is ignored; any
    other unreadable line, or a folder without the file, is a ``ConfigError`` naming it."""
    from ..errors import ConfigError

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl in this folder (is it a training run's --output-dir?)")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ConfigError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) for every numeric key (bools excluded); non-finite values become gaps (NaN)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for n, row in enumerate(rows):
        step = row.get("step", n)
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        for k, v in row.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(float(step))
            ys.append(float(v) if math.isfinite(v) else math.nan)
    return out


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.resolve().name or str(p) for p in run_dirs]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def plot_training_curves(run_dirs: Sequence[str | Path], output_dir: str | Path,
                         keys: Sequence[str] | None = None) -> list[Path]:
    """One PNG per metric group present in the runs' ``metrics.jsonl`` (see ``CURVE_GROUPS``; any other numeric
    key, e.g. SFT's ``nll_per_token`` or PPO's ``kl``, gets its own figure, as do ``lr`` and ``grad_norm``), x = step,
    several runs overlaid (legend = run folder name), evaluation rows (``eval/<key>``) dashed with markers.
    Throughput keys (``*_per_second``) are skipped. ``keys`` (names without the ``eval/`` prefix) limits the plot
    to those metrics; one no run has is a ``ConfigError``. Returns the written paths."""
    from ..errors import ConfigError

    if not run_dirs:
        raise ConfigError("plot: give at least one run folder")
    dirs = [Path(d) for d in run_dirs]
    runs = [_series(read_metrics(d)) for d in dirs]
    labels = _run_labels(dirs)

    present: list[str] = []  # base keys (no eval/ prefix), in first-seen order
    for series in runs:
        for k in series:
            base = k[len("eval/"):] if k.startswith("eval/") else k
            if not _skipped(base) and base not in present:
                present.append(base)
    if keys is not None:
        wanted = [k.strip() for k in keys if k.strip()]
        missing = [k for k in wanted if k not in present]
        if missing:
            raise ConfigError(f"plot: no run has the metric(s) {', '.join(missing)} "
                              f"(present: {', '.join(present) or 'none'})")
        present = [k for k in present if k in wanted]
    if not present:
        raise ConfigError(f"plot: no numeric metrics to plot in {', '.join(str(d) for d in dirs)}")

    figures: list[tuple[str, str, list[str]]] = []
    grouped: set[str] = set()
    for stem, title, group in CURVE_GROUPS:
        members = [k for k in group if k in present]
        if members:
            figures.append((stem, title, members))
            grouped.update(members)
    for k in present:
        if k not in grouped:
            figures.append((re.sub(r"[^A-Za-z0-9_.-]+", "_", k), k, [k]))

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written: list[Path] = []
    for stem, title, members in figures:
        fig, ax = plt.subplots(figsize=CURVE_SIZE, dpi=CURVE_DPI)
        for r, (series, label) in enumerate(zip(runs, labels)):
            for m, key in enumerate(members):
                color = colors[(r * len(members) + m) % len(colors)]
                name = label if len(members) == 1 else f"{label}: {key}"
                if key in series:
                    xs, ys = series[key]
                    ax.plot(xs, ys, linestyle="-", color=color, linewidth=1.4, label=name)
                if f"eval/{key}" in series:
                    xs, ys = series[f"eval/{key}"]
                    ax.plot(xs, ys, linestyle="--", marker="o", markersize=4, color=color, linewidth=1.2,
                            label=f"{name} (eval)")
        ax.set_xlabel("step")
        ax.set_ylabel(members[0] if len(members) == 1 else title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / f"{stem}.png"))
    return written


__all__ = ["CURVE_GROUPS", "plot_reward_vs_kl", "plot_training_curves", "read_metrics"]

"""Result tables: one row per evaluated policy, written as JSON and as a Markdown table.

A row is a dict with at least ``method`` (series name, e.g. "dpo"), ``setting`` (e.g. "beta=0.1"),
``reward`` and ``kl`` (``{mean, se, n, clusters}``, see ``eval.kl.MeanEstimate``); optional keys:
``kl_exact`` (True when the KL is a closed form, e.g. Best-of-N), ``mean_length`` (tokens), ``eos_share``,
``train_seconds`` and ``eval_seconds``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pm(est: dict[str, Any] | None, digits: int = 2) -> str:
    if not est:
        return "–"
    mean, se = est.get("mean"), est.get("se")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, fmt)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a GitHub Markdown table (reward and KL as mean ± clustered SE)."""
    head = ["method", "setting", "reward", "KL(π‖π_ref) (nats)", "length (tokens)", "ends with EOS",
            "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        kl = _pm(r.get("kl"))
        if r.get("kl_exact"):
            kl += " (formula)"
        lines.append("| " + " | ".join([
            str(r.get("method", "")), str(r.get("setting", "")), _pm(r.get("reward")), kl,
            _num(r.get("mean_length"), ".1f"), _num(r.get("eos_share"), ".0%"), _num(r.get("train_seconds"), ".0f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def short_table(rows: Sequence[dict[str, Any]]) -> str:
    """A compact plain-text table for the terminal: policy, reward and KL."""
    out = [f"{'policy':<24} {'reward':>16} {'KL (nats)':>16}"]
    for r in rows:
        name = f"{r.get('method', '')} {r.get('setting', '')}".strip()
        kl = _pm(r.get("kl")) + ("*" if r.get("kl_exact") else "")
        out.append(f"{name:<24} {_pm(r.get('reward')):>16} {kl:>16}")
    return "\n".join(out)


def write_report(rows: Sequence[dict[str, Any]], output_dir: str | Path, *, meta: dict[str, Any] | None = None,
                 title: str = "Results", notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``results.json`` ({meta, rows}) and ``results.md`` (title, meta lines, table, notes)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=2, default=str) + "\n")
    md = [f"# {title}", ""]
    for k, v in (meta or {}).items():
        md.append(f"- {k}: {v}")
    if meta:
        md.append("")
    md.append(markdown_table(rows))
    md.extend(f"{n}\n" for n in notes)
    md_path = out / "results.md"
    md_path.write_text("\n".join(md))
    return json_path, md_path


__all__ = ["markdown_table", "short_table", "write_report"]

"""``prefopt eval``: win rates of a policy against a baseline, judged pairwise, at several sampling temperatures.

This is how the DPO paper reports its dialogue and summarization results (its Figure 3): sample the policy at
each temperature, pair every sample with a baseline response to the same prompt, let a judge pick the better one,
and report the policy's win rate with an interval. The baseline is another model (sampled at the same
temperatures, with a different seed so a model against itself is a fair coin, not a column of ties) or
``dataset``: a field of the prompts file, e.g. the chosen response of preference rows.

Each pair is shown to the judge in an order drawn from a seeded generator per (temperature, prompt, sample), and
the order is recorded, so a judge's preference for the first (or second) position cancels out over the pairs
instead of favouring one side.

Outputs in the output directory:

* ``results.json``: ``{"per_temperature": [{temperature, win_rate, ci_low, ci_high, wins, ties, losses, invalid,
  pairs, interval}, ...], "judge", "model", "baseline", ...}`` (see ``eval.winrate`` for the interval);
* ``verdicts.jsonl``: one row per judged pair: ``temperature``, ``prompt``, ``prompt_index``, ``sample_index``,
  ``policy``, ``baseline``, ``policy_first``, ``verdict`` (policy, baseline, tie or invalid), ``judge_verdict``
  (A, B, tie or invalid: A is the response shown first) and ``raw`` (the judge's own answer);
* ``win_rate_vs_temperature.png`` and ``report.html`` (self-contained: the table, the plot inlined, a sample of
  pairs with their verdicts; readable from disk in any browser).
"""

from __future__ import annotations

import base64
import gc
import html
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.types import Text
from ..errors import DataError
from ..jsonl import write_jsonl
from .judges import Judge, load_judge, prompt_text
from .winrate import summarize_verdicts

PLOT_SIZE = (7.0, 4.5)
PLOT_DPI = 100
"""The PNG is PLOT_SIZE * PLOT_DPI pixels (700 x 450)."""


# ------------------------------------------------------------------------------------------ inputs

def _response_text(value: Text) -> str:
    """A baseline response as text: a message list (conversational rows) gives its assistant turns."""
    if isinstance(value, str):
        return value
    turns = [m["content"] for m in value if m.get("role") == "assistant"] or [m["content"] for m in value]
    return "\n\n".join(turns)


def read_eval_prompts(path: str | Path, baseline_field: str | None = None, *,
                      skip_bad: bool = False) -> tuple[list[Text], list[str] | None]:
    """Prompts (any file ``prefopt generate`` reads) and, with ``baseline_field``, each row's baseline response:
    the field of rows with a ``prompt`` field, or for preference rows without one (implicit transcripts,
    conversations) their chosen or rejected response. ``skip_bad``: skip (and count) bad rows instead of
    stopping with the validation report."""
    from ..data.formats import detect_format, read_examples, text_field, to_example
    from ..data.prompts import read_prompts

    if baseline_field is None:
        return read_prompts(path), None
    if Path(path).suffix.lower() == ".txt":
        raise DataError(f"a .txt file has one prompt a line and no '{baseline_field}' field for the dataset "
                        "baseline; use JSON lines rows {prompt, " + baseline_field + "}", source=str(path),
                        reason="wrong_type")

    def kind(row: dict, source: str) -> str:
        return "prompt" if "prompt" in row else detect_format(row, source)

    def convert(row: dict, source: str, fmt: str) -> tuple[Text, str]:
        if fmt == "prompt" or baseline_field not in ("chosen", "rejected"):
            return text_field(row, "prompt", source), _response_text(text_field(row, baseline_field, source))
        ex = to_example(row, source, fmt)
        return ex.prompt, _response_text(ex.chosen if baseline_field == "chosen" else ex.rejected)

    rows, report = read_examples(path, kind, convert, skip_bad=skip_bad)
    if report.validation.errors:
        print(report.validation.summary())
    if not rows:
        raise DataError("no prompts in file", source=str(path), reason="empty_file")
    return [p for p, _ in rows], [b for _, b in rows]


def parse_temperatures(values: Sequence[Any]) -> list[float]:
    from ..errors import ConfigError

    try:
        temps = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"invalid temperatures = {list(values)!r}: must be numbers >= 0, e.g. 0,0.5,1.0.") from None
    if not temps or any(not math.isfinite(t) or t < 0 for t in temps):
        raise ConfigError(f"invalid temperatures = {list(values)!r}: must be numbers >= 0, e.g. 0,0.5,1.0.")
    return temps


def policy_first(seed: int, temperature: float, prompt_index: int, sample_index: int) -> bool:
    """Whether the policy's response is shown first (as A): a fair coin per pair, from a seeded generator, so
    the same seed gives the same orders whatever else changes."""
    return random.Random(f"prefopt-eval-order:{seed}:{temperature!r}:{prompt_index}:{sample_index}").random() < 0.5


# ------------------------------------------------------------------------------------------ sampling

def _device(name: str) -> str:
    import torch

    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def sample_at_temperatures(model_path: str, prompts: Sequence[Text], temperatures: Sequence[float], cfg: Any,
                           seed: int, label: str) -> dict[float, list[list[str]]]:
    """``out[temperature][prompt][sample]``: responses of one model (loaded once, freed after)."""
    from ..generation import generate
    from ..models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_model(model_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device=_device(cfg.device))
    out = {}
    for t in temperatures:
        if cfg.progress:
            print(f"sampling {label} at temperature {t}")
        out[t] = generate(model, tokenizer, prompts, num_samples=cfg.num_samples, temperature=t, top_p=cfg.top_p,
                          top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.batch_size,
                          progress=cfg.progress)
    del model
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------ judging

def judge_pairs(judge: Judge, pairs: list[dict[str, Any]], *, progress: bool = False) -> list[dict[str, Any]]:
    """Judge rows {prompt, policy, baseline, policy_first, ...}; adds ``judge_verdict`` (A/B/tie/invalid),
    ``verdict`` (policy/baseline/tie/invalid) and ``raw``."""
    first = [r["policy"] if r["policy_first"] else r["baseline"] for r in pairs]
    second = [r["baseline"] if r["policy_first"] else r["policy"] for r in pairs]
    verdicts = judge.judge([r["prompt"] for r in pairs], first, second, progress=progress)
    out = []
    for r, v in zip(pairs, verdicts):
        side = {"A": "policy" if r["policy_first"] else "baseline",
                "B": "baseline" if r["policy_first"] else "policy"}.get(v.winner, v.winner)
        out.append({**r, "verdict": side, "judge_verdict": v.winner, "raw": v.raw})
    return out


def per_temperature(rows: Sequence[dict[str, Any]], temperatures: Sequence[float], *,
                    seed: int = 0) -> list[dict[str, Any]]:
    """One summary per temperature (``eval.winrate.summarize_verdicts``, clustered by prompt)."""
    out = []
    for t in temperatures:
        mine = [r for r in rows if r["temperature"] == t]
        s = summarize_verdicts([r["verdict"] for r in mine], [r["prompt_index"] for r in mine], seed=seed)
        out.append({"temperature": t, **s.as_dict()})
    return out


# ------------------------------------------------------------------------------------------ outputs

def _json_number(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def plot_win_rate(summary: Sequence[dict[str, Any]], path: str | Path, *, label: str = "policy",
                  title: str = "Win rate against the baseline") -> Path:
    """Win rate (ties half) against sampling temperature with its 95 % interval as error bars; 0.5 dashed."""
    from .plots import plot_win_rates

    return plot_win_rates([{"label": label, "points": list(summary)}], path, title=title, size=PLOT_SIZE,
                          dpi=PLOT_DPI)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def render_html(results: dict[str, Any], rows: Sequence[dict[str, Any]], png: bytes | None, *,
                sample_pairs: int = 30, seed: int = 0) -> str:
    """The report page: one file, no external resource (the plot is a data: URI), every text HTML-escaped."""
    e = html.escape
    head = ["temperature", "win rate", "95 % interval", "wins", "ties", "losses", "invalid", "pairs"]
    table = ["<table id='win-rates'>", "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead>",
             "<tbody>"]
    for r in results["per_temperature"]:
        cells = [_fmt(r["temperature"], "g"), _fmt(r["win_rate"]), f"{_fmt(r['ci_low'])} – {_fmt(r['ci_high'])}",
                 str(r["wins"]), str(r["ties"]), str(r["losses"]), str(r["invalid"]), str(r["pairs"])]
        table.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    table.append("</tbody></table>")
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(sample_pairs, len(rows))))
    cards = []
    for i in picked:
        r = rows[i]
        first, second = ("policy", "baseline") if r["policy_first"] else ("baseline", "policy")
        cards.append(
            f"<section class='pair verdict-{e(r['verdict'])}'>"
            f"<h3>temperature {e(_fmt(r['temperature'], 'g'))} · prompt {r['prompt_index']} · sample "
            f"{r['sample_index']} · verdict: <b>{e(r['verdict'])}</b> (judge said {e(r['judge_verdict'])}; "
            f"A = {first}, B = {second})</h3>"
            f"<div class='label'>prompt</div><pre>{e(prompt_text(r['prompt']))}</pre>"
            f"<div class='cols'><div><div class='label'>policy</div><pre>{e(r['policy'])}</pre></div>"
            f"<div><div class='label'>baseline</div><pre>{e(r['baseline'])}</pre></div></div>"
            f"<details><summary>judge's answer</summary><pre>{e(r['raw'])}</pre></details></section>")
    meta = [("model", results.get("model")), ("baseline", results.get("baseline")), ("judge", results.get("judge")),
            ("prompts", results.get("prompts")), ("samples per prompt", results.get("num_samples"))]
    meta_html = "".join(f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in meta if v is not None)
    img = (f"<img alt='win rate vs temperature' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
           if png else "<p>(no plot)</p>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:4px 10px;"
             "text-align:right}th{background:#eee}pre{white-space:pre-wrap;background:#f7f7f7;padding:6px;"
             "margin:2px 0 8px 0;font-size:13px}.cols{display:grid;grid-template-columns:1fr 1fr;gap:12px}"
             ".label{font-size:12px;color:#666}.pair{border-top:1px solid #ccc;padding-top:6px}"
             "h3{font-size:14px;font-weight:normal}.verdict-policy b{color:#1a7f37}.verdict-baseline b{color:#b42318}"
             ".verdict-invalid b{color:#888}")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>prefopt eval: win rates</title>"
            f"<style>{style}</style></head><body><h1>Win rates against the baseline</h1><ul>{meta_html}</ul>"
            "<p>Win rate = (wins + ties / 2) / (wins + ties + losses); invalid verdicts are counted, not scored. "
            "Interval: 95 %, Wilson, or a bootstrap over prompts when a prompt has several samples.</p>"
            + "\n".join(table) + img
            + f"<h2>Sample of judged pairs ({len(picked)} of {len(rows)})</h2>" + "\n".join(cards)
            + "</body></html>\n")


def write_outputs(output_dir: str | Path, results: dict[str, Any], rows: Sequence[dict[str, Any]], *,
                  sample_pairs: int = 30, seed: int = 0) -> dict[str, Path]:
    """results.json, verdicts.jsonl, win_rate_vs_temperature.png and report.html in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {**results, "per_temperature": [{k: _json_number(v) for k, v in r.items()}
                                            for r in results["per_temperature"]]}
    paths = {"results": out / "results.json", "verdicts": out / "verdicts.jsonl",
             "plot": out / "win_rate_vs_temperature.png", "report": out / "report.html"}
    paths["results"].write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_jsonl(rows, paths["verdicts"])
    plot_win_rate(results["per_temperature"], paths["plot"], label=str(results.get("model", "policy")))
    paths["report"].write_text(render_html(results, rows, paths["plot"].read_bytes(), sample_pairs=sample_pairs,
                                           seed=seed), encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------------------ the command

def make_judge(cfg: Any) -> Judge:
    return load_judge(cfg.judge, url=cfg.judge_url, key_env=cfg.judge_key_env, template=cfg.judge_template,
                      cache=cfg.judge_cache or None, beta=cfg.judge_beta, tolerance=cfg.judge_tolerance,
                      batch_size=cfg.batch_size, device=_device(cfg.device), dtype=cfg.dtype,
                      trust_remote_code=cfg.trust_remote_code, max_retries=cfg.judge_max_retries,
                      backoff=cfg.judge_backoff, timeout=cfg.judge_timeout, max_requests=cfg.judge_max_requests,
                      concurrency=cfg.judge_concurrency, max_tokens=cfg.judge_max_tokens)


def run_eval(cfg: Any) -> dict[str, Any]:
    """``prefopt eval``: sample, judge every pair, write the outputs; returns the results mapping."""
    cfg.validate()
    temperatures = parse_temperatures(cfg.temperatures)
    dataset = cfg.baseline == "dataset"
    prompts, baseline_texts = read_eval_prompts(cfg.prompts, cfg.baseline_field if dataset else None,
                                               skip_bad=cfg.skip_bad_rows)
    if cfg.max_prompts is not None:
        prompts = prompts[:cfg.max_prompts]
        baseline_texts = baseline_texts[:cfg.max_prompts] if baseline_texts is not None else None
    # cheap judges first, so a bad spec or a missing key stops the run before any sampling
    early = cfg.judge.split(":", 1)[0] in ("fn", "openai")
    judge = make_judge(cfg) if early else None
    policy = sample_at_temperatures(cfg.model, prompts, temperatures, cfg, cfg.seed, "the policy")
    baseline = None if dataset else sample_at_temperatures(cfg.baseline, prompts, temperatures, cfg, cfg.seed + 1,
                                                           "the baseline")
    pairs = []
    for t in temperatures:
        for i, prompt in enumerate(prompts):
            for s in range(cfg.num_samples):
                theirs = baseline_texts[i] if baseline is None else baseline[t][i][s]  # type: ignore[index]
                pairs.append({"temperature": t, "prompt": prompt, "prompt_index": i, "sample_index": s,
                              "policy": policy[t][i][s], "baseline": theirs,
                              "policy_first": policy_first(cfg.seed, t, i, s)})
    if judge is None:
        judge = make_judge(cfg)
    rows = judge_pairs(judge, pairs, progress=cfg.progress)
    results: dict[str, Any] = {
        "per_temperature": per_temperature(rows, temperatures, seed=cfg.seed),
        "judge": cfg.judge, "model": cfg.model,
        "baseline": f"dataset:{cfg.baseline_field}" if dataset else cfg.baseline,
        "prompts": cfg.prompts, "num_prompts": len(prompts), "num_samples": cfg.num_samples,
        "max_new_tokens": cfg.max_new_tokens, "top_p": cfg.top_p, "top_k": cfg.top_k, "seed": cfg.seed,
        "policy_first_share": sum(r["policy_first"] for r in rows) / len(rows),
    }
    requests = getattr(judge, "requests", None)
    if requests is not None:
        results["judge_requests"] = requests
        results["judge_endpoint"] = getattr(judge, "endpoint", None)
    paths = write_outputs(cfg.output_dir, results, rows, sample_pairs=cfg.report_pairs, seed=cfg.seed)
    lines = [f"{'temperature':>11} {'win rate':>9} {'95% interval':>15} {'W/T/L':>11} {'invalid':>7}"]
    for r in results["per_temperature"]:
        lines.append(f"{r['temperature']:>11g} {_fmt(r['win_rate']):>9} "
                     f"{_fmt(r['ci_low']) + '-' + _fmt(r['ci_high']):>15} "
                     f"{str(r['wins']) + '/' + str(r['ties']) + '/' + str(r['losses']):>11} {r['invalid']:>7}")
    print("\n".join(lines) + f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return {**results, "paths": {k: str(v) for k, v in paths.items()}}


__all__ = ["run_eval", "read_eval_prompts", "judge_pairs", "per_temperature", "policy_first", "plot_win_rate",
           "render_html", "write_outputs", "sample_at_temperatures", "parse_temperatures", "make_judge"]

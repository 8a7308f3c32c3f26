"""DPO training throughput: TRL's DPOTrainer against prefopt's plain and fast log-prob paths.

Not a test; run by hand from the repository root:

    python benchmarks/dpo_throughput.py            # full run (about 15 minutes on 2 cores)
    python benchmarks/dpo_throughput.py --quick    # fewer steps, one repeat

Workload: Llama-style ``small`` and ``medium`` models from ``prefopt.models.init_model`` (tokenizer trained on the
rt-polarity text in ../shared/data), preference pairs built from rt-polarity (prompt = the first words of a
review, chosen / rejected = the continuation of a positive / a negative review), 8 pairs a step, max length 128,
fp32, 2 threads, AdamW, a fixed number of steps after warm-up. Every configuration runs in a fresh subprocess
(so peak RSS is its own) and the repeats alternate configurations (so slow drift on a shared machine hits all
alike). An HH-style case (long dialogue prompts, shorter responses) compares prefix sharing with the plain path.

Reported per configuration (medians over repeats): pairs/s = 8 / the median wall time of a training step (each
step timed from its start to the next one's: collate, forward, backward, optimizer, logging); the same from the
process CPU time of a step (pairs/s "at 2 full cores", which a machine shared with other jobs distorts less);
non-pad tokens/s (the workload's average non-pad tokens per pair, counted with prefopt's tokenization, times
pairs/s; the same for every tool); peak RSS of the process and its growth after the imports; ratios to TRL's
live-reference and precompute pairs/s and to prefopt's plain path (medians of the per-repeat ratios); achieved
GFLOP/s = (6 [policy fwd+bwd] + 2 [live reference fwd]) x parameters x non-pad tokens/s, against a measured fp32
matmul ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RT = SHARED / "rt-polarity"
HH = SHARED / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
BATCH = 8
THREADS = 2
MARK = "@@RESULT@@ "

# name -> prefopt DPOConfig overrides or TRL options. prefopt precomputes the reference by default, so the live-
# reference modes say precompute_ref=False.
LIVE = {"precompute_ref": False}
PREFOPT_MODES = {
    "plain": {**LIVE},
    "precomputed ref (default)": {},
    "packing": {**LIVE, "packing": True},
    "prefix sharing": {**LIVE, "prefix_sharing": True},
    "chunked": {**LIVE, "logps_chunk_size": 128},
    "all fast, live ref": {**LIVE, "packing": True, "prefix_sharing": True, "logps_chunk_size": 128},
    "all fast + precomputed": {"packing": True, "prefix_sharing": True, "logps_chunk_size": 128},
    "packing + prefix + precomputed": {"packing": True, "prefix_sharing": True},
}
TRL_MODES = {"TRL live ref": {"precompute_ref_log_probs": False}, "TRL precompute": {"precompute_ref_log_probs": True},
             "TRL live ref, fused AdamW": {"precompute_ref_log_probs": False, "optim": "adamw_torch_fused"}}
HH_MODES = ["plain", "prefix sharing", "all fast, live ref"]


# ------------------------------------------------------------------------------------------------ setup


def require_shared() -> None:
    missing = [p for p in (RT / "rt-polarity.pos", RT / "rt-polarity.neg") if not p.is_file()]
    if missing:
        sys.exit(f"error: the shared rt-polarity data is missing ({', '.join(map(str, missing))}); this benchmark "
                 f"reads it from ../shared/data beside the repository root ({REPO}).")


def rt_lines(kind: str) -> list[str]:
    return [ln.strip() for ln in (RT / f"rt-polarity.{kind}").read_text(encoding="utf-8", errors="replace")
            .splitlines() if ln.strip()]


def rt_pairs(n: int, seed: int = 0, prompt_words: int = 4) -> list[dict]:
    """prompt = first words of a review; chosen / rejected = continuations of a positive / negative review."""
    rng = random.Random(seed)
    pos = [s.split() for s in rt_lines("pos") if len(s.split()) > prompt_words + 3]
    neg = [s.split() for s in rt_lines("neg") if len(s.split()) > prompt_words + 3]
    rows = []
    for _ in range(n):
        p, q = rng.choice(pos), rng.choice(neg)
        source = p if rng.random() < 0.5 else q
        rows.append({"prompt": " ".join(source[:prompt_words]),
                     "chosen": " " + " ".join(p[prompt_words:]),
                     "rejected": " " + " ".join(q[prompt_words:])})
    return rows


def prepare(work: Path, sizes: list[str], n_pairs: int, n_hh: int) -> dict:
    from prefopt.data import load_preferences, write_jsonl
    from prefopt.data.types import PreferenceExample
    from prefopt.models import init_model

    work.mkdir(parents=True, exist_ok=True)
    corpus = rt_lines("pos") + rt_lines("neg")
    models = {}
    for size in sizes:
        d = work / f"model-{size}"
        if not (d / "model.safetensors").is_file():
            print(f"building the {size} model (tokenizer trained on rt-polarity) in {d}", flush=True)
            init_model(size, d, corpus=corpus, seed=0)
        models[size] = str(d)
    rt_file = work / "rt-pairs.jsonl"
    rows = rt_pairs(n_pairs)
    write_jsonl([PreferenceExample(r["prompt"], [r["chosen"], r["rejected"]]) for r in rows], rt_file)
    out = {"models": models, "rt": str(rt_file)}
    if HH.is_file():
        hh, _ = load_preferences(HH, skip_bad=True, limit=n_hh)
        out["hh"] = str(write_jsonl(hh, work / "hh-pairs.jsonl"))
    else:
        print(f"note: {HH} not found; the HH-style case is skipped", flush=True)
    return out


def workload_stats(model_dir: str, data: str, max_length: int, max_prompt_length: int) -> dict:
    from prefopt.data import load_preferences, tokenize_examples
    from prefopt.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    examples, _ = load_preferences(data, skip_bad=True)
    items, _ = tokenize_examples(examples, tok, max_length=max_length, max_prompt_length=max_prompt_length)
    rows = [(len(it.prompt_ids), [len(r) for r in it.response_ids]) for it in items]
    tokens = [sum(p + r for r in rs) for p, rs in rows]
    cfg = json.loads((Path(model_dir) / "prefopt_model.json").read_text())
    return {"tokens_per_pair": statistics.mean(tokens), "prompt_tokens": statistics.mean(p for p, _ in rows),
            "response_tokens": statistics.mean(statistics.mean(rs) for _, rs in rows),
            "parameters": cfg["parameters"], "pairs": len(items)}


# ------------------------------------------------------------------------------------------------ workers


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _per_step(marks: list[tuple[float, float]], warmup: int) -> dict:
    """(wall, cpu) stamps at step starts (the last one at the end of the last step) -> timed steps after warm-up."""
    walls = [b[0] - a[0] for a, b in zip(marks, marks[1:])][warmup:]
    cpus = [b[1] - a[1] for a, b in zip(marks, marks[1:])][warmup:]
    return {"step_wall": walls, "step_cpu": cpus, "steps": len(walls)}


def worker_prefopt(spec: dict) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    import prefopt.train.dpo as dpo
    from prefopt.config import DPOConfig
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401  (imported lazily by prefopt;
    # here so that "RSS growth" counts the run, not the library imports, as for TRL)

    import_rss = _rss_mb()
    marks: list[tuple[float, float]] = []
    make_collate = dpo.make_collate

    def stamped_collate(*a, **k):  # the loop collates once at the start of each step (micro batch = batch)
        collate = make_collate(*a, **k)

        def fn(examples):
            marks.append((time.perf_counter(), time.process_time()))
            return collate(examples)

        return fn

    dpo.make_collate = stamped_collate
    out = Path(spec["out"])
    total = spec["warmup"] + spec["steps"] + 1  # one more step: its start closes the last timed step
    cfg = DPOConfig(model=spec["model"], data=spec["data"], output_dir=str(out), optimizer="adamw", lr=1e-6,
                    warmup_steps=0, batch_size=BATCH, micro_batch_size=BATCH, max_steps=total,
                    max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"], progress=False,
                    log_every=1, cache_dir=str(out / "cache"), seed=spec["seed"], **spec["options"])
    dpo.train_dpo(cfg)
    return {**_per_step(marks[-total:], spec["warmup"]), "peak_rss_mb": _peak_mb(), "import_rss_mb": import_rss}


def worker_trl(spec: dict) -> dict:
    import warnings

    import torch

    torch.set_num_threads(THREADS)
    import datasets
    import trl
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: F401

    from prefopt.models import load_model, load_tokenizer

    import_rss = _rss_mb()
    tok = load_tokenizer(spec["model"])
    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    marks: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(output_dir=spec["out"], report_to="none", use_cpu=True, bf16=False, fp16=False,
                             gradient_checkpointing=False, per_device_train_batch_size=BATCH,
                             max_length=spec["max_length"], disable_dropout=True,
                             max_steps=spec["warmup"] + spec["steps"] + 1, logging_steps=1, save_strategy="no",
                             learning_rate=1e-6, lr_scheduler_type="constant",
                             dataloader_num_workers=0, seed=spec["seed"], disable_tqdm=True,
                             **{"optim": "adamw_torch", **spec["options"]})
        trainer = trl.DPOTrainer(model=load_model(spec["model"]), args=args,
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                                 callbacks=[Timer()])
        trainer.train()
    return {**_per_step(marks, spec["warmup"]), "peak_rss_mb": _peak_mb(), "import_rss_mb": import_rss}


def worker_matmul(spec: dict) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    n = spec.get("n", 2048)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(spec.get("reps", 5)):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return {"gflops": 2 * n**3 / best / 1e9}


def run_worker(kind: str, spec: dict, timeout: int = 900) -> dict:
    # passive OpenMP waiting: on a machine shared with other jobs, spinning threads at barriers can slow a run
    # down many times over; the setting is the same for every configuration
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise RuntimeError(f"worker {kind} failed (exit {proc.returncode}):\n{tail}")


# ------------------------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and one repeat (a few minutes)")
    ap.add_argument("--sizes", nargs="+", default=["small", "medium"])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="steps not timed")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: per size)")
    ap.add_argument("--no-hh", action="store_true", help="skip the HH-style prefix-sharing case")
    ap.add_argument("--workdir", default=None, help="models and data (default: a folder under the temp dir)")
    ap.add_argument("--json", default=None, help="also write all raw results to this file")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        fn = {"prefopt": worker_prefopt, "trl": worker_trl, "matmul": worker_matmul}[kind]
        print(MARK + json.dumps(fn(spec)), flush=True)
        return

    require_shared()
    repeats = args.repeats or (1 if args.quick else 2)
    warmup = args.warmup if args.warmup is not None else 1
    steps_for = {"small": 3 if args.quick else 6, "medium": 2 if args.quick else 3}
    if args.steps:
        steps_for = {s: args.steps for s in steps_for}
    work = Path(args.workdir or Path(tempfile.gettempdir()) / "prefopt-dpo-throughput")
    n_pairs = BATCH * (warmup + max(steps_for[s] for s in args.sizes))
    data = prepare(work, args.sizes, n_pairs=n_pairs, n_hh=BATCH * (warmup + steps_for["medium"]))
    hh_size = "medium" if "medium" in args.sizes else args.sizes[0]

    cases = []  # (case, size, label, kind, options, data, max_length, max_prompt_length)
    for size in args.sizes:
        for label, opts in TRL_MODES.items():
            cases.append(("rt-polarity", size, label, "trl", opts, data["rt"], 128, 64))
        for label, opts in PREFOPT_MODES.items():
            cases.append(("rt-polarity", size, label, "prefopt", opts, data["rt"], 128, 64))
    if "hh" in data and not args.no_hh:
        for label in HH_MODES:
            cases.append(("hh-rlhf", hh_size, label, "prefopt", PREFOPT_MODES[label], data["hh"], 256, 192))

    stats = {}
    for case, size, *_rest in cases:
        key = (case, size)
        if key not in stats:
            path, ml, mpl = _rest[3], _rest[4], _rest[5]
            stats[key] = workload_stats(data["models"][size], path, ml, mpl)
    for (case, size), st in stats.items():
        print(f"workload {case}/{size}: {st['pairs']} pairs, {st['tokens_per_pair']:.1f} non-pad tokens a pair "
              f"(prompt {st['prompt_tokens']:.1f}, response {st['response_tokens']:.1f}), "
              f"{st['parameters'] / 1e6:.1f} M parameters", flush=True)

    results: list[dict] = []
    ceilings: list[float] = []
    started = time.perf_counter()
    for rep in range(repeats):
        ceilings.append(run_worker("matmul", {})["gflops"])
        order = cases if rep % 2 == 0 else list(reversed(cases))
        for case, size, label, kind, opts, path, ml, mpl in order:
            with tempfile.TemporaryDirectory(prefix="bench-") as out:
                spec = {"model": data["models"][size], "data": path, "out": out, "options": opts,
                        "warmup": warmup, "steps": steps_for[size], "max_length": ml, "max_prompt_length": mpl,
                        "seed": 0}
                res = run_worker(kind, spec)
            st = stats[(case, size)]
            wall, cpu = statistics.median(res["step_wall"]), statistics.median(res["step_cpu"])
            res.update(case=case, size=size, label=label, repeat=rep, pairs_per_s=BATCH / wall,
                       pairs_per_cpu_s=BATCH / cpu)
            res["tokens_per_s"] = res["pairs_per_s"] * st["tokens_per_pair"]
            live = (opts.get("precompute_ref", True) is False if kind == "prefopt"
                    else not opts.get("precompute_ref_log_probs"))
            res["gflops"] = (8 if live else 6) * st["parameters"] * res["tokens_per_s"] / 1e9
            results.append(res)
            print(f"[{time.perf_counter() - started:6.0f}s] rep {rep} {case:11s} {size:6s} {label:24s} "
                  f"{res['pairs_per_s']:6.2f} pairs/s ({THREADS * res['pairs_per_cpu_s']:6.2f} at {THREADS} full "
                  f"cores)  peak RSS {res['peak_rss_mb']:6.0f} MB", flush=True)

    ceiling = statistics.median(ceilings)
    print(f"\nfp32 matmul ceiling (2048x2048, {THREADS} threads): {ceiling:.1f} GFLOP/s "
          f"(runs: {', '.join(f'{c:.1f}' for c in ceilings)})")
    print(f"{repeats} repeat(s), {warmup} warm-up step(s), timed steps: "
          + ", ".join(f"{s} {steps_for[s]}" for s in args.sizes) + f"; wall time {time.perf_counter() - started:.0f} s")
    print(report_table(results, ceiling))
    if args.json:
        Path(args.json).write_text(json.dumps({"ceiling_gflops": ceiling, "results": results}, indent=2))


def report_table(results: list[dict], ceiling: float) -> str:
    """Medians over repeats; ratios are medians of the per-repeat ratios (repeats ran back to back)."""
    def med(xs):
        xs = list(xs)
        return statistics.median(xs) if xs else float("nan")

    keys: list[tuple[str, str, str]] = []
    for r in results:
        if (r["case"], r["size"], r["label"]) not in keys:
            keys.append((r["case"], r["size"], r["label"]))

    def per_rep(case, size, label):
        return {r["repeat"]: r for r in results if (r["case"], r["size"], r["label"]) == (case, size, label)}

    def ratio(mine, other, field):
        rs = [mine[i][field] / other[i][field] for i in mine if i in other]
        return f"{med(rs):.2f}x" if rs else "-"

    lines = ["| case | model | configuration | pairs/s | tokens/s | vs TRL live | vs TRL precompute | vs plain "
             f"| pairs/s at {THREADS} full cores (CPU time) | vs TRL live (CPU time) | peak RSS MB | RSS growth MB "
             "| GFLOP/s | % of ceiling |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case, size, label in keys:
        mine = per_rep(case, size, label)
        rows = list(mine.values())
        refs = {ref: per_rep(case, size, ref) for ref in ("TRL live ref", "TRL precompute", "plain")}
        r = {ref: ratio(mine, other, "pairs_per_s") if ref != label else "-" for ref, other in refs.items()}
        r_cpu = ratio(mine, refs["TRL live ref"], "pairs_per_cpu_s") if label != "TRL live ref" else "-"
        gf = med(x["gflops"] for x in rows)
        lines.append(
            f"| {case} | {size} | {label} | {med(x['pairs_per_s'] for x in rows):.2f} "
            f"| {med(x['tokens_per_s'] for x in rows):.0f} | {r['TRL live ref']} | {r['TRL precompute']} "
            f"| {r['plain']} | {THREADS * med(x['pairs_per_cpu_s'] for x in rows):.2f} | {r_cpu} "
            f"| {med(x['peak_rss_mb'] for x in rows):.0f} "
            f"| {med(x['peak_rss_mb'] - x['import_rss_mb'] for x in rows):.0f} "
            f"| {gf:.1f} | {100 * gf / ceiling:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Data preparation at scale: wall time and peak memory from 2k to 400k HH-style preference pairs.

For each size it generates distinct pairs from the shared HH-RLHF sample (raw transcripts; row i's first human
turn is tagged with its number, so no two rows are equal and lengths stay HH's), then runs, each in a fresh
process:

* ``prefopt dpo --max-steps 1 --precompute-ref false`` on a tiny model with an empty data cache (first run) and
  again (cached rerun): the preparation time prefopt prints, the whole command's wall time, and its peak RSS
  (main process; the tokenizing workers' peak is reported apart);
* the ecosystem baseline on the same file: ``datasets`` JSON loading plus a batched ``map`` in ``--num-proc``
  processes that splits the prompt at the last "\\n\\nAssistant:" and tokenizes prompt and both responses
  separately (no validation, no exact continuation rule), first run and cached rerun;
* optionally (``--plain-up-to N``) the one-example-at-a-time path prefopt used before
  (``load_preferences`` + ``tokenize_examples``), for sizes up to N;
* two processes mapping the same cached table and reading every row: the data's proportional memory (PSS) of
  both together against one alone.

    python benchmarks/data_scale.py --sizes 2000,20000,100000,400000 --out benchmarks/data_scale.json

Prints a Markdown table (the one in RESULTS.md). Needs ../shared/data (the HH sample).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HH = HERE.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
MARKER = "\n\nAssistant:"


def generate(n: int, path: Path) -> Path:
    rows = [json.loads(line) for line in gzip.open(HH, "rt")]
    rows = [r for r in rows if r["chosen"] != r["rejected"]
            and all(r[k].rsplit(MARKER, 1)[-1].strip() for k in ("chosen", "rejected"))]
    with open(path, "w") as f:
        for i in range(n):
            r = rows[i % len(rows)]
            tag = f"\n\nHuman: (request {i})"
            f.write(json.dumps({k: r[k].replace("\n\nHuman:", tag, 1) for k in ("chosen", "rejected")}) + "\n")
    return path


def make_model(path: Path) -> Path:
    from prefopt.models import init_model

    texts = [json.loads(line)["chosen"] for line in gzip.open(HH, "rt")]
    return init_model("tiny", path, corpus=texts, seed=0)


def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def pss_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


def mapping_pss_mb(path: Path) -> float:
    """The PSS of this process's mappings of ``path`` (its share of the file's pages in memory)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and line.startswith("Pss:"):
                total += int(head[1])
    return total / 1024


# ---------------------------------------------------------------------------------------------------------
# Workers (each runs in its own process)


def worker_prefopt(spec: dict) -> dict:
    import contextlib
    import io

    import prefopt.train.setup as setup
    from prefopt.cli import main

    os.environ["PREFOPT_CACHE"] = spec["cache"]
    marks = {}
    load_policy = setup.load_policy

    def mark_then_load(*a, **k):  # the data is ready, no model loaded yet: the peak so far is the data's
        marks["data_peak_mb"] = peak_mb()
        return load_policy(*a, **k)

    setup.load_policy = mark_then_load
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        main(["dpo", "--model", spec["model"], "--data", spec["data"], "--output-dir", spec["out"],
              "--max-steps", "1", "--precompute-ref", "false", "--batch-size", "8", "--micro-batch-size", "8",
              "--max-length", "1024", "--max-prompt-length", "512", "--progress", "false",
              "--num-proc", str(spec["num_proc"])])
    wall = time.perf_counter() - t
    m = re.search(r"train data: (\d+) examples (.*?) in ([\d.]+) s", buf.getvalue())
    return {"wall_s": wall, "prepare_s": float(m.group(3)), "how": m.group(2), "examples": int(m.group(1)),
            "peak_mb": peak_mb(), "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN), **marks}


def worker_datasets(spec: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["cache"])

    def split_and_tokenize(batch):
        prompts, chosen, rejected = [], [], []
        for c, r in zip(batch["chosen"], batch["rejected"]):
            cut = c.rfind(MARKER) + len(MARKER)
            prompts.append(c[:cut])
            chosen.append(c[cut:])
            rejected.append(r[r.rfind(MARKER) + len(MARKER):])
        enc = lambda xs: tok(xs, add_special_tokens=False)["input_ids"]  # noqa: E731
        return {"prompt_ids": enc(prompts), "chosen_ids": enc(chosen), "rejected_ids": enc(rejected)}

    ds = ds.map(split_and_tokenize, batched=True, num_proc=spec["num_proc"], remove_columns=ds.column_names)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "prepare_s": wall, "examples": len(ds), "peak_mb": peak_mb(),
            "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN)}


def worker_plain(spec: dict) -> dict:
    from prefopt.data import load_preferences, tokenize_examples
    from prefopt.models import load_tokenizer

    tok = load_tokenizer(spec["model"])
    t = time.perf_counter()
    examples, _ = load_preferences(spec["data"], vocab_size=len(tok))
    items, _ = tokenize_examples(examples, tok, max_length=1024, max_prompt_length=512)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "prepare_s": wall, "examples": len(items), "peak_mb": peak_mb(), "workers_peak_mb": 0.0}


def worker_map(spec: dict) -> dict:
    """Map the cached table (as a rank of a run does) and read every row; the PSS the data added.

    The table is opened and dropped once first, so that what loading pyarrow's and numpy's code costs a process
    (about 35 MB of private memory, whatever the data) is not counted as data."""
    import ctypes
    import gc

    from prefopt.data.table import TokenizedTable

    folder = next(Path(spec["cache"]).glob("data/*/"))
    digest = json.loads((folder / "report.json").read_text())["digest"]

    def settle() -> float:
        gc.collect()  # rows read are garbage: hand their heap back, so only the mapping is measured
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return pss_mb()

    warm = TokenizedTable.open(folder / "tokenized.arrow", digest)
    warm[0]
    del warm
    before = settle()
    table = TokenizedTable.open(folder / "tokenized.arrow", digest)
    n = sum(len(ex.prompt_ids) for ex in table)

    def barrier(phase: str) -> None:  # with a second process: both reach ``phase`` before either goes on
        if spec.get("wait"):
            Path(spec["ready"] + phase).write_text("1")
            deadline = time.time() + 120
            while not Path(spec["wait"] + phase).exists() and time.time() < deadline:
                time.sleep(0.05)

    barrier(".read")  # both hold the mapping, every row read ...
    out = {"data_pss_mb": settle() - before, "mapping_pss_mb": mapping_pss_mb(folder / "tokenized.arrow"),
           "tokens": n, "table_mb": (folder / "tokenized.arrow").stat().st_size / 2**20}
    barrier(".measured")  # ... and keep it until both have measured
    return out


WORKERS = {"prefopt": worker_prefopt, "datasets": worker_datasets, "plain": worker_plain, "map": worker_map}


def run_worker(kind: str, spec: dict, timeout: int = 3600) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def two_ranks(spec: dict) -> dict:
    """The PSS the data adds to one process alone and to two processes together (the whole process, and the
    table's mapping alone)."""
    one = run_worker("map", spec)  # a process of its own; then two at once
    with tempfile.TemporaryDirectory() as d:
        flags = [Path(d) / "a", Path(d) / "b"]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", "map",
                                   json.dumps({**spec, "ready": str(flags[i]), "wait": str(flags[1 - i])})],
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                 for i in range(2)]
        outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    return {"table_mb": one["table_mb"], "one_mb": one["data_pss_mb"], "two_mb": sum(o["data_pss_mb"] for o in outs),
            "one_mapping_mb": one["mapping_pss_mb"], "two_mapping_mb": sum(o["mapping_pss_mb"] for o in outs)}


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000,100000")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--plain-up-to", type=int, default=20000, help="run the old one-at-a-time path up to this size")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the raw results here as JSON")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))))
        return
    if not HH.is_file():
        sys.exit(f"the HH-RLHF sample is missing at {HH} (../shared/data beside the repo)")
    work = Path(args.work or tempfile.mkdtemp(prefix="data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(make_model(work / "model"))
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = generate(n, work / f"hh-{n}.jsonl")
        mb = data.stat().st_size / 1e6
        cache, dcache = work / f"cache-{n}", work / f"hf-cache-{n}"
        row = {"pairs": n, "file_mb": round(mb, 1), "load": os.getloadavg()[0]}
        spec = {"model": model, "data": str(data), "cache": str(cache), "num_proc": args.num_proc}
        row["prefopt_first"] = run_worker("prefopt", {**spec, "out": str(work / f"run-{n}-a")})
        row["prefopt_cached"] = run_worker("prefopt", {**spec, "out": str(work / f"run-{n}-b")})
        dspec = {**spec, "cache": str(dcache)}
        row["datasets_first"] = run_worker("datasets", dspec)
        row["datasets_cached"] = run_worker("datasets", dspec)
        if n <= args.plain_up_to:
            row["plain"] = run_worker("plain", spec)
        row["pss"] = two_ranks(spec)
        results.append(row)
        print(json.dumps(row), flush=True)
        for p in (data,):
            p.unlink()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results, args.num_proc))


def table(results: list[dict], num_proc: int) -> str:
    lines = [f"| pairs | JSONL MB | prefopt first: prepare s (peak RSS MB at data ready) | prefopt cached: prepare s "
             "(peak RSS MB at data ready) | "
             f"datasets.map ({num_proc} proc) first s (peak MB) | datasets cached s | plain path s (peak MB) | "
             "data PSS, 1 process / 2 processes together, MB: whole process (table's mapping) |",
             "|---:|---:|---|---|---|---|---|---|"]
    for r in results:
        f, c, d, dc = r["prefopt_first"], r["prefopt_cached"], r["datasets_first"], r["datasets_cached"]
        q = r["pss"]
        plain = f"{r['plain']['prepare_s']:.1f} ({r['plain']['peak_mb']:.0f})" if "plain" in r else "-"
        lines.append(f"| {r['pairs']:,} | {r['file_mb']} | {f['prepare_s']:.1f} ({f['data_peak_mb']:.0f}; workers "
                     f"{f['workers_peak_mb']:.0f}) | {c['prepare_s']:.2f} ({c['data_peak_mb']:.0f}) | "
                     f"{d['prepare_s']:.1f} "
                     f"({d['peak_mb']:.0f}) | {dc['prepare_s']:.1f} | {plain} | {q['one_mb']:.0f} / {q['two_mb']:.0f} "
                     f"({q['one_mapping_mb']:.0f} / {q['two_mapping_mb']:.0f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

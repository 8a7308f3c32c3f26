"""Memory at real vocabularies: peak RSS and step time of DPO training, TRL's DPOTrainer against prefopt, at
vocabularies of 151,936 (Qwen-sized) and 32,768 (Llama-2 / Mistral-sized).

Not a test; run by hand from the repository root:

    python benchmarks/memory_vocab.py                 # the full table (about 10-20 minutes on 2 cores)
    python benchmarks/memory_vocab.py --quick         # tiny model and vocabularies, 1 measured step: a smoke run

Workload: a Llama-style model of the ``small`` shape of ``prefopt.models.init_model`` (hidden 256, 4 layers, tied
embeddings) whose vocabulary is the one measured; the tokenizer is a 4,096-token byte-level BPE trained on the first
half of ``../shared/data/hh-rlhf/harmless-base-sample.jsonl.gz`` and the embedding matrix is larger than the
tokenizer, as Qwen's 151,936 rows are larger than its tokenizer: only the LM head's size changes with the
vocabulary. The pairs are the first ``--pairs`` held-out HH pairs (from the second half) whose longer sequence is
200-512 tokens; a batch is 4 pairs, max length 512 (nothing is truncated), fp32, 2 threads, AdamW (fused, TRL's
default) at a constant lr, gradient clipping at 1.0 on both sides. TRL 1.16 runs with a live reference (its
default), bf16 and gradient checkpointing off. prefopt runs with its defaults (reference precomputed before
training; log-probs chunked by the memory budget when a micro-batch's logits would exceed it), with
``--logps-chunk-size 128``, and with packing + prefix sharing on top of the defaults.

Every run is its own subprocess (its peak RSS is its own: ``ru_maxrss`` of that child from ``os.wait4``, and the
VmHWM the child reads itself); TRL and prefopt runs alternate. Reported per run: peak RSS, s/step (median of the
timed steps, each step timed from its start to the next one's, after the warm-up steps), pairs/s, the ratios to TRL
at the same vocabulary, the activation memory (peak RSS - RSS after the imports - 4 x parameter bytes: the weights,
their gradients and AdamW's two moments), and the loss of every step next to TRL's. With ``--pairs 4`` (the
default) every step trains on the same 4 pairs, so both tools see identical batches: the same model, data, order,
optimizer and seed, and the step-2.. losses are comparable; with more pairs the two tools shuffle differently and
only step 1 is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
BATCH = 4
THREADS = 2
MARK = "@@RESULT@@ "

FULL = dict(vocabs=[151_936, 32_768], dims=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                                intermediate_size=688),
            min_len=200, max_len=512, warmup=2, steps=3)
QUICK = dict(vocabs=[16_384, 4_096], dims=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=192),
             min_len=100, max_len=256, warmup=1, steps=1)

# label -> prefopt DPOConfig overrides ("defaults" is a run with no flag at all)
PREFOPT_MODES = {
    "prefopt defaults": {},
    "prefopt --logps-chunk-size 128": {"logps_chunk_size": 128},
    "prefopt + packing + prefix sharing": {"packing": True, "prefix_sharing": True},
}
TRL_LABEL = "TRL live ref"


# ------------------------------------------------------------------------------------------------ setup


def prepare(work: Path, vocabs: list[int], dims: dict, n_pairs: int, min_len: int, max_len: int) -> dict:
    """Tokenizer, one model per vocabulary, and the held-out pairs (a JSON-lines file both tools read)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.data import load_preferences, tokenize_examples
    from prefopt.models import MAX_POSITIONS, load_tokenizer, parameter_count, quiet_progress_bars, train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    examples, _ = load_preferences(HH, skip_bad=True)
    half = len(examples) // 2
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        texts = [t for ex in examples[:half] for t in (ex.prompt, *ex.responses)]
        train_tokenizer(texts, vocab_size=4096).save_pretrained(tok_dir)
    tok = load_tokenizer(tok_dir)
    items, _ = tokenize_examples(examples[half:], tok, max_length=10**6, max_prompt_length=10**6 - 1)
    chosen, lengths = [], []
    for ex, it in zip(examples[half:], items):
        longest = max(len(it.prompt_ids) + len(r) for r in it.response_ids)
        if min_len <= longest <= max_len:
            chosen.append(ex)
            lengths.append((len(it.prompt_ids), [len(r) for r in it.response_ids]))
        if len(chosen) == n_pairs:
            break
    if len(chosen) < n_pairs:
        sys.exit(f"error: only {len(chosen)} held-out HH pairs of {min_len}-{max_len} tokens (asked for {n_pairs})")
    data = work / f"hh-heldout-{n_pairs}-{min_len}-{max_len}.jsonl"
    data.write_text("".join(json.dumps({"prompt": ex.prompt, "chosen": ex.responses[0], "rejected": ex.responses[1]})
                            + "\n" for ex in chosen), encoding="utf-8")
    models = {}
    for v in vocabs:
        d = work / f"model-h{dims['hidden_size']}-l{dims['num_hidden_layers']}-v{v}"
        if not (d / "model.safetensors").is_file():
            print(f"building the model with vocabulary {v:,} in {d}", flush=True)
            cfg = LlamaConfig(vocab_size=v, num_key_value_heads=dims["num_attention_heads"],
                              max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, tie_word_embeddings=True,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **dims)
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
            with quiet_progress_bars():
                model.save_pretrained(d, safe_serialization=True)
                tok.save_pretrained(d)
            (d / "prefopt_model.json").write_text(json.dumps({"parameters": parameter_count(model),
                                                              "vocab_size": v, **dims}) + "\n")
        models[v] = {"dir": str(d), "parameters": json.loads((d / "prefopt_model.json").read_text())["parameters"]}
    response_positions = sum(sum(r) for _, r in lengths[:BATCH])
    return {"models": models, "data": str(data), "pairs": len(chosen),
            "tokens_per_pair": statistics.mean(p * len(r) + sum(r) for p, r in lengths),
            "prompt_tokens": statistics.mean(p for p, _ in lengths),
            "response_tokens": statistics.mean(statistics.mean(r) for _, r in lengths),
            "first_batch_response_positions": response_positions}


# ------------------------------------------------------------------------------------------------ workers


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _per_step(marks: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:])][warmup:]


def worker_prefopt(spec: dict) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    import prefopt.logprobs as lp
    import prefopt.train.dpo as dpo
    from prefopt.config import DPOConfig
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401  (counted with the imports)

    import_rss = _status_mb("VmRSS")
    marks: list[float] = []
    losses: list[float] = []
    chunks: list[tuple[int, int]] = []
    step = dpo.DPO.step

    def timed_step(self, model, batch):  # one micro-batch = one optimizer step here
        marks.append(time.perf_counter())
        res = step(self, model, batch)
        if torch.is_grad_enabled():
            losses.append(float(res.losses.detach().double().mean()))
        return res

    chunked = lp.chunked_token_logps

    def counted(hidden, head, targets, chunk_size, *a, **k):
        if torch.is_grad_enabled():
            chunks.append((int(hidden.shape[0]), int(chunk_size)))
        return chunked(hidden, head, targets, chunk_size, *a, **k)

    dpo.DPO.step = timed_step
    lp.chunked_token_logps = counted
    if spec.get("keep_last") is False:
        lp.KEEP_LAST_CHUNK = False
    out = Path(spec["out"])
    total = spec["warmup"] + spec["steps"] + 1  # one more step: its start closes the last timed step
    cfg = DPOConfig(model=spec["model"], data=spec["data"], output_dir=str(out), optimizer="adamw", lr=spec["lr"],
                    warmup_steps=0, max_grad_norm=1.0, batch_size=BATCH, micro_batch_size=BATCH, max_steps=total,
                    max_length=spec["max_length"], max_prompt_length=spec["max_length"] - 1, progress=False,
                    log_every=1, cache_dir=str(out / "cache"), seed=0, **spec["options"])
    dpo.train_dpo(cfg)
    return {"step_s": _per_step(marks[-total:], spec["warmup"]), "losses": losses[-total:],
            "peak_rss_mb": _status_mb("VmHWM"), "import_rss_mb": import_rss,
            "chunked_passes": chunks[-total:], "train_passes": total}


def worker_trl(spec: dict) -> dict:
    import warnings

    import torch

    torch.set_num_threads(THREADS)
    import datasets
    import trl
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: F401

    from prefopt.models import load_model, load_tokenizer

    import_rss = _status_mb("VmRSS")
    tok = load_tokenizer(spec["model"])
    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    marks: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    class Recording(trl.DPOTrainer):  # TRL logs losses rounded to 4 digits; record the exact ones
        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training:
                losses.append(float((out[0] if isinstance(out, tuple) else out).detach().double()))
            return out

    total = spec["warmup"] + spec["steps"] + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(output_dir=spec["out"], report_to="none", use_cpu=True, bf16=False, fp16=False,
                             gradient_checkpointing=False, per_device_train_batch_size=BATCH,
                             max_length=spec["max_length"], disable_dropout=True, max_steps=total, logging_steps=1,
                             save_strategy="no", learning_rate=spec["lr"], lr_scheduler_type="constant",
                             warmup_steps=0, max_grad_norm=1.0, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                             precompute_ref_log_probs=False)
        trainer = Recording(model=load_model(spec["model"]), args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tok, callbacks=[Timer()])
        trainer.train()
    return {"step_s": _per_step(marks, spec["warmup"]), "losses": losses, "peak_rss_mb": _status_mb("VmHWM"),
            "import_rss_mb": import_rss}


def run_worker(kind: str, spec: dict, timeout: float = 3600) -> dict:
    """Run one worker in a fresh process; its peak RSS comes from the kernel (os.wait4 on that child)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, json.dumps(spec)], stdout=log,
                                stderr=subprocess.STDOUT, text=True, env=env)
        started = time.monotonic()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    for line in text.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            res["child_maxrss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
            res["log_lines"] = [ln for ln in text.splitlines() if ln.startswith("log-probs:")]
            return res
    tail = "\n".join(text.splitlines()[-30:])
    raise RuntimeError(f"worker {kind} failed (exit {proc.returncode}):\n{tail}")


# ------------------------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny model (hidden 64, 2 layers), vocabularies 16,384 and 4,096, pairs of 100-256 tokens, "
                         "1 warm-up and 1 measured step")
    ap.add_argument("--vocabs", type=int, nargs="+", default=None, help="vocabularies (default 151936 32768)")
    ap.add_argument("--pairs", type=int, default=BATCH,
                    help=f"held-out pairs to train on (default {BATCH}: one batch, identical for both tools)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3; quick 1)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--repeats", type=int, default=1, help="repeats, in alternating order (default 1)")
    ap.add_argument("--keep-last-off", action="store_true",
                    help="also run prefopt's chunked modes at the largest vocabulary with the chunked backward "
                         "recomputing every chunk (prefopt.logprobs.KEEP_LAST_CHUNK = False), for a before/after")
    ap.add_argument("--chunking-off", action="store_true",
                    help="also run prefopt with --logps-chunk-size 0 (no chunking: the default before the memory rule)")
    ap.add_argument("--no-trl", action="store_true", help="prefopt only (no ratios)")
    ap.add_argument("--workdir", default=None, help="models and data (default: a folder under the temp dir)")
    ap.add_argument("--json", default=None, help="also write all raw results to this file")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        print(MARK + json.dumps({"prefopt": worker_prefopt, "trl": worker_trl}[kind](spec)), flush=True)
        return

    if not HH.is_file():
        sys.exit(f"error: the shared HH-RLHF sample is missing ({HH}); this benchmark reads it from ../shared/data "
                 f"beside the repository root ({REPO}).")
    preset = QUICK if args.quick else FULL
    vocabs = args.vocabs or preset["vocabs"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    steps = args.steps if args.steps is not None else preset["steps"]
    work = Path(args.workdir or Path(tempfile.gettempdir()) / "prefopt-memory-vocab")
    load_before = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)} ({os.cpu_count()} CPUs)", flush=True)
    data = prepare(work, vocabs, preset["dims"], args.pairs, preset["min_len"], preset["max_len"])
    print(f"workload: {data['pairs']} held-out HH pairs of {preset['min_len']}-{preset['max_len']} tokens, "
          f"{data['tokens_per_pair']:.1f} non-pad tokens a pair (prompt {data['prompt_tokens']:.1f}, response "
          f"{data['response_tokens']:.1f}); the first batch has {data['first_batch_response_positions']} response "
          f"positions; {warmup} warm-up + {steps} timed steps", flush=True)

    cases = []  # (vocab, label, kind, options, keep_last)
    for v in vocabs:
        modes = [(label, "prefopt", opts, True) for label, opts in PREFOPT_MODES.items()]
        if args.chunking_off:
            modes.append(("prefopt --logps-chunk-size 0 (chunking off)", "prefopt", {"logps_chunk_size": 0}, True))
        if args.keep_last_off and v == max(vocabs):
            modes += [(label + " [recompute every chunk]", "prefopt", opts, False)
                      for label, opts in PREFOPT_MODES.items() if label != "prefopt + packing + prefix sharing"]
        if not args.no_trl:  # TRL in the middle of its vocabulary's runs: TRL and prefopt alternate
            modes.insert(1, (TRL_LABEL, "trl", {}, True))
        cases += [(v, *m) for m in modes]

    results = []
    started = time.perf_counter()
    for rep in range(args.repeats):
        for v, label, kind, opts, keep in (cases if rep % 2 == 0 else cases[::-1]):
            with tempfile.TemporaryDirectory(prefix="memvocab-") as out:
                spec = {"model": data["models"][v]["dir"], "data": data["data"], "out": out, "options": opts,
                        "warmup": warmup, "steps": steps, "max_length": preset["max_len"], "lr": args.lr}
                if not keep:
                    spec["keep_last"] = False
                load = os.getloadavg()[0]
                res = run_worker(kind, spec)
            params = data["models"][v]["parameters"]
            res.update(vocab=v, label=label, kind=kind, repeat=rep, parameters=params, load_1min=load,
                       s_per_step=statistics.median(res["step_s"]))
            res["pairs_per_s"] = BATCH / res["s_per_step"]
            res["activation_mb"] = res["child_maxrss_mb"] - res["import_rss_mb"] - 4 * params * 4 / 2**20
            results.append(res)
            print(f"[{time.perf_counter() - started:6.0f}s] {v:>7,} {label:44s} {res['s_per_step']:7.2f} s/step  "
                  f"peak RSS {res['child_maxrss_mb']:6.0f} MB (VmHWM {res['peak_rss_mb']:.0f})  "
                  f"load {load:.2f}  losses {' '.join(f'{x:.6f}' for x in res['losses'])}", flush=True)
            for line in res["log_lines"][:1]:
                print(f"         {line}", flush=True)
    load_after = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}; wall time "
          f"{time.perf_counter() - started:.0f} s\n")
    print(report(results, data, vocabs))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": data, "results": results, "load_before": load_before,
                                               "load_after": load_after}, indent=2))


def _med(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def report(results: list[dict], data: dict, vocabs: list[int]) -> str:
    """Markdown: the table, the loss agreement, the activation growth and the targets."""
    by = {}
    for r in results:
        by.setdefault((r["vocab"], r["label"]), []).append(r)

    def med(v, label, field):
        return _med(r[field] for r in by.get((v, label), []))

    lines = ["| vocabulary | configuration | peak RSS MB | vs TRL | s/step | pairs/s | vs TRL | activation MB "
             "| LM head passes chunked (positions / chunk) | step-1 loss | max abs loss diff vs TRL, steps 2+ |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for v in vocabs:
        labels = [lab for (vv, lab) in by if vv == v]
        trl_rss, trl_pps = med(v, TRL_LABEL, "child_maxrss_mb"), med(v, TRL_LABEL, "pairs_per_s")
        trl_losses = by[(v, TRL_LABEL)][0]["losses"] if (v, TRL_LABEL) in by else None
        for label in labels:
            rows = by[(v, label)]
            rss, pps = med(v, label, "child_maxrss_mb"), med(v, label, "pairs_per_s")
            losses = rows[0]["losses"]
            diff = "-"
            if trl_losses and label != TRL_LABEL and data["pairs"] == BATCH:
                n = min(len(losses), len(trl_losses))
                diff = f"{max(abs(a - b) for a, b in zip(losses[1:n], trl_losses[1:n])):.1e}" if n > 1 else "-"
            chunked = "-"
            if rows[0]["kind"] == "prefopt":
                passes = rows[0]["chunked_passes"]
                chunked = (f"{len(passes)} of {rows[0]['train_passes']} ("
                           + ", ".join(sorted({f'{p} / {c}' for p, c in passes})) + ")") if passes else \
                    f"0 of {rows[0]['train_passes']}"
            lines.append(
                f"| {v:,} | {label} | {rss:,.0f} | {rss / trl_rss:.2f}x | {med(v, label, 's_per_step'):.2f} "
                f"| {pps:.3f} | {pps / trl_pps:.1f}x | {med(v, label, 'activation_mb'):,.0f} | {chunked} "
                f"| {losses[0]:.6f} | {diff} |".replace("| nanx |", "| - |"))
    out = ["\n".join(lines)]

    if len(vocabs) >= 2:
        big, small = max(vocabs), min(vocabs)
        a_big, a_small = med(big, "prefopt defaults", "activation_mb"), med(small, "prefopt defaults", "activation_mb")
        out.append(f"\nActivation memory, prefopt defaults: {a_small:,.0f} MB at {small:,} -> {a_big:,.0f} MB at "
                   f"{big:,}: {100 * (a_big / a_small - 1):+.0f}%")
        targets = []
        v = big

        def ratio(label, field):
            return med(v, label, field) / med(v, TRL_LABEL, field)

        if (v, TRL_LABEL) in by:
            d_rss, d_pps = ratio("prefopt defaults", "child_maxrss_mb"), ratio("prefopt defaults", "pairs_per_s")
            p_rss = ratio("prefopt + packing + prefix sharing", "child_maxrss_mb")
            p_pps = ratio("prefopt + packing + prefix sharing", "pairs_per_s")
            targets += [
                (f"defaults at {v:,}: peak RSS <= 0.35x TRL", f"{d_rss:.2f}x", d_rss <= 0.35),
                (f"defaults at {v:,}: pairs/s >= 10x TRL", f"{d_pps:.1f}x", d_pps >= 10),
                (f"packing + prefix sharing at {v:,}: peak RSS <= 0.3x TRL", f"{p_rss:.2f}x", p_rss <= 0.3),
                (f"packing + prefix sharing at {v:,}: pairs/s >= 15x TRL", f"{p_pps:.1f}x", p_pps >= 15),
            ]
        growth = a_big / a_small - 1
        targets.append((f"defaults: activation memory grows < 20% from {small:,} to {big:,}",
                        f"{100 * growth:+.0f}%", growth < 0.2))
        out.append("\n| target | measured | met? |\n|---|---:|---|")
        out += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets]
    return "\n".join(out)


if __name__ == "__main__":
    main()

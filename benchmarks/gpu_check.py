"""The one prepared script for a lent GPU: does prefopt's DPO train correctly, and how much memory does it take,
under each accelerate engine on real CUDA hardware?

The test suite runs every engine on CPU (gloo, float32). What only a GPU shows is checked here, in one command
that fits a short device window (``--budget-s``, default 480 s) and writes everything to ``$OUT``:

* **environment** -- torch / transformers / accelerate / deepspeed / peft versions, the GPU, bf16 support, and
  whether FlashAttention 2 and SDPA are usable, probed in a subprocess (a real bf16 SDPA call; loading the test
  model with ``attn_implementation="flash_attention_2"`` and running a forward). Every figure below is read
  against it.
* **single_bf16** -- ``prefopt dpo`` in one process under bf16 autocast (default: precomputed reference). At step
  0 the policy IS the reference, so every pair's loss is ln 2 and the first ``metrics.jsonl`` row (with
  ``--log-every 1``: the mean over step 1's micro-batches, all taken before the first update) must be ln 2 within
  1e-3. bf16 rounding that made the policy's and the reference's log-probs disagree would show here first.
* **throughput** -- pairs/s and non-pad tokens/s of that run, from ``summary.json`` (its last logged row) and
  the median of the ``metrics.jsonl`` rows after step 1 (step 1 carries start-up costs).
* **fsdp2_1proc** / **fsdp2_2proc** -- FSDP2 under torchrun with the variables ``accelerate launch`` sets from
  examples/accelerate/fsdp2.yaml (as tests/test_fsdp.py does, but on NCCL: no ``ACCELERATE_USE_CPU``); first
  loss ln 2, and the stdout's ``engine:`` line must name FSDP2. Two processes only when two GPUs exist.
* **zero3** -- DeepSpeed ZeRO-3 on one process with the variables accelerate's own launcher computes from
  examples/accelerate/zero3.yaml (bf16 kept); first loss ln 2, engine line names ZeRO-3. Skipped when
  ``import deepspeed`` fails.
* **flash_attention** / **flash_packing** -- the DPO run (and a ``--packing`` run, whose packed rows are read
  from position ids only under FlashAttention, a path CPU tests cannot reach) with FlashAttention 2; first loss
  ln 2 (``--attn-implementation flash_attention_2``). If the float32-weights + bf16-autocast run fails, one retry with ``--dtype bfloat16`` is recorded beside it.
* **peak_memory** -- ``torch.cuda.max_memory_allocated`` inside the training process for a live reference
  (``--precompute-ref false``), the precomputed reference (the single_bf16 run), ``--lora`` and FSDP2 on one
  process, on the same model and batch. prefopt has no memory hook, so every run goes through this script's
  own child mode (``--child DIR dpo ...``): it calls ``prefopt.cli.main(argv)`` and then writes each rank's peak
  (and peak RSS) to ``DIR/peak-rank<R>.json``.

Every check is independent: a failed run is recorded with the tail of its stdout/stderr and the script goes on;
once ``--budget-s`` is spent the remaining checks are recorded as skipped. Results: ``$OUT/gpu_check.json``
(written after every check, so a killed command still leaves what was done) and ``$OUT/gpu_check.md`` (a
table for benchmarks/RESULTS.md). Models, data and run folders go to ``--workdir``, not ``$OUT``.

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --dry-run       # tiny model on CPU: checks the script's own logic

The dry run builds a tiny model, runs the single-process checks under CPU bf16 autocast and the FSDP2 / ZeRO-3
checks on two CPU processes (gloo, float32, as the tests do: on CPU prefopt turns the engine on only for more
than one process), reads peak RSS in place of GPU memory, and records the GPU-only checks as "skipped: no CUDA".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
EXAMPLES = ROOT / "examples" / "accelerate"
LN2 = math.log(2.0)
LN2_TOL = 1e-3
PORTS = iter(range(29900, 29951))
CPU_ENGINE_NPROC = 2
"""Processes of the dry run's FSDP2 / ZeRO-3 runs: on CPU prefopt turns accelerate's engine path on only for a
launch of more than one process (on GPUs torchrun's one process already gets the engine)."""

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}
"""What ``accelerate launch`` sets from examples/accelerate/fsdp2.yaml (the same table as tests/test_fsdp.py)."""

# Model and data shapes. "gpu": about 136M parameters (hidden 1024, 8 layers, vocabulary 32,768, tied
# embeddings) -- big enough that memory figures are dominated by the model and the logits, small enough that a
# run takes seconds. prefopt.models.init_model tops out at hidden 512 and sizes the vocabulary to the tokenizer
# trained on its small corpus, so the model is built here with the same recipe and a larger embedding table.
SHAPES = {
    "gpu": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, intermediate_size=2816,
                vocab_size=32768),
    "dry": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
                vocab_size=1024),
}
RUN_SHAPES = {  # pairs in the file, responses joined per pair, DPO batch/length flags, steps
    "gpu": dict(pairs=128, join=24, batch=16, micro=8, max_length=512, max_prompt=128, steps=3, timed_steps=8),
    "dry": dict(pairs=32, join=1, batch=8, micro=4, max_length=96, max_prompt=48, steps=2, timed_steps=3),
}


# ------------------------------------------------------------------------------------------- child mode

def child_main(argv: list[str]) -> int:
    """``--child DIR <prefopt argv>``: run the CLI in this process, then record this rank's peak memory."""
    peak_dir, cli_argv = Path(argv[0]), argv[1:]
    sys.path.insert(0, str(SRC))
    import resource

    import torch

    from prefopt.cli import main

    rc = main(cli_argv)
    peak = {"rank": int(os.environ.get("RANK", "0")), "rc": rc,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        peak["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    peak_dir.mkdir(parents=True, exist_ok=True)
    (peak_dir / f"peak-rank{peak['rank']}.json").write_text(json.dumps(peak), encoding="utf-8")
    return rc


def probe_main(model_dir: str) -> int:
    """``--probe MODEL``: print the environment as JSON (run in a subprocess so the parent never holds CUDA)."""
    import importlib.util

    env: dict = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "peft", "flash_attn"):
        try:
            env[f"{name}_version"] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 -- recorded, not raised
            env[f"{name}_version"] = None
            env[f"{name}_import_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        import deepspeed

        env["deepspeed_version"] = deepspeed.__version__
    except Exception as e:  # noqa: BLE001
        env["deepspeed_version"] = None
        env["deepspeed_import_error"] = f"{type(e).__name__}: {e}"[:300]
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    env.update(cuda=cuda, torch_cuda=torch.version.cuda, gpu_count=torch.cuda.device_count() if cuda else 0)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
        env["sdpa_backends_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
            "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)()}
    env["sdpa_function"] = hasattr(F, "scaled_dot_product_attention")
    try:
        dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
        q = torch.randn(2, 4, 64, 64, device=dev, dtype=dt)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        env["sdpa_call"] = f"ok ({dev}, {dt})"
    except Exception as e:  # noqa: BLE001
        env["sdpa_call"] = f"failed: {type(e).__name__}: {e}"[:300]
    env["flash_attn_package"] = importlib.util.find_spec("flash_attn") is not None
    try:
        from transformers.utils import is_flash_attn_2_available

        env["transformers_flash_attn_2_available"] = bool(is_flash_attn_2_available())
    except Exception as e:  # noqa: BLE001
        env["transformers_flash_attn_2_available"] = f"error: {e}"[:200]
    if not cuda:
        env["flash_attention_2_loadable"] = "skipped: no CUDA"
    else:
        try:
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                     attn_implementation="flash_attention_2").to("cuda")
            ids = torch.randint(0, m.config.vocab_size, (2, 64), device="cuda")
            with torch.no_grad():
                m(input_ids=ids)
            env["flash_attention_2_loadable"] = f"ok ({m.config._attn_implementation})"
        except Exception as e:  # noqa: BLE001
            env["flash_attention_2_loadable"] = f"failed: {type(e).__name__}: {e}"[:400]
    print("PROBE_JSON " + json.dumps(env))
    return 0


# ------------------------------------------------------------------------------------------- set-up

def build_model(directory: Path, shape: dict) -> Path:
    """A randomly initialised Llama-style model and a BPE tokenizer, saved with save_pretrained (no hub)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.data import synthetic_text
    from prefopt.models import MAX_POSITIONS, quiet_progress_bars, train_tokenizer

    if (directory / "config.json").exists():
        return directory
    tok = train_tokenizer(synthetic_text(2000), vocab_size=4096)
    dims = {k: v for k, v in shape.items() if k != "vocab_size"}
    config = LlamaConfig(vocab_size=max(shape["vocab_size"], len(tok)), num_key_value_heads=dims["num_attention_heads"],
                         max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **dims)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_progress_bars():
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def build_data(path: Path, n: int, join: int) -> Path:
    """Explicit pairs from prefopt's synthetic generator; ``join`` consecutive examples' responses are joined into
    one, so responses are long enough (about 16 tokens x join) for memory to mean something."""
    from prefopt.data import make_synthetic_preferences

    if path.exists():
        return path
    ex = make_synthetic_preferences(n + join, seed=0)
    rows = [{"prompt": ex[i].prompt,
             "chosen": "".join(e.responses[0] for e in ex[i:i + join]),
             "rejected": "".join(e.responses[1] for e in ex[i:i + join])} for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def zero3_env(nproc: int) -> dict[str, str]:
    """The ACCELERATE_* variables ``accelerate launch --config_file examples/accelerate/zero3.yaml`` gives the
    training processes, as accelerate's own launcher computes them (as tests/test_deepspeed.py does)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(EXAMPLES / "zero3.yaml"),
                                               "--num_processes", str(nproc), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_") and "DYNAMO" not in k}


# ------------------------------------------------------------------------------------------- runs

def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


@dataclass
class Ctx:
    out: Path
    work: Path
    dry_run: bool
    budget_s: float
    start: float = field(default_factory=time.monotonic)
    cuda: bool = False
    gpu_count: int = 0
    deepspeed: bool = False
    flash: bool = False
    model: Path | None = None
    data: Path | None = None
    runs: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    @property
    def shape(self) -> dict:
        return RUN_SHAPES["dry" if self.dry_run else "gpu"]

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "DS_"))}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in [str(SRC), os.environ.get("PYTHONPATH", "")] if p))
        return env


class Skip(Exception):
    """A check that cannot run here (no CUDA, one GPU, no deepspeed, budget spent): recorded as skipped."""


def dpo_argv(ctx: Ctx, name: str, *extra: str, steps: int | None = None, precision: str = "bf16") -> list[str]:
    s = ctx.shape
    run_dir = ctx.work / "runs" / name
    return ["dpo", "--model", str(ctx.model), "--data", str(ctx.data), "--output-dir", str(run_dir / "out"),
            "--cache-dir", str(run_dir / "cache"), "--batch-size", str(s["batch"]),
            "--micro-batch-size", str(s["micro"]), "--max-length", str(s["max_length"]),
            "--max-prompt-length", str(s["max_prompt"]), "--max-steps", str(steps or s["steps"]),
            "--log-every", "1", "--progress", "false", "--num-proc", "1", "--optimizer", "adamw",
            "--mixed-precision", precision, *extra]


def run_dpo(ctx: Ctx, name: str, argv: list[str], *, nproc: int = 0, env: dict | None = None,
            expect_engine: str | None = None) -> dict:
    """Run ``prefopt dpo`` through the child mode (``nproc`` 0: plain python; else torchrun with that many
    processes); returns what it logged: first loss against ln 2, throughput, per-rank peak memory, the engine line;
    stdout/stderr tails when it failed. Memoised by name, so checks can share a run."""
    if name in ctx.runs:
        return ctx.runs[name]
    if not ctx.cuda and not ctx.dry_run:
        raise Skip("skipped: no CUDA (--dry-run runs the CPU version)")
    left = ctx.left()
    if left <= 0:
        raise Skip("skipped: time budget spent")
    run_dir = ctx.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    me = [str(Path(__file__).resolve()), "--child", str(run_dir / "peak"), *argv]
    if nproc:
        port = next(PORTS)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), *me]
    else:
        cmd = [sys.executable, *me]
    full_env = {**ctx.base_env(), **(env or {})}
    timeout = min(300.0, max(20.0, left + 30.0))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=full_env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers are in the same new session
        stdout, stderr = proc.communicate()
        rc = f"timeout after {timeout:.0f} s"
    res: dict = {"name": name, "nproc": nproc or 1, "cmd": " ".join(cmd), "env": env or {}, "rc": rc,
                 "wall_s": round(time.monotonic() - t0, 1)}
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{name}.log").write_text(f"$ {res['cmd']}\n--- env {env or {}}\n--- stdout\n{tail(stdout, 20000)}\n"
                                      f"--- stderr\n{tail(stderr, 20000)}\n", encoding="utf-8")
    for line in stdout.splitlines():
        if line.startswith("engine: "):
            res["engine"] = line
    metrics = run_dir / "out" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    if rows:
        res["first_step"], res["first_loss"] = rows[0]["step"], rows[0]["loss"]
        res["ln2_diff"] = abs(rows[0]["loss"] - LN2)
        res["losses"] = [r["loss"] for r in rows]
        later = rows[1:] or rows
        res["median_pairs_per_s"] = statistics.median(r.get("pairs_per_second", float("nan")) for r in later)
        res["median_tokens_per_s"] = statistics.median(r.get("tokens_per_second", float("nan")) for r in later)
    summary = run_dir / "out" / "summary.json"
    if summary.exists():
        train = json.loads(summary.read_text()).get("train") or {}
        res["summary_pairs_per_s"] = train.get("pairs_per_second")
        res["summary_tokens_per_s"] = train.get("tokens_per_second")
    peaks = sorted((run_dir / "peak").glob("peak-rank*.json"))
    res["peaks"] = [json.loads(p.read_text()) for p in peaks]
    problems = []
    if rc != 0:
        problems.append(f"exit status {rc}")
    if not rows:
        problems.append("no metrics.jsonl rows")
    elif rows[0]["step"] != 1:
        problems.append(f"first row is step {rows[0]['step']}, not 1")
    elif not res["ln2_diff"] <= LN2_TOL:
        problems.append(f"first loss {rows[0]['loss']:.6f} is not ln 2 = {LN2:.6f} within {LN2_TOL}")
    if expect_engine and expect_engine not in res.get("engine", ""):
        problems.append(f"engine line {res.get('engine')!r} does not name {expect_engine}")
    res["status"] = "fail" if problems else "pass"
    if problems:
        res["problems"] = problems
        res["stdout_tail"], res["stderr_tail"] = tail(stdout), tail(stderr)
    ctx.runs[name] = res
    return res


def peak_mib(run: dict) -> float | None:
    """The largest per-rank peak of a run: GPU max_memory_allocated, or peak RSS when there is no CUDA."""
    key = "max_memory_allocated_mib" if any("max_memory_allocated_mib" in p for p in run.get("peaks", [])) \
        else "peak_rss_mib"
    values = [p[key] for p in run.get("peaks", []) if key in p]
    return round(max(values), 1) if values else None


# ------------------------------------------------------------------------------------------- checks

def check_environment(ctx: Ctx) -> dict:
    """Versions, GPU, bf16, SDPA and FlashAttention 2 (probed in a subprocess against the test model)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", str(ctx.model)],
                          env=ctx.base_env(), capture_output=True, text=True, timeout=max(30.0, min(180.0, ctx.left())))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE_JSON ")]
    smi = shutil.which("nvidia-smi")
    if not lines:  # the probe crashed: go on as if the GPU were there (not in a dry run); the runs will tell
        ctx.cuda, ctx.gpu_count = bool(smi) and not ctx.dry_run, 1
        return {"status": "fail", "rc": proc.returncode, "stdout_tail": tail(proc.stdout),
                "stderr_tail": tail(proc.stderr)}
    env = json.loads(lines[-1][len("PROBE_JSON "):])
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    ctx.cuda, ctx.gpu_count = env["cuda"], env["gpu_count"]
    ctx.deepspeed = env.get("deepspeed_version") is not None
    ctx.flash = str(env.get("flash_attention_2_loadable", "")).startswith("ok")
    return {"status": "pass", **env}


def check_single_bf16(ctx: Ctx) -> dict:
    """One process, bf16 autocast, precomputed reference (the default): first loss ln 2."""
    return run_dpo(ctx, "single_bf16", dpo_argv(ctx, "single_bf16", steps=ctx.shape["timed_steps"]))


def check_throughput(ctx: Ctx) -> dict:
    """pairs/s and tokens/s of the single_bf16 run (summary.json's last row; median of rows after step 1)."""
    run = check_single_bf16(ctx)
    if "summary_pairs_per_s" not in run:
        return {"status": "fail", "problems": ["single_bf16 wrote no summary.json"]}
    keys = ("summary_pairs_per_s", "summary_tokens_per_s", "median_pairs_per_s", "median_tokens_per_s")
    return {"status": "pass", "run": "single_bf16", "steps": len(run.get("losses", [])),
            **{k: run.get(k) for k in keys}}


def _fsdp(ctx: Ctx, nproc: int) -> dict:
    name = f"fsdp2_{nproc}proc"
    env = dict(FSDP_ENV)
    precision = "bf16"
    if not ctx.cuda:  # the CPU path of the tests: gloo, one thread per process, float32
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        precision, nproc = "no", CPU_ENGINE_NPROC
    return run_dpo(ctx, name, dpo_argv(ctx, name, precision=precision), nproc=nproc, env=env, expect_engine="FSDP2")


def check_fsdp2_1proc(ctx: Ctx) -> dict:
    """FSDP2 on one process under torchrun: first loss ln 2, engine FSDP2."""
    return _fsdp(ctx, 1)


def check_fsdp2_2proc(ctx: Ctx) -> dict:
    """FSDP2 on two GPUs (NCCL): first loss ln 2 (the loss is the mean over both ranks' pairs)."""
    if not ctx.cuda:
        raise Skip("skipped: no CUDA")
    if ctx.gpu_count < 2:
        raise Skip(f"skipped: {ctx.gpu_count} GPU(s), needs 2")
    return _fsdp(ctx, 2)


def check_zero3(ctx: Ctx) -> dict:
    """DeepSpeed ZeRO-3 on one process, environment from examples/accelerate/zero3.yaml: first loss ln 2."""
    if not ctx.deepspeed:
        raise Skip("skipped: import deepspeed failed (see environment)")
    env, precision, nproc = zero3_env(1), "bf16", 1
    if not ctx.cuda:  # the tests' CPU overrides
        env = {**zero3_env(CPU_ENGINE_NPROC), "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "true",
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        precision, nproc = "no", CPU_ENGINE_NPROC
    return run_dpo(ctx, "zero3", dpo_argv(ctx, "zero3", precision=precision), nproc=nproc, env=env,
                   expect_engine="DeepSpeed ZeRO-3")


def _flash(ctx: Ctx, name: str, *extra: str) -> dict:
    if not ctx.cuda:
        raise Skip("skipped: no CUDA")
    if not ctx.flash:
        env = ctx.results.get("environment", {})
        raise Skip(f"skipped: FlashAttention 2 unavailable ({env.get('flash_attention_2_loadable')})")
    flash = ("--attn-implementation", "flash_attention_2")
    res = run_dpo(ctx, name, dpo_argv(ctx, name, *extra, *flash))
    if res["status"] != "pass" and ctx.left() > 0:  # float32 weights under autocast may be refused: try bf16 weights
        retry = run_dpo(ctx, name + "_bf16_weights", dpo_argv(ctx, name + "_bf16_weights", *extra, *flash,
                                                               "--dtype", "bfloat16"))
        res = {**res, "retry_bf16_weights": retry}
    return res


def check_flash_attention(ctx: Ctx) -> dict:
    """The single-process run with attn_implementation=flash_attention_2: first loss ln 2."""
    return _flash(ctx, "flash_attention")


def check_flash_packing(ctx: Ctx) -> dict:
    """--packing under FlashAttention 2 (packed rows told apart by position ids): first loss ln 2."""
    return _flash(ctx, "flash_packing", "--packing", "true")


def check_peak_memory(ctx: Ctx) -> dict:
    """Peak memory inside the training process: live reference, precomputed, LoRA, FSDP2 (1 process)."""
    runs = {
        "live_reference": lambda: run_dpo(ctx, "live_reference",
                                          dpo_argv(ctx, "live_reference", "--precompute-ref", "false")),
        "precomputed_reference": lambda: check_single_bf16(ctx),
        "lora": lambda: run_dpo(ctx, "lora", dpo_argv(ctx, "lora", "--lora", "true", "--lr", "1e-4")),
        "fsdp2_1proc": lambda: check_fsdp2_1proc(ctx),
    }
    table, failed = {}, []
    for label, fn in runs.items():
        try:
            run = fn()
        except Skip as s:
            table[label] = {"status": str(s)}
            continue
        table[label] = {"run": run["name"], "status": run["status"], "peak_mib": peak_mib(run),
                        "first_loss": run.get("first_loss"), "peaks": run.get("peaks")}
        if run["status"] != "pass":
            failed.append(label)
    unit = "GPU max_memory_allocated MiB" if ctx.cuda else "peak RSS MiB (no CUDA)"
    ran = [r for r in table.values() if "run" in r]
    status = "fail" if failed else "pass" if ran else "skipped: no run could start"
    return {"status": status, "unit": unit, "runs": table, **({"failed": failed} if failed else {})}


CHECKS = [  # in priority order: what the budget reaches first
    ("environment", check_environment),
    ("single_bf16", check_single_bf16),
    ("throughput", check_throughput),
    ("fsdp2_1proc", check_fsdp2_1proc),
    ("zero3", check_zero3),
    ("flash_attention", check_flash_attention),
    ("peak_memory", check_peak_memory),
    ("fsdp2_2proc", check_fsdp2_2proc),
    ("flash_packing", check_flash_packing),
]


# ------------------------------------------------------------------------------------------- report

def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(ctx: Ctx) -> str:
    env = ctx.results.get("environment", {})
    lines = ["## GPU check (`benchmarks/gpu_check.py" + (" --dry-run" if ctx.dry_run else "") + "`)", ""]
    if env.get("status") == "pass":
        gpu = (f"{env.get('gpu_count')} x {env.get('gpu_name')} (sm {env.get('gpu_capability')}, "
               f"{env.get('gpu_memory_gib')} GiB), bf16 {env.get('bf16_supported')}") if env.get("cuda") else "no CUDA"
        lines += [f"- GPU: {gpu}",
                  f"- torch {env.get('torch_version')} (CUDA {env.get('torch_cuda')}), transformers "
                  f"{env.get('transformers_version')}, accelerate {env.get('accelerate_version')}, deepspeed "
                  f"{env.get('deepspeed_version')}, peft {env.get('peft_version')}, flash_attn {env.get('flash_attn_version')}",
                  f"- SDPA: {env.get('sdpa_call')}; FlashAttention 2: {env.get('flash_attention_2_loadable')}"]
    s = ctx.shape
    model = SHAPES["dry" if ctx.dry_run else "gpu"]
    lines += [f"- model: Llama, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, vocabulary "
              f"{model['vocab_size']}; batch {s['batch']} = micro-batch {s['micro']} x accumulation; max length "
              f"{s['max_length']}; AdamW; first loss must be ln 2 = {LN2:.6f} within {LN2_TOL}",
              f"- wall time {ctx.results.get('wall_s', '-')} s (budget {ctx.budget_s:.0f} s)", "",
              "| run | status | engine, processes | first loss | abs(loss - ln 2) | peak MiB | pairs/s | tokens/s | wall s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, run in ctx.runs.items():
        engine = run.get("engine", "-").removeprefix("engine: ").split(";")[0].replace(" process(es)", "")
        lines.append(f"| {name} | {run['status']} | {engine} | {fmt(run.get('first_loss'), '.6f')} | "
                     f"{fmt(run.get('ln2_diff'), '.1e')} | {fmt(peak_mib(run))} | "
                     f"{fmt(run.get('median_pairs_per_s'))} | {fmt(run.get('median_tokens_per_s'), '.0f')} | "
                     f"{run['wall_s']} |")
    unit = "GPU `max_memory_allocated`" if ctx.cuda else "peak RSS (no CUDA)"
    lines += ["", f"peak MiB: the largest rank's {unit}, read inside the training process after the run; pairs/s and "
              "tokens/s: median of the metrics.jsonl rows after step 1.", "", "| check | status |", "|---|---|"]
    for name, _ in CHECKS:
        r = ctx.results.get(name, {})
        status = r.get("status", "-")
        why = "; ".join(r.get("problems", []) or r.get("failed", []) or ([r["error"]] if "error" in r else []))
        lines.append(f"| {name} | {status}{' -- ' + why if why else ''} |")
    return "\n".join(lines) + "\n"


def write_results(ctx: Ctx) -> None:
    doc = {"dry_run": ctx.dry_run, "budget_s": ctx.budget_s, "ln2": LN2, "tolerance": LN2_TOL,
           "model_shape": SHAPES["dry" if ctx.dry_run else "gpu"], "run_shape": ctx.shape,
           "checks": ctx.results, "runs": ctx.runs}
    (ctx.out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    (ctx.out / "gpu_check.md").write_text(markdown(ctx), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    if argv[:1] == ["--probe"]:
        return probe_main(argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks this script's logic")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip the remaining checks after this many seconds")
    p.add_argument("--workdir", default=None, help="models, data and run folders (default: prefopt-gpu-check[-dry] "
                                                   "under the temp dir; the model is reused between invocations)")
    p.add_argument("--only", default=None, help="comma-separated check names to run (environment always runs)")
    args = p.parse_args(argv)

    sys.path.insert(0, str(SRC))
    out = Path(os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tag = "dry" if args.dry_run else "gpu"
    work = Path(args.workdir or Path(tempfile.gettempdir()) / f"prefopt-gpu-check-{tag}").resolve()
    ctx = Ctx(out=out, work=work, dry_run=args.dry_run, budget_s=args.budget_s)
    t0 = time.monotonic()
    ctx.model = build_model(work / "model", SHAPES[tag])
    s = RUN_SHAPES[tag]
    ctx.data = build_data(work / "pairs.jsonl", s["pairs"], s["join"])
    ctx.results["setup_s"] = round(time.monotonic() - t0, 1)
    only = set(args.only.split(",")) | {"environment"} if args.only else None
    for name, check in CHECKS:
        t = time.monotonic()
        if only is not None and name not in only:
            ctx.results[name] = {"status": "skipped: not in --only"}
        elif ctx.left() <= 0:
            ctx.results[name] = {"status": "skipped: time budget spent"}
        else:
            try:
                ctx.results[name] = check(ctx)
            except Skip as sk:
                ctx.results[name] = {"status": str(sk)}
            except Exception as e:  # noqa: BLE001 -- one check's crash must not stop the others
                import traceback

                ctx.results[name] = {"status": "error", "error": f"{type(e).__name__}: {e}",
                                     "traceback": tail(traceback.format_exc())}
            if not args.dry_run and name == "environment" and not ctx.cuda:
                print("gpu_check: no CUDA here -- GPU checks are skipped (use --dry-run for the CPU check)")
        ctx.results[name]["check_s"] = round(time.monotonic() - t, 1)
        ctx.results["wall_s"] = round(time.monotonic() - ctx.start, 1)
        write_results(ctx)
        print(f"gpu_check: {name}: {ctx.results[name]['status']} ({ctx.results[name]['check_s']} s)", flush=True)
    print(markdown(ctx))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    bad = [n for n, _ in CHECKS if ctx.results[n]["status"] in ("fail", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

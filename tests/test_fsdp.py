"""FSDP2 through accelerate on CPU (gloo): two sharded processes train exactly as one unsharded process does.

The 2-process runs are launched with torchrun and the variables ``accelerate launch --config_file
examples/accelerate/fsdp2.yaml`` sets (``FSDP_ENV``); the 1-process run is the plain in-process CLI. Equal loss
trajectories and final weights (float tolerance) show the policy, the sharded live reference, the precomputed
pass through the sharded policy, sharded checkpoints (resumed on 2 and on 1 process) and the gathered final
save all compute what one process computes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "accelerate"

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}
"""What ``accelerate launch`` sets from examples/accelerate/fsdp2.yaml (test_configs_load checks it does)."""

needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def launch(argv: list[str], *, port: int, nproc: int = 2, fsdp: bool = True) -> str:
    """``python <argv>`` under torchrun with ``nproc`` CPU processes (gloo), from this checkout's source."""
    src = str(ROOT / "src")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           **(FSDP_ENV if fsdp else {})}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(port), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def stopped_by_sigterm(argv: list[str], env: dict[str, str], run: Path, *, port: int) -> int:
    """Start ``prefopt <argv> --output-dir <run>`` under torchrun (2 processes, ``env`` added), send SIGTERM to the
    launcher, as a scheduler or a preemptible machine does, once two steps are logged; the launcher passes it to
    every rank. Checks that all ranks stopped at one step boundary with a checkpoint there and returns that step."""
    import signal
    import time

    src = str(ROOT / "src")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env,
                "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), "-m", "prefopt.cli", *argv, "--output-dir", str(run)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0  # the launcher reports the stop
    assert out.count("stopped on SIGTERM: checkpoint") == 1, (out[-2000:], err[-3000:])  # printed by rank 0
    (ckpt,) = sorted((run / "checkpoints").glob("step-*"))
    assert (ckpt / "manifest.json").is_file() and (ckpt / "rng-0.pt").is_file() and (ckpt / "rng-1.pt").is_file()
    return int(ckpt.name.split("-")[1])


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def max_diffs(a: Path, b: Path, keys: tuple[str, ...]) -> tuple[float, float]:
    """(largest difference of the logged ``keys`` over all rows, relative to max(1, |value|); largest |difference|
    of the final weights); the same rows and weight names."""
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    logged = max(abs(x[k] - y[k]) / max(1.0, abs(x[k])) for x, y in zip(ra, rb) for k in keys if k in x)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    weights = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"{a.name} vs {b.name}: max diff logged (relative) {logged:.3g}, weights (abs) {weights:.3g}")  # shown with -s
    return logged, weights


def interrupted_at(ckpt: Path, run: Path) -> Path:
    """A run folder as a run killed right after checkpoint ``ckpt`` (``<run>/checkpoints/step-N``) leaves it: that
    checkpoint, the run's config.yaml and its metrics rows up to step N."""
    source, step = ckpt.parent.parent, int(ckpt.name.split("-")[1])
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, run / "checkpoints" / ckpt.name)
    shutil.copy(source / "config.yaml", run / "config.yaml")
    kept = [r for r in rows(source) if r["step"] <= step and not any(k.startswith("eval/") for k in r)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return run


def dpo_args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["dpo", "--model", str(model), "--data", str(data), "--optimizer", "adamw", "--lr", "1e-3",
            "--warmup-steps", "2", "--batch-size", "8", "--micro-batch-size", "2", "--progress", "false",
            "--max-length", "96", "--max-prompt-length", "48", *extra]


@needs_torchrun
def test_fsdp2_dpo_live_reference_equals_one_process(tiny_model_dir, synthetic_pairs, tmp_path):
    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "3", "--precompute-ref", "false",
                    "--eval-fraction", "0.25")
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    out = launch(["-m", "prefopt.cli", *args, "--output-dir", str(tmp_path / "two")], port=29541)
    assert "engine: FSDP2, 2 process(es)" in out and "reference: live" in out, out
    assert "global batch 8 = micro-batch 2 x accumulation 2 x processes 2" in out
    assert len(rows(tmp_path / "two")) == 4  # 3 train rows, 1 eval row
    logged, weights = max_diffs(tmp_path / "one", tmp_path / "two", ("loss", "rewards/margins", "eval/loss"))
    assert logged < 1e-5 and weights < 1e-5, (logged, weights)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "two")  # the gathered final model is a plain folder


@needs_torchrun
@pytest.mark.slow
def test_fsdp2_dpo_precomputed_reference_equals_one_process(tiny_model_dir, synthetic_pairs, tmp_path):
    """The precomputed pass runs through the sharded policy (its own cache dir: nothing is read from the 1-process
    run's cache). 32 train pairs + 1 eval pair: the pass over 33 splits 17/16 (micro-batches of 4: 5 and 4, plus a
    filler on the second rank) and the eval pair sits on rank 0 while rank 1 runs a filler forward."""
    lines = synthetic_pairs.read_text().splitlines()
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(lines[:32]) + "\n")
    held.write_text(lines[40] + "\n")
    args = dpo_args(tiny_model_dir, train, "--max-steps", "3", "--eval-data", str(held))
    assert main(args + ["--output-dir", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1")]) == 0
    out = launch(["-m", "prefopt.cli", *args, "--output-dir", str(tmp_path / "two"),
                  "--cache-dir", str(tmp_path / "c2")], port=29542)
    assert "reference: precomputed" in out and "computed and cached" in out, out
    torch.testing.assert_close(load_file(str(next((tmp_path / "c1").glob("ref-logps-*"))))["reference_logps"],
                               load_file(str(next((tmp_path / "c2").glob("ref-logps-*"))))["reference_logps"],
                               atol=1e-4, rtol=1e-5)
    logged, weights = max_diffs(tmp_path / "one", tmp_path / "two", ("loss", "rewards/margins", "eval/loss"))
    assert logged < 1e-5 and weights < 1e-5, (logged, weights)


@needs_torchrun
@pytest.mark.slow
def test_fsdp2_sft_equals_one_process(tiny_model_dir, synthetic_pairs, tmp_path):
    """One whole epoch of 45 examples at batch 8: five full steps, then a tail of 5 (3 and 2 examples on the two
    processes, a filler micro-batch on the second); an eval set of 19 (10 and 9)."""
    args = ["sft", "--model", str(tiny_model_dir), "--data", str(synthetic_pairs), "--from-preferences",
            "--optimizer", "adamw", "--lr", "1e-3", "--warmup-steps", "2", "--batch-size", "8",
            "--micro-batch-size", "2", "--epochs", "1", "--progress", "false", "--max-length", "96",
            "--max-prompt-length", "48", "--eval-fraction", "0.3"]
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    launch(["-m", "prefopt.cli", *args, "--output-dir", str(tmp_path / "two")], port=29543)
    assert [r["step"] for r in rows(tmp_path / "one")] == [1, 2, 3, 4, 5, 6, 6]  # 6 train rows + the eval row
    logged, weights = max_diffs(tmp_path / "one", tmp_path / "two", ("loss", "ppl", "eval/loss"))
    assert logged < 1e-5 and weights < 1e-5, (logged, weights)


@needs_torchrun
@pytest.mark.slow
def test_fsdp2_kto_equals_one_process(tiny_model_dir, synthetic_pairs, tmp_path):
    """KTO's live reference is placed like DPO's: sharded with the policy under FSDP2."""
    args = ["kto", "--model", str(tiny_model_dir), "--data", str(synthetic_pairs), "--optimizer", "adamw",
            "--lr", "1e-3", "--warmup-steps", "2", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps",
            "3", "--progress", "false", "--max-length", "96", "--max-prompt-length", "48"]
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    out = launch(["-m", "prefopt.cli", *args, "--output-dir", str(tmp_path / "two")], port=29551)
    assert "engine: FSDP2, 2 process(es)" in out, out
    logged, weights = max_diffs(tmp_path / "one", tmp_path / "two", ("loss",))
    assert logged < 1e-5 and weights < 1e-5, (logged, weights)


@needs_torchrun
@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_on_two_and_on_one_process(tiny_model_dir, synthetic_pairs, tmp_path):
    """A sharded checkpoint at step 2 of 4, resumed with 2 FSDP processes and with 1 unsharded process: both
    finish with the uninterrupted run's numbers and weights."""
    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "4", "--precompute-ref", "false")
    assert main(args + ["--output-dir", str(tmp_path / "plain")]) == 0  # uninterrupted, 1 process
    launch(["-m", "prefopt.cli", *args, "--save-every", "2", "--output-dir", str(tmp_path / "full")], port=29544)
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000002"
    assert (ckpt / "sharded" / ".metadata").is_file() and not (ckpt / "model").exists()
    for name, nproc in (("resume2", 2), ("resume1", 1)):
        run = interrupted_at(ckpt, tmp_path / name)
        resume = ["--output-dir", str(run), "--resume", "auto"]
        if nproc == 2:
            out = launch(["-m", "prefopt.cli", *args, *resume], port=29545)
        else:
            assert main(args + resume) == 0
            out = ""
        assert nproc == 1 or "resumed from" in out
        assert json.loads((run / "summary.json").read_text())["resumed_from"] == 2
        logged, weights = max_diffs(tmp_path / "plain", run, ("loss", "rewards/margins"))
        assert logged < 1e-5 and weights < 1e-5, (name, logged, weights)
    logged, weights = max_diffs(tmp_path / "plain", tmp_path / "full", ("loss", "rewards/margins"))
    assert logged < 1e-5 and weights < 1e-5, ("uninterrupted 2-process", logged, weights)


@needs_torchrun
@pytest.mark.slow
def test_fsdp2_lora_dpo_equals_one_process(tiny_model_dir, synthetic_pairs, tmp_path):
    """LoRA under FSDP2: the reference is the policy with its adapters off, precomputed through the sharded peft
    model; only the adapters are in the optimizer; a sharded checkpoint at step 2 of 4 resumes on 2 processes and
    on 1; the final folder (merged model + adapter/) is what one process writes and loads with transformers / peft."""
    from peft import PeftModel
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "4", "--lora", "--eval-fraction", "0.25")
    assert main(args + ["--output-dir", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1")]) == 0
    out = launch(["-m", "prefopt.cli", *args, "--save-every", "2", "--output-dir", str(tmp_path / "two"),
                  "--cache-dir", str(tmp_path / "c2")], port=29610)
    assert "engine: FSDP2, 2 process(es)" in out and "reference: LoRA adapters off" in out, out
    assert "computed and cached" in out, out
    torch.testing.assert_close(load_file(str(next((tmp_path / "c1").glob("ref-logps-*"))))["reference_logps"],
                               load_file(str(next((tmp_path / "c2").glob("ref-logps-*"))))["reference_logps"],
                               atol=1e-4, rtol=1e-5)
    ckpt = tmp_path / "two" / "checkpoints" / "step-0000002"
    saved = FileSystemReader(str(ckpt / "sharded")).read_metadata().state_dict_metadata
    moments = {k.rsplit(".", 1)[0] for k in saved if k.startswith("optimizer.state.")}
    trainable = {"optimizer.state." + k[len("model."):] for k in saved if k.startswith("model.") and ".lora_" in k}
    assert moments == trainable and len(trainable) > 0  # adapters only: the frozen base has no optimizer state
    assert any(k.startswith("model.") and "base_layer" in k for k in saved)  # the base is in the checkpoint too

    for name, nproc in (("resume2", 2), ("resume1", 1)):
        run = interrupted_at(ckpt, tmp_path / name)
        resume = ["--output-dir", str(run), "--resume", "auto", "--cache-dir", str(tmp_path / f"c-{name}")]
        if nproc == 2:
            assert "resumed from" in launch(["-m", "prefopt.cli", *args, *resume], port=29611)
        else:
            assert main(args + resume) == 0
        assert json.loads((run / "summary.json").read_text())["resumed_from"] == 2

    for run in ("two", "resume2", "resume1"):
        logged, weights = max_diffs(tmp_path / "one", tmp_path / run, ("loss", "rewards/margins", "eval/loss"))
        assert logged < 1e-5 and weights < 1e-5, (run, logged, weights)
        a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors"))
        assert sorted(a) == sorted(b) and all(k.count("lora_") == 1 for k in a)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, run
    files = {r: {p.name for p in (tmp_path / r).iterdir()} - {"checkpoints"} for r in ("one", "two")}
    assert files["one"] == files["two"], files  # the same folder: merged model, adapter/, tokenizer, logs
    cfg_one, cfg_two = (json.loads((tmp_path / r / "adapter" / "adapter_config.json").read_text())
                        for r in ("one", "two"))
    assert set(cfg_one.pop("target_modules")) == set(cfg_two.pop("target_modules")) and cfg_one == cfg_two

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "two")  # the merged model: a plain folder
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        tmp_path / "two" / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        logits = merged(ids).logits
        torch.testing.assert_close(adapted(ids).logits, logits, atol=1e-5, rtol=1e-5)  # merged = base + adapters
        assert (base(ids).logits - logits).abs().max() > 1e-4  # and training moved it


EPOCH_WORKER = r'''
"""One epoch of 21 examples (batch 8: steps of 8, 8 and 5) on a tiny Llama; each example's metric seen/i is 1
for example i, so the epoch's pair-weighted means are count_i / 21."""
import sys
import torch
from transformers import AutoModelForCausalLM
from prefopt.config import TrainConfig
from prefopt.train.loop import StepResult, train

N = 21


class Probe:
    unit = "examples"

    def step(self, model, batch):
        logits = model(input_ids=batch["input_ids"]).logits.float()
        losses = logits.logsumexp(-1).mean(-1) * 1e-3
        ids = batch["ids"]
        metrics = {f"seen/{i}": (ids == i).float() for i in range(N)}
        metrics["id"] = ids.float()
        return StepResult(losses, metrics, tokens=batch["input_ids"].numel())


def collate(items):
    ids = torch.tensor(items)
    return {"ids": ids, "input_ids": (ids[:, None] * 7 + torch.arange(6)[None, :]) % 500 + 3}


model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
cfg = TrainConfig(model=sys.argv[1], data="-", output_dir=sys.argv[2], batch_size=8, micro_batch_size=2,
                  epochs=1, log_every=3, progress=False, optimizer="adamw", lr=1e-3, warmup_steps=0)
summary = train(cfg, model=model, method=Probe(), train_items=list(range(N)), collate=collate)
'''


@needs_torchrun
@pytest.mark.parametrize("fsdp", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["fsdp2", "ddp"])
def test_each_example_once_per_epoch_across_two_processes(tiny_model_dir, tmp_path, fsdp):
    """21 examples, global batch 8, 2 processes: the epoch is 3 steps (8, 8, then the tail of 5 split 3/2 with a
    filler micro-batch on the short process), every example counted exactly once, means weighted by examples."""
    worker = tmp_path / "epoch_worker.py"
    worker.write_text(EPOCH_WORKER)
    out = launch([str(worker), str(tiny_model_dir), str(tmp_path / "run")], port=29546 + int(fsdp), fsdp=fsdp)
    assert "global batch 8 = micro-batch 2 x accumulation 2 x processes 2" in out
    assert out.count("global batch") == 1  # printed once, by the main process
    (row,) = rows(tmp_path / "run")
    assert row["step"] == 3
    for i in range(21):
        assert row[f"seen/{i}"] == pytest.approx(1 / 21, abs=1e-9), i
    assert row["id"] == pytest.approx(10.0, abs=1e-9)  # mean of 0..20: each example weighs the same


def test_tail_steps_split_across_ranks_cover_every_example_once():
    """The schedule and the rank split alone (no processes): every example once per epoch, for sizes that do not
    divide by the batch or by the number of processes."""
    from prefopt.train.loop import BatchSchedule
    from prefopt.train.sharding import rank_share

    for n, batch, world in ((21, 8, 2), (23, 6, 3), (16, 8, 2), (9, 4, 4)):
        schedule = BatchSchedule(n, batch, seed=3, keep_tail=True)
        assert schedule.steps_per_epoch == -(-n // batch)
        seen = []
        for step in range(schedule.steps_per_epoch):
            idx = schedule.indices(step)
            shares = [idx[slice(*rank_share(len(idx), r, world))] for r in range(world)]
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            seen += [i for share in shares for i in share]
        assert sorted(seen) == list(range(n)), (n, batch, world)
        assert schedule.indices(schedule.steps_per_epoch) != schedule.indices(0)  # the next epoch reshuffles


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero2", "zero3"])
def test_configs_load(name):
    """accelerate parses each example config, and its launch sets the environment the engine reads."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(EXAMPLES / f"{name}.yaml"))
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    kind = cfg.distributed_type.value
    if name == "ddp":
        assert kind == "MULTI_GPU"
    elif name == "fsdp2":
        assert kind == "FSDP"
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        env = _launch_env(EXAMPLES / "fsdp2.yaml")
        for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_AUTO_WRAP_POLICY", "FSDP_RESHARD_AFTER_FORWARD",
                    "FSDP_STATE_DICT_TYPE"):
            assert env[key].lower() == FSDP_ENV[key].lower(), key  # what the tests above launch with
    else:
        assert kind == "DEEPSPEED"
        stage = int(name[-1])
        assert cfg.deepspeed_config["zero_stage"] == stage
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps="auto", gradient_clipping="auto",
                                 zero3_init_flag=cfg.deepspeed_config.get("zero3_init_flag", False))
        assert plugin.zero_stage == stage


def _launch_env(config: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file <config>`` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config), "--num_processes", "2", "train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_memory_table_follows_from_the_config():
    """benchmarks/memory_per_gpu.py: the Llama-2-7B shape has its published 6,738,415,616 parameters, and each row
    is bytes-per-parameter arithmetic over that count."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_per_gpu", ROOT / "benchmarks" / "memory_per_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["memory_per_gpu"] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    config = mod.llama2_7b_config()
    n = mod.count_parameters(config)
    assert n == 6_738_415_616
    assert mod.lora_parameters(config) == 32 * 2 * 8 * (4096 + 4096)
    _, data = mod.table(config, gpus=8, pairs=1, seq_len=1024)
    rows_ = data["rows"]
    gib = 1024 ** 3
    one = rows_["1 GPU, live reference"]
    assert one["policy"] == one["reference"] == one["gradients"] == round(4 * n / gib, 2)
    assert one["optimizer"] == round(8 * n / gib, 2)
    assert rows_["1 GPU, precomputed reference"]["reference"] == 0
    sharded = rows_["FSDP2 x8, live reference (sharded)"]
    assert sharded["reference"] == round(4 * n / 8 / gib, 2) and sharded["optimizer"] == round(8 * n / 8 / gib, 2)
    # DeepSpeed bf16: 2-byte weights and gradients, 12 bytes of optimizer state (float32 master + two moments)
    zero2 = rows_["ZeRO-2 x8 (bf16), precomputed"]
    assert zero2["policy"] == round(2 * n / gib, 2) and zero2["gradients"] == round(2 * n / 8 / gib, 2)
    assert zero2["optimizer"] == round(12 * n / 8 / gib, 2)
    zero3 = rows_["ZeRO-3 x8 (bf16), live reference (partitioned)"]
    assert zero3["reference"] == round(2 * n / 8 / gib, 2) and zero3["gradients"] == zero2["gradients"]


def test_launch_config_precision_is_used_unless_given(monkeypatch, tmp_path, capsys):
    """examples/accelerate/*.yaml say mixed_precision: bf16; `accelerate launch` passes it as
    ACCELERATE_MIXED_PRECISION. A run that does not give --mixed-precision (flag or --config file) takes it,
    and says so; one that gives it keeps its own."""
    from prefopt.cli import COMMANDS, build_parser, config_from_args

    dpo = next(c for c in COMMANDS if c.name == "dpo")
    base = ["dpo", "--model", "m", "--data", "d", "--output-dir", str(tmp_path / "o")]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert config_from_args(dpo.config, build_parser().parse_args(base)).mixed_precision == "bf16"
    assert "from the accelerate launch config" in capsys.readouterr().out
    given = build_parser().parse_args(base + ["--mixed-precision", "no"])
    assert config_from_args(dpo.config, given).mixed_precision == "no"
    (tmp_path / "c.yaml").write_text("mixed_precision: fp16\n")
    from_file = build_parser().parse_args(base + ["--config", str(tmp_path / "c.yaml")])
    assert config_from_args(dpo.config, from_file).mixed_precision == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert config_from_args(dpo.config, build_parser().parse_args(base)).mixed_precision == "no"


@needs_torchrun
@pytest.mark.parametrize("fsdp", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["ddp", "fsdp2"])
def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_and_resumes(fsdp, tiny_model_dir, synthetic_pairs,
                                                                          tmp_path):
    """SIGTERM to torchrun mid-run: every rank finishes the same step, one checkpoint is written there (sharded
    under FSDP2), and resuming it to two steps further gives one uninterrupted process's numbers."""
    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "400", "--precompute-ref", "false",
                    "--log-every", "1")
    env = {"ACCELERATE_USE_CPU": "true", **(FSDP_ENV if fsdp else {})}
    step = stopped_by_sigterm(args, env, tmp_path / "run", port=29560 + int(fsdp))
    assert 2 <= step < 400
    more = ["--max-steps", str(step + 2)]  # the schedule is a function of (seed, step): the same batches
    launch(["-m", "prefopt.cli", *args, *more, "--output-dir", str(tmp_path / "run"), "--resume", "auto"],
           port=29562 + int(fsdp), fsdp=fsdp)
    assert main(args + more + ["--output-dir", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from"] == step
    logged, weights = max_diffs(tmp_path / "one", tmp_path / "run", ("loss", "rewards/margins"))
    assert logged < 1e-5 and weights < 1e-5, (logged, weights)


@needs_torchrun
@pytest.mark.slow
def test_fsdp2_moving_reference_equals_one_process_and_resumes(tiny_model_dir, synthetic_pairs, tmp_path):
    """TR-DPO (soft update every 2 steps) under FSDP2: the sharded reference is mixed shard by shard, gathered
    into each checkpoint, and a run resumed at step 3 (between syncs) ends as one uninterrupted process."""
    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "6", "--precompute-ref", "false",
                    "--ref-sync-every", "2", "--ref-sync-mix", "0.5", "--log-every", "1")
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    launch(["-m", "prefopt.cli", *args, "--save-every", "3", "--output-dir", str(tmp_path / "two")], port=29564)
    ckpt = tmp_path / "two" / "checkpoints" / "step-0000003"
    assert (ckpt / "reference.safetensors").is_file()
    logged, weights = max_diffs(tmp_path / "one", tmp_path / "two", ("loss", "rewards/margins"))
    assert logged < 1e-5 and weights < 1e-5, (logged, weights)
    run = interrupted_at(ckpt, tmp_path / "resumed")
    launch(["-m", "prefopt.cli", *args, "--output-dir", str(run), "--resume", "auto"], port=29565)
    logged, weights = max_diffs(tmp_path / "one", run, ("loss", "rewards/margins"))
    assert logged < 1e-5 and weights < 1e-5, (logged, weights)

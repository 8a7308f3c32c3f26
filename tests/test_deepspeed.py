"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate on CPU (gloo): two processes train exactly as one plain process.

The 2-process runs are launched with torchrun and the environment ``accelerate launch --config_file
examples/accelerate/zero<N>.yaml`` gives its processes (computed by accelerate's own launcher code, ``zero_env``),
on CPU (``ACCELERATE_USE_CPU``, DeepSpeed's CPU accelerator) and in float32 so that the numbers can be compared
with one plain process exactly (float tolerance). Equal loss trajectories and final weights show: the engine's
accumulation and clipping set from prefopt's options, the precomputed reference pass through the engine's
(partitioned) policy, the live reference as a DeepSpeed inference engine, DeepSpeed's checkpoints resumed, the
non-finite skip, and the final model gathered into a plain save_pretrained folder. Skipped, with the reason, where
DeepSpeed is not installed (CI installs only what the README's set-up installs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_fsdp import EPOCH_WORKER, EXAMPLES, ROOT, interrupted_at, max_diffs, rows

from prefopt.cli import main

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed): the ZeRO runs need it")
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def zero_env(stage: int) -> dict[str, str]:
    """The variables ``accelerate launch --config_file examples/accelerate/zero<stage>.yaml`` sets, as its own
    launcher computes them; then CPU and float32 for this machine."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(EXAMPLES / f"zero{stage}.yaml"), "--num_processes", "2",
                              "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
    _, env = prepare_deepspeed_cmd_env(args)
    ours = {k: v for k, v in env.items() if k.startswith("ACCELERATE_") and "DYNAMO" not in k}
    assert ours["ACCELERATE_USE_DEEPSPEED"] == "true" and ours["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    return {**ours, "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu"}


def launch(argv: list[str], *, stage: int, port: int, expect_ok: bool = True, extra_env: dict | None = None
           ) -> subprocess.CompletedProcess:
    src = str(ROOT / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **zero_env(stage), **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    program = argv if argv[0].endswith(".py") else ["-m", "prefopt.cli", *argv]  # a script, or a prefopt command
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), *program], env=env, capture_output=True, text=True, timeout=400)
    if expect_ok:
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def dpo_args(model: Path, data: Path, *extra: str, command: str = "dpo") -> list[str]:
    return [command, "--model", str(model), "--data", str(data), "--optimizer", "adamw", "--lr", "1e-3",
            "--warmup-steps", "2", "--batch-size", "8", "--micro-batch-size", "2", "--progress", "false",
            "--max-length", "96", "--max-prompt-length", "48", *extra]


def assert_equal_runs(one: Path, two: Path, keys=("loss", "rewards/margins", "eval/loss")) -> None:
    logged, weights = max_diffs(one, two, keys)
    assert logged < 1e-5 and weights < 1e-5, (logged, weights)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_dpo_precomputed_reference_equals_one_process(stage, tiny_model_dir, synthetic_pairs, tmp_path):
    """The default reference: one pass through the engine's policy (ZeRO-3: partitioned) before training, each rank
    its share, gathered in order; then a whole epoch with the engine's accumulation (2 micro-batches a step) whose
    last step is short (51 training pairs: 6 steps of 8, then 3), and an eval set that does not divide by the
    processes (13 pairs: under ZeRO-3 the short rank runs a filler forward)."""
    args = dpo_args(tiny_model_dir, synthetic_pairs, "--epochs", "1", "--eval-fraction", "0.2")
    assert main(args + ["--output-dir", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1")]) == 0
    out = launch([*args, "--output-dir", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "c2")],
                 stage=stage, port=29810 + stage).stdout
    assert f"engine: DeepSpeed ZeRO-{stage}, 2 process(es)" in out and "reference: precomputed" in out, out
    assert "global batch 8 = micro-batch 2 x accumulation 2 x processes 2" in out
    assert f"DeepSpeed ZeRO-{stage}: the engine accumulates 2 micro-batches of 2 and clips at 10.0" in out
    assert "reference log-probs: computed and cached" in out  # the pass ran under DeepSpeed, not from a cache
    assert [r["step"] for r in rows(tmp_path / "two")] == [1, 2, 3, 4, 5, 6, 7, 7]  # 7 train rows, 1 eval row
    assert_equal_runs(tmp_path / "one", tmp_path / "two")
    # the same cache key: the fingerprint of the partitioned weights is the whole model's
    assert sorted(p.name for p in (tmp_path / "c1").glob("ref-logps-*")) == \
        sorted(p.name for p in (tmp_path / "c2").glob("ref-logps-*"))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_dpo_live_reference_equals_one_process(stage, tiny_model_dir, synthetic_pairs, tmp_path):
    """A live reference: a DeepSpeed inference engine (ZeRO-3: partitioned like the policy, loaded again rather
    than deep-copied from partitions), frozen, never in the optimizer."""
    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "3", "--precompute-ref", "false",
                    "--eval-fraction", "0.25")
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    out = launch([*args, "--output-dir", str(tmp_path / "two")], stage=stage, port=29820 + stage).stdout
    assert "reference: live" in out, out
    assert_equal_runs(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_zero3_sft_kto_and_rm_equal_one_process(tiny_model_dir, synthetic_pairs, tmp_path):
    """The other methods on the one loop: SFT, KTO (live reference engine) and the reward model (a new score head,
    initialised in ZeRO-3 partitions as in one process)."""
    for i, (command, extra, keys) in enumerate((("sft", ["--from-preferences"], ("loss",)),
                                                ("kto", [], ("loss",)), ("rm", [], ("loss", "accuracy")))):
        args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "3", *extra, command=command)
        assert main(args + ["--output-dir", str(tmp_path / f"{command}1")]) == 0
        launch([*args, "--output-dir", str(tmp_path / f"{command}2")], stage=3, port=29830 + i)
        assert_equal_runs(tmp_path / f"{command}1", tmp_path / f"{command}2", keys)


@pytest.mark.slow
def test_zero3_checkpoint_resumes_on_the_same_number_of_processes(tiny_model_dir, synthetic_pairs, tmp_path):
    """DeepSpeed's checkpoint at step 2 of 4 resumes on 2 processes to the uninterrupted numbers; on 1 process it
    is refused before training, naming why."""
    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "4", "--precompute-ref", "false")
    assert main(args + ["--output-dir", str(tmp_path / "plain")]) == 0
    launch([*args, "--save-every", "2", "--output-dir", str(tmp_path / "full")], stage=3, port=29840)
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000002"
    assert (ckpt / "deepspeed" / "state").is_dir() and (ckpt / "manifest.json").is_file()
    assert not (ckpt / "model").exists()
    for name in ("resume2", "resume1"):
        interrupted_at(ckpt, tmp_path / name)
    out = launch([*args, "--output-dir", str(tmp_path / "resume2"), "--resume", "auto"], stage=3, port=29841).stdout
    assert "resumed from" in out
    assert_equal_runs(tmp_path / "plain", tmp_path / "resume2", ("loss", "rewards/margins"))
    assert_equal_runs(tmp_path / "plain", tmp_path / "full", ("loss", "rewards/margins"))
    assert main(args + ["--output-dir", str(tmp_path / "resume1"), "--resume", "auto"]) == 2
    assert not (tmp_path / "resume1" / "model.safetensors").exists()


@pytest.mark.slow
def test_zero3_nonfinite_step_is_skipped_as_in_one_process(tiny_model_dir, synthetic_pairs, tmp_path, monkeypatch):
    """A NaN loss at step 3: the engine skips that update, as the plain loop does with --on-nonfinite skip; the
    runs end equal and finite. Without skip the run stops naming the examples."""
    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "4", "--precompute-ref", "false")
    monkeypatch.setenv("PREFOPT_TEST_NAN_AT_STEP", "3")
    assert main(args + ["--on-nonfinite", "skip", "--output-dir", str(tmp_path / "one")]) == 0
    nan = {"PREFOPT_TEST_NAN_AT_STEP": "3"}
    launch([*args, "--on-nonfinite", "skip", "--output-dir", str(tmp_path / "two")], stage=3, port=29850,
           extra_env=nan)
    assert_equal_runs(tmp_path / "one", tmp_path / "two", ("loss", "rewards/margins"))
    stopped = launch([*args, "--save-every", "2", "--output-dir", str(tmp_path / "stop")], stage=3, port=29851,
                     extra_env=nan, expect_ok=False)
    assert stopped.returncode != 0
    assert "stopped before the optimizer step: step 3" in stopped.stderr and "pairs.jsonl:" in stopped.stderr
    assert (tmp_path / "stop" / "checkpoints" / "step-0000002" / "manifest.json").is_file()


@pytest.mark.slow
def test_lora_under_zero2_equals_one_process_and_is_refused_under_zero3(tiny_model_dir, synthetic_pairs, tmp_path):
    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "3", "--lora")
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    launch([*args, "--output-dir", str(tmp_path / "two")], stage=2, port=29860)
    assert (tmp_path / "two" / "adapter").is_dir()
    assert_equal_runs(tmp_path / "one", tmp_path / "two", ("loss", "rewards/margins"))
    refused = launch([*args, "--output-dir", str(tmp_path / "three")], stage=3, port=29861, expect_ok=False)
    assert refused.returncode != 0 and "LoRA under DeepSpeed ZeRO-3 is not supported" in refused.stderr


@pytest.mark.slow
def test_zero3_bf16_first_loss_is_ln2_and_the_final_model_is_float32(tiny_model_dir, synthetic_pairs, tmp_path):
    """DeepSpeed's bf16 mode, as the example configs set it (the launch's mixed_precision is taken when
    --mixed-precision is not given): the precomputed reference runs through the same bf16 engine as the policy,
    so the first step's loss is ln 2; the final model is the float32 master weights (not the engine's bf16
    copies), and its config says float32."""
    import math

    import torch
    from safetensors.torch import load_file

    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "2", "--log-every", "1")
    out = launch([*args, "--output-dir", str(tmp_path / "bf16"), "--cache-dir", str(tmp_path / "c")], stage=3,
                 port=29870, extra_env={"ACCELERATE_MIXED_PRECISION": "bf16"}).stdout
    assert "mixed precision: bf16, from the accelerate launch config" in out
    first = rows(tmp_path / "bf16")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6, first
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "float32"
    trained = weights["model.layers.0.mlp.up_proj.weight"]
    assert (trained.to(torch.bfloat16).float() != trained).any()  # master weights: not all bf16-representable
    initial = load_file(str(tiny_model_dir / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(initial, trained)


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_each_example_once_per_epoch_across_two_processes(stage, tiny_model_dir, tmp_path):
    """21 examples, global batch 8: 3 steps (8, 8, then the tail of 5 split 3/2, the short rank running a filler
    micro-batch of weight 0), every example counted exactly once, means weighted by examples, under the engine's
    accumulation boundary."""
    worker = tmp_path / "epoch_worker.py"
    worker.write_text(EPOCH_WORKER)
    out = launch([str(worker), str(tiny_model_dir), str(tmp_path / "run")], stage=stage, port=29880 + stage).stdout
    assert "global batch 8 = micro-batch 2 x accumulation 2 x processes 2" in out
    (row,) = rows(tmp_path / "run")
    assert row["step"] == 3
    for i in range(21):
        assert row[f"seen/{i}"] == pytest.approx(1 / 21, abs=1e-9), i
    assert row["id"] == pytest.approx(10.0, abs=1e-9)


@pytest.mark.slow
def test_zero3_sigterm_to_the_launcher_stops_every_rank_and_resumes(tiny_model_dir, synthetic_pairs, tmp_path):
    """A preempted ZeRO-3 run: SIGTERM to torchrun, every rank finishes the same step and writes its partition of
    one DeepSpeed checkpoint there; resumed two steps further, it equals one uninterrupted process."""
    from test_fsdp import stopped_by_sigterm

    args = dpo_args(tiny_model_dir, synthetic_pairs, "--max-steps", "400", "--precompute-ref", "false",
                    "--log-every", "1")
    step = stopped_by_sigterm(args, zero_env(3), tmp_path / "run", port=29890)
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:07d}" / "deepspeed" / "state").is_dir()
    more = ["--max-steps", str(step + 2)]
    launch([*args, *more, "--output-dir", str(tmp_path / "run"), "--resume", "auto"], stage=3, port=29891)
    assert main(args + more + ["--output-dir", str(tmp_path / "one")]) == 0
    assert_equal_runs(tmp_path / "one", tmp_path / "run", ("loss", "rewards/margins"))

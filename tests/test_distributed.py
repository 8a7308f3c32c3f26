"""--batch-size is global: two processes (gloo on CPU) train exactly as one process does."""

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


def two_processes(args: list[str], port: int) -> None:
    """``prefopt <args>`` under torchrun with 2 CPU processes (gloo), from this checkout's source."""
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout, whatever is pip-installed
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "prefopt.cli", *args],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_equal_one(tiny_model_dir, synthetic_pairs, tmp_path):
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(synthetic_pairs), "--optimizer", "adamw",
            "--lr", "1e-3", "--warmup-steps", "2", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3",
            "--progress", "false", "--max-length", "96", "--max-prompt-length", "48", "--eval-fraction", "0.25"]
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    two_processes(args + ["--output-dir", str(tmp_path / "two")], port=29517)
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 4  # 3 train rows (written once, by the main process) + 1 eval row
    for a, b in zip(one, two):
        for k in ("loss", "rewards/margins", "eval/loss", "eval/rewards/margins"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_an_eval_set_smaller_than_the_processes(tiny_model_dir, synthetic_pairs, tmp_path):
    """One eval pair on two processes: the process with no eval example still joins the metric reduction."""
    one_pair = tmp_path / "one_pair.jsonl"
    one_pair.write_text(synthetic_pairs.read_text().splitlines()[0] + "\n")
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(synthetic_pairs), "--eval-data", str(one_pair),
            "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "1", "--progress", "false",
            "--max-length", "96", "--max-prompt-length", "48", "--precompute-ref", "false"]
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    # without the data cache the local main process writes the tables into the run and the other one maps them
    # (it fails if it finds none: it never tokenizes itself)
    two_processes(args + ["--output-dir", str(tmp_path / "two"), "--no-data-cache"], port=29518)
    assert all((tmp_path / "two" / "tokenized" / part / "tokenized.arrow").is_file() for part in ("train", "eval"))
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert one[-1]["eval/loss"] == pytest.approx(two[-1]["eval/loss"], rel=1e-5)

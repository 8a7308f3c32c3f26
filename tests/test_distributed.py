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


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_equal_one(tiny_model_dir, synthetic_pairs, tmp_path):
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(synthetic_pairs), "--optimizer", "adamw",
            "--lr", "1e-3", "--warmup-steps", "2", "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3",
            "--progress", "false", "--max-length", "96", "--max-prompt-length", "48", "--eval-fraction", "0.25"]
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout, whatever is pip-installed
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "prefopt.cli", *args, "--output-dir", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
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

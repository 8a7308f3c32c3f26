"""Crash safety of the shared loop: SIGKILL anywhere (also inside a save), SIGTERM, non-finite values, damaged
checkpoints, used output folders. Every resumed run must equal the uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.cli import main
from prefopt.train.dpo import DPO
from prefopt.train.loop import find_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")  # this checkout, whatever is pip-installed
TIMING = {"pairs_per_second", "tokens_per_second"}
# A micro-batch step slowed down, so that a kill lands inside training (test code only: the CLI itself runs).
SLOW_CLI = ("import sys, time\nimport prefopt.train.dpo as d\nreal = d.DPO.step\n"
            "def slow(self, model, batch):\n    time.sleep(float(sys.argv[1]))\n    return real(self, model, batch)\n"
            "d.DPO.step = slow\nfrom prefopt.cli import main\nsys.exit(main(sys.argv[2:]))\n")


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["dpo", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--optimizer", "adamw",
            "--lr", "1e-3", "--warmup-steps", "2", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "4",
            "--max-length", "96", "--max-prompt-length", "48", "--progress", "false", "--save-every", "1",
            "--keep-checkpoints", "3", *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, atol: float = 1e-5) -> None:
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            if k not in TIMING:
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=atol), (x["step"], k)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-5, msg=k)
    assert (b / "final.json").is_file()


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def spawn(argv: list[str], env_extra: dict[str, str] | None = None, slow: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env_extra or {}),
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-c", SLOW_CLI, str(slow)] if slow else [sys.executable, "-m", "prefopt.cli"]
    return subprocess.Popen(cmd + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def logged_step(out: Path) -> int:
    try:
        return max((json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()), default=0)
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def full(tiny_model_dir, synthetic_pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "full"
    assert main(args(tiny_model_dir, synthetic_pairs, out)) == 0
    return out


def test_sigkill_inside_a_save_and_in_training_then_resume_equals_uninterrupted(
        full, tiny_model_dir, synthetic_pairs, tmp_path):
    out = tmp_path / "killed"
    # 1. killed inside the save of step 2 (the test hook pauses it after the model and optimizer are written)
    proc = spawn(args(tiny_model_dir, synthetic_pairs, out), {"PREFOPT_TEST_PAUSE_IN_SAVE": "60@2"})
    kill_when(proc, lambda: (out / "checkpoints" / "step-0000002.tmp" / "optimizer.pt").is_file())
    assert not ckpt(out, 2).exists() and (ckpt(out, 1) / "manifest.json").is_file()
    # 2. resumed (from step 1), then killed in the middle of training (after step 2 was logged)
    proc = spawn(args(tiny_model_dir, synthetic_pairs, out, "--resume", "auto"), slow=0.3)
    kill_when(proc, lambda: logged_step(out) >= 2)
    # 3. resumed to the end: the same run as the uninterrupted one
    assert main(args(tiny_model_dir, synthetic_pairs, out, "--resume", "auto")) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from"] in (1, 2)
    assert_same_run(full, out)


def test_sigterm_saves_and_exits_143_and_resumes(full, tiny_model_dir, synthetic_pairs, tmp_path, monkeypatch,
                                                 capsys):
    out = tmp_path / "term"
    calls = {"n": 0}
    real_step = DPO.step

    def terminated(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # the first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, model, batch)

    monkeypatch.setattr(DPO, "step", terminated)
    assert main(args(tiny_model_dir, synthetic_pairs, out)) == 143
    assert calls["n"] == 6  # step 3 ran to its end
    assert "stopped on SIGTERM" in capsys.readouterr().out
    assert find_checkpoint("auto", out) == ckpt(out, 3) and logged_step(out) == 3

    # a second SIGTERM stops at once: no checkpoint at the step boundary
    calls["n"], again = 0, tmp_path / "twice"

    def twice(self, model, batch):
        calls["n"] += 1
        if calls["n"] in (3, 4):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, model, batch)

    monkeypatch.setattr(DPO, "step", twice)
    assert main(args(tiny_model_dir, synthetic_pairs, again)) == 143
    assert find_checkpoint("auto", again) == ckpt(again, 1)

    monkeypatch.setattr(DPO, "step", real_step)
    assert main(args(tiny_model_dir, synthetic_pairs, out, "--resume", "auto")) == 0
    assert_same_run(full, out)


def test_nan_stops_naming_the_step_and_source_or_is_skipped(full, tiny_model_dir, synthetic_pairs, tmp_path,
                                                            monkeypatch, capsys):
    out = tmp_path / "nan"
    monkeypatch.setenv("PREFOPT_TEST_NAN_AT_STEP", "3")
    assert main(args(tiny_model_dir, synthetic_pairs, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefopt: error: stopped before the optimizer step: step 3:") and "Traceback" not in err
    assert f"{synthetic_pairs.name}:" in err and "micro-batch 1/2" in err  # the examples' file:line
    assert find_checkpoint("auto", out) == ckpt(out, 2) and not ckpt(out, 3).exists() and logged_step(out) == 2

    skipped = tmp_path / "skip"
    assert main(args(tiny_model_dir, synthetic_pairs, skipped, "--on-nonfinite", "skip")) == 0
    assert "1 optimizer step(s) skipped" in capsys.readouterr().out
    assert [r["nonfinite_skips"] for r in rows(skipped)] == [0, 0, 1, 1]

    monkeypatch.delenv("PREFOPT_TEST_NAN_AT_STEP")
    assert main(args(tiny_model_dir, synthetic_pairs, out, "--resume", "auto")) == 0  # checkpoint 2 loads
    assert_same_run(full, out)


def test_damaged_checkpoints_are_skipped_naming_the_file(full, tiny_model_dir, synthetic_pairs, tmp_path, capsys):
    out = tmp_path / "damaged"
    shutil.copytree(full, out)
    weights = ckpt(out, 3) / "model" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # truncated
        f.truncate(size - 100)
    optim = ckpt(out, 2) / "optimizer.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped
    optim.write_bytes(bytes(data))

    messages: list[str] = []
    assert find_checkpoint("auto", out, log=messages.append) == ckpt(out, 1)
    assert messages == [f"skipped checkpoints/step-0000003: model/model.safetensors is {size - 100} bytes, "
                        f"the manifest says {size}",
                        "skipped checkpoints/step-0000002: optimizer.pt does not match its sha256 in the manifest "
                        "(corrupted)"]
    capsys.readouterr()
    assert main(args(tiny_model_dir, synthetic_pairs, out, "--resume", str(ckpt(out, 3)))) == 2
    assert "model/model.safetensors is" in capsys.readouterr().err

    assert main(args(tiny_model_dir, synthetic_pairs, out, "--resume", "auto", "--keep-checkpoints", "2")) == 0
    printed = capsys.readouterr().out
    assert "skipped checkpoints/step-0000003" in printed and "resumed from" in printed
    assert "differ from the run's config.yaml: keep_checkpoints: 3 -> 2" in printed
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 1
    assert_same_run(full, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def snapshot(root: Path) -> dict[str, tuple]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size,
                                             hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_used_output_dir_needs_resume_or_overwrite(full, tiny_model_dir, synthetic_pairs, tmp_path, capsys):
    out = tmp_path / "used"
    shutil.copytree(full, out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert main(args(tiny_model_dir, synthetic_pairs, out)) == 2
    err = capsys.readouterr().err
    assert "holds another run's checkpoints" in err and "--resume auto" in err and "--overwrite" in err
    assert snapshot(out) == before

    assert main(args(tiny_model_dir, synthetic_pairs, out, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine"  # only what prefopt wrote is cleared
    assert json.loads((out / "summary.json").read_text())["resumed_from"] is None
    assert_same_run(full, out)


def test_resume_auto_on_a_finished_run_without_checkpoints_is_refused(tiny_model_dir, synthetic_pairs, tmp_path,
                                                                      capsys):
    out = tmp_path / "done"
    base = [a for a in args(tiny_model_dir, synthetic_pairs, out) if a not in ("--save-every", "1")]
    assert main(base) == 0 and not list((out / "checkpoints").glob("step-*"))
    before = snapshot(out)
    assert main(base + ["--resume", "auto"]) == 2
    assert "holds a finished run and no checkpoint" in capsys.readouterr().err
    assert snapshot(out) == before


def test_fp16_overflow_steps_go_to_the_loss_scaler(tiny_model_dir, tmp_path):
    """With a gradient scaler (fp16), a non-finite gradient norm is the scaler's routine overflow: the step goes to
    optimizer.step() (the scaler skips it and lowers its scale); only max_nonfinite_skips of them in a row stop."""
    from accelerate import Accelerator

    from prefopt.config import SFTConfig
    from prefopt.models import load_model
    from prefopt.train.loop import NonFiniteError, start_run

    cfg = SFTConfig(model=str(tiny_model_dir), data="d", output_dir=str(tmp_path / "run"), max_nonfinite_skips=2,
                    progress=False)
    accelerator = Accelerator()
    run = start_run(cfg, load_model(tiny_model_dir), accelerator, total_steps=10, unit="examples")
    stepped = []
    run.optimizer.step = lambda *a, **k: stepped.append(run.step)  # what accelerate hands to the scaler
    accelerator.scaler = object()  # as accelerate sets it for fp16
    for _ in range(2):
        for p in run.params:
            p.grad = torch.full_like(p, float("inf"))
        run.optimizer_step()
    assert len(stepped) == 2
    for p in run.params:
        p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(NonFiniteError, match=r"gradient norm is inf .*loss scaler had already skipped 2 steps"):
        run.optimizer_step()
    for p in run.params:
        p.grad = torch.zeros_like(p)
    run.optimizer_step()  # a finite step resets the count
    assert len(stepped) == 3 and run.nonfinite_in_a_row == 0

"""Crash-resume torture test: a short DPO job (--save-every 1) is SIGKILLed at random moments, some of them inside
a checkpoint save (via the PREFOPT_TEST_PAUSE_IN_SAVE test hook), and one checkpoint is damaged on purpose; each
time the job is resumed with --resume auto. At the end the final weights and metrics.jsonl are compared with an
uninterrupted run of the same job.

    python benchmarks/crash_resume.py --kills 20 --steps 40 --seed 0

Prints the kills survived, the damaged checkpoints skipped, and the largest weight and loss differences.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(out: Path, model: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prefopt.cli", "dpo", "--model", str(model), "--data", str(data),
            "--output-dir", str(out), "--optimizer", "adamw", "--lr", "1e-3", "--warmup-steps", "2", "--batch-size",
            "8", "--micro-batch-size", "4", "--max-steps", str(steps), "--max-length", "96", "--progress", "false",
            "--save-every", "1", "--keep-checkpoints", "3", *extra]


def env(**extra: str) -> dict[str, str]:
    src = str(ROOT / "src")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), **extra}


def logged_steps(out: Path) -> int:
    try:
        return max((json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()), default=0)
    except (OSError, ValueError):
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="prefopt-crash-"))
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("PREFOPT_CACHE", str(work / "cache"))
    from prefopt.data import make_synthetic_preferences, synthetic_text, write_jsonl
    from prefopt.models import init_model

    model = init_model("tiny", work / "model", corpus=synthetic_text(800), seed=0)
    data = write_jsonl(make_synthetic_preferences(128, seed=0), work / "pairs.jsonl")

    t0 = time.perf_counter()
    full = work / "full"
    subprocess.run(cli(full, model, data, a.steps), env=env(), check=True, capture_output=True)
    t_full = time.perf_counter() - t0
    full_rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    t_step = 2 * sum(8 / r["pairs_per_second"] for r in full_rows) / len(full_rows)  # about a step and its save

    out = work / "killed"
    kills = in_save = skipped = 0
    log = []
    for k in range(a.kills):
        args = cli(out, model, data, a.steps, "--resume", "auto")
        done = logged_steps(out)
        if (out / "final.json").is_file():
            break
        if k % 2 == 1 and done < a.steps - 1:  # inside the save of the next step boundary, paused there by the test hook
            target = done + 1
            proc = subprocess.Popen(args, env=env(PREFOPT_TEST_PAUSE_IN_SAVE=f"60@{target}"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            tmp = out / "checkpoints" / f"step-{target:07d}.tmp" / "optimizer.pt"
            while not tmp.is_file() and proc.poll() is None:
                time.sleep(0.01)
            where = f"inside the save of step {target}"
            in_save += 1
        else:  # at a random moment of training: after a random logged step, plus a random fraction of a step
            proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            span = max(1, (a.steps - 2 - done) // max(1, a.kills - k))  # spread the kills over the whole run
            target = min(max(done + 1, a.steps - 2), done + rng.randint(1, span))
            while logged_steps(out) < target and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.5) * t_step)
            where = f"after {logged_steps(out)} logged steps (+{1000 * t_step:.0f} ms x random)"
        if proc.poll() is not None:
            log.append(f"kill {k + 1}: the run had already ended")
            proc.stdout.close()
            continue
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate()[0]
        skipped += output.count("skipped checkpoints/")
        kills += 1
        log.append(f"kill {k + 1}: {where}")
        if k == 2:  # damage the newest checkpoint on purpose: the next resume must skip it
            ckpts = sorted((out / "checkpoints").glob("step-???????"))
            if ckpts:
                victim = ckpts[-1] / "optimizer.pt"
                raw = bytearray(victim.read_bytes())
                raw[len(raw) // 2] ^= 0xFF
                victim.write_bytes(bytes(raw))
                log.append(f"  damaged {victim.relative_to(out)}")
    final = subprocess.run(cli(out, model, data, a.steps, "--resume", "auto"), env=env(), capture_output=True,
                           text=True)
    skipped += final.stdout.count("skipped checkpoints/")
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]

    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    max_w = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    ra = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    same_steps = [r["step"] for r in ra] == [r["step"] for r in rb]
    max_loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(ra, rb))
    print("\n".join(log))
    print(f"kills survived: {kills} ({in_save} inside a checkpoint save); damaged checkpoints skipped: {skipped}")
    print(f"metrics.jsonl steps identical: {same_steps}; max |loss diff|: {max_loss:.3g}; "
          f"max |weight diff|: {max_w:.3g} (torch {torch.__version__}, {a.steps} steps, seed {a.seed})")


if __name__ == "__main__":
    main()

"""`prefopt plot`: training curves from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.eval.plots import CURVE_DPI, CURVE_SIZE, plot_training_curves

mpimg = pytest.importorskip("matplotlib.image")

WIDTH, HEIGHT = int(CURVE_SIZE[0] * CURVE_DPI), int(CURVE_SIZE[1] * CURVE_DPI)


def _write_run(path: Path, offset: float = 0.0) -> Path:
    path.mkdir(parents=True)
    rows = []
    for step in range(1, 11):
        rows.append({"step": step, "loss": 0.69 - 0.03 * step + offset, "rewards/chosen": 0.1 * step,
                     "rewards/rejected": -0.1 * step, "rewards/margins": 0.2 * step,
                     "rewards/accuracies": min(1.0, 0.5 + 0.05 * step), "logps/chosen": -40.0 + step,
                     "logps/rejected": -42.0 - step, "grad_weight": 0.5 - 0.02 * step,
                     "pairs_per_second": 12.5, "tokens_per_second": 900.0, "lr": 1e-6, "grad_norm": 1.5})
        if step % 5 == 0:
            rows.append({"step": step, "eval/loss": 0.7 - 0.02 * step + offset, "eval/rewards/margins": 0.15 * step,
                         "eval/rewards/accuracies": 0.6, "eval/logps/chosen": -41.0})
    with open(path / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 11, "loss": 0.')  # a run killed mid-write: ignored
    return path


def test_plot_two_runs(tmp_path, capsys):
    a = _write_run(tmp_path / "beta0.1")
    b = _write_run(tmp_path / "beta0.5", offset=0.1)
    assert main(["plot", str(a), str(b)]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    names = {p.name for p in printed}
    assert {"loss.png", "rewards.png", "accuracy.png", "logps.png", "grad_weight.png", "lr.png",
            "grad_norm.png"} == names
    assert all(p.parent == a / "plots" for p in printed)
    for p in printed:
        img = mpimg.imread(p)
        assert img.shape[:2] == (HEIGHT, WIDTH)
        assert img.std() > 0  # not blank


def test_plot_keys_and_output_dir(tmp_path, capsys):
    a = _write_run(tmp_path / "run")
    out = tmp_path / "figs"
    assert main(["plot", str(a), "--output-dir", str(out), "--keys", "loss,rewards/margins"]) == 0
    printed = sorted(Path(line).name for line in capsys.readouterr().out.split())
    assert printed == ["loss.png", "rewards.png"]
    assert sorted(p.name for p in out.iterdir()) == printed


def test_plot_other_methods(tmp_path):
    run = tmp_path / "ppo"
    run.mkdir()
    rows = [{"step": s, "reward": 0.1 * s, "kl": 0.01 * s, "iterations_per_second": 3.0} for s in range(1, 5)]
    rows.append({"step": 4, "eval/reward": 0.5, "eval/kl": float("nan")})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = plot_training_curves([run], tmp_path / "out")
    assert sorted(p.name for p in paths) == ["kl.png", "reward.png"]
    assert all(mpimg.imread(p).shape[:2] == (HEIGHT, WIDTH) for p in paths)


def test_plot_errors(tmp_path, capsys):
    good = _write_run(tmp_path / "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(good), str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err and "metrics.jsonl" in err
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["plot", str(good), "--keys", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 0.9}\n')
    assert main(["plot", str(bad)]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err

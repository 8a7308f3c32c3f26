"""The README's first command, on a small budget."""

import json

from prefopt.cli import main


def test_quickstart_runs_and_learns(tmp_path, capsys):
    assert main(["quickstart", "--output-dir", str(tmp_path), "--max-steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "finished 12 steps" in out and "eval" in out
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]
    assert rows[-1]["eval/rewards/accuracies"] > 0.5

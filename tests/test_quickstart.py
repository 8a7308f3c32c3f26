"""The README's first command: the sentiment experiment on the built-in corpus, on a small budget."""

import json

from prefopt.cli import main


def test_quickstart_runs_dpo_and_raises_the_reward(tmp_path, capsys):
    assert main(["quickstart", "--output-dir", str(tmp_path), "--sft-steps", "150", "--max-steps", "40"]) == 0
    out = capsys.readouterr().out
    assert "reward" in out and "KL" in out and "reward_vs_kl.png" in out
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    rows = {(r["method"], r["setting"]): r for r in results["rows"]}
    assert set(rows) == {("sft", "π_SFT"), ("dpo", "β=0.1"), ("dpo", "β=0.5")}
    sft, dpo = rows[("sft", "π_SFT")], rows[("dpo", "β=0.1")]
    # DPO moves away from pi_SFT and raises the exact reward by clearly more than the standard errors
    assert dpo["kl"]["mean"] > 3 * dpo["kl"]["se"] > 0
    gain = dpo["reward"]["mean"] - sft["reward"]["mean"]
    assert gain > 3 * (dpo["reward"]["se"] ** 2 + sft["reward"]["se"] ** 2) ** 0.5
    # a smaller beta allows more KL
    assert dpo["kl"]["mean"] > rows[("dpo", "β=0.5")]["kl"]["mean"]
    assert (tmp_path / "report" / "reward_vs_kl.png").is_file() and (tmp_path / "report" / "results.md").is_file()

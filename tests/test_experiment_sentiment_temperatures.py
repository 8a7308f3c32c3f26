"""The sentiment experiment's temperature figure: every policy against pi_SFT at several sampling temperatures,
judged by the ground-truth reward (built-in corpus, tiny budget)."""

import json
import struct

import pytest

from prefopt.cli import main
from prefopt.errors import ConfigError
from prefopt.eval.winrate import win_rate_of
from prefopt.experiments.sentiment import SentimentConfig, judge_by_reward, run_sentiment, temperature_table

# pi_SFT and Best-of-N only (no pairs, DPO or PPO): the policies that need no training, many samples per prompt
ARGS = ["--size", "tiny", "--corpus-size", "600", "--sft-steps", "20", "--sft-lr", "3e-3", "--num-prompts", "16",
        "--max-new-tokens", "10", "--methods", "best-of-n", "--best-of-n", "2,4", "--eval-prompts", "8",
        "--eval-samples", "1", "--temperature-samples", "4", "--max-length", "64", "--progress", "false"]
TEMPS = [0.25, 0.5, 0.75, 1.0]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("temperatures")
    assert main(["experiment", "sentiment", "--output-dir", str(out), *ARGS]) == 0
    return out


def test_table_has_every_policy_and_temperature(run):
    table = json.loads((run / "report" / "temperatures.json").read_text())
    assert table["temperatures"] == TEMPS and table["prompts"] == 8 and table["samples_per_prompt"] == 4
    assert [(r["method"], r["setting"]) for r in table["rows"]] == [
        ("sft", "π_SFT"), ("best-of-n", "N=2"), ("best-of-n", "N=4")]
    for row in table["rows"]:
        assert [p["temperature"] for p in row["per_temperature"]] == TEMPS
        for p in row["per_temperature"]:
            assert p["pairs"] == 32 and p["invalid"] == 0 and p["wins"] + p["ties"] + p["losses"] == 32
            assert p["win_rate"] == pytest.approx(win_rate_of(p["wins"], p["ties"], p["losses"]))
            assert p["ci_low"] <= p["win_rate"] <= p["ci_high"]
            assert p["interval"] == "bootstrap (clustered by prompt)"  # 4 samples per prompt
    md = (run / "report" / "temperatures.md").read_text()
    assert "| sft | π_SFT |" in md and "| best-of-n | N=4 |" in md and "T=0.25" in md and "T=1" in md


def test_sft_against_itself_is_about_even(run):
    table = json.loads((run / "report" / "temperatures.json").read_text())
    sft = table["rows"][0]["per_temperature"]
    for p in sft:
        assert abs(p["win_rate"] - 0.5) < 0.25, p
    wins, ties, losses = (sum(p[k] for p in sft) for k in ("wins", "ties", "losses"))
    assert abs(win_rate_of(wins, ties, losses) - 0.5) < 0.12
    # independent samples (another seed), not the baseline's own: at temperature 1 most pairs differ
    policy = _rows(run / "temperatures-sft" / "samples.jsonl")
    base = _rows(run / "temperatures-baseline" / "samples.jsonl")
    at_one = [(p["response"], b["response"]) for p, b in zip(policy, base) if p["temperature"] == 1.0]
    assert len(at_one) == 32 and sum(a != b for a, b in at_one) > 16


def test_verdicts_follow_the_ground_truth_reward(run):
    policy = _rows(run / "temperatures-sft" / "samples.jsonl")
    base = {(r["temperature"], r["prompt_index"], r["sample_index"]): r for r in
            _rows(run / "temperatures-baseline" / "samples.jsonl")}
    table = json.loads((run / "report" / "temperatures.json").read_text())
    for t, p in zip(TEMPS, table["rows"][0]["per_temperature"]):
        mine = [r for r in policy if r["temperature"] == t]
        wins = sum(r["reward"] > base[(t, r["prompt_index"], r["sample_index"])]["reward"] for r in mine)
        ties = sum(r["reward"] == base[(t, r["prompt_index"], r["sample_index"])]["reward"] for r in mine)
        assert (p["wins"], p["ties"], p["losses"]) == (wins, ties, len(mine) - wins - ties)


def test_best_of_n_picks_the_best_of_its_group(run):
    samples = _rows(run / "temperatures-best-of-n" / "samples.jsonl")
    assert len(samples) == len(TEMPS) * 8 * 4 * 4
    reward = {(r["temperature"], r["prompt_index"], r["sample_index"]): r["reward"] for r in samples}
    picks = _rows(run / "temperatures-best-of-n" / "picks.jsonl")
    assert len(picks) == len(TEMPS) * 8 * 4 * 2
    for p in picks:
        group = [reward[(p["temperature"], p["prompt_index"], p["sample_index"] * 4 + j)] for j in range(p["n"])]
        assert p["reward"] == max(group)
    # the same samples, a larger group: N=4's pick is never worse than N=2's, so it never wins less often
    table = json.loads((run / "report" / "temperatures.json").read_text())
    n2, n4 = table["rows"][1]["per_temperature"], table["rows"][2]["per_temperature"]
    for a, b in zip(n2, n4):
        assert b["wins"] >= a["wins"] and b["win_rate"] >= a["win_rate"]


def test_plot_is_a_png_of_the_expected_size(run):
    png = (run / "report" / "win_rate_vs_temperature.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (800, 500)
    meta = json.loads((run / "report" / "results.json").read_text())["meta"]
    assert "win_rate_vs_temperature.png" in meta["win rate vs temperature"]


def test_rerun_samples_nothing_again(run, capsys):
    capsys.readouterr()
    assert main(["experiment", "sentiment", "--output-dir", str(run), *ARGS]) == 0
    out = capsys.readouterr().out
    for stage in ("temperatures-baseline", "temperatures-sft", "temperatures-best-of-n"):
        assert f"[{stage}] done earlier" in out
    assert "running" not in out
    # without temperatures: the other stages are unchanged, and no temperature stage runs
    cfg = SentimentConfig(output_dir=str(run), size="tiny", corpus_size=600, sft_steps=20, sft_lr=3e-3,
                          num_prompts=16, max_new_tokens=10, methods=["best-of-n"], best_of_n=[2, 4],
                          eval_prompts=8, eval_samples=1, max_length=64, progress=False, temperatures="none")
    lines = []
    result = run_sentiment(cfg, lines.append)
    assert result["temperatures"] == {} and "win rate vs temperature" not in result["meta"]
    assert not any("temperatures-" in line for line in lines) and not any("running" in line for line in lines)


def test_table_on_known_rewards():
    baseline = [{"temperature": 0.5, "prompt_index": i, "sample_index": 0, "reward": r} for i, r in
                enumerate([0.0, 1.0, 2.0, 3.0])]
    policy = [{"temperature": 0.5, "prompt_index": i, "sample_index": 0, "reward": r} for i, r in
              enumerate([1.0, 1.0, 1.0, 1.0])]  # win, tie, loss, loss
    table = temperature_table([({"policy": "p", "method": "dpo", "setting": "β=1"}, policy)], baseline, [0.5])
    cell = table["rows"][0]["per_temperature"][0]
    assert (cell["wins"], cell["ties"], cell["losses"], cell["pairs"]) == (1, 1, 2, 4)
    assert cell["win_rate"] == pytest.approx(1.5 / 4) and cell["interval"] == "wilson"
    assert cell["mean_reward"] == 1.0 and cell["baseline_mean_reward"] == 1.5
    assert judge_by_reward(2.0, 1.0) == "policy" and judge_by_reward(1.0, 2.0) == "baseline"
    assert judge_by_reward(1.0, 1.0) == "tie"
    with pytest.raises(ValueError, match="no baseline sample"):
        temperature_table([({"policy": "p", "method": "dpo", "setting": ""}, policy)], baseline[:2], [0.5])


def test_temperature_settings():
    cfg = SentimentConfig(output_dir="x", temperatures="0,0.5,1")
    cfg.validate()
    assert cfg.temperatures == [0.0, 0.5, 1.0]
    cfg = SentimentConfig(output_dir="x", temperatures=["none"])
    cfg.validate()
    assert cfg.temperatures == []
    with pytest.raises(ConfigError, match="temperatures"):
        SentimentConfig(output_dir="x", temperatures=[-0.5]).validate()
    with pytest.raises(ConfigError, match="temperatures"):
        SentimentConfig(output_dir="x", temperatures=[0.5, 0.5]).validate()
    with pytest.raises(ConfigError, match="temperature_samples"):
        SentimentConfig(output_dir="x", temperature_samples=0).validate()

"""`prefopt experiment sentiment` end to end on a tiny budget (built-in corpus), resumable stage by stage."""

import json

import pytest

from prefopt.cli import main
from prefopt.errors import ConfigError
from prefopt.eval.kl import best_of_n_kl
from prefopt.experiments.sentiment import SentimentConfig, run_sentiment
from prefopt.experiments.stages import Stages

TINY = ["--size", "tiny", "--corpus-size", "600", "--sft-steps", "20", "--sft-lr", "3e-3", "--num-prompts", "32",
        "--samples-per-prompt", "3", "--max-new-tokens", "16", "--betas", "0.1,0.5", "--dpo-steps", "4",
        "--dpo-batch-size", "8", "--dpo-lr", "5e-4", "--kl-coefs", "0.1", "--ppo-steps", "2",
        "--ppo-rollout-batch-size", "16", "--ppo-batch-size", "8", "--ppo-epochs", "1", "--rm-epochs", "1",
        "--rm-batch-size", "8", "--best-of-n", "2,4", "--eval-prompts", "8", "--eval-samples", "2",
        "--max-length", "64", "--progress", "false"]

STAGES = ["data", "reward", "sft", "eval-sft", "samples", "pairs", "dpo-beta0.1", "eval-dpo-beta0.1", "dpo-beta0.5",
          "eval-dpo-beta0.5", "rm", "ppo-rm-kl0.1", "eval-ppo-rm-kl0.1", "ppo-gt-kl0.1", "eval-ppo-gt-kl0.1",
          "best-of-n"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("sentiment")
    assert main(["experiment", "sentiment", "--output-dir", str(out), *TINY]) == 0
    return out


def test_every_stage_runs_and_writes_its_marker(experiment):
    for stage in STAGES:
        assert (experiment / stage / "done").is_file(), stage
    for model_stage in ("sft", "dpo-beta0.1", "dpo-beta0.5", "rm", "ppo-rm-kl0.1", "ppo-gt-kl0.1"):
        assert (experiment / model_stage / "model" / "config.json").is_file(), model_stage
    pairs = [json.loads(x) for x in (experiment / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)


def test_table_json_markdown_and_plot(experiment):
    report = experiment / "report"
    results = json.loads((report / "results.json").read_text())
    rows = results["rows"]
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("sft", "π_SFT"), ("dpo", "β=0.1"), ("dpo", "β=0.5"), ("ppo-rm", "kl_coef=0.1"), ("ppo-gt", "kl_coef=0.1"),
        ("best-of-n", "N=2"), ("best-of-n", "N=4")]
    for r in rows:
        assert r["reward"]["n"] > 0 and r["reward"]["mean"] == r["reward"]["mean"]  # not NaN
        assert 0 <= r["eos_share"] <= 1 and r["mean_length"] > 0
        assert r["train_seconds"] >= 0
    sft = rows[0]
    assert sft["kl"]["mean"] == 0.0  # pi_SFT against itself
    assert sft["kl"]["n"] == 16 and sft["kl"]["clusters"] == 8
    bon = {r["setting"]: r for r in rows if r["method"] == "best-of-n"}
    assert bon["N=4"]["kl"]["mean"] == pytest.approx(best_of_n_kl(4)) and bon["N=4"]["kl_exact"]
    assert bon["N=4"]["reward"]["mean"] >= bon["N=2"]["reward"]["mean"]  # same samples: more N, never worse
    assert "reward" in results["meta"] and "model" in results["meta"]
    md = (report / "results.md").read_text()
    assert "| dpo | β=0.1 |" in md and "| best-of-n | N=4 |" in md and "(formula)" in md
    png = (report / "reward_vs_kl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_temperature_table_has_every_policy_and_temperature(experiment):
    table = json.loads((experiment / "report" / "temperatures.json").read_text())
    rows = json.loads((experiment / "report" / "results.json").read_text())["rows"]
    assert [(r["method"], r["setting"]) for r in table["rows"]] == [(r["method"], r["setting"]) for r in rows]
    for row in table["rows"]:
        assert [p["temperature"] for p in row["per_temperature"]] == [0.25, 0.5, 0.75, 1.0]
        assert all(p["pairs"] == 8 and p["wins"] + p["ties"] + p["losses"] == 8 for p in row["per_temperature"])
    for stage in ("temperatures-baseline", "temperatures-sft", "temperatures-dpo-beta0.1", "temperatures-ppo-rm-kl0.1",
                  "temperatures-ppo-gt-kl0.1", "temperatures-best-of-n"):
        assert (experiment / stage / "done").is_file(), stage
    assert (experiment / "report" / "win_rate_vs_temperature.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_samples_carry_their_log_probs(experiment):
    rows = [json.loads(x) for x in (experiment / "eval-dpo-beta0.1" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    kl = json.loads((experiment / "report" / "results.json").read_text())["rows"][1]["kl"]["mean"]
    assert kl == pytest.approx(sum(r["logp"] - r["ref_logp"] for r in rows) / len(rows), abs=1e-5)


def test_rerun_skips_finished_stages_and_reruns_only_what_changed(experiment, capsys):
    capsys.readouterr()
    assert main(["experiment", "sentiment", "--output-dir", str(experiment), *TINY]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"[{stage}] done earlier" in out, stage
    assert "running" not in out
    # a third beta: only its DPO run and its evaluation are new
    markers = {s: (experiment / s / "done").read_text() for s in STAGES}
    args = [*TINY]
    args[args.index("--betas") + 1] = "0.1,0.5,0.2"
    assert main(["experiment", "sentiment", "--output-dir", str(experiment), *args]) == 0
    out = capsys.readouterr().out
    assert "[dpo-beta0.2] running" in out and "[eval-dpo-beta0.2] running" in out
    assert "[temperatures-dpo-beta0.2] running" in out  # the temperature figure samples only the new policy
    assert out.count("] running") == 3
    assert all((experiment / s / "done").read_text() == markers[s] for s in STAGES)
    rows = json.loads((experiment / "report" / "results.json").read_text())["rows"]
    assert [r["setting"] for r in rows if r["method"] == "dpo"] == ["β=0.1", "β=0.5", "β=0.2"]


def test_stages_rerun_downstream_when_an_upstream_setting_changes(tmp_path):
    calls = []

    def stage(name):
        def fn(d):
            calls.append(name)
            (d / "out.txt").write_text(name)
            return {"name": name}
        return fn

    log = []
    for a_key in (1, 1, 2):
        s = Stages(tmp_path, log.append)
        s.run("a", {"k": a_key}, stage("a"))
        s.run("b", {"k": 0}, stage("b"), after=["a"])
        s.run("c", {"k": 0}, stage("c"))
    assert calls == ["a", "b", "c", "a", "b"]  # c does not depend on a
    assert any("settings or inputs changed" in line for line in log)
    assert s.run("b", {"k": 0}, stage("b"), after=["a"]) == {"name": "b"}


def test_a_failed_stage_leaves_no_marker_and_runs_again(tmp_path):
    s = Stages(tmp_path, lambda _: None)

    def boom(d):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        s.run("x", {}, boom)
    assert not (tmp_path / "x" / "done").exists()
    assert s.run("x", {}, lambda d: {"ok": 1}) == {"ok": 1}


def test_config_errors_are_named():
    with pytest.raises(ConfigError, match="methods"):
        run_sentiment(SentimentConfig(output_dir="x", methods=["dpo", "rlhf"]))
    with pytest.raises(ConfigError, match="bon_selector"):
        run_sentiment(SentimentConfig(output_dir="x", bon_selector="best"))
    with pytest.raises(ConfigError, match="output_dir"):
        run_sentiment(SentimentConfig())
    with pytest.raises(ConfigError, match="reward model of the ppo-rm"):
        SentimentConfig(output_dir="x", methods=["best-of-n"], bon_selector="reward_model").validate()


def test_methods_subset(tmp_path):
    """Only pi_SFT and Best-of-N: no samples, pairs or training stages."""
    args = [*TINY]
    args += ["--methods", "best-of-n"]
    assert main(["experiment", "sentiment", "--output-dir", str(tmp_path), *args]) == 0
    assert not (tmp_path / "pairs").exists() and not (tmp_path / "rm").exists()
    rows = json.loads((tmp_path / "report" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["sft", "best-of-n", "best-of-n"]


def test_rt_polarity_path_uses_a_classifier_reward(tmp_path):
    from conftest import RT_POLARITY

    if not RT_POLARITY.is_dir():
        pytest.skip(f"rt-polarity not found at {RT_POLARITY} (it lives in ../shared/data beside the repo)")
    args = [*TINY, "--methods", "dpo", "--betas", "0.1", "--vocab-size", "1024"]
    assert main(["experiment", "sentiment", "--output-dir", str(tmp_path), "--data", str(RT_POLARITY), *args]) == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["meta"]["classifier_heldout_accuracy"] > 0.7  # TF-IDF + LR on rt-polarity: about 0.76
    assert results["meta"]["classifier_train_size"] > results["meta"]["classifier_test_size"] > 1000
    data = json.loads((tmp_path / "data" / "done").read_text())["result"]
    assert data["sft_texts"] == 5331 and data["reviews"] == 10662
    # the policy's SFT text, the classifier's training text and the held-out reviews do not overlap
    texts = {name: {json.loads(x)["text"] for x in (tmp_path / "data" / f"{name}.jsonl").read_text().splitlines()}
             for name in ("sft", "classifier_train", "heldout")}
    assert not texts["sft"] & texts["classifier_train"] and not texts["sft"] & texts["heldout"]
    eval_rows = [json.loads(x) for x in (tmp_path / "eval-sft" / "samples.jsonl").read_text().splitlines()]
    assert any(r["reward"] != 0 for r in eval_rows)  # log-odds, not the corpus lexicon

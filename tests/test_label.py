import json
import textwrap

import pytest

from prefopt.cli import main
from prefopt.data import load_preferences
from prefopt.errors import ConfigError
from prefopt.label import label_samples, make_rows, read_samples, score_groups
from prefopt.rewards import load_reward_fn


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def _write_samples(path, groups):
    """groups: {prompt: [responses]} -> generate-style rows."""
    with path.open("w") as f:
        for i, (prompt, responses) in enumerate(groups.items()):
            for j, r in enumerate(responses):
                f.write(json.dumps({"prompt": prompt, "response": r, "prompt_index": i, "sample_index": j}) + "\n")
    return path


SAMPLES = {
    "p1": ["bb", "a", "dddd", "ccc"],      # distinct lengths
    "p2": ["xx", "yy"],                    # best and worst tie -> skipped
    "p3": ["solo"],                        # one response -> skipped
    "p4": ["qq", "qq", "r", "sss", "tt"],  # a duplicate; tt ties qq
}


def test_pairs_follow_the_reward_and_ties_are_skipped(tmp_path):
    rows, report = label_samples(_write_samples(tmp_path / "s.jsonl", SAMPLES), length_reward)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("p1", "dddd", "a"), ("p4", "sss", "r")]
    for r in rows:
        assert r["chosen_score"] > r["rejected_score"]
        assert (r["chosen_score"], r["rejected_score"]) == (len(r["chosen"]), len(r["rejected"]))
    assert (report.prompts, report.samples, report.duplicates) == (4, 12, 1)
    assert (report.rows, report.skipped_ties, report.skipped_single) == (2, 1, 1)
    assert "skipped 1 prompts with tied scores" in report.summary()


def test_min_margin_and_all_pairs(tmp_path):
    path = _write_samples(tmp_path / "s.jsonl", SAMPLES)
    rows, report = label_samples(path, length_reward, min_margin=2.5)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("dddd", "a")]  # p4's margin 2 <= 2.5
    assert report.skipped_ties == 2
    rows, report = label_samples(path, length_reward, all_pairs=True)
    p1 = [(r["chosen"], r["rejected"]) for r in rows if r["prompt"] == "p1"]
    assert len(p1) == 6 and all(len(c) > len(r) for c, r in p1)
    p4 = {(r["chosen"], r["rejected"]) for r in rows if r["prompt"] == "p4"}
    assert p4 == {("sss", "qq"), ("sss", "tt"), ("sss", "r"), ("qq", "r"), ("tt", "r")}
    assert report.tied_pairs == 1  # qq vs tt


def test_ranking_sorted_by_score_and_readable_as_ranked(tmp_path):
    samples = {"p1": ["bb", "a", "dddd", "ccc"], "p4": ["qq", "r", "sss", "tt"], "p5": ["zz", "z"]}
    rows, report = label_samples(_write_samples(tmp_path / "s.jsonl", samples), length_reward, ranking=True)
    assert rows[0] == {"prompt": "p1", "responses": ["dddd", "ccc", "bb", "a"], "scores": [4.0, 3.0, 2.0, 1.0]}
    assert rows[1]["responses"] == ["zz", "z"]
    assert report.skipped_ties == 1  # p4: qq and tt tie in the middle
    out = tmp_path / "ranked.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, load_report = load_preferences(out)
    assert load_report.format == "ranked" and examples[0].responses == ["dddd", "ccc", "bb", "a"]


def test_message_prompts_become_loadable_pairs(tmp_path):
    prompt = [{"role": "user", "content": "hi"}]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt, "response": r}) + "\n" for r in ["long one", "s"]))
    groups, _ = read_samples(path)
    score_groups(groups, length_reward)
    rows, _ = make_rows(groups)
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "long one"}]
    out = tmp_path / "pairs.jsonl"
    out.write_text(json.dumps(rows[0]) + "\n")
    (ex,), _ = load_preferences(out)
    assert ex.prompt == prompt and ex.chosen[0]["content"] == "long one"


def test_reward_fn_loader(tmp_path, monkeypatch):
    for spec, msg in [("nocolon", "expected 'module:function'"), ("mod:", "expected 'module:function'"),
                      ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
                      ("json:no_such_fn", "has no attribute 'no_such_fn'"),
                      ("json:__doc__", "not a callable"), (f"{tmp_path}/missing.py:f", "not found")]:
        with pytest.raises(ConfigError, match=msg):
            load_reward_fn(spec)
    (tmp_path / "my_rewards_mod.py").write_text("def score(p, r):\n    return [1.0] * len(r)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_fn("my_rewards_mod:score")(["p"], ["a", "b"]) == [1.0, 1.0]
    assert load_reward_fn(f"{tmp_path}/my_rewards_mod.py:score")(["p"], ["a"]) == [1.0]


def test_reward_fn_output_checked(tmp_path):
    path = _write_samples(tmp_path / "s.jsonl", {"p": ["a", "bb"]})
    with pytest.raises(ConfigError, match="returned 1 scores for 2"):
        label_samples(path, lambda p, r: [1.0])
    with pytest.raises(ConfigError, match="non-finite"):
        label_samples(path, lambda p, r: [1.0, float("nan")])


def test_cli_label_end_to_end(tmp_path, monkeypatch, capsys):
    mod = tmp_path / "lbl_rewards.py"
    mod.write_text(textwrap.dedent("""
        def count_a(prompts, responses):
            assert len(prompts) == len(responses)
            return [r.count("a") for r in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    samples = _write_samples(tmp_path / "s.jsonl", {"p1": ["xa", "aaa", "b"], "p2": ["q", "w"]})
    out = tmp_path / "pairs.jsonl"
    assert main(["label", "--samples", str(samples), "--output", str(out), "--reward-fn", "lbl_rewards:count_a"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "p1", "chosen": "aaa", "rejected": "b", "chosen_score": 3.0, "rejected_score": 0.0}]
    assert "wrote 1 best-vs-worst pairs" in capsys.readouterr().out
    (ex,), _ = load_preferences(out)
    assert ex.responses == ["aaa", "b"]
    ranked = tmp_path / "ranked.jsonl"
    assert main(["label", "--samples", str(samples), "--output", str(ranked), "--reward-fn",
                 "lbl_rewards:count_a", "--ranking"]) == 0
    assert json.loads(ranked.read_text())["responses"] == ["aaa", "xa", "b"]
    # both or neither reward source is an error
    assert main(["label", "--samples", str(samples), "--output", str(out)]) == 2
    assert "exactly one of reward_model" in capsys.readouterr().err


def test_reward_model_path(tmp_path):
    rm = pytest.importorskip("prefopt.rewards", reason="prefopt.rewards (load_reward_model, score_texts) "
                             "is written in parallel and not there yet")
    from conftest import make_tiny_reward_model
    from prefopt.data import synthetic_text
    from prefopt.rewards import reward_model_fn
    from prefopt.models import train_tokenizer

    make_tiny_reward_model(tmp_path / "rm", train_tokenizer(synthetic_text(50), vocab_size=300))
    assert hasattr(rm, "load_reward_model") and hasattr(rm, "score_texts")
    fn = reward_model_fn(str(tmp_path / "rm"), batch_size=2)
    samples = _write_samples(tmp_path / "s.jsonl", {"Review:": [" good film", " bad film", " fine"]})
    rows, report = label_samples(samples, fn)
    scores = fn(["Review:"] * 3, [" good film", " bad film", " fine"])
    assert len(scores) == 3 and len(set(scores)) == 3
    assert report.rows == 1 and rows[0]["chosen_score"] == pytest.approx(max(scores), abs=1e-5)
    assert rows[0]["rejected_score"] == pytest.approx(min(scores), abs=1e-5)

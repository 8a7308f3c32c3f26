import json
import math

import pytest
from conftest import make_tiny_reward_model
import torch

from prefopt.cli import main
from prefopt.data import load_preferences, make_synthetic_preferences, tokenize_example, write_jsonl
from prefopt.data.types import PreferenceExample
from prefopt.logprobs import naive_logps
from prefopt.models import load_model, load_tokenizer, make_reference
from prefopt.score import implicit_rewards, pair_metrics, score_examples

BETA = 0.5


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def examples():
    exs = make_synthetic_preferences(5, seed=1)
    exs.append(PreferenceExample([{"role": "user", "content": "Say hi."}], ["Hi there!", "No."], source="chat"))
    exs.append(make_synthetic_preferences(1, seed=2, num_responses=3)[0])  # K = 3 beside K = 2
    return exs


def _perturbed(model, seed=0, scale=0.05):
    policy = make_reference(model)
    policy.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return policy


def test_fresh_policy_has_zero_implicit_reward(tiny_model_dir, tok, examples):
    policy = load_model(tiny_model_dir)
    reference = make_reference(policy)
    rewards = implicit_rewards(policy, reference, tok, examples, BETA, batch_size=3)
    assert rewards.shape == (len(examples), 3)
    assert math.isnan(rewards[0, 2]) and not torch.isnan(rewards[-1]).any()  # K = 2 rows padded with NaN
    finite = rewards[~torch.isnan(rewards)]
    assert finite.numel() == 2 * (len(examples) - 1) + 3
    assert torch.equal(finite, torch.zeros_like(finite))  # exactly 0, not approximately


def test_perturbed_policy_matches_naive_logps(tiny_model_dir, tok, examples):
    reference = load_model(tiny_model_dir)
    policy = _perturbed(reference)
    scored = score_examples(policy, reference, tok, examples, BETA, batch_size=2)
    assert (scored.rewards[~torch.isnan(scored.rewards)].abs() > 1e-3).all()
    for i, ex in enumerate(examples):
        item = tokenize_example(ex, tok)
        for k, resp in enumerate(item.response_ids):
            pol = naive_logps(policy, item.prompt_ids, resp)
            ref = naive_logps(reference, item.prompt_ids, resp)
            assert scored.policy_logps[i, k].item() == pytest.approx(pol, abs=1e-3)
            assert scored.reference_logps[i, k].item() == pytest.approx(ref, abs=1e-3)
            assert scored.rewards[i, k].item() == pytest.approx(BETA * (pol - ref), abs=1e-3)
            assert scored.response_tokens[i, k].item() == len(resp)


def test_pair_metrics_constructed():
    scores = torch.tensor([[1.0, 0.0, math.nan], [0.0, 1.0, math.nan], [2.0, -1.0, math.nan],
                           [3.0, 1.0, 2.0], [5.0, math.nan, math.nan]])
    m = pair_metrics(scores)
    # pairs: 3 from K=2 rows (2 correct) + 3 from the K=3 row ((3>1), (3>2) correct, (1>2) wrong); last row has 1
    assert m["pairs"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["margin"] == pytest.approx((1 - 1 + 3 + 1) / 4)  # best minus worst (last) per row
    assert pair_metrics(torch.tensor([[1.0], [2.0]])) == {"pairs": 0}
    # a tie is not a correct ordering
    assert pair_metrics(torch.tensor([[1.0, 1.0]]))["accuracy"] == 0.0


def test_cli_score_end_to_end(tiny_model_dir, tok, tmp_path, capsys):
    reference = load_model(tiny_model_dir)
    policy = _perturbed(reference, seed=1)
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    data = write_jsonl(make_synthetic_preferences(6, seed=3), tmp_path / "pairs.jsonl")
    out = tmp_path / "scores.jsonl"
    args = ["score", "--model", str(tmp_path / "policy"), "--ref-model", str(tiny_model_dir), "--data", str(data),
            "--beta", str(BETA), "--output", str(out), "--batch-size", "4", "--progress", "false"]
    try:
        import prefopt.train.rm  # noqa: F401
        args += ["--reward-model", str(make_tiny_reward_model(tmp_path / "rm", tok))]
        with_rm = True
    except ImportError:  # pragma: no cover - rm.py is written in parallel
        with_rm = False
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    examples, _ = load_preferences(data)
    expected = implicit_rewards(policy, reference, tok, examples, BETA)
    got = torch.tensor([r["implicit_rewards"] for r in rows])
    assert torch.allclose(got, expected, atol=1e-4)
    for r in rows:
        assert r["implicit_rewards"][0] == pytest.approx(BETA * (r["policy_logps"][0] - r["reference_logps"][0]))
    acc = sum(r["implicit_rewards"][0] > r["implicit_rewards"][1] for r in rows) / len(rows)
    assert f"pair accuracy {acc:.4f}" in printed
    if with_rm:
        rm_acc = sum(r["rm_scores"][0] > r["rm_scores"][1] for r in rows) / len(rows)
        assert f"reward model: pair accuracy {rm_acc:.4f}" in printed
    # single-response rows (generate output): rewards per row, no pair metrics
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": ex.prompt, "response": ex.chosen}) + "\n" for ex in examples))
    out2 = tmp_path / "scores2.jsonl"
    assert main(["score", "--model", str(tmp_path / "policy"), "--ref-model", str(tiny_model_dir), "--data",
                 str(samples), "--beta", str(BETA), "--output", str(out2), "--progress", "false"]) == 0
    rows2 = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [r["implicit_rewards"][0] for r in rows2] == pytest.approx([r["implicit_rewards"][0] for r in rows],
                                                                      abs=1e-4)
    assert "pair accuracy" not in capsys.readouterr().out
    # missing reference is a clear config error
    assert main(["score", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)]) == 2
    assert "'ref_model' is required" in capsys.readouterr().err

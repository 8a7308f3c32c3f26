"""Reward model: the Bradley-Terry loss, learning a separable set, scoring, save/load with plain transformers, CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers import AutoModelForSequenceClassification

from prefopt.cli import main
from prefopt.config import RMConfig
from prefopt.data import make_synthetic_preferences, write_jsonl
from prefopt.errors import ConfigError
from prefopt.models import init_model, load_tokenizer
from prefopt.rewards import load_reward_model, score_texts
from prefopt.train.rm import RewardModeling, bradley_terry, build_reward_model, center_penalty, train_rm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("tiny"))


def pair_accuracy(model, tok, examples):
    prompts = [ex.prompt for ex in examples]
    chosen = score_texts(model, tok, prompts, [ex.chosen for ex in examples], batch_size=16)
    rejected = score_texts(model, tok, prompts, [ex.rejected for ex in examples], batch_size=16)
    return float((chosen > rejected).float().mean()), chosen, rejected


def test_bradley_terry_loss():
    r = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    losses, acc = bradley_terry(r)
    torch.testing.assert_close(losses, -F.logsigmoid(r[:, 0] - r[:, 1]))
    assert acc.tolist() == [1.0, 0.0]
    ranked = torch.tensor([[3.0, 1.0, 2.0]])  # best first: pairs (0,1) right, (0,2) right, (1,2) wrong
    losses, acc = bradley_terry(ranked)
    expected = -F.logsigmoid(torch.tensor([2.0, 1.0, -1.0])).mean()
    torch.testing.assert_close(losses, expected.reshape(1))
    assert acc.item() == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="center_rewards_coefficient"):
        RMConfig(model="m", data="d", output_dir="o", center_rewards_coefficient=-1).validate()


def test_center_penalty_is_the_squared_pair_sum_and_spares_the_margin():
    r = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    torch.testing.assert_close(center_penalty(r), torch.tensor([0.0, 6.25]))  # (1 - 1)^2, (2 + 0.5)^2
    # three ranked responses: the mean over the pairs (0,1), (0,2), (1,2)
    r3 = torch.tensor([[3.0, 1.0, -2.0]])
    torch.testing.assert_close(center_penalty(r3), torch.tensor([(16.0 + 1.0 + 1.0) / 3]))
    # shifting both rewards by the same amount moves the penalty, widening their margin around 0 does not
    assert center_penalty(torch.tensor([[2.0, -2.0]])).item() == 0.0

    class Fixed(torch.nn.Module):  # a "reward model" whose logits are given
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.logits})()

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3),
             "num_responses": 2}
    logits = torch.tensor([[1.0], [2.0], [-1.0], [0.5]])  # response-major: chosen of both pairs, then rejected
    plain = RewardModeling().step(Fixed(logits), batch).losses
    centred = RewardModeling(0.1).step(Fixed(logits), batch).losses
    torch.testing.assert_close(centred - plain, 0.1 * torch.tensor([0.0, 6.25]))


def test_score_texts_batched_equals_single_unpadded_forward(tiny):
    tok = load_tokenizer(tiny)
    torch.manual_seed(0)
    model = build_reward_model(tiny, tok).eval()
    prompts = ["Short?", "A much longer prompt that needs padding in a batch?", "Mid-length prompt."]
    responses = [" Yes, indeed.", " No.", " Perhaps, it depends on many things."]
    batched = score_texts(model, tok, prompts, responses, batch_size=3)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = tok(p, add_special_tokens=False)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids + [tok.eos_token_id]])
        with torch.no_grad():
            single = model(input_ids=ids).logits[0, 0]
        assert batched[i].item() == pytest.approx(single.item(), abs=1e-5)
    assert len(set(batched.tolist())) == 3
    with pytest.raises(ValueError, match="2 responses"):
        score_texts(model, tok, prompts, responses[:2])


def test_rm_learns_separable_preferences_and_reloads_with_transformers(tiny, tmp_path):
    train_data = write_jsonl(make_synthetic_preferences(48, seed=0), tmp_path / "train.jsonl")
    held_out = make_synthetic_preferences(32, seed=1)
    eval_data = write_jsonl(held_out, tmp_path / "eval.jsonl")
    tok = load_tokenizer(tiny)
    out = tmp_path / "rm"
    cfg = RMConfig(model=str(tiny), data=str(train_data), eval_data=str(eval_data), output_dir=str(out), lr=3e-3,
                   warmup_steps=0, batch_size=16, micro_batch_size=16, max_steps=15, progress=False, seed=1)
    # the run's exact starting point (train_rm seeds, then builds the head). A random head's accuracy on this set
    # scatters around 0.5 (0.19 to 0.91 over seeds 0-7); seed 1 starts at 0.47, so any rise is the training's.
    set_seed(cfg.seed)
    untrained_acc, _, _ = pair_accuracy(build_reward_model(tiny, tok).eval(), tok, held_out)
    assert 0.3 <= untrained_acc <= 0.7, untrained_acc
    summary = train_rm(cfg)
    assert summary["eval"]["eval/accuracy"] > 0.9

    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers, no prefopt code
    assert type(plain).__name__ == "LlamaForSequenceClassification" and plain.config.num_labels == 1
    assert plain.config.pad_token_id == tok.pad_token_id
    acc, chosen, rejected = pair_accuracy(plain, tok, held_out)
    assert acc > 0.9
    # the same rewards the training run measured on the held-out set, and the same through load_reward_model
    assert chosen.mean().item() == pytest.approx(summary["eval"]["eval/rewards/chosen"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(summary["eval"]["eval/rewards/rejected"], abs=1e-4)
    loaded, loaded_tok = load_reward_model(out)
    again = score_texts(loaded, loaded_tok, [ex.prompt for ex in held_out], [ex.chosen for ex in held_out])
    torch.testing.assert_close(again, chosen)


def test_cli_end_to_end_with_lora(tiny, tmp_path):
    data = write_jsonl(make_synthetic_preferences(16, seed=4), tmp_path / "prefs.jsonl")
    out = tmp_path / "run"
    argv = ["rm", "--model", str(tiny), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "4", "--micro-batch-size", "2", "--eval-fraction", "0.25", "--lora", "--lr", "1e-3",
            "--progress", "false"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "tokens_per_second"):
        assert all(key in r for r in train_rows), key
    assert "eval/accuracy" in rows[-1]
    model = AutoModelForSequenceClassification.from_pretrained(out)  # adapters merged into plain weights
    assert (out / "adapter" / "adapter_config.json").is_file()
    fresh = build_reward_model(tiny, load_tokenizer(tiny))
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, fresh.model.layers[0].self_attn.q_proj.weight)

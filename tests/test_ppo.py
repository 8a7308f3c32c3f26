"""PPO-RLHF: the math on hand-computed numbers, rollout log-probs vs generate, learning a toy reward, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt import rl
from prefopt.cli import main
from prefopt.config import PPOConfig
from prefopt.errors import ConfigError
from prefopt.data.prompts import encode_prompts, read_prompts
from prefopt.generation import sample_ids
from prefopt.train.ppo import PolicyWithValueHead, Rollout, collate_rollouts, load_value_head, policy_forward, train_ppo

PPO_KEYS = ["step", "reward", "kl", "entropy", "clipfrac", "value_loss", "policy_loss", "approx_kl", "kl_coef",
            "response_length"]
TIMING = {"rollout_seconds", "rollouts_per_second", "tokens_per_second"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are too small for intra-op threads; on a busy 2-core machine a second thread makes
    these runs ~10x slower (spinning workers), so this module runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# The math, against numbers worked out by hand


def test_kl_penalty_and_gae_by_hand():
    # row 0: three tokens; row 1: two tokens and one padding slot holding garbage that must be ignored
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, 1.0])
    rewards, kl = rl.kl_penalized_rewards(logps, ref, scores, mask, kl_coef=0.1)
    # kl_t = logp - ref: [0.5, -1.0, 0.0] and [0.0, 1.0, -]
    # r_t = -0.1 kl_t, score added at the last real token
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.0, 0.9, 0.0]]))

    values = torch.tensor([[0.5, 1.0, 1.5], [0.2, 0.4, 9.0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta_2 = 2.0 + 0 - 1.5 = 0.5;  delta_1 = 0.1 + 0.9*1.5 - 1.0 = 0.45;  delta_0 = -0.05 + 0.9*1.0 - 0.5 = 0.35
    #        A_2 = 0.5;  A_1 = 0.45 + 0.72*0.5 = 0.81;  A_0 = 0.35 + 0.72*0.81 = 0.9332;  R = A + V
    # row 1: delta_1 = 0.9 + 0 - 0.4 = 0.5;  delta_0 = 0 + 0.9*0.4 - 0.2 = 0.16;  A_1 = 0.5;  A_0 = 0.16 + 0.72*0.5 = 0.52
    torch.testing.assert_close(adv, torch.tensor([[0.9332, 0.81, 0.5], [0.52, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.4332, 1.81, 2.0], [0.72, 0.9, 0.0]]))

    # gamma = lam = 1: A_t is the reward-to-go minus V_t (Monte Carlo)
    adv1, ret1 = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv1[0], torch.tensor([2.05 - 0.5, 2.1 - 1.0, 2.0 - 1.5]))
    torch.testing.assert_close(ret1[0], torch.tensor([2.05, 2.1, 2.0]))
    # lam = 0: one-step TD errors
    adv0, _ = rl.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv0[0], torch.tensor([0.35, 0.45, 0.5]))


def test_whiten_by_hand():
    x = torch.tensor([[0.0, 2.0], [4.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    # masked values 0, 2, 4: mean 2, unbiased variance (4 + 0 + 4) / 2 = 4, std 2
    torch.testing.assert_close(rl.whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rl.whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0], [3.0, 0.0]]),
                               atol=1e-6, rtol=0)


def test_clipped_policy_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5], [0.4, 0.3]]))
    # row 0: token 0 ratio 1.5 with A = +1 (clip active); token 1 ratio 0.9 with A = -2 (inside the clip range)
    # row 1: ratio 1.5 with A = -1: the unclipped term is the larger (pessimistic) one, so no clipping
    new = (old + torch.log(torch.tensor([[1.5, 0.9], [1.5, 1.0]])))
    new.requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, clipfrac, approx_kl = rl.clipped_policy_loss(new, old, adv, mask, cliprange=0.2)
    # row 0: token 0 max(-1.5, -1.2) = -1.2 (clipped); token 1 max(1.8, 1.8) = 1.8; mean 0.3
    # row 1: max(1.5, 1.2) = 1.5
    torch.testing.assert_close(loss, torch.tensor([0.3, 1.5]))
    torch.testing.assert_close(clipfrac, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(approx_kl, torch.tensor([0.25 * (math.log(1.5) ** 2 + math.log(0.9) ** 2),
                                                        0.5 * math.log(1.5) ** 2]))
    loss.sum().backward()
    # the clipped token gets no gradient; token 1: d/dlogp of -A exp(logp - old) / 2 = 2 * 0.9 / 2
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 0.9], [1.5, 0.0]]))


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[1.5, 1.1]])
    returns = torch.tensor([[2.0, 2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, clipfrac = rl.clipped_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: (1.5 - 2)^2 = 0.25, clipped V = 1.2 -> (1.2 - 2)^2 = 0.64 (active); token 1: 0.81 both
    torch.testing.assert_close(loss, torch.tensor([0.5 * (0.64 + 0.81) / 2]))
    torch.testing.assert_close(clipfrac, torch.tensor([0.5]))


def test_adaptive_kl_controller_moves_the_right_way():
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, n_steps=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped to +0.2
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(6.6, n_steps=1000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))  # error 0.1
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(0.0, n_steps=1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))  # too little KL: lower
    assert ctl.update(6.0, n_steps=1000) == pytest.approx(0.098)  # on target: unchanged
    state = ctl.state_dict()
    other = rl.AdaptiveKLController(0.5, target=6.0, horizon=10000)
    other.load_state_dict(state)
    assert other.value == ctl.value
    fixed = rl.FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05


def test_config_validation():
    base = dict(model="m", data="d", output_dir="o", reward_fn="mod:fn")
    PPOConfig(**base).validate()
    with pytest.raises(ConfigError, match="rollout_batch_size"):
        PPOConfig(**base, rollout_batch_size=20, batch_size=16, micro_batch_size=4).validate()
    with pytest.raises(ConfigError, match="not both"):
        PPOConfig(**base, reward_model="rm").validate()
    with pytest.raises(ConfigError, match="module:function"):
        PPOConfig(**{**base, "reward_fn": "nocolon"}).validate()
    with pytest.raises(ConfigError, match="lam"):
        PPOConfig(**base, lam=1.5).validate()


# ---------------------------------------------------------------------------------------------------------
# Rollouts


def test_rollout_logps_match_the_sampling_distribution(tiny_model_dir):
    """The log-probs PPO trains on are those of the distribution generate sampled from (left padding,
    position ids, temperature)."""
    from transformers import GenerationConfig

    from prefopt.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tok, lm = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    model = PolicyWithValueHead(lm).eval()
    prompt_ids = encode_prompts(["Hi", "A much longer prompt than the other one"], tok, 64)
    width = max(map(len, prompt_ids))
    ids = torch.full((2, width), tok.pad_token_id)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):], am[i, width - len(p):] = torch.tensor(p), 1
    g = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, output_logits=True,
                         return_dict_in_generate=True)
    out = lm.generate(input_ids=ids, attention_mask=am, generation_config=g)
    resp = out.sequences[:, width:]
    expected = torch.log_softmax(torch.stack(out.logits, 1).float() / 0.7, -1).gather(-1, resp[..., None])[..., 0]
    batch = collate_rollouts([Rollout(p, r.tolist()) for p, r in zip(prompt_ids, resp)], tok.pad_token_id)
    with torch.no_grad():
        logps, values, _ = policy_forward(model, batch, temperature=0.7)
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=0)
    assert values.shape == logps.shape

    # sample_ids stops each response at its first EOS and returns token ids (no padding)
    rs = sample_ids(lm, prompt_ids, [1, 2], pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id], max_new_tokens=5,
                    temperature=1.0)
    assert len(rs) == 2 and all(1 <= len(r) <= 5 for r in rs)
    assert all(tok.eos_token_id not in r[:-1] for r in rs)


def test_read_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\nfirst\n")
    assert read_prompts(str(tmp_path / "p.txt"), unique=True) == ["first", "second"]
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "a", "chosen": "z", "rejected": "w"},
            {"prompt": "b", "chosen": "x", "rejected": "y"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompts(str(tmp_path / "pairs.jsonl"), unique=True) == ["a", "b"]
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    sft = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    (tmp_path / "hh.jsonl").write_text(json.dumps(hh) + "\n")
    (tmp_path / "sft.jsonl").write_text(json.dumps(sft) + "\n")
    assert read_prompts(str(tmp_path / "hh.jsonl"), unique=True) == ["\n\nHuman: hi\n\nAssistant:"]
    assert read_prompts(str(tmp_path / "sft.jsonl"), unique=True) == [[{"role": "user", "content": "q"}]]


# ---------------------------------------------------------------------------------------------------------
# Learning a toy reward


def even_token_reward(tokenizer):
    """Fraction of the response's tokens (re-encoded) with an even id: about 1/2 at random, 1 at best."""

    def reward(prompts, responses):
        out = []
        for r in responses:
            ids = tokenizer(r, add_special_tokens=False)["input_ids"]
            out.append(sum(i % 2 == 0 for i in ids) / max(1, len(ids)))
        return out

    return reward


def toy_cfg(model: Path, prompts: Path, out: Path, **kw) -> PPOConfig:
    base = dict(model=str(model), data=str(prompts), output_dir=str(out), lr=3e-3, rollout_batch_size=16,
                batch_size=8, micro_batch_size=8, ppo_epochs=4, max_new_tokens=6, max_steps=8, progress=False,
                seed=0)
    base.update(kw)
    return PPOConfig(**base)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(f"Question {i}: tell me about the river\n" for i in range(32)))
    return path


def test_toy_reward_rises_and_kl_coef_bounds_kl(tiny_model_dir, prompt_file, tmp_path):
    from prefopt.models import load_tokenizer

    reward = even_token_reward(load_tokenizer(tiny_model_dir))
    runs = {}
    for coef in (0.01, 2.0):
        out = tmp_path / f"kl{coef}"
        # 32 rollouts an iteration: the rise over 8 iterations stands well above the sampling noise of a 16-rollout
        # mean (about 0.05 here), whichever random stream the sampler draws
        train_ppo(toy_cfg(tiny_model_dir, prompt_file, out, kl_coef=coef, rollout_batch_size=32), reward_fn=reward)
        runs[coef] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weak, strong = runs[0.01], runs[2.0]
    assert weak[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    first, last = weak[0]["reward"], sum(r["reward"] for r in weak[-2:]) / 2
    assert last > first + 0.1, [r["reward"] for r in weak]
    # a weak penalty lets the policy drift (a few nats over 6 tokens); a strong one keeps it near the reference
    kl_weak = sum(r["kl"] for r in weak[-3:]) / 3
    kl_strong = sum(r["kl"] for r in strong[-3:]) / 3
    assert 1.0 < kl_weak < 20, [r["kl"] for r in weak]
    assert kl_strong < 2.0 and kl_strong < kl_weak / 2, ([r["kl"] for r in strong], [r["kl"] for r in weak])


# ---------------------------------------------------------------------------------------------------------
# The command line


REWARD_FILE = '''
def score(prompts, responses):
    return [r.count("e") / max(1, len(r)) + 0.1 * len(p) / 100 for p, r in zip(prompts, responses)]
'''


def cli_args(model: Path, prompts: Path, out: Path, reward: str, *extra: str) -> list[str]:
    return ["ppo", "--model", str(model), "--data", str(prompts), "--output-dir", str(out), "--reward-fn", reward,
            "--rollout-batch-size", "8", "--batch-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "5",
            "--ppo-epochs", "2", "--lr", "1e-3", "--save-every", "1", "--adaptive-kl", "--target-kl", "0.01",
            "--kl-horizon", "40", "--progress", "false", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_end_to_end_and_exact_resume(tiny_model_dir, prompt_file, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "reward.py").write_text(REWARD_FILE)
    reward = f"{tmp_path / 'reward.py'}:score"
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(cli_args(tiny_model_dir, prompt_file, full, reward, "--max-steps", "3")) == 0
    rows = metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(PPO_KEYS) <= r.keys()
        assert all(math.isfinite(r[k]) for k in PPO_KEYS)
    # adaptive KL: the coefficient rises after an iteration whose KL exceeded the target and falls otherwise
    # (the first rollout has KL 0, so it falls first)
    coefs, kls = [r["kl_coef"] for r in rows], [r["kl"] for r in rows]
    assert coefs[0] == 0.05 and coefs[1] < coefs[0], coefs
    for i in range(2):
        assert (coefs[i + 1] > coefs[i]) == (kls[i] > 0.01), (coefs, kls)
    model = AutoModelForCausalLM.from_pretrained(str(full))
    assert model.config.vocab_size > 0
    assert load_value_head(full).in_features == model.config.hidden_size
    assert (full / "checkpoints" / "step-0000002" / "model" / "value_head" / "value_head.safetensors").is_file()

    # interrupted after 2 iterations (checkpoint at 1), resumed to 3: the same run as the uninterrupted one
    assert main(cli_args(tiny_model_dir, prompt_file, part, reward, "--max-steps", "2")) == 0
    assert main(cli_args(tiny_model_dir, prompt_file, part, reward, "--max-steps", "3", "--resume", "auto")) == 0
    summary = json.loads((part / "summary.json").read_text())
    assert summary["resumed_from"] == 1
    resumed = metrics(part)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(rows, resumed):
        for k in a:
            if k not in TIMING:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)
    ha = load_file(str(full / "value_head" / "value_head.safetensors"))
    hb = load_file(str(part / "value_head" / "value_head.safetensors"))
    torch.testing.assert_close(ha["weight"], hb["weight"], atol=1e-6, rtol=1e-5)


def test_cli_errors(tiny_model_dir, prompt_file, tmp_path, capsys):
    args = ["ppo", "--model", str(tiny_model_dir), "--data", str(prompt_file), "--output-dir", str(tmp_path / "o"),
            "--progress", "false"]
    assert main(args) == 2
    assert "reward" in capsys.readouterr().err
    assert main(args + ["--reward-fn", f"{tmp_path / 'missing.py'}:f"]) == 2
    assert "not found" in capsys.readouterr().err


def test_reward_model_path(tiny_model_dir, prompt_file, tmp_path):
    rm = pytest.importorskip("prefopt.train.rm", reason="prefopt.train.rm (reward models) is not available")
    from prefopt.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    reward_model = rm.build_reward_model(str(tiny_model_dir), tok)
    reward_model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    out = tmp_path / "out"
    summary = train_ppo(toy_cfg(tiny_model_dir, prompt_file, out, reward_model=str(tmp_path / "rm"), max_steps=1,
                                rollout_batch_size=8, ppo_epochs=1))
    assert summary["steps"] == 1
    row = metrics(out)[0]
    assert math.isfinite(row["reward"]) and row["reward"] != 0


def test_eval_prompts_and_lora(tiny_model_dir, prompt_file, tmp_path):
    """Held-out prompts are sampled and scored every eval_every and at the end; with LoRA the reference is the
    policy with its adapters off (KL 0 before the first update) and the final model is saved merged."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    summary = train_ppo(toy_cfg(tiny_model_dir, prompt_file, out, lora=True, eval_fraction=0.25, eval_every=1,
                                max_steps=2, rollout_batch_size=8, ppo_epochs=1),
                        reward_fn=lambda prompts, responses: [float(len(r)) for r in responses])
    rows = metrics(out)
    train_rows = [r for r in rows if "reward" in r]
    eval_rows = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and [r["step"] for r in eval_rows] == [1, 2]
    assert train_rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert train_rows[1]["kl"] != 0  # after an update the adapters-off reference differs from the policy
    assert summary["eval"]["eval/reward"] == eval_rows[-1]["eval/reward"] > 0
    assert (out / "adapter").is_dir() and (out / "value_head" / "value_head.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(str(out))

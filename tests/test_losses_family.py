"""BCO, AOT, the sft part, weighted combinations and the log-prob modifiers (LD-DPO, WPO, TR-DPO): closed forms
written from the papers' formulas, the state BCO and TR-DPO keep across steps, and the config checks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from prefopt import losses as L
from prefopt.config import DPOConfig
from prefopt.errors import ConfigError

PC, PR, RC, RR = [-10.0, -4.0, -7.0], [-12.0, -3.0, -6.5], [-11.0, -4.5, -6.0], [-11.5, -3.2, -7.5]
LC, LR = [5.0, 2.0, 4.0], [4.0, 3.0, 1.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def call(name, beta, **kw):
    return L.get_loss(name)(t(PC), t(PR), t(RC), t(RR), beta=beta, chosen_lengths=t(LC), rejected_lengths=t(LR),
                            **kw)


def close(tensor, expected, tol=1e-10):
    assert tensor.tolist() == pytest.approx(expected, abs=tol)


# ------------------------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("beta,delta", [(0.5, 0.0), (0.1, 0.3), (2.0, -1.2)])
def test_bco_pair_closed_form(beta, delta):
    loss, rc, rr = call("bco_pair", beta, delta=delta)
    exp = [-logsig(beta * (PC[i] - RC[i]) - delta) - logsig(-(beta * (PR[i] - RR[i]) - delta)) for i in range(3)]
    close(loss, exp)
    close(rc, [beta * (PC[i] - RC[i]) for i in range(3)])
    close(rr, [beta * (PR[i] - RR[i]) for i in range(3)])


def cdpo_value(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


@pytest.mark.parametrize("beta,eps", [(0.5, 0.0), (1.0, 0.2), (0.1, 0.5)])
def test_aot_closed_form(beta, eps):
    loss, rc, rr = call("aot", beta, label_smoothing=eps)
    u = sorted(PC[i] - PR[i] for i in range(3))  # policy chosen-over-rejected log-ratios, sorted: [-1, 2, -0.5]
    v = sorted(RC[i] - RR[i] for i in range(3))  # the reference's, sorted
    close(loss, [cdpo_value(beta * (u[i] - v[i]), eps) for i in range(3)])
    close(rc, [beta * (PC[i] - RC[i]) for i in range(3)])  # rewards stay per example (unsorted)
    # the sort really matters here: unsorted margins give another sum
    unsorted = sum(cdpo_value(beta * ((PC[i] - PR[i]) - (RC[i] - RR[i])), eps) for i in range(3))
    assert abs(loss.sum().item() - unsorted) > 1e-3


@pytest.mark.parametrize("beta,eps", [(0.5, 0.0), (1.0, 0.2)])
def test_aot_pair_closed_form(beta, eps):
    loss, _, _ = call("aot_pair", beta, label_smoothing=eps)
    a = sorted(PC[i] - RC[i] for i in range(3))
    b = sorted(PR[i] - RR[i] for i in range(3))
    close(loss, [cdpo_value(beta * (a[i] - b[i]), eps) for i in range(3)])


@pytest.mark.parametrize("name", ["aot", "aot_pair"])
def test_aot_on_one_pair_is_cdpo_and_order_free(name):
    for i in range(3):
        one = L.get_loss(name)(t(PC[i:i + 1]), t(PR[i:i + 1]), t(RC[i:i + 1]), t(RR[i:i + 1]), beta=0.7,
                               label_smoothing=0.1)
        ref = L.cdpo(t(PC[i:i + 1]), t(PR[i:i + 1]), t(RC[i:i + 1]), t(RR[i:i + 1]), beta=0.7, label_smoothing=0.1)
        close(one[0], ref[0].tolist())
    perm = [2, 0, 1]
    shuffled = L.get_loss(name)(*(t([xs[j] for j in perm]) for xs in (PC, PR, RC, RR)), beta=0.7)[0]
    assert shuffled.sum().item() == pytest.approx(call(name, 0.7)[0].sum().item(), abs=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        call(name, 0.7, label_smoothing=0.6)


def test_sft_part_closed_form():
    loss, rc, rr = call("sft", 0.5)
    close(loss, [-PC[i] / LC[i] for i in range(3)])
    close(rc, [0.5 * PC[i] / LC[i] for i in range(3)])
    close(rr, [0.5 * PR[i] / LR[i] for i in range(3)])
    assert "sft" in L.REFERENCE_FREE_LOSSES


def test_new_losses_at_policy_equals_reference():
    x, y = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for name, expected in [("bco_pair", 2 * math.log(2)), ("aot", math.log(2)), ("aot_pair", math.log(2))]:
        loss, rc, rr = L.get_loss(name)(x, y, x.clone(), y.clone(), beta=0.3)  # every log-ratio is 0
        close(loss, [expected] * 4, 1e-12)
        close(rc, [0.0] * 4)


# ------------------------------------------------------------------------------------------------ combinations


def test_parse_loss_spec():
    assert L.parse_loss_spec("sigmoid") == (("sigmoid", 1.0),)
    assert L.parse_loss_spec("sigmoid, sft", ["1.0", "0.2"]) == (("sigmoid", 1.0), ("sft", 0.2))
    assert L.parse_loss_spec("sigmoid,bco_pair,sft") == (("sigmoid", 1.0), ("bco_pair", 1.0), ("sft", 1.0))
    for bad, w, match in [("sigmoid,nope", None, "unknown loss"), ("sigmoid,sigmoid", None, "twice"),
                          ("sigmoid,sft", [1.0], "2 losses"), ("sigmoid,sft", [1.0, -1.0], ">= 0"),
                          ("sigmoid,plackett_luce", None, "plackett_luce"), ("sigmoid,", None, "comma"),
                          ("sigmoid,sft", ["a", "b"], "numbers")]:
        with pytest.raises(ValueError, match=match):
            L.parse_loss_spec(bad, w)


def test_combine_is_the_weighted_sum_of_its_parts():
    parts = (("sigmoid", 1.0), ("bco_pair", 0.5), ("sft", 0.2))
    kw = dict(beta=0.4, chosen_lengths=t(LC), rejected_lengths=t(LR))
    total, rc, rr, logged = L.combine(parts, t(PC), t(PR), t(RC), t(RR), kwargs={"bco_pair": {"delta": 0.1}}, **kw)
    expected = (call("sigmoid", 0.4)[0] + 0.5 * call("bco_pair", 0.4, delta=0.1)[0] + 0.2 * call("sft", 0.4)[0])
    close(total, expected.tolist(), 1e-12)
    close(rc, call("sigmoid", 0.4)[1].tolist())  # the first part's rewards
    assert set(logged) == {"sigmoid", "bco_pair", "sft"}
    close(logged["sft"], call("sft", 0.4)[0].tolist())


# ------------------------------------------------------------------------------------------------ modifiers


def test_ld_token_weights_closed_form():
    # B = 2 pairs, response-major rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    mask = torch.tensor([[0, 1, 1, 1, 1, 0],   # chosen 0: 4 tokens
                         [0, 0, 1, 1, 0, 0],   # chosen 1: 2 tokens
                         [0, 1, 1, 0, 0, 0],   # rejected 0: 2 tokens -> shared 2
                         [1, 1, 1, 1, 1, 0]])  # rejected 1: 5 tokens -> shared 2
    w = L.ld_token_weights(mask, 2, 0.25)
    a = 0.25
    assert w.tolist() == [[0, 1, 1, a, a, 0], [0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0], [1, 1, a, a, a, 0]]
    assert torch.equal(L.ld_token_weights(mask, 2, 1.0), mask.float())
    with pytest.raises(ValueError, match="ld_alpha"):
        L.ld_token_weights(mask, 2, 1.5)
    with pytest.raises(ValueError, match="pair"):
        L.ld_token_weights(mask[:3], 3, 0.5)


def test_wpo_weights_closed_form():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    lsq = torch.tensor([[-0.5, -1.0, -9.0], [-0.25, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = L.wpo_weights(lp.requires_grad_(), lsq, mask)
    assert w.tolist() == pytest.approx([math.exp(((-1 + 0.5) + (-2 + 1)) / 2), math.exp(-0.5 + 0.25)])
    assert not w.requires_grad


def test_token_level_logps_match_the_plain_path_and_ld(tiny_model_dir):
    from prefopt.data import tokenize_examples
    from prefopt.data.types import PreferenceExample
    from prefopt.logprobs import forward_logps
    from prefopt.models import load_model, load_tokenizer
    from prefopt.train.dpo import make_collate, token_level_logps

    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    items, _ = tokenize_examples([PreferenceExample("a b c", [" d e f g", " h"]),
                                  PreferenceExample("i j", [" k", " l m n"])], tok)
    batch = make_collate(tok.pad_token_id)(items)
    with torch.no_grad():
        plain = forward_logps(model, batch)
        ours, w = token_level_logps(model, batch, wpo=True)
        ld1, _ = token_level_logps(model, batch, ld_alpha=1.0)
        ld0, _ = token_level_logps(model, batch, ld_alpha=0.0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    torch.testing.assert_close(ours.sum, plain.sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ld1.sum, plain.sum, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.count, plain.count)
    # ld_alpha = 0: only the first min(len_c, len_r) tokens of each response count
    lp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["loss_mask"][:, 1:]
    lengths = mask.sum(-1).view(2, -1)
    shared = torch.minimum(lengths[0], lengths[1]).repeat(2)
    for row in range(4):
        idx = mask[row].nonzero().flatten()[:shared[row]]
        assert ld0.sum[row].item() == pytest.approx(lp[row, idx].sum().item(), abs=1e-4)
    # WPO: exp(mean(log p - log sum p^2)) by hand from the softmax
    probs = torch.softmax(logits, -1)
    for row in range(4):
        idx = mask[row].nonzero().flatten()
        expect = torch.exp((lp[row, idx] - torch.log((probs[row, idx] ** 2).sum(-1))).mean())
        assert w[row].item() == pytest.approx(expect.item(), rel=1e-4)


# ------------------------------------------------------------------------------------------------ the DPO method


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    from prefopt.data import tokenize_examples
    from prefopt.data.types import PreferenceExample
    from prefopt.models import load_model, load_tokenizer
    from prefopt.train.dpo import make_collate

    tok = load_tokenizer(tiny_model_dir)
    policy = load_model(tiny_model_dir).eval()
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    items, _ = tokenize_examples([PreferenceExample(f"prompt {i} x", [f" good {i} a b", f" bad {i}"]) for i in range(4)],
                                 tok)
    return policy, ref.requires_grad_(False), make_collate(tok.pad_token_id)(items)


def test_weighted_combination_equals_the_weighted_sum_of_its_parts_run_alone(setup):
    from prefopt.train.dpo import DPO, live_reference

    policy, ref, batch = setup
    spec, weights = "sigmoid,bco_pair,sft", [1.0, 0.3, 0.2]
    with torch.no_grad():
        both = DPO(spec, 0.5, live_reference(ref), loss_weights=weights).step(policy, batch)
        alone = [DPO(n, 0.5, live_reference(ref)).step(policy, batch) for n in spec.split(",")]
    expected = sum(w * a.losses for w, a in zip(weights, alone))
    torch.testing.assert_close(both.losses, expected, atol=1e-6, rtol=1e-6)
    for name, a in zip(spec.split(","), alone):
        torch.testing.assert_close(both.metrics[f"loss/{name}"], a.losses, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both.metrics["rewards/chosen"], alone[0].metrics["rewards/chosen"])
    assert "loss/sigmoid" not in alone[0].metrics  # a single loss logs no parts


def test_wpo_multiplies_each_pair_by_its_weights(setup):
    from prefopt.logprobs import split_responses
    from prefopt.train.dpo import DPO, live_reference, token_level_logps

    policy, ref, batch = setup
    with torch.no_grad():
        plain = DPO("sigmoid", 0.5, live_reference(ref)).step(policy, batch)
        wpo = DPO("sigmoid", 0.5, live_reference(ref), wpo=True).step(policy, batch)
        _, w = token_level_logps(policy, batch, wpo=True)
    w = split_responses(w, 2)
    torch.testing.assert_close(wpo.losses, plain.losses * w[:, 0] * w[:, 1], atol=1e-6, rtol=1e-5)
    assert (wpo.metrics["wpo_weight"] < 1).all()


def test_ld_alpha_without_its_logps_fn_is_refused(setup):
    from prefopt.train.dpo import DPO, ld_logps_fn, live_reference

    _, ref, _ = setup
    with pytest.raises(ConfigError, match="ld_logps_fn"):  # would silently be plain DPO on the policy side
        DPO("sigmoid", 0.5, live_reference(ref), ld_alpha=0.5)
    DPO("sigmoid", 0.5, live_reference(ref, ld_logps_fn(0.5)), ld_alpha=0.5, logps_fn=ld_logps_fn(0.5))


def test_bco_reward_shift_is_state_across_steps(setup):
    from accelerate import Accelerator

    from prefopt.train.dpo import DPO, RewardShift, live_reference
    from prefopt.train.loop import MetricSums

    policy, ref, batch = setup
    method = DPO("bco_pair", 0.5, live_reference(ref))
    acc = Accelerator(cpu=True)
    with torch.no_grad():
        first = method.step(policy, batch)  # shift 0 at the first step
        rc, rr = first.metrics["rewards/chosen"], first.metrics["rewards/rejected"]
        assert method.reward_shift.value == 0.0
        torch.testing.assert_close(first.metrics["bco/pair_reward"], (rc + rr) / 2)
        torch.testing.assert_close(first.losses, L.bco_pair(*_logps(policy, ref, batch), beta=0.5)[0],
                                   atol=1e-5, rtol=1e-5)
        sums = MetricSums()
        sums.add(first)
        sums.add(method.step(policy, batch))  # a second micro-batch of the same step: the shift is still 0
        method.end_of_step(policy, acc, 1, sums.reduce(acc))
        mean = ((rc + rr) / 2).mean().item()
        assert method.reward_shift.value == pytest.approx(mean, abs=1e-6) and method.reward_shift.count == 8
        second = method.step(policy, batch)
        expected = L.bco_pair(*_logps(policy, ref, batch), beta=0.5, delta=mean)[0]
    torch.testing.assert_close(second.losses, expected, atol=1e-5, rtol=1e-5)
    assert (second.losses - first.losses).abs().max() > 1e-4  # the shift changes the loss
    assert second.metrics["bco/reward_shift"].tolist() == pytest.approx([mean] * 4)
    # the shift round-trips through state_dict (JSON, as in trainer_state.json)
    again = RewardShift()
    again.load_state_dict(json.loads(json.dumps(method.state_dict()["bco_reward_shift"])))
    assert again.value == method.reward_shift.value and again.count == 8


def _logps(policy, ref, batch):
    from prefopt.logprobs import forward_logps

    p = forward_logps(policy, batch).by_example(2).sum
    r = forward_logps(ref, batch).by_example(2).sum
    return p[:, 0], p[:, 1], r[:, 0], r[:, 1]


def test_hard_sync_makes_reference_logps_equal_the_policys(setup):
    from accelerate import Accelerator

    from prefopt.logprobs import forward_logps
    from prefopt.train.dpo import DPO, ReferenceSync, live_reference

    policy, ref, batch = setup
    ref = copy.deepcopy(ref)
    sync = ReferenceSync(ref, every=2, mix=1.0)
    sync.check(policy)
    method = DPO("sigmoid", 0.5, live_reference(ref), ref_sync=sync)
    with torch.no_grad():
        before = forward_logps(ref, batch).sum
        pol = forward_logps(policy, batch).sum
        assert (before - pol).abs().max() > 1e-2
        method.end_of_step(policy, Accelerator(cpu=True), 1)  # not due
        assert torch.equal(forward_logps(ref, batch).sum, before)
        method.end_of_step(policy, Accelerator(cpu=True), 2)  # due: hard update
        assert torch.equal(forward_logps(ref, batch).sum, pol)
        res = method.step(policy, batch)
    assert res.metrics["rewards/chosen"].abs().max() == 0 and method.state_dict() == {"ref_synced_at": 2}


def test_soft_sync_mixes_parameters(setup):
    from prefopt.train.dpo import ReferenceSync

    policy, ref, _ = setup
    ref = copy.deepcopy(ref)
    old = {n: p.clone() for n, p in ref.named_parameters()}
    ReferenceSync(ref, every=1, mix=0.25).after_step(policy, 3)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(dict(ref.named_parameters())[n], 0.25 * p + 0.75 * old[n])


# ------------------------------------------------------------------------------------------------ config


def cfg(**kw) -> DPOConfig:
    return DPOConfig(model="m", data="d", output_dir="o", **kw)


def test_config_combinations_and_modifiers():
    c = cfg(loss="sigmoid,sft", loss_weights=["1.0", "0.2"])
    c.validate()
    assert c.loss_parts == (("sigmoid", 1.0), ("sft", 0.2)) and not c.reference_free_loss
    assert cfg(loss="orpo,sft").reference_free_loss
    with pytest.raises(ConfigError, match="loss_weights"):
        cfg(loss="sigmoid,sft", loss_weights=["1.0"]).validate()
    with pytest.raises(ConfigError, match="loss"):
        cfg(loss="sigmoid,nope").validate()
    cfg(loss="aot", label_smoothing=0.3).validate()
    cfg(loss="cdpo,aot_pair", label_smoothing=0.3).validate()
    with pytest.raises(ConfigError, match="label smoothing belongs"):
        cfg(loss="cdpo,sft", label_smoothing=0.3).validate()
    with pytest.raises(ConfigError, match="ld_alpha"):
        cfg(ld_alpha=1.5).validate()
    with pytest.raises(ConfigError, match="aot"):
        cfg(loss="aot", wpo=True).validate()
    with pytest.raises(ConfigError, match="plain layout"):
        cfg(wpo=True, packing=True).validate()


def test_config_ref_sync():
    c = cfg(ref_sync_every=4, ref_sync_mix=0.6)
    c.validate()
    assert not c.precomputes_reference  # the default precompute turns off: the reference moves
    from prefopt.train.dpo import reference_source

    assert reference_source(c) == "copy"
    with pytest.raises(ConfigError, match="precomputed reference log-probs stale"):
        cfg(ref_sync_every=4, precompute_ref=True).validate()
    with pytest.raises(ConfigError, match="needs a reference model"):
        cfg(ref_sync_every=4, loss="simpo").validate()
    with pytest.raises(ConfigError, match="lora"):
        cfg(ref_sync_every=4, lora=True).validate()
    with pytest.raises(ConfigError, match="ref_sync_mix"):
        cfg(ref_sync_every=4, ref_sync_mix=0.0).validate()


def test_cli_reads_loss_lists():
    from prefopt.config import load_config

    c = load_config(DPOConfig, overrides=dict(model="m", data="d", output_dir="o", loss="sigmoid,bco_pair,sft",
                                              loss_weights="0.8,0.2,1", wpo="true", ld_alpha="0.5"))
    assert c.loss_parts == (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)) and c.wpo and c.ld_alpha == 0.5


# ------------------------------------------------------------------------------------------------ a run


def run_cfg(model, data, out, **kw) -> DPOConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), optimizer="adamw", lr=1e-3, warmup_steps=0,
                batch_size=8, micro_batch_size=4, max_steps=2, max_length=64, max_prompt_length=32, progress=False)
    base.update(kw)
    return DPOConfig(**base)


def test_run_logs_parts_keeps_bco_shift_and_syncs_reference(tiny_model_dir, synthetic_pairs, tmp_path, capsys):
    from prefopt.train.dpo import train_dpo

    out = tmp_path / "run"
    c = run_cfg(tiny_model_dir, synthetic_pairs, out, loss="sigmoid,bco_pair", loss_weights=["1.0", "0.5"],
                ref_sync_every=1, save_every=1, keep_checkpoints=0)
    train_dpo(c)
    printed = capsys.readouterr().out
    assert "a frozen copy of the initial policy" in printed and "precomputed" not in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss/sigmoid" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        assert r["loss"] == pytest.approx(r["loss/sigmoid"] + 0.5 * r["loss/bco_pair"], rel=1e-5)
    assert train_rows[0]["bco/reward_shift"] == 0.0
    state = json.loads((out / "checkpoints" / "step-0000001" / "trainer_state.json").read_text())
    assert state["method"]["ref_synced_at"] == 1 and state["method"]["bco_reward_shift"]["count"] == 8
    # step 2's shift is the mean reward of step 1 (the checkpoint's state), and with a hard sync after step 1
    # the reference of step 2 is the policy after step 1: its rewards are exactly 0
    shift = state["method"]["bco_reward_shift"]
    assert train_rows[1]["bco/reward_shift"] == pytest.approx(shift["total"] / shift["count"], rel=1e-6)
    assert train_rows[1]["rewards/chosen"] == 0.0 and train_rows[1]["rewards/rejected"] == 0.0
    # resume from step 1: the shift comes back from the checkpoint and the run ends with the same step-2 row
    train_dpo(run_cfg(tiny_model_dir, synthetic_pairs, out, loss="sigmoid,bco_pair", loss_weights=["1.0", "0.5"],
                      ref_sync_every=1, save_every=1, keep_checkpoints=0, resume="auto", overwrite=False))
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in again if "loss/sigmoid" in r][-1]
    assert last["step"] == 2 and last["bco/reward_shift"] == pytest.approx(train_rows[1]["bco/reward_shift"])
    assert last["loss"] == pytest.approx(train_rows[1]["loss"], rel=1e-4)


def test_soft_reference_sync_resumes_exactly(tiny_model_dir, synthetic_pairs, tmp_path):
    """TR-DPO with a soft update (ref <- 0.5 policy + 0.5 ref every 2 steps): the moving reference is in each
    checkpoint, so a run resumed at step 3 (between syncs) ends with the uninterrupted run's rows and weights."""
    import shutil

    from safetensors.torch import load_file

    from prefopt.train.dpo import train_dpo

    kw = dict(ref_sync_every=2, ref_sync_mix=0.5, max_steps=6, save_every=3, keep_checkpoints=0, log_every=1)
    train_dpo(run_cfg(tiny_model_dir, synthetic_pairs, tmp_path / "full", **kw))
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert "reference.safetensors" in json.dumps(manifest["files"])
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, run / "checkpoints" / ckpt.name)
    shutil.copy(tmp_path / "full" / "config.yaml", run / "config.yaml")
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full_rows if r["step"] <= 3))
    train_dpo(run_cfg(tiny_model_dir, synthetic_pairs, run, resume="auto", overwrite=False, **kw))
    resumed_rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in full_rows]
    for a, b in zip(full_rows, resumed_rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and \
            a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6), (a["step"], a, b)
    wa, wb = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6

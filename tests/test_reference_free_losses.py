"""SimPO and ORPO: reference-free losses (closed forms, TRL parity of the loss functions, no reference in a run)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from prefopt import losses as L
from prefopt.config import DPOConfig
from prefopt.errors import ConfigError
from prefopt.train.dpo import reference_source, train_dpo

PC, PR = [-10.0, -4.0, -0.3], [-12.0, -3.0, -2.5]
LC, LR = [5.0, 2.0, 1.0], [4.0, 3.0, 2.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def call(name, beta, ref=None, **kw):
    ref = ref if ref is not None else [0.0] * len(PC)
    return L.get_loss(name)(t(PC), t(PR), t(ref), t(ref), beta=beta, chosen_lengths=t(LC), rejected_lengths=t(LR),
                            **kw)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (0.5, 0.0), (10.0, 1.3)])
def test_simpo_closed_form(beta, gamma):
    loss, rc, rr = call("simpo", beta, gamma=gamma)
    exp = [-logsig(beta * (PC[i] / LC[i] - PR[i] / LR[i]) - gamma) for i in range(3)]
    assert loss.tolist() == pytest.approx(exp, abs=1e-12)
    assert rc.tolist() == pytest.approx([beta * PC[i] / LC[i] for i in range(3)], abs=1e-12)
    assert rr.tolist() == pytest.approx([beta * PR[i] / LR[i] for i in range(3)], abs=1e-12)
    # the reference log-probs are not read
    assert torch.equal(call("simpo", beta, ref=[-7.0, 3.0, 1.0], gamma=gamma)[0], loss)


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_closed_form(beta):
    loss, rc, rr = call("orpo", beta)

    def log_odds(m):
        return m - math.log(1 - math.exp(m))

    exp = []
    for i in range(3):
        mc, mr = PC[i] / LC[i], PR[i] / LR[i]
        exp.append(-mc - beta * logsig(log_odds(mc) - log_odds(mr)))
    assert loss.tolist() == pytest.approx(exp, abs=1e-12)
    assert rc.tolist() == pytest.approx([beta * PC[i] / LC[i] for i in range(3)], abs=1e-12)
    assert rr.tolist() == pytest.approx([beta * PR[i] / LR[i] for i in range(3)], abs=1e-12)
    assert torch.equal(call("orpo", beta, ref=[-7.0, 3.0, 1.0])[0], loss)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_need_lengths_and_no_smoothing(name):
    f = L.get_loss(name)
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="lengths"):
        f(-torch.ones(2), -torch.ones(2), z, z, beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        call(name, 0.1, label_smoothing=0.1)


def test_simpo_rejects_negative_gamma():
    with pytest.raises(ValueError, match="gamma"):
        call("simpo", 0.1, gamma=-0.1)


def test_parity_with_trl_loss_functions():
    """The same per-example values as TRL 1.16's CPOTrainer.cpo_loss (loss_type="simpo", cpo_alpha=0) and
    ORPOTrainer.odds_ratio_loss, called on length-averaged log-probs as those trainers compute them."""
    pytest.importorskip("trl", minversion="1.16")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(0)
    lc = torch.randint(1, 30, (16,), generator=g).double()
    lr = torch.randint(1, 30, (16,), generator=g).double()
    pc = -torch.rand(16, generator=g, dtype=torch.float64) * 3 * lc
    pr = -torch.rand(16, generator=g, dtype=torch.float64) * 3 * lr
    z = torch.zeros(16, dtype=torch.float64)
    acc = SimpleNamespace(device=torch.device("cpu"))
    for beta, gamma in [(2.0, 0.5), (0.1, 1.0)]:
        trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                                  accelerator=acc)
        ours = L.simpo(pc, pr, z, z, beta=beta, chosen_lengths=lc, rejected_lengths=lr, gamma=gamma)
        theirs = CPOTrainer.cpo_loss(trainer, pc / lc, pr / lr)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for beta in (0.1, 0.5):
        trainer = SimpleNamespace(beta=beta, accelerator=acc)
        ours = L.orpo(pc, pr, z, z, beta=beta, chosen_lengths=lc, rejected_lengths=lr)
        or_losses, trc, trr, _, _ = ORPOTrainer.odds_ratio_loss(trainer, pc / lc, pr / lr)
        # TRL: loss = NLL - mean(beta * log sigma(log odds ratio)); per example, NLL is -mean logp of the chosen
        torch.testing.assert_close(ours[0], (-pc / lc - or_losses).to(ours[0].dtype), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1], trc.to(ours[1].dtype), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[2], trr.to(ours[2].dtype), atol=1e-5, rtol=1e-5)


def cfg(model, data, out, **kw) -> DPOConfig:
    base = dict(model=str(model), data=str(data), output_dir=str(out), optimizer="adamw", lr=1e-3, warmup_steps=2,
                batch_size=8, micro_batch_size=8, max_steps=2, max_length=96, max_prompt_length=48, progress=False)
    base.update(kw)
    return DPOConfig(**base)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_config_has_no_reference(loss):
    c = cfg("m", "d", "o", loss=loss)
    c.validate()
    assert reference_source(c) == "none" and not c.precomputes_reference
    for bad in (dict(ref_model="r"), dict(precompute_ref=True)):
        with pytest.raises(ConfigError, match=f"loss '{loss}' is reference-free"):
            cfg("m", "d", "o", loss=loss, **bad).validate()
    cfg("m", "d", "o", loss=loss, precompute_ref=False).validate()  # false is what happens anyway
    with pytest.raises(ConfigError, match="simpo_gamma"):
        cfg("m", "d", "o", loss=loss, simpo_gamma=-1.0).validate()


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_run_loads_and_computes_no_reference(loss, tiny_model_dir, synthetic_pairs, tmp_path, monkeypatch, capsys):
    import prefopt.models
    import prefopt.train.dpo as dpo
    import prefopt.train.setup as setup

    def boom(*args, **kwargs):
        raise AssertionError("a reference was loaded or computed")

    for mod, name in [(prefopt.models, "make_reference"), (setup, "make_reference"),
                      (dpo, "precompute_reference")]:
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, boom)
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    summary = train_dpo(cfg(tiny_model_dir, synthetic_pairs, tmp_path / "run", loss=loss, simpo_gamma=0.3))
    out = capsys.readouterr().out
    assert f"reference: {dpo.REFERENCE_SOURCES['none']}\n" in out and "precomputed" not in out
    assert not list((tmp_path / "cache").rglob("ref-logps-*"))  # no reference log-probs were cached (data may be)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_simpo_gamma_reaches_the_loss():
    from prefopt.train.dpo import DPO, zero_reference

    assert DPO("simpo", 0.1, zero_reference, simpo_gamma=0.3).loss_kwargs == {"gamma": 0.3}
    assert DPO("orpo", 0.1, zero_reference, simpo_gamma=0.3).loss_kwargs == {}

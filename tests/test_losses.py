import math

import pytest
import torch

from prefopt import losses as L
from prefopt.losses import chosen_nll, get_loss, loss_names, reference_free


def logsig(x: float) -> float:
    return math.log(1 / (1 + math.exp(-x)))


# Two examples: policy/ref summed logps and lengths.
PC, PR, RC, RR = [-10.0, -4.0], [-12.0, -3.0], [-11.0, -4.5], [-11.5, -3.2]
LC, LR = [5.0, 2.0], [4.0, 3.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def margins():
    return [(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(2)]  # [1.5, 0.3]


def call(name, beta, **kw):
    return get_loss(name)(t(PC), t(PR), t(RC), t(RR), beta=beta, **kw)


def close(tensor, expected, tol=1e-9):
    assert tensor.tolist() == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.5])
def test_sigmoid_closed_form(beta):
    loss, rc, rr = call("sigmoid", beta)
    close(loss, [-logsig(beta * h) for h in margins()])
    close(rc, [beta * (PC[i] - RC[i]) for i in range(2)])
    close(rr, [beta * (PR[i] - RR[i]) for i in range(2)])


@pytest.mark.parametrize("beta,eps", [(1.0, 0.1), (0.3, 0.25), (2.0, 0.5)])
def test_cdpo_closed_form(beta, eps):
    loss, _, _ = call("cdpo", beta, label_smoothing=eps)
    close(loss, [-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h) for h in margins()])


@pytest.mark.parametrize("beta,eps", [(1.0, 0.1), (0.3, 0.25), (2.0, 0.4)])
def test_robust_closed_form(beta, eps):
    loss, _, _ = call("robust", beta, label_smoothing=eps)
    exp = [(-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps) for h in margins()]
    close(loss, exp)


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.0])
def test_ipo_closed_form(beta):
    loss, rc, _ = call("ipo", beta)
    close(loss, [(h - 1 / (2 * beta)) ** 2 for h in margins()])
    close(rc, [beta * (PC[i] - RC[i]) for i in range(2)])


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.0])
def test_ipo_per_token_closed_form(beta):
    loss, rc, rr = call("ipo_per_token", beta, chosen_lengths=t(LC), rejected_lengths=t(LR))
    c = [(PC[i] - RC[i]) / LC[i] for i in range(2)]
    r = [(PR[i] - RR[i]) / LR[i] for i in range(2)]
    close(loss, [(c[i] - r[i] - 1 / (2 * beta)) ** 2 for i in range(2)])
    # rewards stay on summed log-ratios (only the loss is length-normalised)
    close(rc, [beta * (PC[i] - RC[i]) for i in range(2)])
    close(rr, [beta * (PR[i] - RR[i]) for i in range(2)])


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.0])
def test_hinge_closed_form(beta):
    loss, _, _ = call("hinge", beta)
    close(loss, [max(0.0, 1 - beta * h) for h in margins()])


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_ratios():
    return [PC[i] - RC[i] for i in range(2)], [PR[i] - RR[i] for i in range(2)]  # [1.0, 0.5], [-0.5, 0.2]


@pytest.mark.parametrize("beta,eps", [(1.0, 0.1), (0.3, 1e-3), (2.0, 0.5)])
def test_exo_pair_closed_form(beta, eps):
    # EXO Eq. 16, K = 2: KL(q || p), q = softmax(beta * log-ratios) = (sigma(beta h), 1 - sigma(beta h)),
    # p = (1 - eps, eps)
    loss, rc, _ = call("exo_pair", beta, label_smoothing=eps)
    exp = []
    for h in margins():
        q = sig(beta * h)
        exp.append(q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps))
    close(loss, exp)
    close(rc, [beta * c for c in log_ratios()[0]])


def test_exo_pair_eps0_means_1e3_and_range():
    a, _, _ = call("exo_pair", 0.5)
    b, _, _ = call("exo_pair", 0.5, label_smoothing=1e-3)
    close(a, b.tolist(), 1e-12)
    for eps in (-0.1, 0.6):
        with pytest.raises(ValueError, match="exo_pair"):
            call("exo_pair", 0.5, label_smoothing=eps)


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.0])
def test_nca_pair_closed_form(beta):
    c, r = log_ratios()
    loss, _, _ = call("nca_pair", beta)
    close(loss, [-logsig(beta * c[i]) - 0.5 * logsig(-beta * c[i]) - 0.5 * logsig(-beta * r[i]) for i in range(2)])


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.0])
def test_sppo_hard_closed_form(beta):
    c, r = log_ratios()
    loss, _, _ = call("sppo_hard", beta)
    close(loss, [(c[i] - 1 / (2 * beta)) ** 2 + (r[i] + 1 / (2 * beta)) ** 2 for i in range(2)])


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.0])
def test_apo_closed_form(beta):
    c, r = log_ratios()
    zero, _, _ = call("apo_zero", beta)
    close(zero, [1 - sig(beta * c[i]) + sig(beta * r[i]) for i in range(2)])
    down, _, _ = call("apo_down", beta)
    close(down, [sig(beta * c[i]) + 1 - sig(beta * (c[i] - r[i])) for i in range(2)])


@pytest.mark.parametrize("beta,tau", [(1.0, 0.05), (0.1, 0.05), (2.0, 1.0)])
def test_discopop_closed_form(beta, tau):
    loss, _, _ = call("discopop", beta, tau=tau)
    exp = []
    for h in margins():
        m = sig(beta * h / tau)
        exp.append((1 - m) * -logsig(beta * h) + m * math.exp(-beta * h))
    close(loss, exp)
    if tau == 0.05:  # TRL's default
        close(call("discopop", beta)[0], exp)


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.0])
def test_sigmoid_norm_closed_form(beta):
    loss, rc, rr = call("sigmoid_norm", beta, chosen_lengths=t(LC), rejected_lengths=t(LR))
    c, r = log_ratios()
    close(loss, [-logsig(beta * (c[i] / LC[i] - r[i] / LR[i])) for i in range(2)])
    close(rc, [beta * x for x in c])  # rewards stay on summed log-ratios
    close(rr, [beta * x for x in r])
    with pytest.raises(ValueError, match="lengths"):
        call("sigmoid_norm", beta)


@pytest.mark.parametrize("name,expected", [
    ("sigmoid_norm", lambda beta: math.log(2)),
    ("nca_pair", lambda beta: 2 * math.log(2)),
    ("sppo_hard", lambda beta: 2 * (1 / (2 * beta)) ** 2),
    ("apo_zero", lambda beta: 1.0),
    ("apo_down", lambda beta: 1.0),
    ("discopop", lambda beta: 0.5 * math.log(2) + 0.5),
    ("exo_pair", lambda beta: 0.5 * math.log(0.5 / (1 - 1e-3)) + 0.5 * math.log(0.5 / 1e-3)),
])
def test_new_losses_first_step_at_policy_equals_reference(name, expected):
    x = torch.randn(4, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    beta = 0.3
    loss, rc, rr = get_loss(name)(x, y, x.clone(), y.clone(), beta=beta, chosen_lengths=t([3.0] * 4),
                                  rejected_lengths=t([5.0] * 4))
    close(loss, [expected(beta)] * 4, 1e-12)
    close(rc, [0.0] * 4)
    close(rr, [0.0] * 4)


@pytest.mark.parametrize("name", ["nca_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm"])
def test_new_losses_reject_label_smoothing(name):
    with pytest.raises(ValueError, match="label_smoothing"):
        call(name, 0.1, label_smoothing=0.1, chosen_lengths=t(LC), rejected_lengths=t(LR))


def test_sigmoid_is_ln2_when_policy_equals_reference():
    x = torch.randn(4, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    loss, rc, rr = get_loss("sigmoid")(x, y, x.clone(), y.clone(), beta=0.1)
    close(loss, [math.log(2)] * 4, 1e-12)
    close(rc, [0.0] * 4)
    close(rr, [0.0] * 4)


def test_plackett_luce_k2_equals_sigmoid():
    g = torch.Generator().manual_seed(0)
    pol = torch.randn(8, 2, generator=g, dtype=torch.float64) * 5
    ref = torch.randn(8, 2, generator=g, dtype=torch.float64) * 5
    pl, rewards = get_loss("plackett_luce")(pol, ref, beta=0.7)
    sg, rc, rr = get_loss("sigmoid")(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.7)
    assert torch.allclose(pl, sg, atol=1e-6)
    assert torch.allclose(rewards, torch.stack([rc, rr], dim=1), atol=1e-12)


def test_plackett_luce_k3_hand_computed():
    beta = 0.5
    pol = [[-1.0, -2.0, -4.0], [-3.0, -1.0, -2.0]]
    ref = [[-2.0, -1.0, -3.0], [-3.0, -3.0, -3.0]]
    expected = []
    for p, q in zip(pol, ref):
        r = [beta * (p[k] - q[k]) for k in range(3)]
        total = 0.0
        for k in range(3):
            total -= r[k] - math.log(sum(math.exp(x) for x in r[k:]))
        expected.append(total)
    loss, rewards = get_loss("plackett_luce")(t(pol), t(ref), beta=beta)
    close(loss, expected)
    assert rewards.shape == (2, 3) and not rewards.requires_grad


def test_plackett_luce_shift_invariant():
    g = torch.Generator().manual_seed(1)
    pol = torch.randn(5, 4, generator=g, dtype=torch.float64)
    ref = torch.randn(5, 4, generator=g, dtype=torch.float64)
    a, _ = L.plackett_luce(pol, ref, beta=0.3)
    b, _ = L.plackett_luce(pol + 17.0, ref, beta=0.3)
    c, _ = L.plackett_luce(pol, ref - 3.0, beta=0.3)
    assert torch.allclose(a, b, atol=1e-9) and torch.allclose(a, c, atol=1e-9)


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_label_noise_variants_reduce_to_sigmoid_at_eps0(name):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    a = get_loss(name)(*xs, beta=0.2, label_smoothing=0.0)
    b = get_loss("sigmoid")(*xs, beta=0.2)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-12)


@pytest.mark.parametrize("name", L.PAIRWISE_LOSSES)
def test_rewards_detached_losses_differentiable(name):
    pc = t(PC).requires_grad_()
    pr = t(PR).requires_grad_()
    loss, rc, rr = get_loss(name)(pc, pr, t(RC), t(RR), beta=0.5, chosen_lengths=t(LC), rejected_lengths=t(LR))
    assert loss.shape == (2,) and rc.shape == (2,) and rr.shape == (2,)
    assert loss.requires_grad and not rc.requires_grad and not rr.requires_grad
    loss.sum().backward()
    assert pc.grad is not None and (pr.grad is not None or name == "sft")  # sft reads only the chosen response


def test_sigmoid_gradient_matches_paper_weight():
    beta = 0.4
    pc = t(PC).requires_grad_()
    loss, _, _ = get_loss("sigmoid")(pc, t(PR), t(RC), t(RR), beta=beta)
    loss.sum().backward()
    expected = [-beta / (1 + math.exp(beta * h)) for h in margins()]  # -beta * sigma(-beta h)
    close(pc.grad, expected, 1e-12)


def test_chosen_nll_and_reference_free():
    close(chosen_nll(t(PC), t(LC)), [PC[i] / -LC[i] for i in range(2)])
    z = reference_free(t(PC).requires_grad_())
    assert z.tolist() == [0.0, 0.0] and not z.requires_grad


def test_registry():
    assert set(loss_names()) == {"sigmoid", "cdpo", "robust", "ipo", "ipo_per_token", "hinge", "exo_pair",
                                 "nca_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
                                 "simpo", "orpo", "bco_pair", "aot", "aot_pair", "sft", "plackett_luce"}
    assert L.REFERENCE_FREE_LOSSES == {"simpo", "orpo", "sft"} and L.REFERENCE_FREE_LOSSES < set(L.PAIRWISE_LOSSES)
    assert L.BATCH_COUPLED_LOSSES == {"aot", "aot_pair"}
    assert "plackett_luce" not in L.PAIRWISE_LOSSES and set(L.PAIRWISE_LOSSES) < set(L.LOSSES)
    for name in loss_names():
        assert get_loss(name) is L.LOSSES[name]


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_invalid_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        call("sigmoid", beta)
    with pytest.raises(ValueError, match="beta"):
        get_loss("plackett_luce")(torch.zeros(2, 3), torch.zeros(2, 3), beta=beta)


def test_sigmoid_rejects_label_smoothing():
    with pytest.raises(ValueError, match="cdpo.*robust"):
        call("sigmoid", 0.1, label_smoothing=0.1)


@pytest.mark.parametrize("name,eps", [("robust", 0.5), ("robust", -0.1), ("cdpo", 0.6), ("ipo", 0.1)])
def test_invalid_label_smoothing(name, eps):
    with pytest.raises(ValueError):
        call(name, 0.1, label_smoothing=eps)


def test_ipo_per_token_requires_lengths():
    with pytest.raises(ValueError, match="lengths"):
        call("ipo_per_token", 0.1)
    with pytest.raises(ValueError, match="lengths"):
        call("ipo_per_token", 0.1, chosen_lengths=t(LC))


def test_unknown_loss_lists_names():
    with pytest.raises(ValueError) as e:
        get_loss("nope")
    for name in loss_names():
        assert name in str(e.value)


def test_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        get_loss("sigmoid")(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="shape"):
        get_loss("plackett_luce")(torch.zeros(2, 3), torch.zeros(2, 4), beta=0.1)


def test_config_label_smoothing_for_exo_pair():
    from prefopt.config import load_config
    from prefopt.config.training import DPOConfig
    from prefopt.errors import ConfigError

    good = dict(model="m", data="d", output_dir="o")
    for eps in (0.0, 1e-3, 0.5):
        assert load_config(DPOConfig, overrides={**good, "loss": "exo_pair", "label_smoothing": eps})
    with pytest.raises(ConfigError, match="label_smoothing .* exo_pair"):
        load_config(DPOConfig, overrides={**good, "loss": "exo_pair", "label_smoothing": 0.6})
    with pytest.raises(ConfigError, match="label smoothing belongs to cdpo and robust"):
        load_config(DPOConfig, overrides={**good, "loss": "nca_pair", "label_smoothing": 0.1})
    for name in ("nca_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm"):
        assert load_config(DPOConfig, overrides={**good, "loss": name}).loss == name

"""KL(pi || pi_ref) from samples, clustered standard errors, and the Best-of-N closed form."""

import math

import pytest
import torch

from prefopt.eval.kl import (
    best_of_n_kl,
    clustered_mean,
    estimate_kl,
    kl_from_logps,
    sequence_logps,
)


def test_clustered_se_hand_example():
    # mean 3; residuals -2, -1, 0, 3; cluster sums -3 (a) and 3 (b); G/(G-1) * 18 / N^2 = 2 * 18 / 16 = 2.25
    est = clustered_mean([1.0, 2.0, 3.0, 6.0], ["a", "a", "b", "b"])
    assert est.mean == pytest.approx(3.0)
    assert est.se == pytest.approx(1.5)
    assert (est.n, est.clusters) == (4, 2)


def test_clustered_se_with_singleton_clusters_is_the_usual_se():
    values = [0.3, -1.2, 2.5, 0.7, 1.1, -0.4]
    est = clustered_mean(values)
    usual = torch.tensor(values, dtype=torch.float64).std(unbiased=True).item() / math.sqrt(len(values))
    assert est.se == pytest.approx(usual, rel=1e-12)


def test_clustered_se_grows_when_samples_of_a_prompt_agree():
    # the same values, paired into perfectly correlated clusters: the naive SE understates the uncertainty
    values = [1.0, 1.0, -1.0, -1.0, 2.0, 2.0, 0.0, 0.0]
    naive = clustered_mean(values)
    clustered = clustered_mean(values, [0, 0, 1, 1, 2, 2, 3, 3])
    assert clustered.se > naive.se * 1.2


def test_single_cluster_has_no_se():
    assert math.isnan(clustered_mean([1.0, 2.0], [0, 0]).se)
    with pytest.raises(ValueError):
        clustered_mean([1.0], [0, 1])


def _categorical_kl_check(seed: int):
    """Per prompt x: p_x, q_x over 5 'sequences'; sample 3 per prompt from p_x, estimate vs exact."""
    g = torch.Generator().manual_seed(seed)
    prompts, k, n_per = 300, 5, 3
    logits_p = torch.randn(prompts, k, generator=g) * 1.5
    logits_q = torch.randn(prompts, k, generator=g) * 1.5
    logp, logq = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    exact = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    draws = torch.multinomial(logp.exp(), n_per, replacement=True, generator=g)  # [prompts, n_per]
    lp = logp.gather(1, draws).reshape(-1)
    lq = logq.gather(1, draws).reshape(-1)
    clusters = torch.arange(prompts).repeat_interleave(n_per).tolist()
    return kl_from_logps(lp, lq, clusters), exact


def test_kl_estimate_matches_exact_kl_within_three_se():
    est, exact = _categorical_kl_check(seed=0)
    assert exact > 0.3  # a real KL, not a trivial one
    assert abs(est.mean - exact) < 3 * est.se
    assert est.se < 0.2 * exact  # and the SE is small enough for the check to mean something


def test_kl_se_is_calibrated_over_repeats():
    # over 40 independent repeats, |error| < 2 SE in most of them (about 95% expected)
    hits = 0
    for seed in range(40):
        est, exact = _categorical_kl_check(seed=seed + 100)
        hits += abs(est.mean - exact) < 2 * est.se
    assert hits >= 33


def test_kl_estimate_is_mean_log_ratio_of_two_models(tiny_model_dir):
    from prefopt.generation import generate_samples
    from prefopt.logprobs import naive_logps
    from prefopt.models import load_model, load_tokenizer

    policy, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    reference = load_model(tiny_model_dir)
    with torch.no_grad():  # a different reference, so the log-ratios are not zero by construction
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    samples = generate_samples(policy, tok, ["Write a review of", "I think"], num_samples=3, max_new_tokens=6, seed=0)
    est, lp, _ = estimate_kl(policy, reference, samples, tok.pad_token_id, batch_size=4)
    assert est.clusters == 2 and est.n == 6
    ratios = [naive_logps(policy, s.prompt_ids, s.response_ids) - naive_logps(reference, s.prompt_ids, s.response_ids)
              for s in samples]
    assert est.mean == pytest.approx(sum(ratios) / len(ratios), abs=1e-4)
    assert est.mean != 0.0
    same, _, _ = estimate_kl(policy, policy, samples, tok.pad_token_id, batch_size=4)
    assert same.mean == 0.0


def test_sequence_logps_matches_the_unbatched_definition(tiny_model_dir):
    from prefopt.logprobs import naive_logps
    from prefopt.models import load_model

    model = load_model(tiny_model_dir)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21], [22, 23, 24, 25], [26]]
    got = sequence_logps(model, prompts, responses, pad_token_id=0, batch_size=2)
    want = torch.tensor([naive_logps(model, p, r) for p, r in zip(prompts, responses)])
    assert torch.allclose(got, want, atol=1e-4)


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)  # 0.6362943611198906
    assert best_of_n_kl(4) == pytest.approx(0.6362943611, abs=1e-9)
    assert best_of_n_kl(16) == pytest.approx(2.7725887222 - 0.9375, abs=1e-9)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_of_n_kl_formula_by_simulation():
    # Best-of-N over a continuous reward: pi_BoN(y) = N F(y)^(N-1) pi(y); KL = E_BoN[log N + (N-1) log F]
    n = 4
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, n, generator=g).max(-1).values  # F(y) of the best of N draws is the max of uniforms
    kl = (math.log(n) + (n - 1) * torch.log(u)).mean().item()
    assert kl == pytest.approx(best_of_n_kl(n), abs=0.01)

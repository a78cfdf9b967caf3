"""SPARK policy: features, sampling, log-probabilities, weight map and the
REINFORCE update, against hand-computed values on a tiny fixed-weight policy."""

import math

import numpy as np
import pytest
import torch

scipy_stats = pytest.importorskip("scipy.stats")
from scipy.special import digamma, polygamma  # noqa: E402

from spark_ext.distill import ReinforceUpdater, SparkPolicy, normalize_advantage, standardize_features  # noqa: E402


def constant_policy(bias_alpha: float, bias_beta: float, **kw) -> SparkPolicy:
    """All conv weights and biases zero except the last bias: alpha, beta are constant per cell."""
    policy = SparkPolicy(**kw)
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
        policy.net[-1].bias.copy_(torch.tensor([bias_alpha, bias_beta]))
    return policy


def softplus(x):
    return math.log1p(math.exp(x))


def test_features_hand_computed():
    signals = torch.rand(2, 4, 3, 5, dtype=torch.float64) * 3
    f = np.log1p(signals.numpy())
    mean = f.mean(axis=(2, 3), keepdims=True)
    std = f.std(axis=(2, 3), keepdims=True)  # population std
    expected = (f - mean) / (std + 1e-6)
    np.testing.assert_allclose(standardize_features(signals).numpy(), expected, rtol=1e-5, atol=1e-6)
    # A 1x1 grid standardises to zeros, not NaN.
    assert torch.equal(standardize_features(torch.rand(1, 4, 1, 1)), torch.zeros(1, 4, 1, 1))


def test_concentrations_shapes_and_sampling_statistics():
    policy = constant_policy(1.0, -0.5)
    alpha_v, beta_v = softplus(1.0) + 1, softplus(-0.5) + 1
    signals = torch.rand(4, 4, 32, 32)
    alpha, beta = policy(signals)
    assert alpha.shape == beta.shape == (4, 1, 32, 32)
    torch.testing.assert_close(alpha, torch.full_like(alpha, alpha_v))
    torch.testing.assert_close(beta, torch.full_like(beta, beta_v))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1, s2 = policy.sample(signals, g1), policy.sample(signals, g2)
    assert torch.equal(s1.action, s2.action)  # same seed, same draw
    assert not torch.equal(s1.action, policy.sample(signals, g1).action)
    a = s1.action.double().flatten()
    # 4096 draws: the sample mean and variance match the Beta's to a few standard errors.
    mean = alpha_v / (alpha_v + beta_v)
    var = alpha_v * beta_v / ((alpha_v + beta_v) ** 2 * (alpha_v + beta_v + 1))
    assert abs(float(a.mean()) - mean) < 4 * math.sqrt(var / a.numel())
    assert abs(float(a.var()) / var - 1) < 0.1
    # Sampling leaves the global RNG alone.
    state = torch.get_rng_state()
    policy.sample(signals, g1)
    assert torch.equal(state, torch.get_rng_state())


def test_log_prob_and_entropy_match_scipy():
    policy = constant_policy(0.3, 0.7)
    alpha_v, beta_v = softplus(0.3) + 1, softplus(0.7) + 1
    signals = torch.rand(2, 4, 3, 4)
    s = policy.sample(signals, torch.Generator().manual_seed(0))
    a = s.action.double().numpy()
    expected = scipy_stats.beta.logpdf(a, alpha_v, beta_v).reshape(2, -1).sum(1)
    np.testing.assert_allclose(s.log_prob.detach().numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(policy.log_prob(signals, s.action).detach().numpy(), expected, rtol=1e-5)
    ent = 12 * scipy_stats.beta.entropy(alpha_v, beta_v)
    np.testing.assert_allclose(s.entropy.detach().numpy(), [ent, ent], rtol=1e-5)


def test_weight_map_mean_one_and_clamp():
    policy = SparkPolicy()
    a = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]])
    w = policy.weight_map(a)
    torch.testing.assert_close(w, a / 0.25)
    clamped = SparkPolicy(w_min=0.5, w_max=1.5).weight_map(a)
    raw = torch.tensor([0.5, 0.8, 1.2, 1.5])  # a / 0.25 = [0.4, 0.8, 1.2, 1.6] clamped
    torch.testing.assert_close(clamped.flatten(), raw / raw.mean())
    assert abs(float(clamped.mean()) - 1) < 1e-6
    with pytest.raises(ValueError, match="w_min"):
        SparkPolicy(w_min=2.0, w_max=1.0)


def test_reinforce_update_hand_computed():
    """Loss, gradient and Adam step for two updates, in float64 by hand.

    With zero conv weights only the last bias receives gradient:
    d log Beta(a; al, be)/d al = log a - psi(al) + psi(al + be), times softplus'(b) = sigmoid(b);
    dH/d al = -(al - 1) psi'(al) + (al + be - 2) psi'(al + be).
    """
    b_a, b_b, lr, beta_h = 0.2, -0.1, 1e-2, 1e-3
    policy = constant_policy(b_a, b_b)
    upd = ReinforceUpdater(policy, lr=lr, entropy_coef=beta_h)
    signals = torch.rand(3, 4, 2, 2)
    baseline = 0.0
    biases = np.array([b_a, b_b])
    m = np.zeros(2)
    v = np.zeros(2)
    for t, rewards in enumerate((torch.tensor([0.3, -0.1, 0.05]), torch.tensor([0.2, 0.1, -0.4])), start=1):
        sample = policy.sample(signals, torch.Generator().manual_seed(t))
        a = sample.action.double().numpy().reshape(3, -1)
        al, be = softplus(biases[0]) + 1, softplus(biases[1]) + 1
        adv = rewards.double().numpy() - baseline
        adv = adv / math.sqrt((adv**2).mean() + 1e-12)
        np.testing.assert_allclose(normalize_advantage(rewards, torch.tensor(baseline)).numpy(), adv, rtol=1e-6)
        logp = scipy_stats.beta.logpdf(a, al, be).sum(1)
        ent = 4 * scipy_stats.beta.entropy(al, be)
        loss = -(adv * logp).mean() - beta_h * ent
        sig = 1 / (1 + np.exp(-biases))
        dlogp_da = (np.log(a) - digamma(al) + digamma(al + be)).sum(1)
        dlogp_db = (np.log1p(-a) - digamma(be) + digamma(al + be)).sum(1)
        dh_da = -(al - 1) * polygamma(1, al) + (al + be - 2) * polygamma(1, al + be)
        dh_db = -(be - 1) * polygamma(1, be) + (al + be - 2) * polygamma(1, al + be)
        grad = np.array(
            [
                (-(adv * dlogp_da).mean() - beta_h * 4 * dh_da) * sig[0],
                (-(adv * dlogp_db).mean() - beta_h * 4 * dh_db) * sig[1],
            ]
        )
        stats = upd.update(rewards, sample.log_prob, sample.entropy)
        np.testing.assert_allclose(float(stats["policy_loss"]), loss, rtol=1e-5)
        np.testing.assert_allclose(policy.net[-1].bias.grad.double().numpy(), grad, rtol=1e-4, atol=1e-7)
        # Adam (betas 0.9, 0.999, eps 1e-8) by hand.
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        biases = biases - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(policy.net[-1].bias.detach().double().numpy(), biases, rtol=1e-5)
        assert float(policy.net[-1].weight.detach().abs().sum()) == 0.0  # zero activations: no weight gradient
        np.testing.assert_allclose(float(stats["baseline_used"]), baseline, atol=1e-7)
        baseline = 0.9 * baseline + 0.1 * float(rewards.double().mean())
        np.testing.assert_allclose(float(upd.baseline), baseline, rtol=1e-6)


def test_policy_rejects_bad_signals():
    policy = SparkPolicy()
    with pytest.raises(ValueError, match="4 channels"):
        policy(torch.rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match="4-D"):
        policy(torch.rand(4, 2, 2))
    with pytest.raises(ValueError, match="feature_eps must be > 0, got 0"):
        SparkPolicy(feature_eps=0.0)
    with pytest.raises(ValueError, match="advantage_eps must be > 0, got -1"):
        ReinforceUpdater(policy, advantage_eps=-1e-12)


def test_sampling_and_log_prob_make_no_value_checks(monkeypatch):
    """torch.distributions validates arguments and samples with a Python ``if`` on a
    tensor (a host sync on a GPU); the policy's hot path must not do that."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.distributions argument validation ran (a host sync on a GPU)")

    monkeypatch.setattr(torch, "_is_all_true", refuse)
    policy = SparkPolicy()
    signals = torch.rand(2, 4, 3, 3)
    s = policy.sample(signals, torch.Generator().manual_seed(0))
    policy.log_prob(signals, s.action)
    policy.distribution(signals).entropy()


def test_advantage_is_rescaled_not_recentred():
    """docs/spec.md §4's baseline must survive the batch normalisation: equal rewards above
    the baseline all get a positive advantage (standardising would give zeros)."""
    adv = normalize_advantage(torch.tensor([0.3, 0.3, 0.3]), torch.tensor(0.1))
    torch.testing.assert_close(adv, torch.ones(3))
    # A batch of one: the sign of r - b (up to the 1e-12 eps under the root).
    adv1 = normalize_advantage(torch.tensor([-2e-4]), torch.tensor(0.0))
    torch.testing.assert_close(adv1, torch.tensor([-2e-4 / math.sqrt(4e-8 + 1e-12)]))
    r, b = torch.tensor([3e-4, -1e-4, 5e-5, 2e-4]), 1e-4
    d = r.double() - b
    expected = d / (d.square().mean() + 1e-12).sqrt()
    torch.testing.assert_close(normalize_advantage(r, torch.tensor(b)).double(), expected, rtol=1e-5, atol=0)

"""Exactness of the speculative sampler on known Gaussians, and that the test catches wrong rules."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import stats as sps

from fastardiff.runtime.early_stop import EarlyStop
from fastardiff.runtime.sampling import (TokenDistribution, accept_drafts, guide, log_density, log_density_ratio,
                                         reflected_residual, sample_gaussian, sample_residual, speculative_token)

N = 20_000
SIG = 0.3
# (name, D, shift of q's mean along e_0 in units of sigma_p, sigma_q / sigma_p, wrong rules detectable)
CASES = [
    ("far-16", 16, 4.0, 1.0, True),
    ("near-16", 16, 0.02, 1.01, False),
    ("wide-q-16", 16, 0.0, 2.0, True),
    ("narrow-q-16", 16, 0.5, 0.5, True),
    ("far-1", 1, 3.0, 1.0, True),
    ("near-1", 1, 0.01, 1.0, False),
    ("sigma-1", 1, 0.3, 1.7, True),
]


def params(dim, shift, ratio):
    rng = np.random.default_rng(123)
    p_mean = np.tile(rng.normal(size=dim), (N, 1))
    q_mean = p_mean.copy()
    q_mean[:, 0] += shift * SIG
    return p_mean, np.full(N, SIG), q_mean, np.full(N, SIG * ratio)


def matches_p(x, p_mean, p_sigma) -> float:
    """Smallest p-value of exact one-sample KS tests of the marginal along e_0 (where q differs in mean),
    along the last axis, and of the radius |x - mu|^2 / sigma^2 ~ chi2(D), against the law of p."""
    z = (x - p_mean) / p_sigma[:, None]
    pvals = [sps.kstest(z[:, 0], "norm").pvalue, sps.kstest(z[:, -1], "norm").pvalue,
             sps.kstest((z**2).sum(1), sps.chi2(x.shape[1]).cdf).pvalue]
    return min(pvals)


def accept_always(rng, p_mean, p_sigma, q_mean, q_sigma):
    return sample_gaussian(rng, q_mean, q_sigma)


def residual_is_p(rng, p_mean, p_sigma, q_mean, q_sigma):
    x = sample_gaussian(rng, q_mean, q_sigma)
    keep = np.log(rng.random(len(x))) < log_density(x, p_mean, p_sigma) - log_density(x, q_mean, q_sigma)
    return np.where(keep[:, None], x, sample_gaussian(rng, p_mean, p_sigma))


@pytest.mark.parametrize("name,dim,shift,ratio,detectable", CASES, ids=[c[0] for c in CASES])
def test_speculative_marginal_is_p_and_wrong_rules_fail(name, dim, shift, ratio, detectable):
    p_mean, p_sigma, q_mean, q_sigma = params(dim, shift, ratio)
    x = speculative_token(np.random.default_rng(7), p_mean, p_sigma, q_mean, q_sigma)
    assert np.isfinite(x).all()
    assert matches_p(x, p_mean, p_sigma) > 1e-3, f"{name}: speculative output does not follow p"
    # the same test on fresh draws from q is a sanity check of its power
    if detectable:
        for wrong in (accept_always, residual_is_p):
            y = wrong(np.random.default_rng(7), p_mean, p_sigma, q_mean, q_sigma)
            assert matches_p(y, p_mean, p_sigma) < 1e-6, f"{name}: the test missed the wrong rule {wrong.__name__}"


def test_residual_sampler_targets_positive_part():
    """For p, q in 1-D with equal sigma, max(0, p - q) lives on p's side of the midpoint only."""
    p_mean, p_sigma, q_mean, q_sigma = params(1, 1.0, 1.0)
    y = sample_residual(np.random.default_rng(0), p_mean[:2000], p_sigma[:2000], q_mean[:2000], q_sigma[:2000])
    midpoint = p_mean[0, 0] + 0.5 * SIG
    assert (y[:, 0] < midpoint).all()
    # exact 1-D law: density proportional to phi(t) - phi(t - 1) on t < 0.5 (t in sigma units from mu_p)
    t = (y[:, 0] - p_mean[0, 0]) / SIG
    grid = np.linspace(-8, 0.5, 20001)
    dens = np.maximum(sps.norm.pdf(grid) - sps.norm.pdf(grid - 1.0), 0)
    cdf = np.cumsum(dens) / dens.sum()
    assert sps.kstest(t, lambda v: np.interp(v, grid, cdf)).pvalue > 1e-3


def mirror_always(rng, x, p_mean, p_sigma, q_mean, q_sigma):
    """A plausible bug: the mirror image g(x) kept without its test (right only for equal widths)."""
    d = q_mean - p_mean
    e0 = (x - q_mean) / q_sigma[:, None]
    dd = (d * d).sum(-1)
    mirror = np.divide(2 * (e0 * d).sum(-1), dd, out=np.zeros(len(x)), where=dd > 0)
    return p_mean + p_sigma[:, None] * (e0 - mirror[:, None] * d)


def unreflected_second_stage(rng, x, p_mean, p_sigma, q_mean, q_sigma):
    """A plausible bug: after a rejected mirror image, the plain residual sampler (not the reflected rule)."""
    y0 = mirror_always(rng, x, p_mean, p_sigma, q_mean, q_sigma)
    exact = reflected_residual(np.random.default_rng(1), x, p_mean, p_sigma, q_mean, q_sigma)
    redo = np.flatnonzero((exact != y0).any(axis=1))
    y0[redo] = sample_residual(rng, p_mean[redo], p_sigma[redo], q_mean[redo], q_sigma[redo])
    return y0


# (D, shift of p's mean in units of sigma_q, sigma_p / sigma_q)
REFLECTIONS = [(16, 1.5, 1.0), (16, 1.0, 1.1), (16, 0.0, 1.6), (4, 1.0, 1.3), (4, 2.5, 1.2), (1, 0.8, 0.7)]


@pytest.mark.parametrize("dim,shift,ratio", REFLECTIONS)
def test_reflected_residual_is_the_residual_near_the_rejected_draw_and_wrong_variants_fail(dim, shift, ratio):
    """x ~ q, kept with min(1, p/q), else replaced by reflected_residual(x): the token follows p exactly (as with
    the independent residual), and in several dimensions the replacement lies nearer x than an independent one.
    The mirror image kept untested and a second stage without the reflected rule are caught where the widths
    differ (with equal widths the mirror image is the exact residual: always kept)."""
    rng = np.random.default_rng(5)
    q_mean = np.tile(rng.normal(size=dim), (N, 1))
    p_mean = q_mean.copy()
    p_mean[:, 0] += shift * SIG
    p_mean[:, -1] -= 0.5 * shift * SIG
    q_sigma, p_sigma = np.full(N, SIG), np.full(N, SIG * ratio)
    x = sample_gaussian(rng, q_mean, q_sigma)
    rejected = np.log(rng.random(N)) >= log_density_ratio(x, p_mean, p_sigma, q_mean, q_sigma)
    assert 0.2 < rejected.mean() < 0.9
    rows = (x[rejected], p_mean[rejected], p_sigma[rejected], q_mean[rejected], q_sigma[rejected])

    def token(rule):
        y = x.copy()
        y[rejected] = rule(np.random.default_rng(6), *rows)
        return y

    y = token(reflected_residual)
    assert np.isfinite(y).all() and matches_p(y, p_mean, p_sigma) > 1e-3
    independent = token(lambda rng, x, *dist: sample_residual(rng, *dist))
    near = lambda t: np.linalg.norm(t[rejected] - x[rejected], axis=1).mean()  # noqa: E731
    if dim > 1:
        assert near(y) < 0.9 * near(independent)
    if ratio == 1.0:
        np.testing.assert_allclose(y, token(mirror_always), atol=1e-12)
        return
    for wrong in (mirror_always, unreflected_second_stage):
        assert matches_p(token(wrong), p_mean, p_sigma) < 1e-6, wrong.__name__


def test_residual_fallback_never_returns_zeros(caplog):
    """p == q: the residual has zero mass; the bounded loop ends, warns, and still returns real samples."""
    mean = np.full((3, 16), 5.0)
    sigma = np.full(3, 0.2)
    with caplog.at_level(logging.WARNING):
        y = sample_residual(np.random.default_rng(0), mean, sigma, mean, sigma, max_proposals=1000)
    assert "fallback" in caplog.text
    assert np.isfinite(y).all() and (np.abs(y - 5.0) < 5 * 0.2 * 4).all() and (y != 0).all()


def test_accept_drafts_ragged_and_identical_models_accept_all():
    rng = np.random.default_rng(0)
    rows, gamma, dim = 64, 4, 16
    mean = rng.normal(size=(rows, gamma + 1, dim))
    sigma = np.full((rows, gamma + 1), 0.1)
    p = TokenDistribution(mean, sigma, None)
    q = TokenDistribution(mean[:, :gamma], sigma[:, :gamma], None)
    drafts = sample_gaussian(rng, q.mean, q.sigma)
    k = rng.integers(0, gamma + 1, rows)
    accepted, nxt = accept_drafts(rng, drafts, k, p, q)
    np.testing.assert_array_equal(accepted, k)          # p == q: every draft passes, the bonus follows
    assert np.isfinite(nxt).all()
    # a far-away draft is rejected at the first slot and replaced from the residual, near p's mean
    q_far = TokenDistribution(q.mean + 10.0, q.sigma, None)
    drafts_far = sample_gaussian(rng, q_far.mean, q_far.sigma)
    accepted, nxt = accept_drafts(rng, drafts_far, np.full(rows, gamma), p, q_far)
    assert (accepted == 0).all()
    assert (np.linalg.norm(nxt - mean[:, 0], axis=1) < 1.0).all()


def test_guidance_mixes_means_and_keeps_conditional_entropy():
    mean = np.stack([np.ones((2, 3)), np.zeros((2, 3))]).reshape(2, 2, 3)  # rows: cond, uncond
    entropy = np.array([[0.2, 0.3], [0.9, 0.9]])
    m, e = guide(mean, entropy, 1.5)
    np.testing.assert_allclose(m, 1.5 * np.ones((1, 2, 3)))
    np.testing.assert_allclose(e, [[0.2, 0.3]])
    m1, e1 = guide(mean, entropy, 1.0)
    assert m1 is mean and e1 is entropy


def test_early_stop_thresholds():
    calib = {"tau_static": 0.2, "tau_global": 0.4}
    static = EarlyStop("static", 2, calib)
    assert static.should_stop(np.arange(2), np.array([0.1, 0.3])).tolist() == [True, False]
    context = EarlyStop("context", 2, calib)
    np.testing.assert_allclose(context.threshold(np.arange(2)), [0.4, 0.4])   # starts at tau_global
    context.observe_target(np.array([1]), np.array([[1.0, 1.0]]), np.array([1]))
    ema = 0.9 * 0.5 + 0.1 * 1.0
    np.testing.assert_allclose(context.threshold(np.arange(2)), [0.4, 0.8 * ema])
    off = EarlyStop("off", 2, calib)
    assert not off.should_stop(np.arange(2), np.array([-5.0, 0.0])).any()


def test_sigma_of_entropy_is_pinned_to_config_and_calibration():
    """sigma(E) = sigma_max (e^{E/tau} - 1) / (e^{E_max/tau} - 1), floored at sigma_min, from the config's
    sigma_max / tau_sigma / sigma_min and the calibration's e_max (each argument in its place), times T."""
    from fastardiff.runtime.distribution import SigmaParams, sigma_from_entropy
    from fastardiff.runtime.sampling import token_distribution

    sp = SigmaParams.from_config({"sigma_max": 0.5, "tau_sigma": 2.0, "sigma_min": 0.01, "unused": 9},
                                 {"e_max": 0.9})
    assert (sp.sigma_max, sp.tau_sigma, sp.e_max, sp.sigma_min) == (0.5, 2.0, 0.9, 0.01)
    entropy = np.array([0.0, 0.001, 0.3, 0.9, 1.0])
    want = np.maximum(0.5 * (np.exp(entropy / 2.0) - 1) / (np.exp(0.9 / 2.0) - 1), 0.01)
    np.testing.assert_allclose(sigma_from_entropy(entropy, sp), want, rtol=1e-12)
    assert sigma_from_entropy(np.array([0.9]), sp)[0] == pytest.approx(0.5)     # E_max gives sigma_max
    assert sigma_from_entropy(np.array([0.0]), sp)[0] == 0.01                   # the floor
    mean = np.zeros((5, 3), np.float32)
    for temperature in (1.0, 0.7, 2.5):   # the temperature scales sigma linearly, the mean not at all
        d = token_distribution(mean, entropy.astype(np.float32), sp, temperature)
        np.testing.assert_allclose(d.sigma, temperature * sigma_from_entropy(entropy.astype(np.float32), sp),
                                   rtol=1e-7)
        assert (d.mean == 0).all()


def test_bonus_token_comes_from_the_slot_after_the_last_draft():
    """All drafts accepted (q = p): the next token is drawn from p at slot num_drafts[r], per row (ragged)."""
    rows, gamma, dim = 6, 4, 3
    slot_means = np.arange(gamma + 1, dtype=float)[None, :, None] * 10.0          # slot j has mean 10 j
    p = TokenDistribution(np.broadcast_to(slot_means, (rows, gamma + 1, dim)).copy(), np.full((rows, gamma + 1), 0.01),
                          None)
    q = TokenDistribution(p.mean[:, :gamma].copy(), p.sigma[:, :gamma].copy(), None)
    drafts = p.mean[:, :gamma] + 0.01 * np.random.default_rng(0).standard_normal((rows, gamma, dim))
    num_drafts = np.array([0, 1, 2, 3, 4, 2])
    accepted, nxt = accept_drafts(np.random.default_rng(1), drafts, num_drafts, p, q)
    np.testing.assert_array_equal(accepted, num_drafts)
    np.testing.assert_allclose(nxt, 10.0 * num_drafts[:, None].repeat(dim, 1), atol=0.1)


def test_context_threshold_reads_exactly_the_emitted_tokens():
    """observe_target folds counts[r] target entropies of row r into its running mean, in order, no more."""
    calib = {"tau_static": 0.2, "tau_global": 0.4}
    context = EarlyStop("context", 3, calib)
    entropy = np.array([[0.9, 0.1, 0.5], [0.3, 0.7, 0.2], [0.6, 0.6, 0.6]])
    context.observe_target(np.arange(3), entropy, np.array([2, 0, 3]))
    want = []
    for row, count in zip(entropy, (2, 0, 3)):
        e = 0.4 / 0.8
        for x in row[:count]:
            e = 0.9 * e + 0.1 * x
        want.append(0.8 * e)
    np.testing.assert_allclose(context.threshold(np.arange(3)), want, rtol=1e-12)

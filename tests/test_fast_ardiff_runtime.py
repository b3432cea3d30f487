"""The fast-ardiff family through the exporter and the runtime: head engines, trajectory alignment, the CSpD
acceptance (final-step density ratio times the variance-ratio factor), its residual, and ONNX = torch."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import integrate, stats as sps

from fastardiff.runtime.sampling import TokenDistribution, accept_drafts, sample_residual
from fastardiff.runtime.speculative import GenerationConfig, GenerationError, generate


def small_checkpoint(draft_is_target: bool = False):
    from fastardiff.recipes.config import Calibration, get_config
    from fastardiff.recipes.fast_ardiff import FastARDiffCheckpoint, build_fast_ardiff_models

    cfg = get_config("tiny-mnist-fast-ardiff-small")
    if draft_is_target:
        cfg = dataclasses.replace(cfg, draft_layers=cfg.target_layers)
    torch.manual_seed(0)
    target, draft, teacher, student = build_fast_ardiff_models(cfg)
    if draft_is_target:
        draft.load_state_dict(target.state_dict())
    with torch.no_grad():   # the heads start with zero output layers (adaLN-zero): give every weight a value
        for p in teacher.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    student.load_state_dict(teacher.state_dict())
    return FastARDiffCheckpoint(cfg, Calibration(e_max=1.0), target, draft, teacher, student).eval()


@pytest.fixture(scope="module")
def fast_ckpt():
    return small_checkpoint()


@pytest.fixture(scope="module")
def fast_engines(fast_ckpt):
    from fastardiff.exporter.torch_backend import TorchEngines

    return TorchEngines(fast_ckpt, max_gamma=3)


class RecordingHeads:
    """The engines with every head call's inputs recorded."""

    def __init__(self, engines):
        self.engines, self.manifest, self.calls = engines, engines.manifest, []

    def __getattr__(self, name):
        return getattr(self.engines, name)

    def head(self, name):
        fn = self.engines.head(name)

        def run(z, traj_noise, temperature):
            self.calls.append((name, z.copy(), traj_noise.copy()))
            return fn(z, traj_noise, temperature)

        return run


def test_target_only_reads_token_j_noise_from_trajectory_column_j(fast_engines, fast_ckpt):
    """Token j of sample b is drawn with trajectory[b, j] (drawn first from the run's seeded RNG), whichever
    call makes it: the alignment draft and target rely on."""
    rec = RecordingHeads(fast_engines)
    cfg = fast_ckpt.config
    B, G, seed, n = 3, 3, 5, 6
    generate(rec, np.arange(B), GenerationConfig(mode="target", gamma=G, seed=seed, num_tokens=n))
    steps = cfg.student_steps
    trajectory = np.random.default_rng(seed).standard_normal((B, cfg.num_tokens + G + 1, steps, cfg.token_dim),
                                                             dtype=np.float32)
    assert len(rec.calls) == n and all(name == "head_student" for name, _, _ in rec.calls)
    for j, (_, z, noise) in enumerate(rec.calls):
        assert z.shape == (B, cfg.z_dim)
        np.testing.assert_array_equal(noise, trajectory[:, j])


def test_draft_equal_to_target_with_shared_noise_accepts_everything():
    """With the draft = the target and shared trajectories, every final-step Gaussian and offset agree, so the
    CSpD ratio is 1 and every draft passes; with independent noise the same drafts are often rejected."""
    from fastardiff.exporter.torch_backend import TorchEngines

    engines = TorchEngines(small_checkpoint(draft_is_target=True), max_gamma=3)
    classes = np.arange(4)
    gen = GenerationConfig(gamma=3, early_stop="off", eta=0.0, num_tokens=24)
    shared = generate(engines, classes, gen)[1].summary()
    apart = generate(engines, classes, dataclasses.replace(gen, shared_noise=False))[1].summary()
    assert shared["drafts_proposed"] > 0 and shared["acceptance_rate"] > 0.999
    assert shared["head_calls"] > 0
    assert apart["acceptance_rate"] < 0.9


def test_speculative_verify_reuses_each_drafted_tokens_noise(fast_engines, fast_ckpt):
    rec = RecordingHeads(fast_engines)
    cfg = fast_ckpt.config
    B, G, seed = 2, 3, 11
    generate(rec, np.arange(B), GenerationConfig(gamma=G, seed=seed, eta=0.0, early_stop="off", num_tokens=12))
    steps = cfg.student_steps
    trajectory = np.random.default_rng(seed).standard_normal((B, cfg.num_tokens + G + 1, steps, cfg.token_dim),
                                                             dtype=np.float32)
    # the first round (no prefill): drafts of tokens 0..2, one head call of B rows each, then the verify's head
    # call over tokens 0..3 of both samples (B * (G + 1) rows, sample-major)
    assert [len(z) for _, z, _ in rec.calls[:G + 1]] == [B] * G + [B * (G + 1)]
    for i in range(G):
        np.testing.assert_array_equal(rec.calls[i][2], trajectory[:, i])
    noise = rec.calls[G][2].reshape(B, G + 1, steps, cfg.token_dim)
    np.testing.assert_array_equal(noise, trajectory[:, :G + 1])


def test_offsets_scale_the_acceptance_ratio():
    """p = q except for the offset: a draft passes with probability min(1, exp(shift))."""
    rng = np.random.default_rng(0)
    R, D, shift = 8000, 4, -0.7
    mean = np.zeros((R, 2, D))
    sigma = np.ones((R, 2))
    p = TokenDistribution(mean, sigma, None, np.full((R, 2), shift))
    q = TokenDistribution(mean[:, :1], sigma[:, :1], None, np.zeros((R, 1)))
    drafts = rng.standard_normal((R, 1, D))
    accepted, _ = accept_drafts(rng, drafts, np.ones(R, np.int64), p, q)
    assert accepted.mean() == pytest.approx(np.exp(shift), abs=0.025)


def test_residual_with_offset_samples_max_of_scaled_p_minus_q():
    """The residual of CSpD's scored densities, max(0, e^s p - q) normalised, in 1-D against its numeric CDF;
    the residual of the unscaled densities (an implementation ignoring the offset) fails the same test."""
    rng = np.random.default_rng(1)
    R, s = 20000, 0.4
    p_mean, q_mean = np.zeros((R, 1)), np.full((R, 1), 0.6)
    ones = np.ones(R)
    y = sample_residual(rng, p_mean, ones, q_mean, ones, shift=np.full(R, s))[:, 0]

    def cdf_of(shift):
        density = lambda x: max(0.0, np.exp(shift) * sps.norm.pdf(x) - sps.norm.pdf(x, 0.6))  # noqa: E731
        grid = np.linspace(-8, 8, 4001)
        values = np.array([density(x) for x in grid])
        cum = integrate.cumulative_trapezoid(values, grid, initial=0.0)
        return lambda x: np.interp(x, grid, cum / cum[-1])

    assert sps.kstest(y, cdf_of(s)).pvalue > 1e-3
    assert sps.kstest(y, cdf_of(0.0)).pvalue < 1e-6


def test_inner_temperature_raises_acceptance(fast_engines):
    base = GenerationConfig(gamma=3, early_stop="off", eta=0.0, num_tokens=16)
    plain = generate(fast_engines, np.arange(4), base)[1].summary()
    hot = generate(fast_engines, np.arange(4), dataclasses.replace(base, inner_temperature=42.0))[1].summary()
    assert hot["acceptance_rate"] > plain["acceptance_rate"]


def test_teacher_head_and_clear_errors(fast_engines):
    rec = RecordingHeads(fast_engines)
    generate(rec, [0], GenerationConfig(mode="target", head="teacher", num_tokens=2))
    assert {name for name, _, _ in rec.calls} == {"head_teacher"}
    assert rec.calls[0][2].shape[1] == fast_engines.manifest.engines["head_teacher"].steps
    with pytest.raises(GenerationError, match="--draft jacobi needs explicit Gaussian tokens"):
        generate(fast_engines, [0], GenerationConfig(draft="jacobi", num_tokens=4))
    with pytest.raises(Exception, match="no 'head_nope' engine"):
        generate(fast_engines, [0], GenerationConfig(mode="target", head="nope", num_tokens=2))


def test_onnx_export_runs_the_family_like_torch(fast_ckpt, fast_engines, tmp_path):
    """Export parity (inside the export), the manifest's head entries, then the same seeded run on ONNX Runtime
    and on the torch modules: the same tokens (fp32 tolerance) and the same counters."""
    pytest.importorskip("onnxruntime")
    from fastardiff.exporter.export import export_engines
    from fastardiff.exporter.targets import ExportOptions
    from fastardiff.recipes.fast_ardiff import save_checkpoint
    from fastardiff.runtime.engine import load_engines

    path = save_checkpoint(tmp_path / "fast.pt", fast_ckpt)
    manifest, _ = export_engines(path, tmp_path / "onnx", ExportOptions(target="onnx", gamma=2, max_batch=4))
    assert manifest.family == "fast-ardiff"
    heads = {n: e for n, e in manifest.engines.items() if e.kind == "head"}
    assert {n: e.steps for n, e in heads.items()} == {"head_teacher": fast_ckpt.config.teacher_steps,
                                                      "head_student": fast_ckpt.config.student_steps}
    assert all(e.parity["outputs"]["mean"]["mismatches"] == 0 for e in heads.values())
    onnx = load_engines(tmp_path / "onnx")
    gen = GenerationConfig(gamma=2, seed=3, early_stop="static", cfg_scale=1.5)
    a, sa = generate(onnx, [1, 7], gen)
    b, sb = generate(fast_engines, [1, 7], gen)
    np.testing.assert_allclose(a, b, atol=2e-3)
    assert sa.summary()["drafts_accepted"] == sb.summary()["drafts_accepted"]
    assert sa.summary()["target_calls"] == sb.summary()["target_calls"]


def test_serving_merger_runs_head_calls_of_concurrent_requests_together(fast_engines):
    """Two requests' head calls merge into one engine call and each gets its own rows back."""
    import threading

    from fastardiff.runtime.serve.merge import EngineCallMerger

    merger = EngineCallMerger(fast_engines)
    rng = np.random.default_rng(0)
    steps, dim = fast_engines.manifest.engines["head_student"].steps, fast_engines.manifest.config["token_dim"]
    inputs = [(rng.standard_normal((n, fast_engines.manifest.config["z_dim"]), dtype=np.float32),
               rng.standard_normal((n, steps, dim), dtype=np.float32), np.array([0.9], np.float32)) for n in (3, 5)]
    views = [merger.join(), merger.join()]
    results = [None, None]

    def request(i):
        with views[i] as engines:
            results[i] = engines.head("head_student")(*inputs[i])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert merger.engine_calls == 1 and views[0].merged == 2
    for got, args in zip(results, inputs):
        for g, want in zip(got, fast_engines.head("head_student")(*args)):
            np.testing.assert_allclose(g, want, atol=1e-4)   # another batch size: float reassociation


def shared_trajectory_tokens(rng, rows: int, acceptance: str):
    """A two-jump 1-D head with trajectory noise eps shared by draft and target: the first jump h = a + s eps, the
    final Gaussian N(0.8 h, 0.5^2). Draft (a, s) = (0.4, 0.5), target (0, 1.5), so CSpD's sigma factor
    log_offset = -log s differs by log 3. One speculative token per row (a draft, then accept / residual) under
    `acceptance`; returns those tokens and target-only tokens drawn with fresh noise."""
    eps = rng.standard_normal(rows)

    def final(a, s, noise):
        return 0.8 * (a + s * noise)[:, None, None], np.full((rows, 1), 0.5), np.full((rows, 1), -np.log(s))

    q_mean, q_sigma, q_off = final(0.4, 0.5, eps)
    p_mean, p_sigma, p_off = final(0.0, 1.5, eps)
    scored = acceptance == "cspd"
    p = TokenDistribution(np.concatenate([p_mean, p_mean], 1), np.concatenate([p_sigma, p_sigma], 1), None,
                          np.concatenate([p_off, p_off], 1) if scored else None)
    q = TokenDistribution(q_mean, q_sigma, None, q_off if scored else None)
    drafts = q_mean + q_sigma[..., None] * rng.standard_normal((rows, 1, 1))
    accepted, residual = accept_drafts(rng, drafts, np.ones(rows, np.int64), p, q)
    spec = np.where(accepted == 1, drafts[:, 0, 0], residual[:, 0])
    target_mean, target_sigma, _ = final(0.0, 1.5, rng.standard_normal(rows))
    reference = target_mean[:, 0, 0] + 0.5 * rng.standard_normal(rows)
    return spec, reference


def test_conditional_rule_is_exact_given_shared_trajectories_and_cspd_is_not():
    """Conditioned on the shared trajectory noise both tokens are Gaussians, so scoring the final-step densities
    alone returns target-only's distribution (two-sample KS passes); CSpD's sigma factor, where the draft's and
    the target's earlier jumps differ, shifts it (the same test fails)."""
    rng = np.random.default_rng(3)
    spec, reference = shared_trajectory_tokens(rng, 40000, "conditional")
    assert sps.ks_2samp(spec, reference).pvalue > 1e-3
    spec, reference = shared_trajectory_tokens(rng, 40000, "cspd")
    assert sps.ks_2samp(spec, reference).pvalue < 1e-6


def test_conditional_acceptance_ignores_the_heads_sigma_factor(fast_engines):
    """--acceptance conditional never reads log_offset: engines whose head returns a different log_offset give the
    same run token for token; under cspd they do not. It needs the shared noise and the plain ratio."""
    class OtherOffsets(RecordingHeads):
        def head(self, name):
            fn = self.engines.head(name)

            def run(z, traj_noise, temperature):
                mean, sigma, log_offset = fn(z, traj_noise, temperature)
                return mean, sigma, log_offset + 3.0 * np.sin(1000.0 * z[:, 0]).astype(np.float32)

            return run

    other = OtherOffsets(fast_engines)
    gen = GenerationConfig(gamma=3, early_stop="off", num_tokens=20, seed=4, acceptance="conditional")
    a, sa = generate(fast_engines, np.arange(4), gen)
    b, sb = generate(other, np.arange(4), gen)
    np.testing.assert_array_equal(a, b)
    assert sa.summary()["drafts_accepted"] == sb.summary()["drafts_accepted"] > 0
    cspd = dataclasses.replace(gen, acceptance="cspd")
    assert not np.array_equal(generate(fast_engines, np.arange(4), cspd)[0], generate(other, np.arange(4), cspd)[0])
    for wrong, match in (({"shared_noise": False}, "--shared-noise"), ({"inner_temperature": 42.0}, "inner"),
                         ({"acceptance": "exactish"}, "unknown --acceptance")):
        with pytest.raises(GenerationError, match=match):
            generate(fast_engines, [0], dataclasses.replace(gen, **wrong))

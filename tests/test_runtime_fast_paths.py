"""The runtime's host-side fast paths give exactly what the plain computations they replace give.

KV-cache writes (one slice, rows on one axis, strided windows for ragged offsets) against a per-row loop; the
fused Gaussian log-ratio against the difference of two log-densities; static early stop compared in float64;
the running target-entropy mean skipped where no threshold reads it.
"""
from __future__ import annotations

import numpy as np
import pytest

from fastardiff.runtime.early_stop import EarlyStop
from fastardiff.runtime.kv_cache import KVCache
from fastardiff.runtime.sampling import log_density, log_density_ratio, residual_ratios


def reference_write(k, v, rows, starts, new_k, new_v):
    for r, (row, s) in enumerate(zip(rows, starts)):
        k[:, row, :, s: s + new_k.shape[3]] = new_k[:, r]
        v[:, row, :, s: s + new_k.shape[3]] = new_v[:, r]


@pytest.mark.parametrize("rows, starts, num_new", [
    (None, [3, 3, 3, 3, 3], 2),          # every row, same offset: one slice
    ([1, 4], [0, 0], 3),                  # some rows, same offset
    (None, [0, 5, 2, 9, 1], 1),           # every row, ragged single positions
    ([4, 0, 2], [6, 1, 3], 4),            # unordered rows, ragged, several positions
    ([3], [10], 2),                       # last positions of the cache
])
def test_kv_cache_write_paths_match_a_per_row_loop(rows, starts, num_new):
    rng = np.random.default_rng(0)
    cache = KVCache(layers=3, batch=5, heads=2, capacity=12, head_dim=4)
    cache.k[:] = rng.standard_normal(cache.k.shape)
    cache.v[:] = rng.standard_normal(cache.v.shape)
    k_ref, v_ref = cache.k.copy(), cache.v.copy()
    row_ids = np.arange(5) if rows is None else np.array(rows)
    starts = np.array(starts)
    new_k = rng.standard_normal((3, len(row_ids), 2, num_new, 4)).astype(np.float32)
    new_v = rng.standard_normal(new_k.shape).astype(np.float32)
    cache.write(None if rows is None else row_ids, starts, new_k, new_v)
    reference_write(k_ref, v_ref, row_ids, starts, new_k, new_v)
    np.testing.assert_array_equal(cache.k, k_ref)
    np.testing.assert_array_equal(cache.v, v_ref)


def test_kv_cache_view_without_rows_is_a_view_and_subset_is_a_copy():
    cache = KVCache(layers=2, batch=3, heads=1, capacity=6, head_dim=2)
    k, _ = cache.view(None, 4)
    assert np.shares_memory(k, cache.k) and k.shape == (2, 3, 1, 4, 2)
    cache.k[:] = np.arange(cache.k.size).reshape(cache.k.shape)
    k, _ = cache.view(np.array([2, 0]), 4)
    assert not np.shares_memory(k, cache.k) and k.shape == (2, 2, 1, 4, 2) and k.flags.c_contiguous
    np.testing.assert_array_equal(k, cache.k[:, [2, 0], :, :4])


def test_kv_cache_rows_is_a_contiguous_copy_of_those_rows():
    """The whole buffers of a row subset (what an in-place engine is handed for the active rows): equal to the
    gathered rows, C-contiguous (a backend would otherwise copy it again), and not sharing the cache's memory."""
    rng = np.random.default_rng(2)
    cache = KVCache(layers=3, batch=5, heads=2, capacity=7, head_dim=4)
    cache.k[:] = rng.standard_normal(cache.k.shape)
    cache.v[:] = rng.standard_normal(cache.v.shape)
    rows = np.array([4, 1, 2])
    k, v = cache.rows(rows)
    for got, whole in ((k, cache.k), (v, cache.v)):
        assert got.flags.c_contiguous and not np.shares_memory(got, whole)
        np.testing.assert_array_equal(got, np.stack([whole[:, r] for r in rows], axis=1))


def _denormal_reads_zero() -> bool:
    return float((np.array([1e-38], np.float32) * np.float32(0.01))[0]) == 0.0


def test_denormal_flush_is_scoped_to_the_block_and_the_thread():
    """Inside the block a denormal product reads 0 (flushed); after it, and in another (earlier started) thread
    meanwhile, it does not; nested blocks restore only at the outermost exit; a disabled flush changes nothing."""
    import threading

    from fastardiff.runtime.denormals import DenormalFlush

    flush = DenormalFlush()
    if not flush.available:
        pytest.skip("no fenv control for this platform (Linux x86-64 / aarch64 only)")
    assert not _denormal_reads_zero()
    other, inside = [], threading.Event()

    def check_from_another_thread():           # started before the block (a new thread inherits the flags)
        inside.wait(10)
        other.append(_denormal_reads_zero())

    worker = threading.Thread(target=check_from_another_thread)
    worker.start()
    with flush:
        assert _denormal_reads_zero()
        with flush:
            assert _denormal_reads_zero()
        assert _denormal_reads_zero()              # the inner exit kept the outer block's state
        inside.set()
        worker.join()
    assert other == [False] and not _denormal_reads_zero()
    with DenormalFlush(enabled=False) as off:
        assert not off.available and not _denormal_reads_zero()


def test_denormal_flush_restores_an_environment_changed_after_its_first_use():
    """The caller's floating-point environment is read at every outermost entry, not once: a rounding mode the
    caller sets after the flush object was first used is what every later exit puts back (and the caller's
    original one after it is restored)."""
    import ctypes
    import ctypes.util

    from fastardiff.runtime.denormals import DenormalFlush

    flush = DenormalFlush()
    if not flush.available:
        pytest.skip("no fenv control for this platform (Linux x86-64 / aarch64 only)")
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    upward = {"x86_64": 0x800, "aarch64": 0x400000}.get(__import__("platform").machine().lower())
    if upward is None:
        pytest.skip("rounding-mode constants known for x86-64 / aarch64 only")
    original = libm.fegetround()
    with flush:                                   # the first use: buffers made, the environment of then read
        pass
    try:
        assert libm.fesetround(upward) == 0       # the caller changes its environment after that first use
        for _ in range(2):
            with flush:
                assert _denormal_reads_zero()
            assert libm.fegetround() == upward and not _denormal_reads_zero()
    finally:
        libm.fesetround(original)
    assert libm.fegetround() == original
    with flush:
        pass
    assert libm.fegetround() == original and not _denormal_reads_zero()


def test_fused_log_ratio_equals_difference_of_log_densities():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4, 16)) * 2
    pm, qm = rng.standard_normal((6, 4, 16)), rng.standard_normal((6, 4, 16))
    ps, qs = rng.uniform(0.05, 3, (6, 4)), rng.uniform(0.05, 3, (6, 4))
    expected = log_density(x, pm, ps) - log_density(x, qm, qs)
    np.testing.assert_allclose(log_density_ratio(x, pm, ps, qm, qs), expected, rtol=1e-10, atol=1e-9)


def test_residual_ratios_equal_the_densities_at_the_proposal_and_its_reflection():
    """residual_ratios' closed forms (in |z|^2, z.d, |d|^2) against log densities at y = mu_p + sigma_p z and at
    x' = mu_q + sigma_q R z, R the reflection normal to mu_p - mu_q, built explicitly."""
    rng = np.random.default_rng(1)
    T, C, D = 6, 5, 16
    pm = rng.standard_normal((T, 1, D))
    qm = pm + 0.3 * rng.standard_normal((T, 1, D))
    ps = rng.uniform(0.8, 1.2, (T, 1))
    qs = ps * rng.uniform(0.9, 1.1, (T, 1))
    z = rng.standard_normal((T, C, D))
    y = pm + ps[..., None] * z
    n = (pm - qm) / np.linalg.norm(pm - qm, axis=-1, keepdims=True)
    x = qm + qs[..., None] * (z - 2 * (z * n).sum(-1, keepdims=True) * n)
    want_f = -np.expm1(np.minimum(log_density(y, qm, qs) - log_density(y, pm, ps), 0.0))
    want_g = -np.expm1(np.minimum(log_density(x, pm, ps) - log_density(x, qm, qs), 0.0))
    assert 0 < (want_f > 0).mean() < 1 and 0 < (want_g > 0).mean() < 1
    f, g = residual_ratios(z, pm, ps, qm, qs, reflected=True)
    np.testing.assert_allclose(f, want_f, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g, want_g, rtol=1e-9, atol=1e-12)
    f_plain, g_plain = residual_ratios(z, pm, ps, qm, qs)
    np.testing.assert_array_equal(f_plain, f)
    assert g_plain == 0.0


def test_static_early_stop_compares_in_float64():
    tau = 0.1000000015          # between float32(0.1) and the next float64 above it
    stop = EarlyStop("static", 1, {"tau_static": tau, "tau_global": 0.5})
    shallow = np.array([np.float32(0.1)])
    assert stop.should_stop(np.arange(1), shallow).tolist() == (shallow < stop.threshold(np.arange(1))).tolist() \
        == [True]


@pytest.mark.parametrize("mode", ["static", "off"])
def test_running_entropy_mean_is_only_kept_for_context(mode):
    calibration = {"tau_static": 0.2, "tau_global": 0.4}
    stop = EarlyStop(mode, 2, calibration)
    before = stop.threshold(np.arange(2)).copy()
    stop.observe_target(np.arange(2), np.array([[5.0, 5.0], [5.0, 5.0]]), np.array([2, 1]))
    np.testing.assert_array_equal(stop.threshold(np.arange(2)), before)
    context = EarlyStop("context", 2, calibration)
    context.observe_target(np.arange(2), np.array([[5.0, 5.0], [5.0, 5.0]]), np.array([2, 1]))
    ema0 = 0.4 / 0.8
    np.testing.assert_allclose(context.target_ema, [0.9 * (0.9 * ema0 + 0.5) + 0.5, 0.9 * ema0 + 0.5])


class _CountingBinding:
    """An engine's IOBinding with its bind calls counted per input name (the real one does the work)."""

    def __init__(self, real):
        self.real, self.inputs = real, {}

    def bind_input(self, name, *args):
        self.inputs[name] = self.inputs.get(name, 0) + 1
        return self.real.bind_input(name, *args)

    def bind_output(self, name, *args):
        return self.real.bind_output(name, *args)

    def get_outputs(self):
        return self.real.get_outputs()


class _CountingSession:
    def __init__(self, real):
        self.real, self.runs = real, 0

    def run_with_iobinding(self, binding, options):
        self.runs += 1
        return self.real.run_with_iobinding(binding.real, options)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def counted_engines(shared_onnx_export):
    """The shared in-place ONNX engines with every in-place engine's bind and run calls counted."""
    from fastardiff.runtime.engine import load_engines

    engines = load_engines(shared_onnx_export[0])
    assert {"target_verify", "target_jacobi"} <= engines.capabilities.kv_in_place
    for name in engines.capabilities.kv_in_place:
        engines._bindings[name] = _CountingBinding(engines._bindings[name])
        engines.sessions[name]._sess = _CountingSession(engines.sessions[name]._sess)
    return engines


def _counts(engines, reset: bool = False) -> dict:
    out = {}
    for name in engines.capabilities.kv_in_place:
        binding, session = engines._bindings[name], engines.sessions[name]._sess
        out[name] = (session.runs, dict(binding.inputs))
        if reset:
            binding.inputs.clear()
            session.runs = 0
    return out


@pytest.mark.parametrize("settings", [{"mode": "target"}, {"draft": "jacobi", "gamma": 3},
                                      {"draft": "model", "gamma": 2}])
def test_in_place_cache_bindings_are_made_once_and_kept_run_after_run(counted_engines, settings):
    """The 2L per-layer cache bindings of an in-place engine are made at its first call on a buffer and kept for
    every later call (the loop passes its one buffer); the next run takes the same pooled buffer
    (kv_cache.HostBufferPool), so it binds no cache at all. Counted on the engines' own IOBinding."""
    from fastardiff.runtime.speculative import GenerationConfig, generate

    layers = {n: e.cache_layers for n, e in counted_engines.manifest.engines.items()}
    gen = GenerationConfig(seed=1, **settings)
    for run in range(3):
        _counts(counted_engines, reset=True)
        generate(counted_engines, np.array([3]), gen)
        used = {n: c for n, c in _counts(counted_engines).items() if c[0]}
        assert used and max(runs for runs, _ in used.values()) > 4, used
        for name, (runs, inputs) in used.items():
            cache = sum(v for k, v in inputs.items() if k.startswith(("k_cache_", "v_cache_")))
            assert cache == (2 * layers[name] if run == 0 else 0), (run, name, runs, inputs)


def test_jacobi_rounds_reuse_their_kept_feed_arrays(counted_engines):
    """A Jacobi round fills its per-round target_jacobi inputs into the arrays HostArrays.kept hands out (the same
    array while the shape holds), so their bindings are kept: each is bound at most once per feed shape (the
    guesses tested grow up to the window, so at most gamma shapes), not once per call. Only the token window and
    the lengths (views into the run's buffers, at a new place each round) are bound every call."""
    from fastardiff.runtime.speculative import GenerationConfig, generate

    gamma = 3
    _counts(counted_engines, reset=True)
    generate(counted_engines, np.array([5]), GenerationConfig(draft="jacobi", gamma=gamma, seed=2))
    runs, inputs = _counts(counted_engines)["target_jacobi"]
    per_round = {k: v for k, v in inputs.items() if not k.startswith(("k_cache_", "v_cache_"))
                 and k not in ("tokens", "lengths")}
    assert runs > 4 * gamma and {"guess_mean", "coins", "noise", "residual_noise"} <= set(per_round), inputs
    assert max(per_round.values()) <= gamma, (runs, per_round)
    assert inputs["tokens"] == runs                               # the control: a fresh view is bound each call


def test_a_warmed_run_makes_its_calls_shapes_before_it_is_timed(counted_engines, monkeypatch):
    """generate(warm=True) (what `fastardiff run` asks for) calls every proposal kind the run may use (the plan and
    its alternative) before the timer starts: the timed run then makes no cache binding at all (its pooled
    buffers are the warm-up's, already bound) and its images are the very ones of an unwarmed run (the warm-up
    has its own random stream). Counted on the engines' own IOBinding; the control, without the warm-up, binds."""
    from fastardiff.runtime import speculative
    from fastardiff.runtime.adaptive import Adapter, AdaptPolicy
    from fastardiff.runtime.speculative import GenerationConfig, generate

    real, seen = speculative.warm_up, []

    def counted_warm_up(*args):
        out = real(*args)
        seen.append(_counts(counted_engines, reset=True))
        return out

    monkeypatch.setattr(speculative, "warm_up", counted_warm_up)
    gen = GenerationConfig(draft="jacobi", gamma=3, seed=4, alternative="target")
    classes = np.array([2])              # one image: no ragged rows (a subset of rows is a copy, bound each call)
    counted_engines.capabilities.cache_pool._free.clear()               # a fresh process: nothing pooled yet,
    counted_engines._bound_caches.clear()                               # nothing bound
    _counts(counted_engines, reset=True)
    # an adapter that never probes: a probe's timing-dependent rounds would change the images
    never = dict(adapter=Adapter(AdaptPolicy(first_probe=10 ** 9)))
    warmed, stats = generate(counted_engines, classes, gen, warm=True, **never)
    assert len(seen) == 1 and stats.warm_up["target_calls"] >= 2 + 2 and stats.warm_up["decode_calls"] == 1
    assert seen[0]["target_jacobi"][0] > 0 and seen[0]["target_verify"][0] > 0      # both kinds warmed
    timed = _counts(counted_engines)
    assert timed["target_jacobi"][0] > 0
    for name, (runs, inputs) in timed.items():
        assert not any(k.startswith(("k_cache_", "v_cache_")) for k in inputs), (name, inputs)
    counted_engines.capabilities.cache_pool._free.clear()
    counted_engines._bound_caches.clear()      # (a new buffer may land where the last one was: bound all the same)
    _counts(counted_engines, reset=True)
    cold, cold_stats = generate(counted_engines, classes, gen, adapter=Adapter(AdaptPolicy(first_probe=10 ** 9)))
    assert cold_stats.warm_up is None and np.array_equal(cold, warmed)
    assert any(k.startswith("k_cache_") for k in _counts(counted_engines)["target_jacobi"][1])   # the control

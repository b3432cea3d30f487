"""The engine-call merger of `fastardiff serve` (runtime/serve/merge.py), in this process, no server: requests of
any mix of settings merged together get the images they get alone, no engine call carries more rows than its
engine's profile allows (a batch-1 export included, guidance doubling the rows), and a planner's timing runs
alone while the other requests wait.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_dir(shared_onnx_export):
    return shared_onnx_export[0]


@pytest.fixture(scope="module")
def engines(engine_dir):
    from fastardiff.runtime.engine import load_engines

    return load_engines(engine_dir, device_cache=False)


class RowSpy:
    """The engines, with every call's rows recorded per engine name (rows = the first input's first axis)."""

    def __init__(self, engines):
        self._e = engines
        self.manifest = engines.manifest
        self.rows: dict[str, list[int]] = {}
        self.calls = 0
        self.rollouts = {g: self._spy(fn, self.manifest.rollout_engines()[g]) for g, fn in engines.rollouts.items()}
        self.target_jacobi = self._spy(engines.target_jacobi, "target_jacobi") if engines.target_jacobi else None
        for name in ("draft_step", "target_verify", "decoder"):
            setattr(self, name, self._spy(getattr(engines, name), name))
        self.capabilities = engines.capabilities    # the same rows and rounds, every call spied

    def _spy(self, fn, name):
        def call(*arrays):
            self.rows.setdefault(name, []).append(len(arrays[0]))
            self.calls += 1
            return fn(*arrays)
        return call


def _run(engines, requests, max_rows=None, stagger=0.005):
    """Every request's images (generate through one merger, one thread each) and the merger."""
    from fastardiff.runtime.serve.merge import EngineCallMerger
    from fastardiff.runtime.speculative import generate

    merger = EngineCallMerger(engines, max_rows)

    def one(i):
        time.sleep(stagger * i)                      # requests join while others run
        classes, gen = requests[i]
        with merger.join(guided=gen.cfg_scale != 1.0) as merged:
            return generate(merged, classes, gen)[0]

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, range(len(requests)))), merger


def _mixed_requests(seed: int, n: int):
    """n requests of different settings: mode, proposal kind, gamma, guidance, temperature, early stop, images."""
    from fastardiff.runtime.speculative import GenerationConfig

    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        settings = dict(mode="target" if i % 4 == 3 else "speculative", draft=("model", "jacobi")[i % 2],
                        gamma=int(rng.integers(1, 5)), cfg_scale=float((1.0, 1.5, 2.0, 3.0)[i % 4]),
                        temperature=float(rng.choice([1.0, 0.8])),
                        early_stop=str(rng.choice(["static", "context", "off"])), seed=int(rng.integers(0, 2**31)))
        requests.append((list(map(int, rng.integers(0, 10, int(rng.integers(1, 4))))), GenerationConfig(**settings)))
    return requests


@pytest.mark.parametrize("settings", [
    {"mode": "speculative", "draft": "model", "gamma": 1, "cfg_scale": 2.0},      # merged rollouts, [cond; uncond]
    {"mode": "speculative", "draft": "model", "gamma": 3, "early_stop": "context"},  # draft_step calls (no rollout)
    {"mode": "speculative", "draft": "jacobi", "gamma": 4, "temperature": 0.8},   # merged target_jacobi rounds
    {"mode": "speculative", "draft": "jacobi", "gamma": 2, "cfg_scale": 3.0},
    {"mode": "target", "gamma": 1, "cfg_scale": 1.5},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_merged_engine_calls_give_each_request_its_alone_bits(engines, settings):
    from fastardiff.runtime.speculative import GenerationConfig, generate

    rng = np.random.default_rng(7)
    requests = [(list(rng.integers(0, 10, n)), GenerationConfig(**settings, seed=int(s)))
                for n, s in zip([1, 3, 2, 1, 2], rng.integers(0, 2**32, 5))]
    together, merger = _run(engines, requests)
    assert merger.engine_calls < 0.8 * merger.submitted          # the calls did run together
    for request, images in zip(requests, together):
        alone, single = _run(engines, [request])
        assert single.engine_calls == single.submitted
        np.testing.assert_array_equal(alone[0], images)          # bit for bit
    other = _run(engines, [(requests[0][0], GenerationConfig(**settings, seed=requests[0][1].seed + 1))])[0][0]
    assert not np.array_equal(other, together[0])
    # the random numbers of `fastardiff-run`: the same sample, up to the last bits the padding changes
    np.testing.assert_allclose(generate(engines, *requests[1])[0], together[1], rtol=0, atol=1e-4)


def test_requests_of_every_setting_at_once_get_their_alone_images(engines):
    """Different guidance scales (the bug: an ONNX Runtime shape error), gammas, proposal kinds, temperatures,
    early stops and image counts, all at once through one merger: each request's images are its solo images."""
    requests = _mixed_requests(3, 12)
    together, merger = _run(engines, requests)
    assert merger.engine_calls < merger.submitted                # some calls ran together
    for request, images in zip(requests, together):
        np.testing.assert_array_equal(_run(engines, [request])[0][0], images)


@pytest.mark.parametrize("max_rows", [1, 2, 3, 6])
def test_no_engine_call_exceeds_its_profile_rows(engines, max_rows):
    """Engines that take max_rows rows a call (max_rows 1: a batch-1 export, where a guided sample's cond/uncond
    pair cannot share a rollout or Jacobi call): every call within it, and the same images alone or together."""
    spy = RowSpy(engines)
    requests = _mixed_requests(11 + max_rows, 6)
    together, merger = _run(spy, requests, max_rows)
    assert spy.rows and max(max(rows) for rows in spy.rows.values()) <= max_rows, spy.rows
    assert merger.engine_calls == spy.calls
    for request, images in zip(requests, together):
        np.testing.assert_array_equal(_run(spy, [request], max_rows)[0][0], images)
    assert max(max(rows) for rows in spy.rows.values()) <= max_rows


def test_row_limits_come_from_each_engines_profile():
    from fastardiff.runtime.serve.merge import engine_row_limits

    entry = lambda batch: SimpleNamespace(profile={"batch": batch} if batch else {})   # noqa: E731
    manifest = SimpleNamespace(max_batch=8, engines={"target_verify": entry([1, 1, 1]), "decoder": entry([1, 4, 6]),
                                                     "old": entry(None)})
    assert engine_row_limits(manifest) == {"target_verify": 1, "decoder": 6, "old": 8}


def test_a_planner_runs_its_calls_alone_while_the_others_wait(engines):
    """`--gamma auto` timing in a serving replica: while the exclusive member is in, its calls run at once and
    alone (merged with nobody), and no other request's call runs; the others go on after it leaves."""
    from fastardiff.runtime.serve.merge import EngineCallMerger
    from fastardiff.runtime.speculative import GenerationConfig, generate

    spy = RowSpy(engines)
    merger = EngineCallMerger(spy)
    requests = _mixed_requests(5, 4)
    seen = {}

    def one(i):
        with merger.join(guided=requests[i][1].cfg_scale != 1.0) as merged:
            return generate(merged, *requests[i])[0]

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        time.sleep(0.05)
        with merger.join(exclusive=True) as alone:
            before = spy.calls
            images, _ = generate(alone, [3, 4], GenerationConfig(mode="target", seed=1, gamma=1))
            seen.update(calls=spy.calls - before, own=alone.calls, merged=alone.merged)
        results = [f.result() for f in futures]
    assert seen["own"] > 0 and seen["calls"] == seen["own"]       # no other request's call ran meanwhile
    assert seen["merged"] == seen["own"]                          # and none of its calls was merged with another
    alone_cli = generate(engines, [3, 4], GenerationConfig(mode="target", seed=1, gamma=1))[0]
    np.testing.assert_allclose(images, alone_cli, rtol=0, atol=1e-4)     # the CLI's sample (padding: last bits)
    for request, got in zip(requests, results):
        np.testing.assert_array_equal(_run(engines, [request])[0][0], got)

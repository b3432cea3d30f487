"""Speculative Jacobi decoding: maximal coupling and acceptance on known Gaussians (with wrong variants caught by
the same tests), cache exactness and cost semantics of the loop, --gamma auto's mode choice, the CLI.
The end-to-end two-sample tests against target-only sampling are in test_speculative.py (shared references)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from test_sampling import matches_p
from test_speculative import HostResolved, RecordingEngines, WithCalibration

from fastardiff.runtime.distribution import SigmaParams
from fastardiff.runtime.arrays import HostArrays
from fastardiff.runtime.jacobi import couple_guesses, finish_residuals, resolve_slots
from fastardiff.runtime.manifest import decode_prior, encode_prior
from fastardiff.runtime.sampling import (TokenDistribution, accept_drafts, log_density_ratio, sample_gaussian,
                                         sample_residual)
from fastardiff.runtime.speculative import GenerationConfig, generate, generate_tokens
from fastardiff.runtime.stats import RunStats

N, SIG = 20_000, 0.3
# (D, shift of the new mean along e_0 in units of sigma, sigma_new / sigma_old)
COUPLINGS = [(16, 1.5, 1.0), (16, 0.0, 1.6), (1, 0.8, 0.7), (4, 2.5, 1.2)]


def gaussians(dim, shift, ratio, seed=123):
    rng = np.random.default_rng(seed)
    old_mean = np.tile(rng.normal(size=dim), (N, 1))
    new_mean = old_mean.copy()
    new_mean[:, 0] += shift * SIG
    return old_mean, np.full(N, SIG), new_mean, np.full(N, SIG * ratio)


def keep_always(rng, x_old, old_mean, old_sigma, new_mean, new_sigma):
    return x_old.copy(), np.ones(len(x_old), bool)


def swapped_ratio(rng, x_old, old_mean, old_sigma, new_mean, new_sigma):
    """A plausible bug: the keep probability min(1, old/new) instead of min(1, new/old)."""
    kept = np.log(rng.random(len(x_old))) < log_density_ratio(x_old, old_mean, old_sigma, new_mean, new_sigma)
    x = x_old.copy()
    x[~kept] = sample_residual(rng, new_mean[~kept], new_sigma[~kept], old_mean[~kept], old_sigma[~kept])
    return x, kept


@pytest.mark.parametrize("dim,shift,ratio", COUPLINGS)
def test_coupled_guess_follows_p_new_and_wrong_couplings_fail(dim, shift, ratio):
    old_mean, old_sigma, new_mean, new_sigma = gaussians(dim, shift, ratio)
    x_old = sample_gaussian(np.random.default_rng(1), old_mean, old_sigma)
    x, kept = couple_guesses(np.random.default_rng(2), x_old, old_mean, old_sigma, new_mean, new_sigma)
    assert matches_p(x, new_mean, new_sigma) > 1e-3
    np.testing.assert_array_equal(x[kept], x_old[kept])
    if ratio == 1.0:   # equal widths: P(kept) = 1 - TV = 2 (1 - Phi(shift / 2))
        assert kept.mean() == pytest.approx(2 * sps.norm.sf(shift / 2), abs=0.015)
    assert 0.02 < kept.mean() < 0.98   # the coupling keeps some old guesses, not all
    for wrong in (keep_always, swapped_ratio):
        y, _ = wrong(np.random.default_rng(2), x_old, old_mean, old_sigma, new_mean, new_sigma)
        assert matches_p(y, new_mean, new_sigma) < 1e-6, wrong.__name__


@pytest.mark.parametrize("record_old", [False, True])
def test_accepting_a_coupled_guess_against_its_recorded_q_gives_p(record_old):
    """The guess was coupled from q_old into p_new (its recorded q); the target's p differs from both. Accepting
    against p_new and drawing the residual gives p; testing against the stale q_old (a plausible bug) does not."""
    dim = 4
    old_mean, old_sigma, new_mean, new_sigma = gaussians(dim, 2.0, 1.3)
    p_mean, p_sigma = new_mean.copy(), np.full(N, SIG * 0.8)
    p_mean[:, 1] -= 1.2 * SIG
    rng = np.random.default_rng(3)
    x_old = sample_gaussian(rng, old_mean, old_sigma)
    guess, _ = couple_guesses(rng, x_old, old_mean, old_sigma, new_mean, new_sigma)
    q_mean, q_sigma = (old_mean, old_sigma) if record_old else (new_mean, new_sigma)
    p = TokenDistribution(np.stack([p_mean, p_mean], 1), np.stack([p_sigma, p_sigma], 1), None)
    q = TokenDistribution(q_mean[:, None], q_sigma[:, None], None)
    accepted, nxt = accept_drafts(rng, guess[:, None], np.ones(N, np.int64), p, q)
    token = np.where((accepted == 1)[:, None], guess, nxt)
    if record_old:
        assert matches_p(token, p_mean, p_sigma) < 1e-6
    else:
        assert 0.1 < accepted.mean() < 0.9 and matches_p(token, p_mean, p_sigma) > 1e-3


STUB_SIGMA = SigmaParams(sigma_max=0.5, tau_sigma=2.0, e_max=1.0, sigma_min=1e-3)


class FixedTarget(torch.nn.Module):
    """Stands in for the target AR inside TargetJacobi: outputs fixed means and the entropies giving the wanted
    sigmas at every fed position (the feed's tokens are ignored: p is given), no keys/values."""

    def __init__(self, mean: np.ndarray, sigma: np.ndarray):
        super().__init__()
        denom = math.expm1(STUB_SIGMA.e_max / STUB_SIGMA.tau_sigma)
        entropy = STUB_SIGMA.tau_sigma * np.log1p(sigma * denom / STUB_SIGMA.sigma_max)
        self.mean, self.entropy = torch.tensor(mean, dtype=torch.float32), torch.tensor(entropy, dtype=torch.float32)

    def forward(self, tokens, lengths, k_cache, v_cache, cond, shallow: bool = True):
        rows, width = tokens.shape[:2]
        kv = torch.zeros(1, rows, 1, width, 1)
        return self.mean[:, :width], self.entropy[:, :width], self.entropy[:, :width] if shallow else None, kv, kv


def resolve_slots_in_graph(rng, guesses, k, p, q, window, coupling):
    """resolve_slots's contract, computed by the target_jacobi engine module (exporter/engine_modules.py) that
    the exports trace, fed the round's randomness from `rng` as the runtime feeds it; misses finished on the host
    as the loop does."""
    from fastardiff.exporter.engine_modules import TargetJacobi
    from fastardiff.runtime.jacobi import residual_proposals

    R, G, D = guesses.shape
    module = TargetJacobi(FixedTarget(p.mean, p.sigma), STUB_SIGMA)
    tokens = np.concatenate([np.zeros((R, 1, D)), guesses], axis=1)
    C = residual_proposals(R)
    inputs = [tokens, np.zeros(R), np.zeros((1, R, 1, 0, 1)), np.zeros((1, R, 1, 0, 1)), np.zeros(R),
              q.mean, q.sigma, k, rng.random((R, G), np.float32),
              rng.standard_normal((R, window + 1, D), np.float32),
              rng.standard_normal((R, window + 1, C, D), np.float32), rng.random((R, window + 1, C), np.float32),
              np.ones(1), np.ones(1), np.array([1.0 if coupling else 0.0])]
    longs = {1, 4, 7}
    with torch.no_grad():
        out = module(*(torch.tensor(np.asarray(a), dtype=torch.long if i in longs else torch.float32)
                       for i, a in enumerate(inputs)))
    from fastardiff.runtime.engine import JacobiOutput

    res = JacobiOutput(*(t.numpy() for t in out))
    accepted, tokens_out = res.accepted.astype(np.int64), res.tokens_out.astype(np.float64)
    if res.residual_miss.any():
        r, c = np.nonzero(res.residual_miss)
        tokens_out = finish_residuals(rng, HostArrays(), tokens_out, res, r, c, accepted, q.mean, q.sigma)
    return accepted, tokens_out, res.slot_mean[:, 1:].astype(np.float64), res.slot_sigma[:, 1:].astype(np.float64)


@pytest.mark.parametrize("resolve", [resolve_slots, resolve_slots_in_graph])
@pytest.mark.parametrize("coupling", [True, False])
def test_resolve_slots_emits_p_and_guesses_follow_their_recorded_q(coupling, resolve):
    """The loop's own round on known Gaussians: two guesses g0 ~ q0, g1 ~ q1 and the verify's p0, p1, p2
    (p1, p2 as if conditioned on g0, g1). The emitted first token follows p0 whatever happens; where g0 was
    rejected, the next window's first guess follows p1 (its recorded q: kept from g1 by the coupling or drawn
    fresh) and later ones p2; a rule that kept g1 unconditionally (the tested wrong variant) would not. The same
    test holds the host rule and the target_jacobi engine's in-graph rule (float32)."""
    dim, window = 4, 2
    rng = np.random.default_rng(11)
    q_mean = np.tile(rng.normal(size=(1, 2, dim)), (N, 1, 1))
    p_mean = np.tile(rng.normal(size=(1, 3, dim)) * 0.2, (N, 1, 1)) + np.concatenate(
        [q_mean, q_mean[:, -1:]], axis=1)
    p_mean[:, :2, 0] += np.array([1.0, 0.8]) * SIG                      # p and q overlap, differ
    q_sigma, p_sigma = np.full((N, 2), SIG), np.full((N, 3), SIG * 1.1)
    guesses = sample_gaussian(rng, q_mean, q_sigma).astype(np.float32).astype(np.float64)  # as the engines see
    p, q = TokenDistribution(p_mean, p_sigma, None), TokenDistribution(q_mean, q_sigma, None)
    accepted, out, next_mean, next_sigma = resolve(rng, guesses, np.full(N, 2), p, q, window, coupling)
    first = np.where((accepted >= 1)[:, None], guesses[:, 0], out[:, 0])
    assert matches_p(first, p_mean[:, 0], p_sigma[:, 0]) > 1e-3
    stopped = accepted == 0
    assert 0.2 < stopped.mean() < 0.8
    g1 = out[stopped, 1]
    assert matches_p(g1, p_mean[stopped, 1], p_sigma[stopped, 1]) > 1e-3
    np.testing.assert_allclose(next_mean[stopped, 0], p_mean[stopped, 1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(next_mean[stopped, 1], p_mean[stopped, 2], rtol=1e-6, atol=1e-7)  # past the span
    np.testing.assert_allclose(next_sigma[stopped, 0], p_sigma[stopped, 1], rtol=1e-5)
    kept = (g1 == guesses[stopped, 1]).all(axis=1)
    assert (kept.mean() > 0.3) if coupling else not kept.any()
    assert matches_p(guesses[stopped, 1], p_mean[stopped, 1], p_sigma[stopped, 1]) < 1e-6   # keep-always: caught
    everything = accepted == 2                                          # all passed: the bonus token from p2
    assert matches_p(out[everything, 0], p_mean[everything, 2], p_sigma[everything, 2]) > 1e-3


@pytest.fixture(scope="module")
def random_engines(random_checkpoint):
    from fastardiff.exporter.torch_backend import TorchEngines

    return TorchEngines(random_checkpoint)


def assert_call_used_the_exact_prefix(target, final_seq, fed, length: int, cond: int, mean, seq_len: int, msg: str):
    """A target call fed `fed` at cache length `length` gave the means a cache-free run of the final tokens' prefix
    plus `fed` gives (over the positions inside the sequence): its cache held exactly the accepted prefix."""
    prefix = np.concatenate([final_seq[:length], fed])[None].astype(np.float32)
    with torch.no_grad():
        k, v = target.empty_cache(1, 0)
        full = target(torch.from_numpy(prefix), torch.zeros(1, dtype=torch.long), k, v,
                      torch.tensor([cond]))[0][0, length:].numpy()
    own = min(len(fed), seq_len - length)
    np.testing.assert_allclose(mean[:own], full[:own], atol=2e-4, rtol=1e-3, err_msg=msg)


@pytest.mark.parametrize("coupling,window,cfg_scale", [(True, 4, 1.0), (False, 3, 2.0)])
def test_jacobi_cache_is_exact_and_costs_one_verify_per_round(random_checkpoint, random_engines, coupling, window,
                                                              cfg_scale):
    """Every target call, recomputed without a cache on the final tokens + the call's inputs, gives the same
    means (the cache held exactly the accepted prefix: rollback by length, ragged rows); there are no draft
    calls; one verify per round, of width min(L, tokens left - 1) + 1 after the first round (a plain step)."""
    T, classes = 24, np.array([0, 3])
    rec = RecordingEngines(random_engines)
    stats = RunStats(draft="jacobi")
    gen = GenerationConfig(draft="jacobi", gamma=window, coupling=coupling, eta=0.0, num_tokens=T, seed=4,
                           temperature=6.0, cfg_scale=cfg_scale)
    tokens, _ = generate_tokens(rec, classes, gen, np.random.default_rng(0), stats)
    assert {c[0] for c in rec.calls} == {"target"} and stats.draft_calls == 0
    assert stats.target_calls == len(rec.calls) and stats.drafts_accepted > 0
    assert stats.tokens == len(classes) * T
    nc = random_checkpoint.config.n_cond
    seq = np.concatenate([np.zeros((len(classes), nc, tokens.shape[-1])), tokens], axis=1)
    first, ragged, reps = {}, False, 2 if cfg_scale != 1.0 else 1
    for c, (_, call_tokens, lengths, cond, mean) in enumerate(rec.calls):
        rows = len(cond) // reps               # the conditional rows (the unconditional ones share their inputs)
        ragged |= len(set(lengths[:rows].tolist())) > 1
        for r in range(len(cond)):             # with guidance the unconditional copies too (the null class)
            L, sample = int(lengths[r]), int(np.flatnonzero(classes == cond[r % rows])[0])
            n = L - nc + 1                     # tokens accepted before this call
            want = 1 if first.setdefault(sample, c) == c else min(window, T - 1 - n) + 1
            assert call_tokens.shape[1] >= want
            assert_call_used_the_exact_prefix(random_checkpoint.target, seq[sample], call_tokens[r], L, int(cond[r]),
                                              mean[r], nc + T - 1, f"call {c}")
            # the verify's first slot is the exact next-token distribution of the accepted prefix
            np.testing.assert_array_equal(call_tokens[r, 0], seq[sample, L].astype(np.float32))
    assert ragged                                # rows advanced by different amounts
    if cfg_scale != 1.0:                         # the null class was fed beside every conditional row
        assert all((c[3][len(c[3]) // 2:] == random_checkpoint.config.num_classes).all() for c in rec.calls)


def test_rows_near_the_end_do_not_narrow_the_others_windows(random_checkpoint, random_engines):
    """A whole image at batch 4: after its first round every row is fed its full window, min(L, tokens left - 1)
    guesses, even when another row is about to finish (the padding's keys go to the room past the sequence, not
    into a cap on everyone's window), and the cache stays exact (the last calls recomputed without a cache)."""
    window, classes = 6, np.array([0, 3, 5, 8])
    rec = RecordingEngines(random_engines)
    stats = RunStats(draft="jacobi")
    gen = GenerationConfig(draft="jacobi", gamma=window, eta=0.0, seed=2, temperature=6.0)
    tokens, _ = generate_tokens(rec, classes, gen, np.random.default_rng(0), stats)
    cfg = random_checkpoint.config
    nc, N = cfg.n_cond, cfg.num_tokens
    seq = np.concatenate([np.zeros((len(classes), nc, tokens.shape[-1])), tokens], axis=1)
    first, near_end = {}, 0
    for c, (_, call_tokens, lengths, cond, mean) in enumerate(rec.calls):
        samples = [int(np.flatnonzero(classes == y)[0]) for y in cond]     # finished rows leave the calls
        for r, sample in enumerate(samples):
            L, n = int(lengths[r]), int(lengths[r]) - nc + 1            # n: tokens accepted before this call
            if first.setdefault(sample, c) != c and n < N:
                assert call_tokens.shape[1] >= min(window, N - 1 - n) + 1, (c, sample, n)
            near_end += int(lengths.max()) - nc + 1 >= N - window and n < N - window
        if c >= len(rec.calls) - 3:                                     # the last calls: the cache held the prefix
            for r, sample in enumerate(samples):
                L = int(lengths[r])
                assert_call_used_the_exact_prefix(random_checkpoint.target, seq[sample], call_tokens[r], L,
                                                  int(cond[r]), mean[r], nc + N - 1, f"call {c}")
    assert near_end > 0, "no call mixed a row near the end with rows far from it"


def test_jacobi_needs_no_draft_engine(random_engines):
    """Engines with only target_verify and decoder run --draft jacobi (the draft is never touched)."""
    from fastardiff.runtime.capabilities import EngineCapabilities

    class TargetOnly:
        manifest = random_engines.manifest
        capabilities = EngineCapabilities.host()
        target_verify = staticmethod(random_engines.target_verify)
        decoder = staticmethod(random_engines.decoder)

    images, stats = generate(TargetOnly(), [1, 2], GenerationConfig(draft="jacobi", gamma=4, seed=1))
    assert images.shape[0] == 2 and np.isfinite(images).all()
    assert stats.draft_calls == 0 and stats.tokens == 2 * 64 and stats.target_calls < 2 * 64


def test_statistics_of_a_jacobi_run_add_up(random_engines):
    """Every target call is a Jacobi round (no eta prefill: the first round is a plain step) that emits its
    accepted guesses plus one residual or bonus token."""
    B = 3
    _, stats = generate(random_engines, [1, 4, 6], GenerationConfig(draft="jacobi", gamma=4, eta=10.0, seed=2,
                                                                      temperature=6.0))
    s = stats.summary()
    assert s["tokens"] == B * 64 == s["drafts_accepted"] + s["verifies"]
    assert s["residual_samples"] + s["bonus_tokens"] == s["verifies"] == s["target_rows"]
    assert s["drafts_proposed"] <= 4 * s["verifies"] and s["draft"] == "jacobi"


def test_seeded_jacobi_is_reproducible_and_coupling_changes_it(random_engines):
    gen = GenerationConfig(draft="jacobi", gamma=4, seed=9, num_tokens=20, temperature=6.0)
    a, _ = generate(random_engines, [1, 2], gen)
    b, _ = generate(random_engines, [1, 2], gen)
    c, _ = generate(random_engines, [1, 2], dataclasses.replace(gen, coupling=False))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_gamma_auto_chooses_jacobi_where_it_pays_and_target_only_where_not(random_checkpoint, monkeypatch):
    from fastardiff.runtime import gamma_auto
    from fastardiff.runtime.gamma_auto import choose_gamma
    from test_gamma_auto import _with_jacobi_table

    # the cost model's decision (confirm=False) for fixed per-call costs (a Jacobi round of window L = a step plus
    # 0.25 steps a slot): timed on a busy 2-core machine, one stalled call flipped it; whole-image confirmation
    # with real timings: tests/test_gamma_auto.py
    def costs(engines, batch, cfg_scale, gammas, verify_widths=(), jacobi_windows=()):
        out = {"step": 1.0, **{("rollout", g): 1.0 * g for g in gammas}}
        out.update({("verify", k): 1.0 + 0.05 * k for k in {g + 1 for g in gammas} | set(verify_widths)})
        out.update({("jacobi", w): 1.0 + 0.25 * w for w in jacobi_windows})
        return out

    monkeypatch.setattr(gamma_auto, "time_engine_calls", costs)
    monkeypatch.setattr(gamma_auto, "host_ms", lambda engines, batch, cfg_scale, runs, tokens=16:
                        {key: 0.1 for key in runs})
    fast = choose_gamma(_with_jacobi_table(random_checkpoint, {"2": 2.9, "4": 4.9}), batch=1, cfg_scale=1.0,
                        confirm=False)
    assert [c["draft"] for c in fast.candidates] == ["jacobi", "jacobi"]       # no model acceptance calibrated
    best = max(fast.candidates, key=lambda c: c["speedup"])
    assert fast.draft == "jacobi" and fast.gamma == best["gamma"] and best["speedup"] >= 1.10, fast.table()
    slow = choose_gamma(_with_jacobi_table(random_checkpoint, {"2": 1.0, "4": 1.0}), batch=1, cfg_scale=1.0,
                        confirm=False)
    assert slow.gamma is None and slow.mode == "target" and "cannot pay" in slow.reason, slow.table()
    only_model = choose_gamma(_with_jacobi_table(random_checkpoint, {"4": 4.9}), 1, 1.0, drafts=("model",))
    assert only_model.gamma is None and "acceptance" in only_model.reason


def test_run_cli_draft_jacobi(random_checkpoint_path, tmp_path, capsys):
    import json

    from cli_runner import run_cli

    stats = tmp_path / "stats.json"
    code, out, err = run_cli(["run", "--ckpt", str(random_checkpoint_path), "--prompt", "3,4", "--draft", "jacobi",
                              "--gamma", "4", "--coupling", "off", "--out", str(tmp_path / "a.png"), "--stats-json",
                              str(stats)], capsys)
    assert code == 0, err
    summary = json.loads(stats.read_text())
    assert summary["draft"] == "jacobi" and summary["draft_calls"] == 0 and summary["gamma"] == 4
    assert summary["target_calls"] < 64 and math.isclose(summary["tokens"], 128)
    code, out, err = run_cli(["run", "--ckpt", str(random_checkpoint_path), "--prompt", "3", "--draft", "eagle",
                              "--out", str(tmp_path / "b.png")], capsys)
    assert code == 2 and "--draft" in err and not (tmp_path / "b.png").exists()



def test_no_draft_export_option_leaves_out_every_draft_engine(random_checkpoint):
    from fastardiff.exporter.targets import ExportOptions, engine_modules

    with_draft, _ = engine_modules(random_checkpoint, ExportOptions(target="onnx", gamma=2))
    without, reference = engine_modules(random_checkpoint, ExportOptions(target="onnx", gamma=2, draft=False))
    assert sorted(with_draft) == ["decoder", "draft_rollout_1", "draft_rollout_2", "draft_step", "target_jacobi",
                                  "target_verify"]
    assert sorted(without) == sorted(reference) == ["decoder", "target_jacobi", "target_verify"]


class JacobiRecorder:
    """The engines with their target_jacobi calls recorded as (guesses fed, k, q mean, q sigma, accepted,
    tokens_out, next mean, next sigma, residual slots left to the host): resolve_slots's record, then the count."""

    def __init__(self, engines, rounds):
        self.inner, self.rounds = engines, rounds

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def target_jacobi(self, tokens, lengths, k_cache, v_cache, cond, q_mean, q_sigma, k, *rest):
        out = self.inner.target_jacobi(tokens, lengths, k_cache, v_cache, cond, q_mean, q_sigma, k, *rest)
        self.rounds.append((tokens[:len(k), 1:].copy(), k.copy(), q_mean.copy(), q_sigma.copy(), out.accepted.copy(),
                            out.tokens_out.copy(), out.slot_mean[:, 1:].copy(), out.slot_sigma[:, 1:].copy(),
                            out.residual_miss.sum()))
        return out


@pytest.mark.parametrize("in_graph", [False, True])
def test_jacobi_loop_tests_each_guess_against_the_q_it_was_drawn_from(random_engines, monkeypatch, in_graph):
    """Loop plumbing (white box), host-resolved and in-graph rounds: the q a round tests each guess against is
    exactly the proposal the previous round recorded for that token (next_mean / next_sigma, stored as the
    engines' float32), and the guess fed is the value that round emitted."""
    import fastardiff.runtime.jacobi as jacobi

    rounds = []
    real = jacobi.resolve_slots

    def recording(rng, guesses, k, p, q, window, coupling):
        out = real(rng, guesses, k, p, q, window, coupling)
        rounds.append((guesses.copy(), k.copy(), q.mean.copy(), q.sigma.copy(), *[a.copy() for a in out]))
        return out

    monkeypatch.setattr(jacobi, "resolve_slots", recording)
    engines = JacobiRecorder(random_engines, rounds) if in_graph else HostResolved(random_engines)
    window = 3
    generate(engines, [4], GenerationConfig(draft="jacobi", gamma=window, num_tokens=20, seed=6, temperature=6.0))
    assert len(rounds) > 3
    rounds = rounds[1:] if in_graph else rounds   # the first round (no guesses yet) is resolved on the host
    for before, after in zip(rounds, rounds[1:]):
        _, _, _, _, accepted, out, next_mean, next_sigma = before[:8]
        guesses, k, q_mean, q_sigma = after[:4]
        used = int(k[0])
        assert used >= 1
        np.testing.assert_array_equal(q_mean[0, :used], next_mean[0, :used].astype(np.float32))
        np.testing.assert_array_equal(q_sigma[0, :used], next_sigma[0, :used].astype(np.float32))
        np.testing.assert_array_equal(guesses[0, :used], out[0, 1:1 + used].astype(np.float32))


def test_residual_slots_the_graph_could_not_serve_are_finished_on_the_host(random_engines, monkeypatch):
    """With only 2 in-graph residual proposals per slot many residual slots go unserved (the graph leaves a zero
    there and flags it); every flagged slot is finished by the host sampler, with a finite value that is not the
    graph's placeholder, and the run's tokens are those finished values (no placeholder survives)."""
    import fastardiff.runtime.jacobi as jacobi

    monkeypatch.setattr(jacobi, "residual_proposals", lambda rows, accelerator=False: 2)
    flagged, finished = [], []
    real = jacobi.finish_residuals

    def recording(rng, arrays, out, res, r, c, accepted, q_mean, q_sigma):
        assert np.array_equal(np.stack([r, c]), np.stack(np.nonzero(res.residual_miss)))
        flagged.append(len(r))
        out = real(rng, arrays, out, res, r, c, accepted, q_mean, q_sigma)
        finished.append(out[r, c].copy())
        return out

    monkeypatch.setattr(jacobi, "finish_residuals", recording)
    rounds = []
    tokens, _ = generate(JacobiRecorder(random_engines, rounds), np.arange(6),
                         GenerationConfig(draft="jacobi", gamma=4, num_tokens=24, seed=2, temperature=1.5))
    misses = sum(int(r[-1]) for r in rounds)
    assert misses > 0 and sum(flagged) == misses, (misses, flagged)
    done = np.concatenate(finished)
    assert np.isfinite(done).all() and (np.abs(done).sum(-1) > 0).all()
    assert (np.abs(tokens).sum(-1) > 0).all()        # no all-zero placeholder among the emitted tokens


def test_in_graph_proposals_follow_where_the_engines_compute():
    """CPU engines get few in-graph residual proposals (their tensor work is paid per call, a host finish is cheap);
    GPU engines many for few rows (free there, a host finish costs a sync)."""
    from fastardiff.runtime.capabilities import accelerator_for
    from fastardiff.runtime.jacobi import CPU_RESIDUAL_PROPOSALS, residual_proposals

    assert not accelerator_for("onnxruntime", providers=["CPUExecutionProvider"])
    assert not accelerator_for("aoti", device="cpu", cache_device=None)
    assert accelerator_for("onnxruntime", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert accelerator_for("tensorrt")
    assert accelerator_for("aoti", device="cuda:0", cache_device=None)
    assert accelerator_for("torch", device=torch.device("cuda", 0), cache_device=torch.device("cuda", 0))
    assert residual_proposals(1) == residual_proposals(8) == CPU_RESIDUAL_PROPOSALS
    assert residual_proposals(1, accelerator=True) == 16 and residual_proposals(64, accelerator=True) == 2


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_export_records_the_jacobi_engines_residual_rule(random_checkpoint, tmp_path, precision):
    """build_all_engines writes target_jacobi's residual rule into its manifest entry (read from the engine module,
    whatever wraps it for the precision; the loader drops an entry without it) and none into the others'."""
    from fastardiff.exporter.targets import ExportOptions, build_all_engines
    from fastardiff.runtime.manifest import JACOBI_RESIDUAL

    def build_one(name, module, reference, profile):
        (tmp_path / f"{name}.bin").write_bytes(name.encode())
        return f"{name}.bin", {"outputs": {}}

    opts = ExportOptions(target="trt", precision=precision, onnx_only=True, gamma=2)
    entries = build_all_engines(random_checkpoint, tmp_path, opts, build_one)
    assert entries["target_jacobi"].residual == JACOBI_RESIDUAL
    assert {e.residual for name, e in entries.items() if name != "target_jacobi"} == {""}


def random_prior(manifest, seed=0, sigma=0.4):
    cfg, rng = manifest.config, np.random.default_rng(seed)
    n = (cfg["image_size"] // cfg["patch"]) ** 2
    return encode_prior(rng.normal(0, 0.3, (cfg["num_classes"], n, cfg["token_dim"])),
                        np.full((cfg["num_classes"], n), sigma))


@pytest.mark.parametrize("in_graph", [False, True])
def test_guesses_past_the_verified_span_come_from_the_prior_with_it_as_their_q(random_engines, in_graph):
    """With a first-window proposal (calibration.extra.jacobi_prior): the first round already verifies L guesses
    (fed from the condition slot), drawn from the prior at each row's class with q = the prior there; in every
    later round a guess is tested against the q its proposal recorded: the last verify's p where that verify
    reached the token (next_mean of the previous round), the prior past it."""
    rounds = []
    prior = random_prior(random_engines.manifest, sigma=0.7)
    engines = WithCalibration(random_engines, jacobi_prior=prior)
    if in_graph:
        engines = JacobiRecorder(engines, rounds)
    else:
        import fastardiff.runtime.jacobi as jacobi

        engines = HostResolved(engines)
        real = jacobi.resolve_slots

        def recording(rng, guesses, k, p, q, window, coupling):
            out = real(rng, guesses, k, p, q, window, coupling)
            rounds.append((guesses.copy(), k.copy(), q.mean.copy(), q.sigma.copy(), *[a.copy() for a in out]))
            return out

        jacobi.resolve_slots, restore = recording, real
    classes, window = np.array([3, 8]), 3
    try:
        generate(engines, classes, GenerationConfig(draft="jacobi", gamma=window, num_tokens=24, seed=4,
                                                    temperature=2.0))
    finally:
        if not in_graph:
            jacobi.resolve_slots = restore
    mean, sigma = engines.manifest.jacobi_prior
    guesses, k, q_mean, q_sigma = rounds[0][:4]
    assert (k == window).all()                                # the first round verifies a full window
    np.testing.assert_array_equal(q_mean, mean[classes, :window])
    np.testing.assert_allclose(q_sigma, 2.0 * sigma[classes, :window])       # scaled by the temperature
    from_prior = from_verify = 0
    n = np.zeros(len(classes), np.int64)                      # tokens before each row's window
    for before, after in zip(rounds, rounds[1:]):
        k_before, accepted, next_mean = before[1], before[4], before[6]
        active = np.flatnonzero(n < 24)                       # the rows of `before`, in order
        n[active] += accepted + 1
        now = np.flatnonzero(n < 24)                          # the rows of `after`
        k, q_mean = after[1], after[2]
        for i, row in enumerate(now):
            b = int(np.flatnonzero(active == row)[0])         # the row's index in `before`
            first = n[row]
            for j in range(int(k[i])):
                token = first + j
                if token <= first - accepted[b] - 1 + k_before[b]:     # the previous verify computed p there
                    np.testing.assert_array_equal(q_mean[i, j], next_mean[b, j].astype(np.float32))
                    from_verify += 1
                else:
                    np.testing.assert_array_equal(q_mean[i, j], mean[classes[row], token])
                    from_prior += 1
    assert from_prior > 0 and from_verify > 0


def test_manifest_jacobi_prior_is_checked_and_absent_is_none(random_engines):
    from fastardiff.errors import EngineError

    manifest = random_engines.manifest
    assert WithCalibration(random_engines).manifest.jacobi_prior is None
    good = WithCalibration(random_engines, jacobi_prior=random_prior(manifest)).manifest
    mean, sigma = good.jacobi_prior
    assert mean.dtype == np.float32 and sigma.shape == mean.shape[:2] and good.jacobi_prior[0] is mean   # parsed once
    shape = mean.shape
    for broken in ({"mean": [[0.0]], "sigma": [[1.0]]}, {**random_prior(manifest), "sigma": "not base64!"},
                   {**random_prior(manifest), "shape": [shape[0], shape[1] - 1, shape[2]]},
                   encode_prior(mean, np.zeros(shape[:2])), encode_prior(np.full(shape, np.nan), sigma), [1, 2]):
        with pytest.raises(EngineError, match="jacobi_prior is not a float32 prior.*calibrate --measure jacobi"):
            WithCalibration(random_engines, jacobi_prior=broken).manifest.jacobi_prior


def test_measured_prior_has_a_gaussian_per_class_and_token(random_checkpoint):
    from fastardiff.exporter.calibrate import measure_jacobi_prior

    cfg = random_checkpoint.config
    prior = measure_jacobi_prior(random_checkpoint, images=3, seed=1, batch=16)
    mean, sigma = decode_prior(prior, (cfg.num_classes, cfg.num_tokens, cfg.token_dim))
    assert mean.shape == (cfg.num_classes, cfg.num_tokens, cfg.token_dim) and sigma.shape == mean.shape[:2]
    assert np.isfinite(mean).all() and (sigma >= cfg.sigma_min * 0.999).all() and (sigma <= cfg.sigma_max).all()
    assert np.abs(mean[0] - mean[1]).max() > 0             # per class


def test_prior_proposals_for_one_row_equal_the_general_rows_path():
    """propose_from_prior's one-row path (slices) writes what the many-rows path (masks) writes for that row, with
    the same draws: tokens max(verified + 1, first) .. min(first + window, total) - 1 get mean + sigma * noise and
    their q; nothing else changes."""
    from fastardiff.runtime.jacobi import propose_from_prior

    rng = np.random.default_rng(0)
    prior = (rng.normal(size=(2, 20, 3)).astype(np.float32), rng.uniform(0.5, 1, (2, 20)).astype(np.float32))
    results = []
    for act, first, verified in ((np.array([0]), np.array([3]), np.array([5])),
                                 (np.array([0, 1]), np.array([3, 2]), np.array([5, 10]))):
        seq, mean, sigma = np.zeros((2, 30, 3), np.float32), np.zeros((2, 27, 3), np.float32), np.ones((2, 27))
        propose_from_prior(HostArrays(), np.random.default_rng(7), prior, seq, mean, sigma, act, first, verified,
                           total=20, n_cond=1, window=6)
        results.append((seq, mean, sigma))
    (seq, mean, sigma), other = results
    for a, b in zip(results[0], other):
        np.testing.assert_array_equal(a, b)
    noise = np.random.default_rng(7).standard_normal((3, 3), dtype=np.float32)
    np.testing.assert_array_equal(seq[0, 7:10], prior[0][0, 6:9] + prior[1][0, 6:9, None] * noise)
    np.testing.assert_array_equal(mean[0, 6:9], prior[0][0, 6:9])
    np.testing.assert_array_equal(sigma[0, 6:9], prior[1][0, 6:9])
    assert not seq[:, :7].any() and not seq[:, 10:].any() and not seq[1].any() and (sigma[1] == 1).all()


def matches_diagonal(x, mean, sigma) -> float:
    """matches_p for N(mean, diag(sigma^2)) (sigma [R, D]): whitened per dimension, then the same KS tests."""
    z = (x - mean) / sigma
    return min(sps.kstest(z[:, 0], "norm").pvalue, sps.kstest(z[:, -1], "norm").pvalue,
               sps.kstest((z**2).sum(1), sps.chi2(x.shape[1]).cdf).pvalue)


@pytest.mark.parametrize("coupling", [True, False])
def test_resolve_slots_with_diagonal_scales(coupling):
    """The foreign-gaussian family's round (per-dimension sigma [R, G, D], widths differing by dimension and
    between p and q): the emitted token follows p0, the next window's first guess after a rejection follows its
    recorded q = p1 (coupled from g1 or drawn fresh), the bonus follows p2; g1 itself (q1) does not follow p1."""
    dim, window = 6, 2
    rng = np.random.default_rng(5)
    widths = SIG * np.array([0.5, 1.0, 2.0, 0.8, 1.5, 1.2])
    q_mean = np.tile(rng.normal(size=(1, 2, dim)), (N, 1, 1))
    p_mean = np.concatenate([q_mean, q_mean[:, -1:]], axis=1) + np.tile(rng.normal(size=(1, 3, dim)) * 0.2 * widths,
                                                                        (N, 1, 1))
    p_mean[:, :2, 0] += np.array([1.0, 0.8]) * widths[0]
    q_sigma = np.tile(widths, (N, 2, 1))
    p_sigma = np.tile(widths * np.array([1.1, 0.9, 1.3, 1.0, 0.7, 1.2]), (N, 3, 1))
    guesses = sample_gaussian(rng, q_mean, q_sigma).astype(np.float32).astype(np.float64)
    p, q = TokenDistribution(p_mean, p_sigma, None), TokenDistribution(q_mean, q_sigma, None)
    accepted, out, next_mean, next_sigma = resolve_slots(rng, guesses, np.full(N, 2), p, q, window, coupling)
    first = np.where((accepted >= 1)[:, None], guesses[:, 0], out[:, 0])
    assert matches_diagonal(first, p_mean[:, 0], p_sigma[:, 0]) > 1e-3
    stopped = accepted == 0
    assert 0.2 < stopped.mean() < 0.8
    g1 = out[stopped, 1]
    assert matches_diagonal(g1, p_mean[stopped, 1], p_sigma[stopped, 1]) > 1e-3
    np.testing.assert_allclose(next_sigma[stopped, 0], p_sigma[stopped, 1], rtol=1e-6)
    kept = (g1 == guesses[stopped, 1]).all(axis=1)
    assert (kept.mean() > 0.3) if coupling else not kept.any()
    assert matches_diagonal(guesses[stopped, 1], p_mean[stopped, 1], p_sigma[stopped, 1]) < 1e-6
    everything = accepted == 2
    assert matches_diagonal(out[everything, 0], p_mean[everything, 2], p_sigma[everything, 2]) > 1e-3

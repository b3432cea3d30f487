"""End-to-end speculative decoding over the torch reference backend.

Losslessness is tested statistically on the shipped model; KV-cache correctness (ragged advance, rollback) is
tested exactly by recomputing every engine call from scratch on the final accepted tokens.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from fastardiff.recipes.two_sample import two_sample_pvalue
from fastardiff.runtime.capabilities import EngineCapabilities
from fastardiff.runtime.engine import DraftOutput
from fastardiff.runtime.speculative import GenerationConfig, GenerationError, generate, generate_tokens
from fastardiff.runtime.stats import RunStats

STAT_BATCH = 2000     # samples per mode for the two-sample tests (400 lost power against the distilled draft)
STAT_TOKENS = 32      # the first four rows of the 8x8 token grid


@pytest.fixture(scope="module")
def shipped_engines(shipped_checkpoint):
    from fastardiff.exporter.torch_backend import TorchEngines

    return TorchEngines(shipped_checkpoint, max_batch=2 * STAT_BATCH)


@pytest.fixture(scope="module")
def random_engines(random_checkpoint):
    from fastardiff.exporter.torch_backend import TorchEngines

    return TorchEngines(random_checkpoint)


def first_tokens(engines, mode, seed, early_stop="off", cfg_scale=1.0, num_tokens=STAT_TOKENS, **options):
    classes = np.arange(STAT_BATCH) % 10
    gen = GenerationConfig(mode=mode, early_stop=early_stop, eta=0.0, seed=seed, num_tokens=num_tokens,
                           cfg_scale=cfg_scale, **options)
    tokens, stats = generate(engines, classes, gen)
    return tokens, stats


def tokens_for(cfg_scale: float) -> int:
    """Tokens compared per sample: STAT_TOKENS, or 16 with guidance (twice the engine rows per sample; the guided
    rows go through the same acceptance code, and 16 tokens hold several speculative rounds)."""
    return STAT_TOKENS if cfg_scale == 1.0 else 16


@pytest.fixture(scope="module")
def target_only_tokens(shipped_engines):
    """Target-only reference samples per guidance scale (seeded, computed once)."""
    cache = {}

    def get(cfg_scale):
        if cfg_scale not in cache:
            cache[cfg_scale] = first_tokens(shipped_engines, "target", seed=1, cfg_scale=cfg_scale,
                                            num_tokens=tokens_for(cfg_scale))[0]
        return cache[cfg_scale]

    return get


@pytest.mark.parametrize("early_stop,cfg_scale,engine_acceptance", [("off", 1.0, None), ("context", 2.0, None),
                                                                     ("static-forced", 1.0, None),
                                                                     ("context", 2.0, True)])
def test_speculative_is_indistinguishable_from_target_only(shipped_engines, target_only_tokens, early_stop,
                                                          cfg_scale, engine_acceptance):
    """Model-draft speculation (rollouts, guidance, early stop) gives target-only samples; engine_acceptance:
    each round verified and accepted in one target_jacobi call (runtime/jacobi.py accept_drafts_in_engine, the
    path device backends take), else target_verify + the host's accept_drafts (the CPU default)."""
    engines = shipped_engines
    if early_stop == "static-forced":  # threshold at the draft's mean shallow entropy: many rounds stop early
        tau = shipped_engines.manifest.calibration["draft_shallow_mean"]
        engines, early_stop = RecordingEngines(shipped_engines, calibration={"tau_static": tau}), "static"
    # the forced early stop makes many more, shorter rounds: its first 16 tokens hold several rounds per sample
    num_tokens = 16 if engines is not shipped_engines else tokens_for(cfg_scale)
    spec, stats = first_tokens(engines, "speculative", seed=2, early_stop=early_stop, cfg_scale=cfg_scale,
                               num_tokens=num_tokens, engine_acceptance=engine_acceptance)
    assert stats.drafts_accepted > 0
    if engines is not shipped_engines:
        assert stats.early_stops > STAT_BATCH
    assert two_sample_pvalue(spec, target_only_tokens(cfg_scale)[:, :num_tokens]) > 1e-3


@pytest.mark.parametrize("coupling,cfg_scale,window,in_graph", [(True, 2.0, 8, True), (False, 1.0, 4, True),
                                                                (True, 1.0, 8, False)])
def test_jacobi_is_indistinguishable_from_target_only(shipped_engines, target_only_tokens, coupling, cfg_scale,
                                                      window, in_graph):
    """--draft jacobi, coupled and independent, with and without guidance, rounds resolved in-graph (the
    target_jacobi engine module) and on the host: the target's own guesses, accepted exactly, give target-only
    samples (the first 16 tokens: two full windows and more; two-sample tests with power shown below)."""
    engines = shipped_engines if in_graph else HostResolved(shipped_engines)
    spec, stats = first_tokens(engines, "speculative", seed=7, cfg_scale=cfg_scale, draft="jacobi",
                               coupling=coupling, gamma=window, num_tokens=16)
    s = stats.summary()
    assert stats.draft_calls == 0 and s["draft"] == "jacobi"
    assert s["drafts_accepted"] > 0.1 * s["drafts_proposed"] > 0 and s["tokens_per_target_call"] > 1.5
    assert two_sample_pvalue(spec, target_only_tokens(cfg_scale)[:, :16]) > 1e-3


class WithCalibration:
    """The engines with their manifest's calibration.extra changed (a copy: the engines' own is untouched)."""

    def __init__(self, engines, **extra):
        self.inner = engines
        self.manifest = copy.deepcopy(engines.manifest)
        self.manifest.calibration["extra"] = {**(self.manifest.calibration.get("extra") or {}), **extra}

    def __getattr__(self, name):
        return getattr(self.inner, name)


def misrecorded_prior_proposal(arrays, rng, prior, seq, guess_mean, guess_sigma, act, first, verified, total, n_cond,
                               window):
    """jacobi.propose_from_prior with a wrong q: guesses drawn from the prior, recorded with half its sigma."""
    token = first[:, None] + np.arange(window)[None, :]
    r, c = np.nonzero((token > verified[:, None]) & (token < total))
    rows, token = act[r], token[r, c]
    mean, sigma = prior[0][rows, token], prior[1][rows, token]
    seq[rows, n_cond + token] = mean + sigma[:, None] * arrays.normal(rng, mean.shape)
    guess_mean[rows, token], guess_sigma[rows, token] = mean, 0.5 * sigma


@pytest.mark.parametrize("prior_kind", ["shifted", "misrecorded"])
def test_jacobi_guesses_from_any_prior_are_exact_and_a_misrecorded_q_is_caught(shipped_engines, target_only_tokens,
                                                                              monkeypatch, prior_kind):
    """The first window's guesses and those past each verify's span come from the calibrated prior: any proposal
    is exact once its density is the recorded q (here one moved by 0.15 and twice as wide: still target-only
    samples), while the same guesses tested against a q half as wide as the one they were drawn from are told apart
    at the same sample size (the test has power on exactly this path). The shipped prior itself runs in the test
    above."""
    import fastardiff.runtime.jacobi as jacobi
    from fastardiff.runtime.manifest import encode_prior

    mean, sigma = shipped_engines.manifest.jacobi_prior
    table = encode_prior(mean + 0.15, 2 * sigma)         # the same proposal for both: recorded right or wrong
    if prior_kind == "misrecorded":
        monkeypatch.setattr(jacobi, "propose_from_prior", misrecorded_prior_proposal)
    engines = WithCalibration(shipped_engines, jacobi_prior=table)
    spec, stats = first_tokens(engines, "speculative", seed=8, draft="jacobi", gamma=8, num_tokens=16)
    p = two_sample_pvalue(spec, target_only_tokens(1.0)[:, :16])
    if prior_kind == "shifted":
        assert stats.summary()["tokens_per_target_call"] > 1.5 and p > 1e-3
    else:
        assert p < 1e-4


@pytest.mark.parametrize("noise", ["host", "device"])
def test_device_cache_runs_are_indistinguishable_from_target_only(shipped_checkpoint, target_only_tokens, noise):
    """The KV caches, the loop's buffers and every engine output kept on the engines' device (torch storage,
    runtime/kv_cache.py, runtime/arrays.py; the path a CUDA run takes) under the statistical test: model draft with
    rollouts, engine acceptance, guidance and early stop (ragged rows, gathered rows, ragged writes), with the
    noise copied from the run's Generator (a device run then equals the host run token for token,
    tests/test_device_cache.py) or drawn on the device (a GPU's default)."""
    from fastardiff.exporter.torch_backend import TorchEngines

    from fastardiff.runtime.speculative import in_engine_acceptance

    engines = TorchEngines(shipped_checkpoint, max_batch=2 * STAT_BATCH, device_loop=True, loop_noise=noise)
    assert in_engine_acceptance(engines, GenerationConfig(draft="model"))     # device caches: accepted in-engine
    assert engines.capabilities.loop_device is not None   # and the loop's buffers and outputs on the device too
    spec, stats = first_tokens(engines, "speculative", seed=9, early_stop="context", cfg_scale=2.0, draft="model",
                               gamma=4, num_tokens=16)
    if noise == "device":           # reproducible from the seed, and not the host-noise run's numbers
        short = dict(early_stop="context", cfg_scale=2.0, draft="model", gamma=4, num_tokens=2)
        once, _ = first_tokens(engines, "speculative", seed=9, **short)
        np.testing.assert_array_equal(once, first_tokens(engines, "speculative", seed=9, **short)[0])
        host_noise = TorchEngines(shipped_checkpoint, max_batch=2 * STAT_BATCH, device_loop=True, loop_noise="host")
        assert not np.allclose(once, first_tokens(host_noise, "speculative", seed=9, **short)[0])
    assert stats.drafts_accepted > 0
    assert two_sample_pvalue(spec, target_only_tokens(2.0)) > 1e-3


def test_runtime_target_only_matches_an_independent_reference_sampler(shipped_engines, shipped_checkpoint):
    """The runtime's target-only sampling against recipes' separately written torch sampler, at a temperature
    and a guidance scale != 1, so that an error both runtime paths share (sigma, temperature, guidance rows)
    cannot cancel out. (The ONNX and AOTI backends are pinned to this torch backend run for run.)"""
    from fastardiff.recipes.evaluate import sample_target_only

    temperature, cfg_scale = 0.8, 1.5
    runtime, _ = first_tokens(shipped_engines, "target", seed=8, cfg_scale=cfg_scale, temperature=temperature,
                              num_tokens=8)
    labels = torch.from_numpy(np.arange(STAT_BATCH) % 10)
    with torch.no_grad():
        reference, _ = sample_target_only(shipped_checkpoint, labels, temperature, cfg_scale,
                                          torch.Generator().manual_seed(8), num_tokens=8)
    assert two_sample_pvalue(runtime, reference.numpy()) > 1e-3


def test_draft_samples_are_distinguishable(shipped_engines, target_only_tokens):
    """The two-sample test has power at STAT_BATCH: draft-only samples (the wrong distribution) are rejected.
    With the on-policy distilled draft, 400 and 1000 samples per mode gave p = 0.03 and 8e-4 (seed 3), so a loop
    emitting draft samples would have passed the losslessness tests; at 2000, p = 1e-10 .. 2e-9 over seeds 3, 5, 6
    (target vs target: 0.77)."""
    draft, _ = first_tokens(shipped_engines, "draft", seed=3)
    assert two_sample_pvalue(draft, target_only_tokens(1.0)) < 1e-4
    # that two target-only samplers are not told apart (the test is calibrated) is shown by
    # test_runtime_target_only_matches_an_independent_reference_sampler


class HostResolved:
    """The engines without their target_jacobi engine: the loop resolves every round on the host."""

    def __init__(self, engines):
        self.inner = engines
        self.capabilities = dataclasses.replace(engines.capabilities, target_jacobi=False)

    def __getattr__(self, name):
        if name == "target_jacobi":
            return None
        return getattr(self.inner, name)


class RecordingEngines:
    """Wraps engines, records every AR call (inputs and outputs); optionally the draft is the target itself."""

    def __init__(self, engines, draft_is_target=False, calibration=None):
        self.inner = engines
        self.manifest = copy.deepcopy(engines.manifest)
        if calibration:
            self.manifest.calibration.update(calibration)
        if draft_is_target:
            self.manifest.config["draft_layers"] = self.manifest.config["target_layers"]
        self.draft_is_target = draft_is_target
        self.calls = []
        self.capabilities = EngineCapabilities.host()    # plain host engines: no rollout, no target_jacobi

    def draft_step(self, tokens, lengths, k, v, cond):
        if self.draft_is_target:
            out = self.inner.target_verify(tokens, lengths, k, v, cond)
            out = DraftOutput(out.mean, out.entropy, out.entropy, out.new_k, out.new_v)
        else:
            out = self.inner.draft_step(tokens, lengths, k, v, cond)
        self.calls.append(("draft", tokens.copy(), lengths.copy(), cond.copy(), out.mean.copy()))
        return out

    def target_verify(self, tokens, lengths, k, v, cond):
        out = self.inner.target_verify(tokens, lengths, k, v, cond)
        self.calls.append(("target", tokens.copy(), lengths.copy(), cond.copy(), out.mean.copy()))
        return out

    def decoder(self, tokens, entropy, cond):
        return self.inner.decoder(tokens, entropy, cond)


def test_kv_cache_rollback_and_ragged_batch_are_exact(random_checkpoint, random_engines):
    """Every engine call, recomputed without any cache on the final accepted tokens + the call's new tokens,
    gives the same outputs: the cached prefix of every row was exactly its accepted tokens (rejected drafts
    rolled back, ragged rows recomputing/padding correctly). The shallow-entropy threshold is set near the
    random draft's typical value so that rows stop drafting at different steps."""
    B, T = 4, 24
    rec = RecordingEngines(random_engines, calibration={"tau_static": 0.975})
    classes = np.array([0, 3, 5, 7])   # distinct: a call's rows are a subset of samples, found by class
    stats = RunStats()
    gen = GenerationConfig(gamma=3, eta=5.0, num_tokens=T, seed=5, temperature=8.0)  # some drafts pass
    tokens, entropy = generate_tokens(rec, classes, gen, np.random.default_rng(0), stats)
    assert stats.drafts_proposed > stats.drafts_accepted > 0 and stats.early_stops > 0  # rollbacks, ragged drafting
    assert len({call[1].shape[1] for call in rec.calls}) > 1                        # varying widths were fed
    n_cond = random_checkpoint.config.n_cond
    seq = np.concatenate([np.zeros((B, n_cond, tokens.shape[-1])), tokens], axis=1)
    models = {"draft": random_checkpoint.draft, "target": random_checkpoint.target}
    checked = 0
    for c, (name, call_tokens, lengths, cond, mean) in enumerate(rec.calls):
        model = models[name]
        for r in range(len(cond)):
            L, sample = int(lengths[r]), int(np.flatnonzero(classes == cond[r])[0])
            inputs = np.zeros((seq.shape[1] + 8, seq.shape[2]))
            inputs[: seq.shape[1]] = seq[sample]
            if name == "draft":  # mid-round the draft cache also holds this round's drafts: the next verify's
                nxt = next(x for x in rec.calls[c + 1:] if x[0] == "target" and cond[r] in x[3])  # inputs
                rv = int(np.flatnonzero(nxt[3] == cond[r])[0])
                start = int(nxt[2][rv])
                inputs[start: start + nxt[1].shape[1]] = nxt[1][rv]
                inputs[: start] = seq[sample, :start]
            prefix = np.concatenate([inputs[:L], call_tokens[r]])[None].astype(np.float32)
            with torch.no_grad():
                k, v = model.empty_cache(1, 0)
                full = model(torch.from_numpy(prefix), torch.zeros(1, dtype=torch.long), k, v,
                             torch.tensor([int(cond[r])]))[0][0, L:].numpy()
            own = min(call_tokens.shape[1], n_cond + T - 1 - L)   # slots inside this row's real sequence
            np.testing.assert_allclose(mean[r, :own], full[:own], atol=2e-4, rtol=1e-3,
                                       err_msg=f"call {c} ({name}), sample {sample}, cache length {L}")
            checked += 1
    assert checked > 100
    # the entropies handed to the decoder are the target's at every accepted token
    with torch.no_grad():
        _, target_entropy, _ = random_checkpoint.target.forward_sequence(torch.from_numpy(tokens).float(),
                                                                         torch.from_numpy(classes))
    np.testing.assert_allclose(entropy, target_entropy.numpy(), atol=2e-4)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_draft_identical_to_target_accepts_everything(random_engines, cfg_scale):
    rec = RecordingEngines(random_engines, draft_is_target=True)
    gamma, B = 4, 3
    images, stats = generate(rec, [1, 4, 8], GenerationConfig(gamma=gamma, early_stop="off", eta=0.0,
                                                              cfg_scale=cfg_scale))
    s = stats.summary()
    assert images.shape == (B, 1, 32, 32) and np.isfinite(images).all()
    assert s["drafts_accepted"] == s["drafts_proposed"] > 0
    assert s["residual_samples"] == 0 and s["bonus_tokens"] == s["verifies"]
    # every verify emits gamma + 1 tokens except at the end: ceil(64 / 5) = 13 verifies per sample
    assert s["verifies"] == B * 13 and s["target_calls"] == 13
    assert s["tokens_per_target_call"] == pytest.approx(64 / 13)


def test_statistics_are_consistent(random_engines):
    """The counters against each other and against the calls actually made (recorded), not against the
    formulas that define them."""
    B, gamma, eta = 2, 4, 10.0
    rec = RecordingEngines(random_engines)
    images, stats = generate(rec, [2, 5], GenerationConfig(gamma=gamma, eta=eta, early_stop="context", seed=3))
    s = stats.summary()
    prefill = round(eta / 100 * 64)
    assert s["tokens"] == B * 64 and s["images"] == B
    assert s["target_rows"] == B * prefill + s["verifies"]
    # every verify emits its accepted drafts plus one residual or bonus token
    assert s["tokens"] == B * prefill + s["drafts_accepted"] + s["verifies"]
    assert s["residual_samples"] + s["bonus_tokens"] == s["verifies"]
    assert 0 <= s["acceptance_rate"] <= 1 and s["drafts_accepted"] <= s["drafts_proposed"]
    assert s["drafts_proposed"] <= gamma * s["verifies"]
    target_calls = [c for c in rec.calls if c[0] == "target"]
    assert s["target_calls"] == len(target_calls) and s["target_rows"] == sum(len(c[3]) for c in target_calls)
    assert s["draft_calls"] == sum(c[0] == "draft" for c in rec.calls)
    assert s["tokens_per_target_call"] == pytest.approx(B * 64 / sum(len(c[3]) for c in target_calls))
    assert s["total_seconds"] >= s["seconds"]["draft"] + s["seconds"]["verify"] + s["seconds"]["decode"]
    # target-only: exactly one token per target call
    _, base = generate(random_engines, [2], GenerationConfig(mode="target"))
    assert base.summary()["tokens_per_target_call"] == 1.0 and base.target_calls == 64


def test_seeded_runs_are_reproducible(random_engines):
    gen = GenerationConfig(seed=11, num_tokens=12)
    a, _ = generate(random_engines, [1, 2], gen)
    b, _ = generate(random_engines, [1, 2], gen)
    c, _ = generate(random_engines, [1, 2], dataclasses.replace(gen, seed=12))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_bad_requests_raise(random_engines):
    with pytest.raises(GenerationError, match="gamma"):
        generate(random_engines, [1], GenerationConfig(gamma=0))
    with pytest.raises(GenerationError, match="N = 64"):
        generate(random_engines, [1], GenerationConfig(num_tokens=65))
    with pytest.raises(GenerationError, match="gamma 64"):
        generate(random_engines, [1], GenerationConfig(gamma=64))


def test_nan_from_an_engine_is_an_error(random_engines):
    from fastardiff.errors import EngineError

    class NaNEngines(RecordingEngines):
        def target_verify(self, *args):
            out = super().target_verify(*args)
            return out._replace(mean=np.full_like(out.mean, np.nan))

    with pytest.raises(EngineError, match="engine 'target_verify' returned NaN"):
        generate(NaNEngines(random_engines), [1], GenerationConfig())


def test_kv_cache_writes_ragged_rows_in_place_and_refuses_overflow():
    from fastardiff.errors import EngineError
    from fastardiff.runtime.kv_cache import KVCache

    cache = KVCache(layers=2, batch=3, heads=1, capacity=6, head_dim=2)
    new = np.arange(2 * 2 * 1 * 3 * 2, dtype=np.float32).reshape(2, 2, 1, 3, 2)   # [L, R=2, H, K=3, Dh]
    cache.write(np.array([2, 0]), np.array([1, 3]), new, -new)
    np.testing.assert_array_equal(cache.k[:, 2, :, 1:4], new[:, 0])
    np.testing.assert_array_equal(cache.k[:, 0, :, 3:6], new[:, 1])
    np.testing.assert_array_equal(cache.v[:, 0, :, 3:6], -new[:, 1])
    assert not cache.k[:, 1].any()                                  # untouched row
    k, _ = cache.view(np.arange(3), 4)
    assert np.shares_memory(k, cache.k) and k.shape == (2, 3, 1, 4, 2)   # all rows: a view, no copy
    with pytest.raises(EngineError, match="N is exceeded"):
        cache.write(np.array([1]), np.array([4]), new[:, :1], new[:, :1])


def test_cost_semantics_null_class_widths_and_no_recomputation(random_checkpoint, random_engines):
    """Speed contracts the distribution tests cannot see, from recorded calls (batch 1, step drafting):
    with guidance both engines get [cond; uncond] rows with the null class and the same tokens; a verify is
    exactly min(gamma, tokens left - 1) + 1 wide and starts at its cache length with the last accepted token
    (rollback recomputes nothing); a draft step feeds at most the last accepted token and the new one."""
    T, gamma, nc = 24, 3, random_checkpoint.config.n_cond
    rec = RecordingEngines(random_engines)
    gen = GenerationConfig(gamma=gamma, early_stop="off", eta=0.0, num_tokens=T, seed=3, temperature=8.0,
                           cfg_scale=2.0)
    stats = RunStats()
    tokens, _ = generate_tokens(rec, np.array([6]), gen, np.random.default_rng(0), stats)
    assert stats.drafts_accepted > 0 and stats.residual_samples > 0
    null = random_checkpoint.config.num_classes
    seq = np.concatenate([np.zeros((nc, tokens.shape[-1])), tokens[0]])
    for name, call_tokens, lengths, cond, _ in rec.calls:
        assert cond.tolist() == [6, null], (name, cond)
        np.testing.assert_array_equal(call_tokens[0], call_tokens[1])
        assert lengths[0] == lengths[1]
        if name == "target":
            n = int(lengths[0]) - nc + 1                  # tokens accepted before this verify
            assert call_tokens.shape[1] == min(gamma, T - 1 - n) + 1
            if n > 0:
                np.testing.assert_array_equal(call_tokens[0, 0], seq[lengths[0]].astype(np.float32))
        else:
            assert call_tokens.shape[1] in (1, 2)
    assert sum(c[0] == "target" for c in rec.calls) == stats.target_calls == stats.verifies


def test_early_stop_drops_the_low_entropy_draft(random_engines):
    """A threshold above every shallow entropy stops each round at its first draft, which is dropped: nothing
    is proposed, every verify is one token wide, one draft call per round (none for the last token: nothing
    is left to draft)."""
    rec = RecordingEngines(random_engines, calibration={"tau_static": 2.0})
    stats = RunStats()
    gen = GenerationConfig(gamma=4, early_stop="static", eta=0.0, num_tokens=16, seed=1)
    generate_tokens(rec, np.array([2, 5]), gen, np.random.default_rng(0), stats)
    assert stats.drafts_proposed == 0 and stats.verifies == 2 * 16 and stats.early_stops == 2 * 15
    verify_widths = {c[1].shape[1] for c in rec.calls if c[0] == "target"}
    assert verify_widths == {1}
    assert sum(c[0] == "draft" for c in rec.calls) == 15


def test_rejected_drafts_are_replaced_in_the_output(random_checkpoint, random_engines):
    """From recorded verify calls (batch 1): the drafts a verify accepted are in the final tokens, and the token
    at its first rejection differs from the rejected draft (the residual sample took its place). How many it
    accepted is read off the next verify's cache length; verifies cut short = residual samples counted."""
    T, nc = 32, random_checkpoint.config.n_cond
    rec = RecordingEngines(random_engines)
    stats = RunStats()
    gen = GenerationConfig(gamma=3, early_stop="off", eta=0.0, num_tokens=T, seed=5, temperature=8.0)
    tokens, _ = generate_tokens(rec, np.array([3]), gen, np.random.default_rng(2), stats)
    final = tokens[0].astype(np.float32)
    verifies = [(int(c[2][0]), c[1][0, 1:]) for c in rec.calls if c[0] == "target"]
    cut = 0
    for (length, drafts), (next_length, _) in zip(verifies, verifies[1:] + [(nc + T - 1, None)]):
        first = length - nc + 1                           # token index of the first draft
        accepted = next_length - length - 1
        assert 0 <= accepted <= len(drafts)
        np.testing.assert_array_equal(final[first: first + accepted], drafts[:accepted])
        if accepted < len(drafts):
            cut += 1
            assert not np.array_equal(final[first + accepted], drafts[accepted])
    assert cut == stats.residual_samples > 0 and stats.drafts_accepted > 0


class RolloutRecorder:
    """Engines whose draft_rollout calls are recorded: (cache lengths, tokens fed, gamma)."""

    def __init__(self, engines):
        self.inner, self.manifest, self.calls = engines, engines.manifest, []
        self.rollouts = {g: self._recording(g, fn) for g, fn in engines.rollouts.items()}

    def _recording(self, gamma, fn):
        def run(tokens, lengths, *rest):
            self.calls.append((lengths.copy(), tokens.shape[1], gamma))
            return fn(tokens, lengths, *rest)
        return run

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_rollout_loop_never_claims_an_unfed_cache_position(random_engines):
    """Speed contract of the rollout path: a draft_rollout call fills the cache through its fed window and its
    drafts but the last (never fed); the next call's cache length may not exceed that (junk keys would be
    treated as valid, changing later drafts though not the output distribution)."""
    rec = RolloutRecorder(random_engines)
    stats = RunStats()
    gen = GenerationConfig(gamma=2, early_stop="off", eta=0.0, num_tokens=40, seed=2, temperature=8.0)
    generate_tokens(rec, np.array([1]), gen, np.random.default_rng(4), stats)
    assert len(rec.calls) > 5 and stats.bonus_tokens > 0          # some rounds accepted every draft
    for (length, width, gamma), (next_length, _, _) in zip(rec.calls, rec.calls[1:]):
        assert int(next_length[0]) <= int(length[0]) + width + gamma - 1


def test_engine_acceptance_choice_and_its_errors(shipped_engines):
    """Engine acceptance is off on host-cache engines unless asked for, never for Jacobi or target-only, and a
    clear error where it cannot run (a diffusion-head family, an inner temperature, no target_jacobi engine)."""
    from types import SimpleNamespace

    from fastardiff.runtime.speculative import GenerationError, in_engine_acceptance

    assert not in_engine_acceptance(shipped_engines, GenerationConfig(draft="model"))
    assert in_engine_acceptance(shipped_engines, GenerationConfig(draft="model", engine_acceptance=True))
    assert not in_engine_acceptance(shipped_engines, GenerationConfig(draft="jacobi", engine_acceptance=True))
    assert not in_engine_acceptance(shipped_engines, GenerationConfig(mode="target", engine_acceptance=True))
    manifest = shipped_engines.manifest
    no_jacobi = SimpleNamespace(manifest=SimpleNamespace(family="drift-ar", engines={"target_verify": None}),
                                capabilities=EngineCapabilities.host(cache_device="cuda"))
    heads = SimpleNamespace(manifest=SimpleNamespace(family="fast-ardiff", engines=manifest.engines))
    for engines, gen in ((no_jacobi, GenerationConfig(engine_acceptance=True)),
                         (heads, GenerationConfig(engine_acceptance=True)),
                         (shipped_engines, GenerationConfig(engine_acceptance=True, inner_temperature=2.0))):
        with pytest.raises(GenerationError, match="engine acceptance needs a drift-ar model"):
            in_engine_acceptance(engines, gen)
    assert not in_engine_acceptance(no_jacobi, GenerationConfig())         # auto: quietly off where it cannot run


SWITCH_EVERY_PROBE = dict(first_probe=1, probe_rounds=2, min_gap=1, budget=1e9, margin=0.0, z=0.0,
                          probe_all_rows=True)


@pytest.fixture
def any_rows(monkeypatch):
    """Probes compared with every kept round whatever its rows (the switching tests force a switch at every probe;
    rows finishing apart would otherwise leave a probe "unsure" now and then)."""
    from fastardiff.runtime import adaptive

    monkeypatch.setattr(adaptive, "ROW_MATCH", 1e-9)


@pytest.mark.parametrize("plan,alternative,gamma", [("jacobi", "target", 8), ("target", "jacobi:6", 4),
                                                    ("model", "target", 3)])
def test_runs_that_switch_mid_image_are_indistinguishable_from_target_only(shipped_engines, target_only_tokens,
                                                                          plan, alternative, gamma, any_rows):
    """A policy that switches at the end of every probe (margin 0) changes the proposal kind every few rounds of
    every image, both ways (target-only <-> Jacobi, target-only <-> the model draft, whose cache then catches
    up): the samples stay target-only's."""
    from fastardiff.runtime.adaptive import Adapter, AdaptPolicy

    gen = GenerationConfig(mode="target" if plan == "target" else "speculative", draft="jacobi" if plan == "jacobi"
                           else "model", gamma=gamma, alternative=alternative, early_stop="off", seed=21,
                           num_tokens=STAT_TOKENS)
    adapter = Adapter(AdaptPolicy(**SWITCH_EVERY_PROBE))
    tokens, stats = generate(shipped_engines, np.arange(STAT_BATCH) % 10, gen, adapter=adapter)
    assert len(stats.switches) >= 4 and len(stats.mode_rates) == 2, stats.switches
    assert two_sample_pvalue(tokens, target_only_tokens(1.0)) > 1e-3


def test_a_broken_proposal_on_the_switching_path_is_caught(shipped_engines, target_only_tokens, monkeypatch,
                                                           any_rows):
    """The same test has power on that path: Jacobi windows entered after target-only rounds whose guesses are
    recorded with half the sigma they were drawn from (a wrong q) are told apart from target-only."""
    import fastardiff.runtime.jacobi as jacobi
    from fastardiff.runtime.adaptive import Adapter, AdaptPolicy

    monkeypatch.setattr(jacobi, "propose_from_prior", misrecorded_prior_proposal)
    gen = GenerationConfig(mode="target", gamma=6, alternative="jacobi:6", early_stop="off", seed=22,
                           num_tokens=STAT_TOKENS)
    tokens, stats = generate(shipped_engines, np.arange(STAT_BATCH) % 10, gen,
                             adapter=Adapter(AdaptPolicy(**SWITCH_EVERY_PROBE)))
    assert len(stats.switches) >= 4
    assert two_sample_pvalue(tokens, target_only_tokens(1.0)) < 1e-4

"""Model semantics that everything else is checked against: cached == full forward, entropy, sigma(E), checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastardiff.errors import CheckpointError
from fastardiff.recipes.checkpoint import load_checkpoint, save_checkpoint
from fastardiff.recipes.entropy_attention import brute_force_row_entropy
from fastardiff.runtime.distribution import SigmaParams, sigma_from_entropy


def _sequence(cfg, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, cfg.seq_len, cfg.token_dim, generator=g)
    cond = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    return tokens, cond


def _full_forward(model, tokens, cond):
    B = tokens.shape[0]
    k, v = model.empty_cache(B, 0)
    return model(tokens, torch.zeros(B, dtype=torch.long), k, v, cond)


@pytest.mark.parametrize("which", ["target", "draft"])
def test_cached_forward_equals_full_forward_ragged(random_checkpoint, which):
    model = getattr(random_checkpoint, which)
    cfg = random_checkpoint.config
    tokens, cond = _sequence(cfg, 3)
    mean, ent, shallow, full_k, full_v = _full_forward(model, tokens, cond)
    K = 4
    lengths = torch.tensor([0, 7, 37])  # ragged: each sample resumes at a different position
    # cache holds the true keys below lengths[b] and garbage above (must be ignored)
    k_cache = torch.randn(model.num_layers, 3, cfg.heads, cfg.seq_len, cfg.head_dim) * 50
    v_cache = torch.randn_like(k_cache) * 50
    for b, n in enumerate(lengths.tolist()):
        k_cache[:, b, :, :n] = full_k[:, b, :, :n]
        v_cache[:, b, :, :n] = full_v[:, b, :, :n]
    pos = lengths.view(-1, 1) + torch.arange(K).view(1, K)
    new_tokens = torch.stack([tokens[b, pos[b]] for b in range(3)])
    m2, e2, s2, nk, nv = model(new_tokens, lengths, k_cache, v_cache, cond)
    for b in range(3):
        p = pos[b]
        torch.testing.assert_close(m2[b], mean[b, p], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(e2[b], ent[b, p], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s2[b], shallow[b, p], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(nk[:, b], full_k[:, b, :, p], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(nv[:, b], full_v[:, b, :, p], atol=1e-5, rtol=1e-4)
    # in_buffer (the onnx target's in-place engines): per-layer buffers, the new keys written at each row's length
    # and attention over the whole buffer (garbage past lengths + i masked): the same outputs, and the buffers
    # are the inputs with exactly the new keys/values written
    m3, e3, s3, nk3, nv3, *buffers = model(new_tokens, lengths, k_cache.unbind(0), v_cache.unbind(0), cond,
                                           in_buffer=True)
    for got, want in zip((m3, e3, s3, nk3, nv3), (m2, e2, s2, nk, nv)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for buffer, cache, new in zip(buffers, (*k_cache, *v_cache), (*nk3, *nv3)):
        want = cache.clone()
        for b, n in enumerate(lengths.tolist()):
            want[b, :, n:n + K] = new[b]
        assert torch.equal(buffer, want)
    # shallow=False (the target engines): the shallow layer attends like a plain layer, the same mean and entropy;
    # its entropy is returned only where it is the entropy layer (the draft's single layer)
    for buffered in (False, True):
        caches = (k_cache.unbind(0), v_cache.unbind(0)) if buffered else (k_cache, v_cache)
        m4, e4, s4, *_ = model(new_tokens, lengths, *caches, cond, in_buffer=buffered, shallow=False)
        torch.testing.assert_close(m4, m2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(e4, e2, atol=1e-5, rtol=1e-4)
        if model.shallow_layer == model.entropy_layer:
            torch.testing.assert_close(s4, s2, atol=1e-5, rtol=1e-4)
        else:
            assert s4 is None


@pytest.mark.parametrize("splits", [[1] * 64, [5, 1, 20, 38], [2, 62], [64]])
def test_incremental_decoding_over_splits_equals_full(random_checkpoint, splits):
    model = random_checkpoint.target
    cfg = random_checkpoint.config
    assert sum(splits) == cfg.seq_len
    tokens, cond = _sequence(cfg, 2, seed=3)
    mean, ent, shallow, _, _ = _full_forward(model, tokens, cond)
    # preallocated caches filled with large finite garbage: positions >= lengths must never be read
    k_cache = torch.full((model.num_layers, 2, cfg.heads, cfg.seq_len, cfg.head_dim), 1e3)
    v_cache = torch.full_like(k_cache, -1e3)
    filled, means, ents = 0, [], []
    for K in splits:
        lengths = torch.full((2,), filled, dtype=torch.long)
        m, e, _, nk, nv = model(tokens[:, filled:filled + K], lengths, k_cache, v_cache, cond)
        k_cache[:, :, :, filled:filled + K] = nk
        v_cache[:, :, :, filled:filled + K] = nv
        means.append(m)
        ents.append(e)
        filled += K
    torch.testing.assert_close(torch.cat(means, 1), mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(ents, 1), ent, atol=1e-5, rtol=1e-4)


def test_entropy_in_unit_interval_and_equals_brute_force(random_checkpoint):
    model = random_checkpoint.target
    cfg = random_checkpoint.config
    tokens, cond = _sequence(cfg, 2, seed=5)
    B, T = tokens.shape[:2]
    k, v = model.empty_cache(B, 0)
    out = model(tokens, torch.zeros(B, dtype=torch.long), k, v, cond, return_hidden=True)
    entropy, hidden = out[1], out[5]
    assert entropy.shape == (B, T)
    assert float(entropy.min()) >= 0.0 and float(entropy.max()) <= 1.0 + 1e-6
    assert float(entropy[:, 0].abs().max()) == 0.0  # one visible key: normalised entropy is 0 by definition
    layer = model.entropy_layer
    x = hidden[layer - 1] if layer > 0 else model.embed(tokens, torch.zeros(B, dtype=torch.long), cond)
    block = model.blocks[layer]
    with torch.no_grad():
        q, kk, _ = block.attn.qkv(block.norm1(x)).view(B, T, 3, cfg.heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ kk.transpose(-1, -2)) * cfg.head_dim**-0.5
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).double()
    brute = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(1, T):
            rows = [brute_force_row_entropy(probs[b, h, i, : i + 1].tolist()) / math.log(i + 1)
                    for h in range(cfg.heads)]
            brute[b, i] = sum(rows) / cfg.heads
    torch.testing.assert_close(entropy.double(), brute, atol=2e-5, rtol=1e-4)
    # a non-trivial check: entropies actually vary across positions
    assert float(entropy[:, 1:].std()) > 1e-4


@pytest.mark.parametrize("e_max", [0.3, 0.9])
def test_sigma_matches_drift_ar_eq6(e_max):
    p = SigmaParams(sigma_max=0.5, tau_sigma=2.0, e_max=e_max, sigma_min=1e-3)
    entropies = [0.0, 0.01, 0.1, 0.25, e_max, 0.95]
    expected = [max(0.5 * (math.exp(e / 2.0) - 1) / (math.exp(e_max / 2.0) - 1), 1e-3) for e in entropies]
    np.testing.assert_allclose(sigma_from_entropy(np.array(entropies), p), expected, rtol=1e-12)
    got = sigma_from_entropy(torch.tensor(entropies, dtype=torch.float64), p)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert sigma_from_entropy(np.array([e_max]), p)[0] == pytest.approx(0.5)
    assert sigma_from_entropy(np.array([0.0]), p)[0] == pytest.approx(1e-3)  # floored, never zero
    # monotone increasing above the floor
    grid = np.linspace(0.05, 1.0, 50)
    assert np.all(np.diff(sigma_from_entropy(grid, p)) > 0)


def test_checkpoint_round_trip_gives_identical_outputs(random_checkpoint, tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", random_checkpoint)
    assert path.with_suffix(".json").exists()
    loaded = load_checkpoint(path, expected_config=random_checkpoint.config)
    assert loaded.calibration.to_dict() == random_checkpoint.calibration.to_dict()
    cfg = random_checkpoint.config
    tokens, cond = _sequence(cfg, 2, seed=7)
    for which in ("target", "draft"):
        a = _full_forward(getattr(random_checkpoint, which), tokens, cond)
        b = _full_forward(getattr(loaded, which), tokens, cond)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    grid = torch.randn(2, cfg.num_tokens, cfg.token_dim)
    ent = torch.rand(2, cfg.num_tokens)
    assert torch.equal(random_checkpoint.decoder(grid, ent, cond), loaded.decoder(grid, ent, cond))


def test_load_errors_are_clear(random_checkpoint, random_checkpoint_path, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable fastardiff checkpoint"):
        load_checkpoint(junk)
    payload = torch.load(random_checkpoint_path, weights_only=True)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="header"):
        load_checkpoint(foreign)
    other = tmp_path / "other.pt"
    torch.save({**payload, "family": "fast-ardiff"}, other)
    with pytest.raises(CheckpointError, match="model family 'fast-ardiff'"):
        load_checkpoint(other)
    import dataclasses

    wider = dataclasses.replace(random_checkpoint.config, width=2 * random_checkpoint.config.width)
    with pytest.raises(CheckpointError, match=r"different config \(differs in \['width'\]\)"):
        load_checkpoint(random_checkpoint_path, expected_config=wider)
    lying = tmp_path / "lying.pt"
    torch.save({**payload, "config": wider.to_dict()}, lying)
    with pytest.raises(CheckpointError, match="weights of 'target' do not match its config"):
        load_checkpoint(lying)
    old = tmp_path / "old.pt"
    torch.save({**payload, "version": 99}, old)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(old)


def test_drifting_field_is_anti_symmetric_and_vanishes_at_equilibrium():
    from fastardiff.recipes.drift_loss import drift_loss, drifting_field

    g = torch.Generator().manual_seed(0)
    x, p, q = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 6))
    for t in (0.02, 0.05, 0.2):
        v_pq = drifting_field(x, p, q, t, exclude_self=False)
        v_qp = drifting_field(x, q, p, t, exclude_self=False)
        torch.testing.assert_close(v_pq, -v_qp)
        assert float(v_pq.abs().max()) > 1e-6
        assert float(drifting_field(x, p, p, t, exclude_self=False).abs().max()) < 1e-12
    # attraction: generated samples far from the data are pulled towards it
    far = torch.randn(16, 4, generator=g) + 5.0
    data = torch.randn(16, 4, generator=g)
    v = drifting_field(far, data, far, 0.2)
    assert float((v * (data.mean(0) - far)).sum(-1).min()) > 0
    far.requires_grad_(True)
    drift_loss(far, data).backward()  # gradient descent moves the samples along V
    assert float((-far.grad * v).sum()) > 0


def test_alpha_schedules():
    from fastardiff.recipes.train import alpha_at

    assert alpha_at(0.0, "linear") == pytest.approx(0.95) and alpha_at(1.0, "linear") == pytest.approx(0.05)
    assert alpha_at(0.5, "linear") == pytest.approx(0.5)
    assert alpha_at(0.4, "two-phase") == pytest.approx(0.475)
    assert alpha_at(0.8, "two-phase") == pytest.approx(0.0) and alpha_at(0.9, "two-phase") == 0.0

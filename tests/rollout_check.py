"""One draft_rollout call against gamma draft_step calls with the same noise (shared by the backend tests).

The reference is written here, independently of the rollout module: each step is a draft_step call on a cache
the test updates itself, classifier-free guidance and sigma(E) are applied on the host with numpy, and the
early stop is the loop's rule (stop at the first draft whose conditional shallow entropy is below the
threshold, that draft dropped; never more than max_drafts)."""
from __future__ import annotations

import numpy as np

from fastardiff.runtime.distribution import SigmaParams, sigma_from_entropy


def rollout_inputs(manifest, gamma: int, guided: bool, seed: int = 0, window: int = 2):
    cfg = manifest.config
    grid = cfg["image_size"] // cfg["patch"]
    seq_len = cfg["n_cond"] + grid * grid - 1
    rng = np.random.default_rng(seed)
    samples = 3
    rows = 2 * samples if guided else samples
    lengths = np.array([seq_len - window - gamma, 7, 0][:samples], np.int64)   # ragged, one empty cache
    entry = manifest.engines[manifest.rollout_engines()[gamma]]
    capacity = entry.profile["cache"][-1]
    heads, head_dim = cfg["heads"], cfg["width"] // cfg["heads"]
    cache_shape = (cfg["draft_layers"], rows, heads, capacity, head_dim)
    k_cache = rng.standard_normal(cache_shape).astype(np.float32)
    v_cache = rng.standard_normal(cache_shape).astype(np.float32)
    tokens = rng.standard_normal((samples, window, cfg["token_dim"])).astype(np.float32)
    classes = np.array([3, 7, 1], np.int64)
    cond = np.concatenate([classes, np.full(samples, cfg["num_classes"])]) if guided else classes
    reps = rows // samples
    noise = rng.standard_normal((samples, gamma, cfg["token_dim"])).astype(np.float32)
    max_drafts = np.array([gamma, gamma, max(gamma - 1, 0)], np.int64)
    return (np.tile(tokens, (reps, 1, 1)), np.tile(lengths, reps), k_cache, v_cache, cond, noise, max_drafts)


def reference_rollout(engines, inputs, threshold, temperature: float, cfg_scale: float):
    """gamma draft_step calls on a host-updated cache; returns what a rollout returns."""
    tokens, lengths, k_cache, v_cache, cond, noise, max_drafts = inputs
    sp = SigmaParams.from_config(engines.manifest.config, engines.manifest.calibration)
    samples, gamma = noise.shape[:2]
    rows = len(cond)
    owner = np.arange(rows) % samples
    k, v = k_cache.copy(), v_cache.copy()
    x, start = tokens, lengths.copy()
    alive = np.ones(samples, bool)
    drafts, means, sigmas, shallows, kept = [], [], [], [], []
    fed_k, fed_v = [], []
    for i in range(gamma):
        out = engines.draft_step(x, start, k, v, cond)     # the whole buffer: room for the fed positions
        for r in range(rows):  # the loop's KV write: the new keys at each row's own offset
            k[:, r, :, start[r]:start[r] + x.shape[1]] = out.new_k[:, r]
            v[:, r, :, start[r]:start[r] + x.shape[1]] = out.new_v[:, r]
        fed_k.append(out.new_k)
        fed_v.append(out.new_v)
        z = out.mean[:, -1].astype(np.float64)
        z = z[rows - samples:] + cfg_scale * (z[:samples] - z[rows - samples:])
        sigma = sigma_from_entropy(out.entropy[:samples, -1].astype(np.float64), sp) * temperature
        draft = z + sigma[:, None] * noise[:, i]
        shallow = out.shallow_entropy[:samples, -1]
        alive &= (shallow >= threshold) & (i < max_drafts)
        drafts.append(draft)
        means.append(z)
        sigmas.append(sigma)
        shallows.append(shallow)
        kept.append(alive.copy())
        start = start + x.shape[1]
        x = draft[owner][:, None].astype(np.float32)
    return {"drafts": np.stack(drafts, 1), "draft_mean": np.stack(means, 1), "draft_sigma": np.stack(sigmas, 1),
            "num_drafts": np.stack(kept, 1).sum(1), "shallow_entropy": np.stack(shallows, 1),
            "new_k": np.concatenate(fed_k, 3), "new_v": np.concatenate(fed_v, 3)}


def thresholds_for(mode: str, reference_shallow: np.ndarray) -> np.ndarray:
    """static: one threshold for every sample; context: a different one per sample; off: never stop. The values
    sit between observed shallow entropies so that some samples stop early and some do not."""
    samples = reference_shallow.shape[0]
    if mode == "off":
        return np.full(samples, -np.inf, np.float32)
    ordered = np.sort(reference_shallow.ravel())
    i = max(1, reference_shallow.size // 3)
    mid = 0.5 * (ordered[i - 1] + ordered[i])      # between two observed values: no tie for rounding to flip
    if mode == "static":
        return np.full(samples, mid, np.float32)
    return (mid + np.array([-1.0, 0.5, 0.0][:samples]) * reference_shallow.std()).astype(np.float32)


def check_rollout_matches_steps(engines, gamma: int, guided: bool, mode: str, atol: float = 1e-4):
    """Run both and compare; returns the number of samples the early stop cut short (so callers can assert the
    early-stop branch was exercised)."""
    temperature, cfg_scale = 0.9, (1.7 if guided else 1.0)
    inputs = rollout_inputs(engines.manifest, gamma, guided)
    probe = reference_rollout(engines, inputs, np.full(3, -np.inf), temperature, cfg_scale)
    threshold = thresholds_for(mode, probe["shallow_entropy"])
    ref = reference_rollout(engines, inputs, threshold, temperature, cfg_scale)
    tokens, lengths, k_cache, v_cache, cond, noise, max_drafts = inputs
    out = engines.rollouts[gamma](tokens, lengths, k_cache, v_cache, cond, noise, threshold, max_drafts,
                                  np.array([temperature], np.float32), np.array([cfg_scale], np.float32))
    np.testing.assert_array_equal(out.num_drafts, ref["num_drafts"])
    for name in ("drafts", "draft_mean", "draft_sigma", "shallow_entropy", "new_k", "new_v"):
        np.testing.assert_allclose(getattr(out, name), ref[name], atol=atol, rtol=1e-4, err_msg=name)
    return int(np.count_nonzero(ref["num_drafts"] < max_drafts))

"""Exact continuous speculative decoding over an `Engines` object (DESIGN.md "The runtime loop").

Sequence layout (engine contract): positions 0..n_cond-1 are condition slots, position n_cond + r holds token
x_r, and the output at position p predicts token p - n_cond + 1. Token r is therefore produced by feeding the
engine through position n_cond + r - 1. Each AR engine keeps its KV cache valid exactly over fed positions
whose inputs are accepted tokens; rejection is resetting the lengths.

Per round and sample (vectorised, ragged): draft up to gamma tokens with `draft_step` (stop early on low
shallow entropy), one `target_verify` over [last accepted token + drafts], accept a prefix with min(1, p/q),
then the residual sample at the first rejection or the target's bonus token. `mode="target"` samples every
token from `target_verify` alone (the baseline); `mode="draft"` from `draft_step` alone (a test reference).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from fastardiff.errors import EngineError, FastardiffError

from .distribution import SigmaParams
from .early_stop import EarlyStop
from .kv_cache import KVCache
from .sampling import TokenDistribution, accept_drafts, guide, sample_gaussian, token_distribution
from .stats import RunStats

MODES = ("speculative", "target", "draft")


class GenerationError(FastardiffError):
    """A generation request the model or its engines cannot serve (gamma, token count, batch)."""


@dataclass(frozen=True)
class GenerationConfig:
    mode: str = "speculative"
    gamma: int = 4
    early_stop: str = "static"
    temperature: float = 1.0
    cfg_scale: float = 1.0
    eta: float = 5.0              # percent of the N tokens sampled by the target alone before speculating
    seed: int = 0
    num_tokens: int | None = None  # stop after the first tokens (tests); None = all N, then decode


@dataclass(frozen=True)
class ModelShape:
    """What the loop needs to know about the model, read from the manifest's config dict."""

    n_cond: int
    num_tokens: int
    token_dim: int
    heads: int
    head_dim: int
    target_layers: int
    draft_layers: int
    num_classes: int

    @classmethod
    def from_config(cls, c: dict) -> "ModelShape":
        grid = c["image_size"] // c["patch"]
        return cls(c["n_cond"], grid * grid, c["token_dim"], c["heads"], c["width"] // c["heads"],
                   c["target_layers"], c["draft_layers"], c["num_classes"])

    @property
    def seq_len(self) -> int:
        return self.n_cond + self.num_tokens - 1


class AREngine:
    """One AR engine (draft_step or target_verify) with its KV cache and guidance, fed from a token buffer."""

    def __init__(self, name, fn, layers, shape: ModelShape, classes, gen: GenerationConfig, sigma: SigmaParams,
                 stats: RunStats, stage: str):
        self.name, self.fn, self.gen, self.sigma, self.stats, self.stage = name, fn, gen, sigma, stats, stage
        self.batch = len(classes)
        guided = gen.cfg_scale != 1.0
        self.cond = np.concatenate([classes, np.full_like(classes, shape.num_classes)]) if guided else classes
        self.cache = KVCache(layers, len(self.cond), shape.heads, shape.seq_len, shape.head_dim)

    def rows(self, samples: np.ndarray) -> np.ndarray:
        return np.concatenate([samples, samples + self.batch]) if len(self.cond) > self.batch else samples

    def predict(self, seq: np.ndarray, samples: np.ndarray, first: np.ndarray, end: np.ndarray, slots: int):
        """Feed positions up to end[r] (exclusive) of `samples`; return the token distributions output at
        positions first[r] .. first[r]+slots-1 (slots past a row's own end are junk) and the shallow entropy."""
        rows = self.rows(samples)
        lengths = self.cache.lengths[rows[: len(samples)]]
        width = int((end - lengths).max())
        # rows needing fewer than `width` positions recompute cached ones (same inputs, same keys) or feed junk
        # past their end (ignored: the length marks it invalid); no feed may pass the cache capacity
        start = np.minimum(lengths, self.cache.capacity - width)
        positions = start[:, None] + np.arange(width)[None, :]
        tokens = seq[samples[:, None], positions].astype(np.float32)
        k, v = self.cache.view(rows, int(start.max()))
        reps = len(rows) // len(samples)          # 2 with classifier-free guidance: [cond; uncond] rows
        starts = np.tile(start, reps)
        with self.stats.timer(self.stage):
            out = self.fn(np.concatenate([tokens] * reps), starts, k, v, self.cond[rows])
        if self.stage == "draft":
            self.stats.draft_calls += 1
        else:
            self.stats.target_calls += 1
            self.stats.target_rows += len(samples)
        if not (np.isfinite(out.mean).all() and np.isfinite(out.entropy).all()):
            raise EngineError(f"engine '{self.name}' returned NaN or inf; the engine or its inputs are broken "
                              "(re-export it, or try a lower --cfg / --temperature)")
        self.cache.write(rows, starts, out.new_k, out.new_v)
        self.cache.lengths[rows] = np.tile(end, reps)
        mean, entropy = guide(out.mean, out.entropy, self.gen.cfg_scale)
        shallow = getattr(out, "shallow_entropy", None)
        idx = np.clip((first - start)[:, None] + np.arange(slots)[None, :], 0, width - 1)
        take = lambda a: np.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
        dist = token_distribution(take(mean), take(entropy), self.sigma, self.gen.temperature)
        return dist, (take(shallow[: len(samples)]) if shallow is not None else None)

    def rollback(self, samples: np.ndarray, length: np.ndarray) -> None:
        rows = self.rows(samples)
        reps = len(rows) // len(samples)
        self.cache.lengths[rows] = np.minimum(self.cache.lengths[rows], np.tile(length, reps))


def check_request(gen: GenerationConfig, shape: ModelShape, max_verify_tokens: int | None = None) -> int:
    """Validate the request; returns the number of tokens to generate."""
    if gen.mode not in MODES:
        raise GenerationError(f"unknown mode '{gen.mode}'; choose one of {', '.join(MODES)}")
    if gen.gamma < 1:
        raise GenerationError(f"--gamma must be at least 1 (got {gen.gamma}): it is the number of draft tokens "
                              "per target call")
    n = shape.num_tokens if gen.num_tokens is None else gen.num_tokens
    if not 1 <= n <= shape.num_tokens:
        raise GenerationError(f"asked for {n} tokens but the model generates N = {shape.num_tokens} per image")
    if gen.gamma + 1 > shape.num_tokens or (max_verify_tokens and gen.gamma + 1 > max_verify_tokens):
        limit = min(shape.num_tokens, max_verify_tokens or shape.num_tokens) - 1
        raise GenerationError(f"--gamma {gen.gamma} needs {gen.gamma + 1} tokens per target call, more than this "
                              f"model/engine allows (N = {shape.num_tokens}); use --gamma {limit} or less")
    if not 0 <= gen.eta < 100:
        raise GenerationError(f"--eta is a percentage of tokens in [0, 100) (got {gen.eta})")
    if gen.temperature <= 0:
        raise GenerationError(f"--temperature must be positive (got {gen.temperature})")
    return n


def generate_tokens(engines, classes: np.ndarray, gen: GenerationConfig, rng: np.random.Generator,
                    stats: RunStats) -> tuple[np.ndarray, np.ndarray]:
    """Sample tokens [B, n, D] and the target entropy of each token [B, n] for class ids `classes`."""
    m = engines.manifest
    shape = ModelShape.from_config(m.config)
    total = check_request(gen, shape)
    sigma = SigmaParams.from_config(m.config, m.calibration)
    classes = np.asarray(classes, np.int64)
    B, nc, G = len(classes), shape.n_cond, gen.gamma
    seq = np.zeros((B, nc + shape.num_tokens + G + 1, shape.token_dim))  # position p holds the input of p
    token_entropy = np.zeros((B, shape.num_tokens))
    n = np.zeros(B, np.int64)                                             # accepted tokens per sample
    target = AREngine("target_verify", engines.target_verify, shape.target_layers, shape, classes, gen, sigma,
                      stats, "verify")
    draft = AREngine("draft_step", engines.draft_step, shape.draft_layers, shape, classes, gen, sigma, stats, "draft")
    stopper = EarlyStop(gen.early_stop, B, m.calibration)
    prefill = total if gen.mode != "speculative" else min(total, int(round(gen.eta / 100 * shape.num_tokens)))
    one_model = draft if gen.mode == "draft" else target
    everyone = np.arange(B)

    for _ in range(prefill):  # one token per call from a single model (target-only / draft-only / eta prefill)
        p, _ = one_model.predict(seq, everyone, nc + n - 1, nc + n, 1)
        seq[everyone, nc + n] = sample_gaussian(rng, p.mean[:, 0], p.sigma[:, 0])
        token_entropy[everyone, n] = p.entropy[:, 0]
        stopper.observe_target(everyone, p.entropy, np.ones(B, np.int64))
        n += 1

    while (act := np.flatnonzero(n < total)).size:
        na, R = n[act], len(act)
        # 1. draft up to gamma tokens (never past the end), stop early on low shallow entropy
        max_drafts = np.minimum(G, total - 1 - na)
        k = np.zeros(R, np.int64)
        q_mean, q_sigma = np.zeros((R, G, shape.token_dim)), np.ones((R, G))
        drafting = max_drafts > 0
        for i in range(G):
            idx = np.flatnonzero(drafting)
            if not idx.size:
                break
            q, shallow = draft.predict(seq, act[idx], nc + na[idx] + i - 1, nc + na[idx] + i, 1)
            stop = stopper.should_stop(act[idx], shallow[:, 0])
            keep = idx[~stop]
            seq[act[keep], nc + na[keep] + i] = sample_gaussian(rng, q.mean[~stop, 0], q.sigma[~stop, 0])
            q_mean[keep, i], q_sigma[keep, i] = q.mean[~stop, 0], q.sigma[~stop, 0]
            k[keep] += 1
            drafting[idx[stop]] = False
            drafting &= k < max_drafts
            stats.early_stops += int(stop.sum())
        # 2. one target call over [last accepted token, drafts]: p for tokens n .. n+k (slot k = bonus)
        kmax = int(k.max())
        p, _ = target.predict(seq, act, nc + na - 1, nc + na + k, kmax + 1)
        # 3. accept a prefix, then the residual sample or the bonus token
        drafts = seq[act[:, None], nc + na[:, None] + np.arange(kmax)[None, :]]
        q = TokenDistribution(q_mean[:, :kmax], q_sigma[:, :kmax], None)
        accepted, next_token = accept_drafts(rng, drafts, k, p, q)
        seq[act, nc + na + accepted] = next_token
        emitted = np.arange(kmax + 1)[None, :] <= accepted[:, None]
        r_idx, j_idx = np.nonzero(emitted)
        token_entropy[act[r_idx], na[r_idx] + j_idx] = p.entropy[r_idx, j_idx]
        stopper.observe_target(act, p.entropy, accepted + 1)
        n[act] += accepted + 1
        target.rollback(act, nc + n[act] - 1)
        draft.rollback(act, nc + n[act] - 1)
        stats.verifies += R
        stats.drafts_proposed += int(k.sum())
        stats.drafts_accepted += int(accepted.sum())
        stats.residual_samples += int((accepted < k).sum())
        stats.bonus_tokens += int((accepted == k).sum())
    stats.tokens += B * total
    return seq[:, nc: nc + total].copy(), token_entropy[:, :total]


def generate(engines, classes, gen: GenerationConfig, stats: RunStats | None = None,
             max_batch: int | None = None) -> tuple[np.ndarray, RunStats]:
    """Tokens for every class id (in engine-sized chunks), then the decoder when all N tokens were asked for.
    Returns (images [B, C, H, W] in [-1, 1], or tokens [B, n, D] when gen.num_tokens is set; stats)."""
    stats = stats or RunStats(mode=gen.mode, early_stop=gen.early_stop, gamma=gen.gamma)
    classes = np.asarray(classes, np.int64)
    check_request(gen, ModelShape.from_config(engines.manifest.config), verify_limit(engines))
    per_call = 2 if gen.cfg_scale != 1.0 else 1
    chunk = max(1, (max_batch or engines.manifest.max_batch) // per_call)
    rng = np.random.default_rng(gen.seed)
    started = time.perf_counter()
    outputs = []
    starts = range(0, len(classes), chunk)
    for lo in tqdm(starts, desc="generate", unit="batch", disable=len(starts) < 2, leave=False):
        part = classes[lo: lo + chunk]
        tokens, entropy = generate_tokens(engines, part, gen, rng, stats)
        if gen.num_tokens is not None:
            outputs.append(tokens)
            continue
        with stats.timer("decode"):
            images = engines.decoder(tokens.astype(np.float32), entropy.astype(np.float32), part)
        if not np.isfinite(images).all():
            raise EngineError("engine 'decoder' returned NaN or inf; re-export the engines")
        outputs.append(images)
    stats.images += len(classes)
    stats.total_seconds += time.perf_counter() - started
    stats.seconds["host"] = max(0.0, stats.total_seconds - sum(v for s, v in stats.seconds.items() if s != "host"))
    return np.concatenate(outputs), stats


def verify_limit(engines) -> int | None:
    entry = engines.manifest.engines.get("target_verify")
    profile = getattr(entry, "profile", None) or {}
    k = profile.get("K") or profile.get("new_tokens")
    return int(k[-1]) if k else None

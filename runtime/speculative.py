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

import math
import time

import numpy as np
from tqdm import tqdm

from fastardiff.errors import EngineError

from .early_stop import EarlyStop
from .generation import (DRAFTS, MODES, GenerationConfig, GenerationError, ModelShape,  # noqa: F401  (re-exported)
                         check_request, in_engine_acceptance, verify_limit)
from .jacobi import accept_drafts_in_engine, jacobi_rounds
from .kv_cache import KVCache, windows
from .sampling import TokenDistribution, accept_drafts, guide, sample_gaussian
from .stats import RunStats
from .token_rules import token_rules


class AREngine:
    """One AR engine (draft_step or target_verify) with its KV cache and guidance, fed from a token buffer.

    `samples` passed to predict/rollback are strictly increasing sample indices; all B of them (the common case)
    needs no index arrays on the cache at all."""

    def __init__(self, name, fn, layers, shape: ModelShape, classes, gen: GenerationConfig, rule,
                 stats: RunStats, stage: str, capacity: int | None = None, cache_views: bool = False,
                 cache_limit: float | None = None, in_place=frozenset(), needs_room: bool = False, device=None):
        self.name, self.fn, self.gen, self.rule, self.stats, self.stage = name, fn, gen, rule, stats, stage
        # engines that write their new keys/values into the cache buffers they are passed (ONNX Runtime with the
        # onnx target's in-place engines): a call given the whole buffer needs no host write after it
        self.in_place = in_place
        # needs_room: the engines' caches must hold the fed positions too (the in-place engines scatter them there;
        # backend_onnxruntime checks it): never a prefix view, the whole buffer or its rows at full capacity
        self.needs_room = needs_room
        # cache_views: the backend takes strided cache views (torch does; ONNX Runtime would copy them), so a call
        # gets the cached prefix it needs, not the whole buffer: the engine's attention and concat then scale
        # with the tokens so far, not with the capacity
        self.cache_views = cache_views
        # the longest cache axis the engine accepts (None: the sequence length, the exported profile's; inf: any,
        # e.g. ONNX Runtime's CPU provider): a buffer is passed whole only up to it, else as the prefix a call reads
        self.cache_limit = shape.seq_len if cache_limit is None else cache_limit
        self.n_cond = shape.n_cond
        self.batch = len(classes)
        self.guided = gen.cfg_scale != 1.0
        self.cond = np.concatenate([classes, np.full_like(classes, shape.num_classes)]) if self.guided else classes
        # device: the backend's `cache_device` (a torch device: the cache lives there, kv_cache.py), or None
        self.cache = KVCache(layers, len(self.cond), shape.heads, capacity or shape.seq_len, shape.head_dim,
                             device=device)
        self.scalars = (np.array([gen.temperature], np.float32), np.array([gen.cfg_scale], np.float32))
        self.seq_len = shape.seq_len
        self.reps = len(self.cond) // self.batch      # 2 with classifier-free guidance: [cond; uncond] rows

    def rows(self, samples: np.ndarray) -> np.ndarray:
        return np.concatenate([samples, samples + self.batch]) if self.guided else samples

    def predict(self, seq: np.ndarray, samples: np.ndarray, first: np.ndarray, end: np.ndarray, slots: int):
        """Feed positions up to end[r] (exclusive) of `samples`; return the token distributions output at
        positions first[r] .. first[r]+slots-1 (slots past a row's own end are junk) and the shallow entropy."""
        out, start, width = self._fed_call(self.fn, self.name, seq, samples, end, lambda start: (),
                                           lambda o: (o.mean, o.entropy))
        mean, entropy = guide(out.mean, out.entropy, self.gen.cfg_scale)
        shallow = getattr(out, "shallow_entropy", None)
        if shallow is not None:
            shallow = shallow[: len(samples)]
        if width == 1 and slots == 1:               # the only output of every row
            span = slice(0, 1)
        else:
            offset = first - start
            lo = int(offset.min())
            span = slice(lo, lo + slots) if 0 <= lo == int(offset.max()) and lo + slots <= width else None
        if span is not None:                          # the same slots of every row: a slice, no gather
            take = lambda a: a[:, span]  # noqa: E731
        else:                                         # ragged: gather slot idx[r, j] of row r
            idx = np.minimum(np.maximum((first - start)[:, None] + np.arange(slots)[None, :], 0), width - 1)
            row = np.arange(len(samples))[:, None]
            take = lambda a: a[row, idx]  # noqa: E731
        dist = self.rule.distribution(take(mean), take(entropy), samples, first - (self.n_cond - 1))
        return dist, (take(shallow) if shallow is not None else None)

    def jacobi(self, fn, seq: np.ndarray, samples: np.ndarray, end: np.ndarray, sampling: tuple,
               coupling: np.ndarray):
        """One target_jacobi call over [last accepted token, guesses]: positions end[r] - kmax - 1 .. end[r] - 1
        (every row's feed starts at its cache length: runtime/jacobi.py keeps the window inside the cache), with
        the round's sampling inputs (guess_mean .. residual_coins)."""
        out, _, _ = self._fed_call(fn, "target_jacobi", seq, samples, end,
                                   lambda start: sampling + self.scalars + (coupling,),
                                   lambda o: (o.tokens_out, o.slot_sigma))
        return out

    def _fed_call(self, fn, engine: str, seq, samples, end, extra, finite):
        """Feed positions up to end[r] (exclusive) of `samples` through `fn` (engine `engine`, with the inputs
        extra(start) after the AR ones), check the outputs finite(out), write the new keys/values (unless the
        engine wrote them into the buffer itself) and the lengths; returns (out, start, width)."""
        cache, batch = self.cache, self.batch
        full = len(samples) == batch                  # every sample in order
        lengths = cache.lengths[:batch] if full else cache.lengths[samples]
        width = int((end - lengths).max())
        # rows needing fewer than `width` positions recompute cached ones (same inputs, same keys) or feed junk
        # past their end (ignored: the length marks it invalid); no feed may pass the cache capacity
        start = np.minimum(lengths, cache.capacity - width)
        rows, tokens, starts, cond = self._feed(seq, samples, start, width)
        ends = np.concatenate([end, end]) if self.guided else end
        whole = rows is None and not self.cache_views and (cache.capacity <= self.cache_limit or self.needs_room)
        if whole:
            k, v = cache.k, cache.v                   # the whole buffer: no copy (positions >= lengths are masked)
        elif self.needs_room:
            k, v = cache.rows(rows) if rows is not None else (cache.k, cache.v)
        else:
            k, v = cache.view(rows, int(start.max()))
        out = self._timed(fn, tokens, starts, k, v, cond, *extra(start))
        if self.stage == "draft":
            self.stats.draft_calls += 1
        else:
            self.stats.target_calls += 1
            self.stats.target_rows += len(samples)
        check_finite(self.name, *finite(out))
        if not (whole and engine in self.in_place):
            cache.write(rows, starts, out.new_k, out.new_v)
        if full:
            cache.lengths[:] = ends
        else:
            cache.lengths[rows] = ends
        return out, start, width

    def rollout(self, fn, gamma: int, seq: np.ndarray, samples: np.ndarray, end: np.ndarray, noise: np.ndarray,
                threshold: np.ndarray, max_drafts: np.ndarray):
        """One draft_rollout call: feed positions up to end[r] (exclusive; the last one holds the last accepted
        token), then `gamma` drafts in-graph. The whole cache buffer is passed (static shape, no copy), or with
        cache_views the prefix the call reads."""
        cache, batch = self.cache, self.batch
        full = len(samples) == batch
        lengths = cache.lengths[:batch] if full else cache.lengths[samples]
        width = int((end - lengths).max())
        start = end - width                              # rows with a valid cache recompute cached positions
        rows, tokens, starts, cond = self._feed(seq, samples, start, width)
        if self.cache_views:                             # the cached prefix it needs (a view for every row)
            k, v = cache.view(rows, int(starts.max()))
        else:                                            # static cache shape: the whole buffer of those rows
            k, v = (cache.k, cache.v) if rows is None else cache.rows(rows)
        out = self._timed(fn, tokens, starts, k, v, cond, noise, threshold, max_drafts, *self.scalars)
        self.stats.draft_calls += 1
        check_finite(f"draft_rollout_{gamma}", out.draft_mean, out.draft_sigma)
        cache.write(rows, starts, out.new_k, out.new_v)
        fed = starts + (width + gamma - 1)
        if full:
            cache.lengths[:] = fed
        else:
            cache.lengths[rows] = fed
        return out

    def _feed(self, seq: np.ndarray, samples: np.ndarray, start: np.ndarray, width: int):
        """The engine rows of `samples` (None: every row in order), their input window seq[start : start+width]
        ([cond; uncond] copies with guidance), per-row start positions and class ids."""
        full = len(samples) == self.batch
        if width == 1:
            tokens = seq[samples, start][:, None]
        else:
            tokens = seq[samples[:, None], start[:, None] + np.arange(width)[None, :]]
        if self.guided:
            rows = None if full else np.concatenate([samples, samples + self.batch])
            tokens, start = np.concatenate([tokens, tokens]), np.concatenate([start, start])
        else:
            rows = None if full else samples
        return rows, tokens, start, (self.cond if full else self.cond[rows])

    def _timed(self, fn, *arrays):
        began = time.perf_counter()
        out = fn(*arrays)
        seconds = self.stats.seconds
        seconds[self.stage] = seconds.get(self.stage, 0.0) + time.perf_counter() - began
        return out

    def rollback(self, samples: np.ndarray, length: np.ndarray) -> None:
        lengths = self.cache.lengths.reshape(self.reps, self.batch)      # a view: [cond; uncond] rows
        if len(samples) == self.batch:
            np.minimum(lengths, length, out=lengths)
        else:
            lengths[:, samples] = np.minimum(lengths[:, samples], length)


def jacobi_cache_capacity(shape: ModelShape, window: int, batch: int, cache_limit) -> int | None:
    """The target cache of a Jacobi run: G + 1 positions of room past the sequence for batch > 1 (rows near the
    end would otherwise cap every row's window), or at batch 1 when the engines take the longer buffer whole
    (cache_limit inf); None: the sequence length."""
    room = shape.seq_len + window + 1
    return room if batch > 1 or (cache_limit is not None and room <= cache_limit) else None


def check_finite(name: str, a: np.ndarray, b: np.ndarray) -> None:
    """float64 sums of float32 outputs cannot overflow: finite iff every element is finite."""
    if not math.isfinite(np.add.reduce(a, None, np.float64) + np.add.reduce(b, None, np.float64)):
        raise EngineError(f"engine '{name}' returned NaN or inf; the engine or its inputs are broken "
                          "(re-export it, or try a lower --cfg / --temperature)")


def generate_tokens(engines, classes: np.ndarray, gen: GenerationConfig, rng: np.random.Generator,
                    stats: RunStats) -> tuple[np.ndarray, np.ndarray]:
    """Sample tokens [B, n, D] and the target entropy of each token [B, n] for class ids `classes`."""
    m = engines.manifest
    shape = ModelShape.from_config(m.config)
    total = check_request(gen, shape)
    classes = np.asarray(classes, np.int64)
    B, nc, G = len(classes), shape.n_cond, gen.gamma
    draft_rule, target_rule = token_rules(engines, gen, rng, B, shape.num_tokens + G + 1, stats)
    # position p holds the input of p, in float32: what the engines are fed (no conversion per call) and exactly
    # the values the acceptance test scores
    seq = np.zeros((B, nc + shape.num_tokens + G + 1, shape.token_dim), np.float32)
    # entropy of token j at column j; columns past a sample's accepted tokens may hold a verify's junk slots,
    # overwritten when those tokens are emitted (G + 1 spare columns so a verify never writes out of bounds)
    token_entropy = np.zeros((B, shape.num_tokens + G + 1))
    n = np.zeros(B, np.int64)                                             # accepted tokens per sample
    views = bool(getattr(engines, "cache_views", False))
    jacobi = gen.mode == "speculative" and gen.draft == "jacobi"
    # Jacobi feeds every row [last accepted token, guesses] from its own cache length, padded to the widest row:
    # room for G + 1 positions past the sequence keeps a row near the end from capping every other row's window
    # (the padding's keys land there, junk past the row's length). At batch 1 the row's own end is the cap anyway,
    # so the room is left out there unless the engines take the longer buffer whole (no copy either way)
    limit = getattr(engines, "cache_limit", None)
    # model-draft rounds verify and accept in one target_jacobi call where the engines have one (in_engine_acceptance)
    accept_engine = engines.target_jacobi if in_engine_acceptance(engines, gen) else None
    room = jacobi_cache_capacity(shape, G, B, limit) if jacobi or accept_engine is not None else None
    in_place = getattr(engines, "kv_in_place", frozenset())
    needs_room = bool(getattr(engines, "needs_cache_room", False))
    device = getattr(engines, "cache_device", None)     # the KV caches live on the engines' device (kv_cache.py)
    target = AREngine("target_verify", engines.target_verify, shape.target_layers, shape, classes, gen,
                      target_rule, stats, "verify", capacity=room, cache_views=views, cache_limit=limit,
                      in_place=in_place, needs_room=needs_room, device=device)
    rollout = getattr(engines, "rollouts", {}).get(G) if gen.mode == "speculative" and not jacobi else None
    draft = None if jacobi or gen.mode == "target" else AREngine(
        "draft_step", engines.draft_step, shape.draft_layers, shape, classes, gen, draft_rule, stats, "draft",
        rollout_capacity(m, G) if rollout is not None else None, cache_views=views, in_place=in_place,
        needs_room=needs_room, device=device)
    seq_windows = windows(seq, G)                    # [B, P - G + 1, G, D]: positions p .. p+G-1 of a row
    entropy_windows = windows(token_entropy, G + 1)  # [B, N + 1, G + 1]
    stopper = EarlyStop(gen.early_stop, B, m.calibration)
    # the eta prefill (fast-ardiff Algorithm 1) spares the model draft the first tokens; off by default: on the
    # shipped model the draft's acceptance is the same with and without it (measured), so it only costs target
    # calls. Jacobi has no draft calls to spare and its first round is a plain target step already
    prefill = (total if gen.mode != "speculative" else 0 if jacobi
               else min(total, int(round(gen.eta / 100 * shape.num_tokens))))
    one_model = draft if gen.mode == "draft" else target
    everyone = np.arange(B)
    ones = np.ones(B, np.int64)

    for j in range(prefill):  # one token per call from a single model (target-only / draft-only / eta prefill);
        end = np.full(B, nc + j)  # every sample has exactly j tokens here
        p, _ = one_model.predict(seq, everyone, end - 1, end, 1)
        seq[:, nc + j] = sample_gaussian(rng, p.mean[:, 0], p.sigma[:, 0])
        token_entropy[:, j] = p.entropy[:, 0]
        stopper.observe_target(everyone, p.entropy, ones)
    n += prefill
    if jacobi:
        jacobi_rounds(target, seq, token_entropy, n, total, nc, G, gen.coupling, rng, stats,
                      getattr(engines, "target_jacobi", None))

    while (act := np.flatnonzero(n < total)).size:
        R = len(act)
        na = n[act]
        base = nc + na                                 # position of token na[r], the first one this round makes
        # 1. draft up to gamma tokens (never past the end), stop early on low shallow entropy
        max_drafts = np.minimum(G, total - 1 - na)
        if rollout is not None:                        # one engine call drafts every token of the round
            noise = rng.standard_normal((R, G, shape.token_dim), dtype=np.float32)
            out = draft.rollout(rollout, G, seq, act, base, noise, stopper.threshold32(act), max_drafts)
            k = out.num_drafts.astype(np.int64)
            seq_windows[act, base] = out.drafts            # drafts past k[r] are junk, overwritten later
            drafts, q_mean, q_sigma, q_offset = out.drafts, out.draft_mean, out.draft_sigma, None
            stats.early_stops += int(np.count_nonzero(k < max_drafts))
        else:
            k, q_mean, q_sigma, q_offset = draft_with_steps(draft, stopper, seq, act, base, max_drafts, G, rng,
                                                            stats)
            drafts = seq_windows[act, base]
        # 2. one target call over [last accepted token, drafts]: p for tokens n .. n+k (slot k = bonus)
        # 3. accept a prefix, then the residual sample or the bonus token (in the same call with accept_engine)
        kmax = int(k.max())
        if accept_engine is not None and kmax:
            accepted, next_token, entropy = accept_drafts_in_engine(target, accept_engine, seq, act, base, k,
                                                                    q_mean, q_sigma, rng)
        else:
            p, _ = target.predict(seq, act, base - 1, base + k, kmax + 1)
            q = TokenDistribution(q_mean[:, :kmax].astype(np.float64), q_sigma[:, :kmax].astype(np.float64), None,
                                  None if q_offset is None else q_offset[:, :kmax])
            accepted, next_token = accept_drafts(rng, drafts[:, :kmax], k, p, q, gen.inner_temperature)
            entropy = p.entropy
        seq[act, base + accepted] = next_token
        entropy_windows[act, na, :kmax + 1] = entropy  # slots past `accepted` are rewritten later
        stopper.observe_target(act, entropy, accepted + 1)
        n[act] = na + accepted + 1
        target.rollback(act, base + accepted)          # = nc + n - 1: the new token is not fed yet
        draft.rollback(act, base + accepted)
        stats.record_round(k, accepted)
    stats.tokens += B * total
    return seq[:, nc: nc + total].copy(), token_entropy[:, :total]


def draft_with_steps(draft: AREngine, stopper: EarlyStop, seq, act, base, max_drafts, G: int, rng, stats):
    """Drafting with one draft_step call per token (engines without a draft_rollout of this gamma)."""
    R = len(act)
    k = np.zeros(R, np.int64)
    q_mean, q_sigma = np.zeros((R, G, seq.shape[-1])), np.ones((R, G))
    q_offset = None                                    # [R, G] once a draft has a log_offset (diffusion heads)
    drafting = max_drafts > 0
    for i in range(G):
        idx = np.flatnonzero(drafting)
        if not idx.size:
            break
        every = len(idx) == R
        rows = act if every else act[idx]
        end = (base if every else base[idx]) + i
        q, shallow = draft.predict(seq, rows, end - 1, end, 1)
        if q.log_offset is not None and q_offset is None:
            q_offset = np.zeros((R, G))
        stop = stopper.should_stop(rows, shallow[:, 0])
        if stop.any():
            keep, go = idx[~stop], ~stop
            seq[act[keep], base[keep] + i] = sample_gaussian(rng, q.mean[go, 0], q.sigma[go, 0])
            drafting[idx[stop]] = False
            stats.early_stops += int(stop.sum())
        else:
            keep, go = (slice(None), slice(None)) if every else (idx, slice(None))
            seq[rows, end] = sample_gaussian(rng, q.mean[:, 0], q.sigma[:, 0])
        q_mean[keep, i], q_sigma[keep, i] = q.mean[go, 0], q.sigma[go, 0]
        if q_offset is not None:
            q_offset[keep, i] = q.log_offset[go, 0]
        k[keep] += 1
        drafting &= k < max_drafts
    return k, q_mean, q_sigma, q_offset


def rollout_capacity(manifest, gamma: int) -> int:
    """Cache positions of the draft when it runs draft_rollout engines: their static cache axis."""
    entry = manifest.engines.get(manifest.rollout_engines().get(gamma, ""))
    cache = (getattr(entry, "profile", None) or {}).get("cache")
    shape = ModelShape.from_config(manifest.config)
    return int(cache[-1]) if cache else shape.seq_len + gamma


def generate(engines, classes, gen: GenerationConfig, stats: RunStats | None = None,
             max_batch: int | None = None, on_images=None) -> tuple[np.ndarray | None, RunStats]:
    """Tokens for every class id (in engine-sized chunks), then the decoder when all N tokens were asked for.
    Returns (images [B, C, H, W] in [-1, 1], or tokens [B, n, D] when gen.num_tokens is set; stats).
    on_images(images, first): called with each decoded chunk and the index of its first image instead of keeping
    it (a large run streams its images to disk); the returned images are then None. Same images either way."""
    stats = stats or RunStats(mode=gen.mode, early_stop=gen.early_stop, gamma=gen.gamma, draft=gen.draft)
    classes = np.asarray(classes, np.int64)
    check_request(gen, ModelShape.from_config(engines.manifest.config), verify_limit(engines))
    if gen.mode == "speculative" and gen.draft == "jacobi" and engines.manifest.family != "drift-ar":
        raise GenerationError(f"--draft jacobi needs explicit Gaussian tokens (family drift-ar); these engines are "
                              f"of family '{engines.manifest.family}': use --draft model or --mode target")
    needs_draft = gen.mode == "draft" or (gen.mode == "speculative" and gen.draft == "model")
    if needs_draft and "draft_step" not in engines.manifest.engines:
        raise GenerationError("these engines have no draft model (exported with --no-draft); run with "
                              "--draft jacobi or --mode target, or re-export without --no-draft")
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
        stats.decode_calls += 1
        if not np.isfinite(images).all():
            raise EngineError("engine 'decoder' returned NaN or inf; re-export the engines")
        if on_images is not None:
            on_images(images, lo)
        else:
            outputs.append(images)
    stats.images += len(classes)
    stats.total_seconds += time.perf_counter() - started
    stats.seconds["host"] = max(0.0, stats.total_seconds - sum(v for s, v in stats.seconds.items() if s != "host"))
    return (np.concatenate(outputs) if outputs else None), stats

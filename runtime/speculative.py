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

import numpy as np
from tqdm import tqdm

from fastardiff.errors import EngineError

from .ar_engine import AREngine, round_results
from .arrays import DeviceArrays, HostArrays
from .early_stop import EarlyStop
from .generation import (DRAFTS, MODES, GenerationConfig, GenerationError, ModelShape,  # noqa: F401  (re-exported)
                         check_request, in_engine_acceptance, next_round, on_accelerator, round_limit,
                         samples_per_call, verify_limit)
from .jacobi import accept_drafts_in_engine, jacobi_rounds
from .kv_cache import windows
from .sampling import TokenDistribution, accept_drafts, sample_gaussian
from .stats import RunStats
from .token_rules import token_rules


def jacobi_cache_capacity(shape: ModelShape, window: int, batch: int, cache_limit) -> int | None:
    """The target cache of a Jacobi run: G + 1 positions of room past the sequence for batch > 1 (rows near the
    end would otherwise cap every row's window), or at batch 1 when the engines take the longer buffer whole
    (cache_limit inf); None: the sequence length."""
    room = shape.seq_len + window + 1
    return room if batch > 1 or (cache_limit is not None and room <= cache_limit) else None


def generate_tokens(engines, classes: np.ndarray, gen: GenerationConfig, rng: np.random.Generator,
                    stats: RunStats) -> tuple[np.ndarray, np.ndarray]:
    """Sample tokens [B, n, D] and the target entropy of each token [B, n] for class ids `classes`."""
    m = engines.manifest
    shape = ModelShape.from_config(m.config)
    total = check_request(gen, shape)
    classes = np.asarray(classes, np.int64)
    B, nc, G = len(classes), shape.n_cond, gen.gamma
    draft_rule, target_rule = token_rules(engines, gen, rng, B, shape.num_tokens + G + 1, stats)
    jacobi = gen.mode == "speculative" and gen.draft == "jacobi"
    # model-draft rounds verify and accept in one target_jacobi call where the engines have one (in_engine_acceptance)
    accept_engine = engines.target_jacobi if in_engine_acceptance(engines, gen) else None
    accelerator = on_accelerator(engines)    # sizes the in-graph residual proposals (jacobi.residual_proposals)
    rollout = getattr(engines, "rollouts", {}).get(G) if gen.mode == "speculative" and not jacobi else None
    arrays = loop_arrays(engines, gen, rng, jacobi, rollout is not None and accept_engine is not None)
    # position p holds the input of p, in float32: what the engines are fed (no conversion per call) and exactly
    # the values the acceptance test scores (on the engines' device with the device loop, runtime/arrays.py)
    seq = arrays.zeros((B, nc + shape.num_tokens + G + 1, shape.token_dim))
    # entropy of token j at column j; columns past a sample's accepted tokens may hold a verify's junk slots,
    # overwritten when those tokens are emitted (G + 1 spare columns so a verify never writes out of bounds)
    token_entropy = np.zeros((B, shape.num_tokens + G + 1))
    n = np.zeros(B, np.int64)                                             # accepted tokens per sample
    views = bool(getattr(engines, "cache_views", False))
    # Jacobi feeds every row [last accepted token, guesses] from its own cache length, padded to the widest row:
    # room for G + 1 positions past the sequence keeps a row near the end from capping every other row's window
    # (the padding's keys land there, junk past the row's length). At batch 1 the row's own end is the cap anyway,
    # so the room is left out there unless the engines take the longer buffer whole (no copy either way)
    limit = getattr(engines, "cache_limit", None)
    room = jacobi_cache_capacity(shape, G, B, limit) if jacobi or accept_engine is not None else None
    in_place = getattr(engines, "kv_in_place", frozenset())
    needs_room = bool(getattr(engines, "needs_cache_room", False))
    device = getattr(engines, "cache_device", None)     # the KV caches live on the engines' device (kv_cache.py)
    pool = getattr(engines, "cache_pool", None)          # host buffers reused run after run (kv_cache.py)
    target = AREngine("target_verify", engines.target_verify, shape.target_layers, shape, classes, gen,
                      target_rule, stats, "verify", capacity=room, cache_views=views, cache_limit=limit,
                      in_place=in_place, needs_room=needs_room, device=device, arrays=arrays, pool=pool)
    draft = None if jacobi or gen.mode == "target" else AREngine(
        "draft_step", engines.draft_step, shape.draft_layers, shape, classes, gen, draft_rule, stats, "draft",
        rollout_capacity(m, G) if rollout is not None else None, cache_views=views, in_place=in_place,
        needs_room=needs_room, device=device, arrays=arrays, pool=pool)
    seq_windows = arrays.windows(seq, G)             # [B, P - G + 1, G, D]: positions p .. p+G-1 of a row
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
        seq[:, nc + j] = sample_first_slot(arrays, rng, p)
        entropy, = round_results(arrays, (one_model,), p.entropy)
        token_entropy[:, j] = entropy[:, 0]
        stopper.observe_target(everyone, entropy, ones)
    n += prefill
    if jacobi:
        prior = m.jacobi_prior                       # the first window's proposal, when calibrated
        if prior is not None:
            prior = (prior[0][classes], prior[1][classes] * np.float32(gen.temperature))
        jacobi_rounds(target, seq, token_entropy, n, total, nc, G, gen.coupling, rng, stats,
                      getattr(engines, "target_jacobi", None), accelerator, prior)

    rounds, limit = 0, round_limit(n, total)
    while (act := np.flatnonzero(n < total)).size:
        rounds = next_round(rounds, limit, "speculative")
        R = len(act)
        na = n[act]
        base = nc + na                                 # position of token na[r], the first one this round makes
        # 1. draft up to gamma tokens (never past the end), stop early on low shallow entropy
        max_drafts = np.minimum(G, total - 1 - na)
        if rollout is not None:                        # one engine call drafts every token of the round
            noise = arrays.normal(rng, (R, G, shape.token_dim))
            out = draft.rollout(rollout, G, seq, act, base, noise, stopper.threshold32(act), max_drafts)
            k = out.num_drafts                             # on the device loop: read back with the round's results
            seq_windows[act, base] = out.drafts            # drafts past k[r] are junk, overwritten later
            drafts, q_mean, q_sigma, q_offset = out.drafts, out.draft_mean, out.draft_sigma, None
        else:
            k, q_mean, q_sigma, q_offset = draft_with_steps(draft, stopper, seq, act, base, max_drafts, G, rng,
                                                            stats)
            drafts = seq_windows[act, base]
        # 2. one target call over [last accepted token, drafts]: p for tokens n .. n+k (slot k = bonus)
        # 3. accept a prefix, then the residual sample or the bonus token (in the same call with accept_engine,
        # fed every row's max_drafts slots: no draft count needed on the host before it)
        if accept_engine is not None and (kmax := int(max_drafts.max())):
            accepted, k, next_token, entropy = accept_drafts_in_engine(target, accept_engine, seq, act, base, k,
                                                                       kmax, q_mean, q_sigma, rng, (draft,),
                                                                       accelerator)
        elif arrays.on_device:            # the last token of every row: no drafts, a plain target step (the draws
            kmax, k, accepted = 0, np.zeros(R, np.int64), np.zeros(R, np.int64)   # accept_drafts makes for none)
            p, _ = target.predict(seq, act, base - 1, base, 1)
            next_token = sample_first_slot(arrays, rng, p).float()
            entropy, = round_results(arrays, (target, draft), p.entropy)
        else:
            k = np.asarray(k).astype(np.int64) if rollout is not None else k
            kmax = int(k.max())
            p, _ = target.predict(seq, act, base - 1, base + k, kmax + 1)
            q = TokenDistribution(q_mean[:, :kmax].astype(np.float64), q_sigma[:, :kmax].astype(np.float64), None,
                                  None if q_offset is None else q_offset[:, :kmax])
            accepted, next_token = accept_drafts(rng, drafts[:, :kmax], k, p, q, gen.inner_temperature)
            entropy = p.entropy
        if rollout is not None:
            stats.early_stops += int(np.count_nonzero(k < max_drafts))
        seq[act, base + accepted] = next_token
        entropy_windows[act, na, :kmax + 1] = entropy  # slots past `accepted` are rewritten later
        stopper.observe_target(act, entropy, accepted + 1)
        n[act] = na + accepted + 1
        target.rollback(act, base + accepted)          # = nc + n - 1: the new token is not fed yet
        draft.rollback(act, base + accepted)
        stats.record_round(k, accepted)
    stats.tokens += B * total
    for engine in (target, draft):
        if engine is not None:
            engine.cache.release()
    return np.array(arrays.readback(seq[:, nc: nc + total])[0]), token_entropy[:, :total]


def sample_first_slot(arrays, rng: np.random.Generator, p: TokenDistribution):
    """x ~ p at each row's first slot, wherever `arrays` keeps the loop (sampling.sample_gaussian's draw: the same
    float64 normals from rng on the host path)."""
    mean = p.mean[:, 0]
    return mean + p.sigma[:, 0, None] * arrays.normal(rng, tuple(mean.shape), np.float64)


def loop_arrays(engines, gen: GenerationConfig, rng: np.random.Generator, jacobi: bool, model_on_device: bool):
    """Where the loop keeps its token buffer and engine outputs (runtime/arrays.py): on the engines' device when
    the backend offers one (`loop_device`) and every step of the run can stay there: plain Gaussian tokens, and
    target-only, Jacobi with its target_jacobi engine, or the model draft with draft_rollout engines and engine
    acceptance. Else the host."""
    device = getattr(engines, "loop_device", None)
    if device is None or engines.manifest.family != "drift-ar" or gen.mode == "draft":
        return HostArrays()
    if gen.mode == "speculative" and not (model_on_device if not jacobi else
                                          "target_jacobi" in engines.manifest.engines):
        return HostArrays()
    return DeviceArrays(device, rng, getattr(engines, "loop_noise", "host"))


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
    chunk = samples_per_call(engines, gen.cfg_scale, max_batch)   # every call fits the engines' batch profile
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

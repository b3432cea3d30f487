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

import dataclasses
import time

import numpy as np
import numpy.random  # noqa: F401  (numpy loads it lazily: at import, not inside a run's first timed image)
from tqdm import tqdm

from fastardiff.errors import EngineError

from .adaptive import Adapter, measured_rounds, parse_label, probes_pay
from .ar_engine import AREngine
from .arrays import DeviceArrays, HostArrays
from .early_stop import EarlyStop
from .generation import (DRAFTS, MODES, GenerationConfig, GenerationError, ModelShape,  # noqa: F401  (re-exported)
                         check_draft_supported, check_request, in_engine_acceptance, on_accelerator, samples_per_call,
                         verify_limit)
from .proposals import PROPOSALS, ModelDraft, Proposal, ProposalEngines, SingleModel, TokenLoop
from .stats import RunStats
from .token_rules import token_rules


def jacobi_cache_capacity(shape: ModelShape, window: int, batch: int, cache_limit) -> int | None:
    """The target cache of a Jacobi run: G + 1 positions of room past the sequence for batch > 1 (rows near the
    end would otherwise cap every row's window), or at batch 1 when the engines take the longer buffer whole
    (cache_limit inf); None: the sequence length."""
    room = shape.seq_len + window + 1
    return room if batch > 1 or (cache_limit is not None and room <= cache_limit) else None


def generate_tokens(engines, classes: np.ndarray, gen: GenerationConfig, rng: np.random.Generator,
                    stats: RunStats, adapter: Adapter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample tokens [B, n, D] and the target entropy of each token [B, n] for class ids `classes`: fast-ardiff's
    Algorithm 1, each round one proposal kind's propose / verify / accept / roll back (runtime/proposals.py);
    with gen.alternative, `adapter` (one for the whole run) switches kinds as the measured rates say
    (runtime/adaptive.py)."""
    loop, proposals = start_loop(engines, np.asarray(classes, np.int64), gen, rng, stats,
                                 adapter.policy.probe_all_rows if adapter is not None else False)
    # the eta prefill (fast-ardiff Algorithm 1) spares the model draft the first tokens; off by default: on the
    # shipped model the draft's acceptance is the same with and without it (measured), so it only costs target
    # calls. Jacobi has no draft calls to spare and its first round is a plain target step already
    if isinstance(proposals[0], ModelDraft):
        steps = SingleModel(loop)
        for _ in range(min(loop.total, round(gen.eta / 100 * loop.shape.num_tokens))):
            steps.round(np.arange(loop.B))
    if len(proposals) == 1:
        measured_rounds(loop, proposals[0], stats)
    else:
        (adapter or Adapter()).run(loop, *proposals, stats)
    stats.tokens += loop.B * loop.total
    loop.release()
    return loop.tokens()


def start_loop(engines, classes: np.ndarray, gen: GenerationConfig, rng: np.random.Generator,
               stats: RunStats, probe_all_rows: bool = False) -> tuple[TokenLoop, list[Proposal]]:
    """The run's buffers, its AR engines with their caches, and its proposal kinds: the one the request asks
    for, then the alternative it adapts to (gen.alternative), if any."""
    caps, m = engines.capabilities, engines.manifest
    shape = ModelShape.from_config(m.config)
    total = check_request(gen, shape)
    B, specs = len(classes), proposal_specs(engines, gen, len(classes), probe_all_rows)
    G = max(g for _, g in specs)                      # the widest proposal: its spare positions
    draft_rule, target_rule = token_rules(engines, gen, rng, B, shape.num_tokens + G + 1, stats)
    # model-draft rounds verify and accept in one target_jacobi call where the engines have one (in_engine_acceptance)
    model = {g: (engines.rollouts[g] if g in caps.rollout_gammas else None,
                 engines.target_jacobi if in_engine_acceptance(engines, speculating(gen, "model", g)) else None)
             for kind, g in specs if kind == "model"}
    arrays = loop_arrays(engines, gen, rng, [kind for kind, _ in specs],
                         all(rollout is not None and accept is not None for rollout, accept in model.values()))
    # Jacobi feeds every row [last accepted token, guesses] from its own cache length, padded to the widest row
    # (jacobi_cache_capacity); so does the in-engine acceptance
    fed = [g for kind, g in specs if kind == "jacobi" or kind == "model" and model[g][1] is not None]
    room = jacobi_cache_capacity(shape, max(fed), B, caps.cache_limit) if fed else None
    cache = dict(cache_views=caps.cache_views, in_place=caps.kv_in_place, needs_room=caps.needs_cache_room,
                 device=caps.cache_device, arrays=arrays, pool=caps.cache_pool)
    target = AREngine("target_verify", engines.target_verify, shape.target_layers, shape, classes, gen, target_rule,
                      stats, "verify", capacity=room, cache_limit=caps.cache_limit, **cache)
    rollouts = [g for g, (rollout, _) in model.items() if rollout is not None]
    draft = None if not model and specs[0][0] != "draft" else AREngine(
        "draft_step", engines.draft_step, shape.draft_layers, shape, classes, gen, draft_rule, stats, "draft",
        rollout_capacity(m, max(rollouts)) if rollouts else None, **cache)
    loop = TokenLoop(shape, gen, rng, stats, arrays, total, target, draft, EarlyStop(gen.early_stop, B, m.calibration),
                     caps, G)
    prior = m.jacobi_prior if any(kind == "jacobi" for kind, _ in specs) else None
    if prior is not None:                            # the Jacobi windows' proposal, when calibrated
        prior = (prior[0][classes], prior[1][classes] * np.float32(gen.temperature))
    jacobi_engine = engines.target_jacobi if caps.target_jacobi else None
    return loop, [PROPOSALS[kind](loop, ProposalEngines(kind, g, *model.get(g, (None, None)), jacobi_engine, prior))
                  for kind, g in specs]


def proposal_specs(engines, gen: GenerationConfig, rows: int, probe_all_rows: bool = False) -> list[tuple[str, int]]:
    """[(kind, gamma)] a chunk of `rows` rows runs: the requested kind, then gen.alternative where the chunk sets
    it up (adapts)."""
    specs = [(proposal_kind(gen), gen.gamma)]
    if gen.alternative is not None and (alt := check_alternative(engines, gen)) not in specs \
            and adapts(gen, alt, rows, probe_all_rows):
        specs.append(alt)
    return specs


def adapts(gen: GenerationConfig, alternative: tuple, rows: int, probe_all_rows: bool = False) -> bool:
    """Whether a chunk of `rows` rows sets up its alternative kind (adaptive.probes_pay): one it would never probe
    (speculation beside target-only over several rows) is left out, with its buffers and the wider KV cache its
    windows need (attention over the spare positions made such target-only runs ~8 % slower at 16 images)."""
    kind, g = alternative
    return probes_pay(proposal_kind(gen), "target" if kind == "target" else f"{kind}:{g}", rows, probe_all_rows)


def proposal_kind(gen: GenerationConfig) -> str:
    """target (target-only), draft (draft-only), model or jacobi (speculative)."""
    return gen.draft if gen.mode == "speculative" else gen.mode


def speculating(gen: GenerationConfig, draft: str, gamma: int) -> GenerationConfig:
    return dataclasses.replace(gen, mode="speculative", draft=draft, gamma=gamma)


def check_alternative(engines, gen: GenerationConfig) -> tuple[str, int]:
    """(kind, gamma) of gen.alternative, which these engines and this request can run (GenerationError)."""
    kind, g = parse_label(gen.alternative)
    if gen.mode == "draft":
        raise GenerationError("a draft-only run does not adapt (it is a test reference); drop the alternative")
    if kind != "target":
        check_request(speculating(gen, kind, g), ModelShape.from_config(engines.manifest.config),
                      verify_limit(engines))
        check_proposal(engines, kind)
    return (kind, g) if kind != "target" else ("target", gen.gamma)


def check_proposal(engines, draft: str) -> None:
    """Whether these engines can propose with `draft` (GenerationError naming the fix)."""
    check_draft_supported(engines.manifest, "speculative", draft)


def loop_arrays(engines, gen: GenerationConfig, rng: np.random.Generator, kinds: list, model_on_device: bool):
    """Where the loop keeps its token buffer and engine outputs (runtime/arrays.py): on the engines' device when
    the backend offers one (`loop_device`) and every step of every kind the run may use can stay there: plain
    Gaussian tokens, and target-only, Jacobi with its target_jacobi engine, or the model draft with draft_rollout
    engines and engine acceptance. Else the host."""
    caps = engines.capabilities
    if caps.loop_device is None or engines.manifest.family != "drift-ar" or "draft" in kinds:
        return HostArrays()
    in_graph_jacobi = "target_jacobi" in engines.manifest.engines
    if "model" in kinds and not model_on_device or "jacobi" in kinds and not in_graph_jacobi:
        return HostArrays()
    return DeviceArrays(caps.loop_device, rng, caps.loop_noise)


def rollout_capacity(manifest, gamma: int) -> int:
    """Cache positions of the draft when it runs draft_rollout engines: their static cache axis."""
    entry = manifest.engines.get(manifest.rollout_engines().get(gamma, ""))
    cache = (getattr(entry, "profile", None) or {}).get("cache")
    shape = ModelShape.from_config(manifest.config)
    return int(cache[-1]) if cache else shape.seq_len + gamma


def warm_up(engines, classes: np.ndarray, gen: GenerationConfig, chunk: int) -> dict:
    """The engine call shapes a run will use, each called before the run is timed: every proposal kind the run may
    use (the planned one, and gen.alternative where the chunk sets it up) at the first chunk's batch (below: how
    many tokens), then the decoder. In a fresh process the first call of an engine at a shape is slower (ONNX Runtime plans and allocates
    its memory for the shape; the pooled KV buffers are mapped and bound): measured ~3-4 ms of a 1-image run's
    ~9 ms (Jacobi) or ~18 ms (target-only) on the shipped model, which a cached-plan run paid and a freshly planned
    one (warm from the plan's timing) did not. Its own random stream and statistics: the run's images are the
    same with and without it. Returns {seconds, target_calls, draft_calls, decode_calls} (RunStats.warm_up)."""
    started = time.perf_counter()
    part = np.asarray(classes, np.int64)[:chunk]
    shape = ModelShape.from_config(engines.manifest.config)
    kinds = [gen] + [dataclasses.replace(gen, mode="target") if kind == "target" else speculating(gen, kind, g)
                     for kind, g in proposal_specs(engines, gen, len(part))[1:]]
    stats = RunStats(mode=gen.mode, early_stop=gen.early_stop, gamma=gen.gamma, draft=gen.draft)
    for kind in kinds:
        # target-only: two steps (one shape). Speculation: its feeds narrow as windows near the end of the image,
        # a shape per width: one whole image where the chunk is one row (~9 ms on the shipped model; measured
        # 9.15 -> 8.7 ms for the run after it, as warm as a freshly planned run), else a first and a full-window
        # round (the shapes of most rounds; a whole chunk would double a large run's time)
        tokens = 2 if kind.mode == "target" else shape.num_tokens if len(part) == 1 else kind.gamma + 2
        generate_tokens(engines, part, dataclasses.replace(kind, num_tokens=min(shape.num_tokens, tokens),
                                                           alternative=None), np.random.default_rng(0), stats)
    if gen.num_tokens is None:
        engines.decoder(np.zeros((len(part), shape.num_tokens, shape.token_dim), np.float32),
                        np.zeros((len(part), shape.num_tokens), np.float32), part)
        stats.decode_calls += 1
    return {"seconds": round(time.perf_counter() - started, 6), "target_calls": stats.target_calls,
            "draft_calls": stats.draft_calls, "decode_calls": stats.decode_calls}


def generate(engines, classes, gen: GenerationConfig, stats: RunStats | None = None,
             max_batch: int | None = None, on_images=None, adapter: Adapter | None = None, warm: bool = False
             ) -> tuple[np.ndarray | None, RunStats]:
    """Tokens for every class id (in engine-sized chunks), then the decoder when all N tokens were asked for.
    Returns (images [B, C, H, W] in [-1, 1], or tokens [B, n, D] when gen.num_tokens is set; stats).
    on_images(images, first): called with each decoded chunk and the index of its first image instead of keeping
    it (a large run streams its images to disk); the returned images are then None. Same images either way.
    adapter: the switching state of gen.alternative (runtime/adaptive.py; a serving replica keeps one per plan
    across requests); None: a fresh one for this run.
    warm: call every engine at the run's first shapes before the timing starts (warm_up; a command's one run in a
    fresh process: its stats then say what the warm-up took, outside total_seconds)."""
    stats = stats or RunStats(mode=gen.mode, early_stop=gen.early_stop, gamma=gen.gamma, draft=gen.draft)
    classes = np.asarray(classes, np.int64)
    check_request(gen, ModelShape.from_config(engines.manifest.config), verify_limit(engines))
    if gen.mode != "target":
        check_proposal(engines, "model" if gen.mode == "draft" else gen.draft)
    if gen.alternative is not None:
        check_alternative(engines, gen)
        adapter = adapter or Adapter(plan_rates=gen.plan_rates)   # one for the run: a switch carries over to the
                                                                  # next chunk
    chunk = samples_per_call(engines, gen.cfg_scale, max_batch)   # every call fits the engines' batch profile
    if warm:
        stats.warm_up = warm_up(engines, classes, gen, chunk)
    rng = np.random.default_rng(gen.seed)
    started = time.perf_counter()
    outputs = []
    starts = range(0, len(classes), chunk)
    # a bar only over several chunks: a tqdm, even disabled, makes its multiprocessing lock on first use (~2 ms)
    for lo in tqdm(starts, desc="generate", unit="batch", leave=False) if len(starts) > 1 else starts:
        part = classes[lo: lo + chunk]
        tokens, entropy = generate_tokens(engines, part, gen, rng, stats, adapter)
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

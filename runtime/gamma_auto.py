"""`--gamma auto`: choose the proposal kind (model draft or Jacobi), its length, or target-only, to maximise
expected tokens per second.

Model draft, length g, from the per-position acceptance a_1, a_2, ... calibrated on the trained model
(a_i = P(draft i accepted | drafts before it accepted), stored in the checkpoint's and the manifest's calibration
as `acceptance_by_position`, one curve per guidance scale):
    tau(g) = 1 + a_1 + a_1 a_2 + ... + a_1 ... a_g,   round cost t_rollout(g) + t_verify(g + 1) + h_round.
Jacobi, window L (runtime/jacobi.py): tau(L) = the calibrated tokens per target call of the real Jacobi loop
(`jacobi_tokens_per_call`), round cost t_verify(L + 1) + h_jacobi (t_jacobi(L), the target_jacobi engine's
call, where the engines have it): no draft call at all.
Target-only costs t_step + h_step per token. Engine calls are timed on the loaded engines in a short warm-up at
the requested batch; the host work per round / per step (the loop's numpy sampling, acceptance and bookkeeping)
is measured by short real generations (16 tokens). Every timing is interleaved across the candidates
(A B C A B C ..., the median of each), so a busy machine's stall cannot favour one of them.
Predicted speedup = tau (t_step + h_step) / round cost.
The prediction ranks; whole images decide (`confirm_by_runs`): the best predicted candidate of each proposal kind
runs against target-only, interleaved, and the fastest measured one runs only where it is at least `margin`
(default 1.10) faster than target-only: never slower; otherwise target-only, and the choice says why. (The model
alone had over-predicted Jacobi at batch 8 on this CPU: 1.12-1.23x predicted, 0.92-1.17x measured.)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("fastardiff.runtime")

WARMUP_CALLS = 2
TIMED_CALLS = 7
HOST_RUNS = 3       # short generations timed for the host work per call (median)
CONFIRM_RUNS = 5    # whole-image generations per finalist and target-only when confirming (median)
CONFIRM_BUDGET_S = 3.0  # fewer of them (>= 2) where CONFIRM_RUNS rounds would take longer than this
FINALIST_FLOOR = 0.8  # a kind whose best prediction is below this is not run (no cold-timing error is that large)


@dataclass
class GammaChoice:
    gamma: int | None                 # None: target-only
    reason: str
    target_step_ms: float = 0.0
    candidates: list = field(default_factory=list)   # {draft, gamma, tokens_per_round, rollout_ms, verify_ms, ...}
    draft: str = "model"              # what proposes: the draft model or the target's own Jacobi guesses

    @property
    def mode(self) -> str:
        return "target" if self.gamma is None else "speculative"

    def table(self) -> str:
        lines = [f"gamma auto: {self.reason}",
                 f"  target-only {self.target_step_ms:.3f} ms/token (engine + host)",
                 "  draft   gamma  tokens/round  rollout ms  verify ms  host ms  predicted speedup  measured"]
        for c in self.candidates:
            measured = f"{c['measured_speedup']:>8.3f}" if "measured_speedup" in c else f"{'-':>8}"
            lines.append(f"  {c.get('draft', 'model'):<6}  {c['gamma']:>5}  {c['tokens_per_round']:>12.3f}  "
                         f"{c['rollout_ms']:>10.3f}  {c['verify_ms']:>9.3f}  {c.get('host_ms', 0.0):>7.3f}  "
                         f"{c['speedup']:>17.3f}  {measured}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"gamma": self.gamma, "mode": self.mode, "draft": self.draft, "reason": self.reason,
                "target_step_ms": self.target_step_ms, "candidates": self.candidates}


def acceptance_curve(calibration: dict, cfg_scale: float) -> list[float] | None:
    """The calibrated per-position acceptance for the guidance scale nearest `cfg_scale` (None if absent)."""
    curves = (calibration.get("extra") or {}).get("acceptance_by_position") or {}
    if not curves:
        return None
    scale = min(curves, key=lambda k: abs(float(k) - cfg_scale))
    return [min(max(float(a), 0.0), 1.0) for a in curves[scale]]


def jacobi_tokens(calibration: dict, cfg_scale: float) -> dict[int, float] | None:
    """{L: calibrated Jacobi tokens per target call} for the guidance scale nearest `cfg_scale` (None if absent)."""
    tables = (calibration.get("extra") or {}).get("jacobi_tokens_per_call") or {}
    if not tables:
        return None
    scale = min(tables, key=lambda k: abs(float(k) - cfg_scale))
    return {int(w): max(float(t), 1.0) for w, t in tables[scale].items()}


def expected_tokens(curve: list[float], gamma: int) -> float:
    """tau(g) = 1 + sum_i prod_{j<=i} a_j; positions past the curve reuse its last value."""
    tokens, run = 1.0, 1.0
    for i in range(gamma):
        run *= curve[min(i, len(curve) - 1)] if curve else 0.0
        tokens += run
    return tokens


def interleaved_median_ms(calls: dict, repeats: int = TIMED_CALLS) -> dict:
    """{key: median ms of calls[key]()}, timed round-robin (A B C A B C ...) after WARMUP_CALLS each, so a stall
    of a busy machine lands on every engine alike instead of on whichever was being timed then."""
    for call in calls.values():
        for _ in range(WARMUP_CALLS):
            call()
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return {key: 1000 * float(np.median(t)) for key, t in times.items()}


def time_engine_calls(engines, batch: int, cfg_scale: float, gammas, verify_widths=(), jacobi_windows=()) -> dict:
    """Per-call milliseconds at `batch` samples (2x rows with guidance), mid-sequence cache lengths:
    {"step": target 1-token step, ("verify", k): k-token verify, ("rollout", g): draft_rollout(g),
    ("jacobi", L): a target_jacobi round of window L (when the engines have one: the call Jacobi rounds make)}.
    A call over more tokens of the same network is never cheaper than the step: timings that say so are noise
    and are raised to the step's."""
    from .speculative import ModelShape, jacobi_cache_capacity, rollout_capacity

    cfg = engines.manifest.config
    shape = ModelShape.from_config(cfg)
    rows = batch * (2 if cfg_scale != 1.0 else 1)
    cond = np.zeros(rows, np.int64)
    if cfg_scale != 1.0:
        cond[batch:] = shape.num_classes
    mid = shape.seq_len // 2
    lengths = np.full(rows, mid, np.int64)
    # inputs shaped as the loop feeds them: the whole cache buffer (half of it valid), token-like values
    rng = np.random.default_rng(0)

    device = getattr(engines, "cache_device", None)    # caches where the loop keeps them (runtime/kv_cache.py)

    def cache(layers, capacity):
        a = rng.standard_normal((layers, rows, shape.heads, capacity, shape.head_dim), dtype=np.float32)
        if device is None:
            return a
        import torch

        return torch.from_numpy(a).to(device)

    t_cache = cache(shape.target_layers, shape.seq_len)

    def verify(k):
        tokens = rng.standard_normal((rows, k, shape.token_dim), dtype=np.float32)
        return lambda: engines.target_verify(tokens, lengths, t_cache, t_cache, cond)

    calls = {"step": verify(1)}
    for k in sorted({g + 1 for g in gammas} | set(verify_widths)):
        calls[("verify", k)] = verify(k)
    rollouts = getattr(engines, "rollouts", {})
    scalars = (np.ones(1, np.float32), np.full(1, cfg_scale, np.float32))

    def rollout(fn, g):
        d_cache = cache(shape.draft_layers, rollout_capacity(engines.manifest, g))
        tokens = rng.standard_normal((rows, 1, shape.token_dim), dtype=np.float32)
        noise = rng.standard_normal((batch, g, shape.token_dim), dtype=np.float32)
        threshold = np.full(batch, -np.inf, np.float32)
        max_drafts = np.full(batch, g, np.int64)
        return lambda: fn(tokens, lengths, d_cache, d_cache, cond, noise, threshold, max_drafts, *scalars)

    for g in gammas:
        if g in rollouts:
            calls[("rollout", g)] = rollout(rollouts[g], g)
    jacobi = getattr(engines, "target_jacobi", None) if jacobi_windows else None
    if jacobi is not None:
        from .generation import on_accelerator
        from .jacobi import residual_proposals

        c, d, flag = residual_proposals(batch, on_accelerator(engines)), shape.token_dim, np.ones(1, np.float32)

        def jacobi_round(w):
            sampling = (np.zeros((batch, w, d), np.float32), np.ones((batch, w), np.float32), np.full(batch, w),
                        np.full((batch, w), 0.5, np.float32), np.zeros((batch, w + 1, d), np.float32),
                        np.zeros((batch, w + 1, c, d), np.float32), np.full((batch, w + 1, c), 0.5, np.float32))
            tokens = rng.standard_normal((rows, w + 1, shape.token_dim), dtype=np.float32)
            room = jacobi_cache_capacity(shape, w, batch, getattr(engines, "cache_limit", None))
            kv = t_cache if room is None else cache(shape.target_layers, room)
            return lambda: jacobi(tokens, lengths, kv, kv, cond, *sampling, *scalars, flag)

        for w in jacobi_windows:
            calls[("jacobi", w)] = jacobi_round(w)
    out = interleaved_median_ms(calls)
    for key in out:
        if key != "step" and key[0] in ("verify", "jacobi"):
            out[key] = max(out[key], out["step"])
    return out


def host_ms(engines, batch: int, cfg_scale: float, runs: dict, tokens: int = 16) -> dict:
    """Host ms per target call of each run {key: (mode, draft, gamma)}: the median over HOST_RUNS short real
    generations after a warm-up."""
    return _per_call_ms(engines, batch, cfg_scale, runs, tokens, "host")


def warm_step_ms(engines, batch: int, cfg_scale: float, tokens: int = 16) -> float:
    """Engine milliseconds per target step of real target-only generations, the median of HOST_RUNS after a
    warm-up: the loop runs its steps back to back on one warm session, while time_engine_calls times every call
    interleaved with the other engines, cold (measured here: 1.27 ms against 0.53 ms at batch 1)."""
    return _per_call_ms(engines, batch, cfg_scale, {"step": ("target", "model", 1)}, tokens, "verify")["step"]


def _per_call_ms(engines, batch: int, cfg_scale: float, runs: dict, tokens: int, stage: str) -> dict:
    """Milliseconds of `stage` (RunStats.seconds) per target call of each run {key: (mode, draft, gamma)}: the
    median over HOST_RUNS short real generations of `tokens` tokens after a warm-up, interleaved so that one stall
    does not decide."""
    from .generation import ModelShape

    tokens = min(tokens, ModelShape.from_config(engines.manifest.config).num_tokens)
    timed = _timed_runs(engines, batch, cfg_scale, runs, tokens, HOST_RUNS, {"early_stop": "off", "eta": 0.0},
                        vary=False)
    return {key: float(np.median([1000 * s.seconds.get(stage, 0.0) / max(s.target_calls, 1) for s in runs_stats]))
            for key, runs_stats in timed.items()}


def measure_runs(engines, batch: int, cfg_scale: float, runs: dict, tokens: int | None = None,
                 repeats: int = CONFIRM_RUNS, options: dict | None = None, budget_s: float = CONFIRM_BUDGET_S) -> dict:
    """{key: (ms per token, the last run's stats summary)} of real generations of `tokens` tokens (default: a whole
    image's, not decoded) for each run {key: (mode, draft, gamma)}: one warm-up each, then `repeats` timed runs
    interleaved (A B C A B C ..., classes and seed moving each repeat), the median of each; fewer repeats (never
    below 2) where the warm-ups say `repeats` would take longer than `budget_s` (a large batch on a slow backend
    must not plan for longer than it generates). `options`: the diffusion-head families' request options."""
    from .generation import ModelShape

    shape = ModelShape.from_config(engines.manifest.config)
    tokens = min(tokens or shape.num_tokens, shape.num_tokens)
    timed = _timed_runs(engines, batch, cfg_scale, runs, tokens, repeats, options, vary=True, budget_s=budget_s)
    return {key: (float(np.median([1000 * s.total_seconds / (batch * tokens) for s in runs_stats])),
                  runs_stats[-1].summary()) for key, runs_stats in timed.items()}


def _timed_runs(engines, batch: int, cfg_scale: float, runs: dict, tokens: int, repeats: int,
                settings: dict | None, vary: bool, budget_s: float = math.inf) -> dict:
    """{key: [RunStats of each timed run]}: generations of `tokens` tokens for each run {key: (mode, draft, gamma)}
    with the extra GenerationConfig `settings`: one warm-up each, then `repeats` timed runs interleaved
    (A B C A B C ...; vary: the classes and the seed move each repeat, else class 0 and seed 0 throughout), fewer
    (never below 2) where the warm-ups say `repeats` would take longer than `budget_s`."""
    from .generation import GenerationConfig, ModelShape
    from .speculative import generate
    from .stats import RunStats

    num_classes = ModelShape.from_config(engines.manifest.config).num_classes
    gens = {key: dict(mode=mode, draft=draft, gamma=gamma, cfg_scale=cfg_scale, num_tokens=tokens, **(settings or {}))
            for key, (mode, draft, gamma) in runs.items()}
    base = np.arange(batch) % num_classes if vary else np.zeros(batch, np.int64)
    started = time.perf_counter()
    for gen in gens.values():                                       # warm-up
        generate(engines, base, GenerationConfig(**gen))
    if math.isfinite(budget_s):
        per_repeat = time.perf_counter() - started
        repeats = max(min(repeats, 2), min(repeats, int(budget_s / max(per_repeat, 1e-9))))
    timed = {key: [] for key in gens}
    for r in range(repeats):
        classes = (base + r) % num_classes if vary else base
        for key, gen in gens.items():
            stats = RunStats()
            generate(engines, classes, GenerationConfig(**({"seed": r + 1} if vary else {}), **gen), stats)
            timed[key].append(stats)
    return timed


def choose_by_runs(engines, batch: int, cfg_scale: float, margin: float, options: dict,
                   tokens: int = 32) -> GammaChoice:
    """Diffusion-head families: every token also costs head calls (draft and target side), which the call-cost
    model above does not time, so short real generations decide: target-only and the model draft at each gamma
    up to the export's, `tokens` tokens each, interleaved (measure_runs)."""
    from .speculative import ModelShape, verify_limit

    shape = ModelShape.from_config(engines.manifest.config)
    tokens = min(tokens, shape.num_tokens)
    top = min(int(engines.manifest.gamma), (verify_limit(engines) or 1 << 30) - 1, tokens - 1)
    runs = {None: ("target", "model", 1), **{g: ("speculative", "model", g) for g in range(1, top + 1)}}
    measured = measure_runs(engines, batch, cfg_scale, runs, tokens, HOST_RUNS, options)
    step = measured.pop(None)[0]
    candidates = [{"draft": "model", "gamma": g, "tokens_per_round": 1 + summary["mean_accepted_per_verify"],
                   "rollout_ms": 0.0, "verify_ms": ms, "host_ms": 0.0, "speedup": step / ms,
                   "measured_speedup": step / ms} for g, (ms, summary) in measured.items()]
    if not candidates:
        return GammaChoice(None, "no draft length fits these engines; target-only", step)
    best = max(candidates, key=lambda c: c["speedup"])
    if best["speedup"] < margin:
        return GammaChoice(None, f"speculation cannot pay here (best measured speedup {best['speedup']:.2f}x at "
                                 f"gamma {best['gamma']} < {margin:.2f}x); running target-only", step, candidates)
    return GammaChoice(best["gamma"], f"model gamma {best['gamma']} (measured {best['speedup']:.2f}x over "
                                      f"target-only at batch {batch}, {tokens} tokens)", step, candidates)


def confirm_by_runs(engines, batch: int, cfg_scale: float, margin: float, candidates: list, step_ms: float,
                    repeats: int = CONFIRM_RUNS) -> GammaChoice:
    """The cost model ranks; whole-image generations decide. The best predicted candidate of each proposal kind
    runs against target-only, interleaved (measure_runs), unless even its prediction is hopeless (< FINALIST_FLOOR:
    the warm-up times calls cold, which has under-predicted by up to ~25 % here, and over-predicted at batch 8:
    Jacobi L = 8 1.12-1.23x predicted, 0.92-1.17x measured); each gets its `measured_speedup`, and the fastest
    measured one runs if it clears `margin`, else target-only."""
    finalists = []
    for draft in ("model", "jacobi"):
        mine = [c for c in candidates if c["draft"] == draft and c["speedup"] >= FINALIST_FLOOR]
        if mine:
            finalists.append(max(mine, key=lambda c: c["speedup"]))
    if not finalists:
        best = max(candidates, key=lambda c: c["speedup"])
        return GammaChoice(None, f"speculation cannot pay here (best predicted speedup {best['speedup']:.2f}x with "
                                 f"{best['draft']} gamma {best['gamma']}); running target-only", step_ms, candidates)
    runs = {None: ("target", "model", 1), **{(c["draft"], c["gamma"]): ("speculative", c["draft"], c["gamma"])
                                            for c in finalists}}
    measured = measure_runs(engines, batch, cfg_scale, runs, repeats=repeats)
    target_ms = measured.pop(None)[0]
    for c in finalists:
        c["measured_speedup"] = target_ms / measured[(c["draft"], c["gamma"])][0]
    best = max(finalists, key=lambda c: c["measured_speedup"])
    if best["measured_speedup"] < margin:
        return GammaChoice(None, f"speculation cannot pay here: it did not in whole-image runs (best measured "
                                 f"{best['measured_speedup']:.2f}x with {best['draft']} gamma {best['gamma']}, "
                                 f"predicted {best['speedup']:.2f}x; < {margin:.2f}x); running target-only",
                           step_ms, candidates)
    return GammaChoice(best["gamma"], f"{best['draft']} gamma {best['gamma']} (measured "
                                      f"{best['measured_speedup']:.2f}x over target-only in whole-image runs at batch "
                                      f"{batch}, predicted {best['speedup']:.2f}x)", step_ms, candidates, best["draft"])


def choose_gamma(engines, batch: int, cfg_scale: float, margin: float = 1.10,
                 drafts=("model", "jacobi"), options: dict | None = None, confirm: bool = True) -> GammaChoice:
    """Pick the proposal kind in `drafts` and its length (model: gamma in the exported rollouts; jacobi: a
    calibrated window the verify engine accepts), or target-only, with the figures behind it. `options`: the
    request's diffusion-head options (head, shared_noise, inner_temperature) for families that have one.
    confirm: the cost model's best candidates are run as whole images against target-only and the measured
    speedup decides (confirm_by_runs); False: the prediction alone decides."""
    from .manifest import HEAD_FAMILIES
    from .speculative import GenerationConfig, ModelShape, in_engine_acceptance, verify_limit

    manifest = engines.manifest
    if manifest.family in HEAD_FAMILIES:
        if "draft_step" not in manifest.engines or "model" not in drafts:
            return GammaChoice(None, "no draft model in these engines; target-only")
        return choose_by_runs(engines, batch, cfg_scale, margin, dict(options or {}))
    gammas = sorted(getattr(engines, "rollouts", {}) or {}) if "model" in drafts else []
    curve = acceptance_curve(manifest.calibration, cfg_scale) if gammas else None
    limit = min(verify_limit(engines) or 1 << 30, ModelShape.from_config(manifest.config).num_tokens)
    windows = {w: t for w, t in (jacobi_tokens(manifest.calibration, cfg_scale) or {}).items() if w + 1 <= limit} \
        if "jacobi" in drafts else {}
    if curve is None:
        gammas = []
    if not gammas and not windows:
        why = []
        if "model" in drafts:
            why.append("no draft_rollout engine (re-export with fastardiff-export)" if not getattr(
                engines, "rollouts", {}) else "no calibrated per-position acceptance "
                                              "(calibration.extra.acceptance_by_position)")
        if "jacobi" in drafts:
            why.append("no calibrated Jacobi tokens per call (calibration.extra.jacobi_tokens_per_call; "
                       "run fastardiff calibrate)")
        return GammaChoice(None, f"{'; '.join(why)}; target-only")
    # model-draft rounds on a device backend verify and accept in one target_jacobi call (in_engine_acceptance):
    # that call is what they cost there
    accepts_in_engine = bool(gammas) and in_engine_acceptance(engines, GenerationConfig(cfg_scale=cfg_scale))
    costs = time_engine_calls(engines, batch, cfg_scale, gammas, [w + 1 for w in windows],
                              sorted(set(windows) | (set(gammas) if accepts_in_engine else set())))
    runs = {"step": ("target", "model", 1)}
    if gammas:
        runs["model"] = ("speculative", "model", max(gammas))
    if windows:
        runs["jacobi"] = ("speculative", "jacobi", max(windows))
    host = host_ms(engines, batch, cfg_scale, runs)
    # target-only's cost per token as it runs (warm), never above the cold per-call estimate: a cold step would
    # credit speculation with the cache misses target-only does not pay
    step = min(costs["step"], warm_step_ms(engines, batch, cfg_scale)) + host["step"]
    candidates = []
    for g in gammas:
        tau = expected_tokens(curve, g)
        rollout = costs[("rollout", g)]
        verify = costs.get(("jacobi", g), costs[("verify", g + 1)]) if accepts_in_engine else costs[("verify", g + 1)]
        candidates.append({"draft": "model", "gamma": g, "tokens_per_round": tau, "rollout_ms": rollout,
                           "verify_ms": verify, "host_ms": host["model"],
                           "speedup": tau * step / (rollout + verify + host["model"])})
    for w, tau in sorted(windows.items()):
        verify = costs.get(("jacobi", w), costs[("verify", w + 1)])   # the round's call: in-graph if exported
        candidates.append({"draft": "jacobi", "gamma": w, "tokens_per_round": tau, "rollout_ms": 0.0,
                           "verify_ms": verify, "host_ms": host["jacobi"],
                           "speedup": tau * step / (verify + host["jacobi"])})
    if confirm:
        return confirm_by_runs(engines, batch, cfg_scale, margin, candidates, step)
    best = max(candidates, key=lambda c: c["speedup"])
    if best["speedup"] < margin:
        return GammaChoice(None, f"speculation cannot pay here (best predicted speedup {best['speedup']:.2f}x with "
                                 f"{best['draft']} gamma {best['gamma']} < {margin:.2f}x); running target-only",
                           step, candidates)
    return GammaChoice(best["gamma"], f"{best['draft']} gamma {best['gamma']} (predicted {best['speedup']:.2f}x over "
                                      f"target-only at batch {batch})", step, candidates, best["draft"])

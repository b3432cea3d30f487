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
The prediction ranks; whole images decide (runtime/gamma_runs.py `confirm_by_runs`): the best predicted candidate
of each proposal kind runs against target-only in paired, interleaved runs until a stated confidence separates
them, and a finalist runs only where it measured at least `margin` (default 1.10) faster than target-only and
confidently not slower; otherwise target-only, and the choice says why and how sure it is. (The model alone had
over-predicted Jacobi at batch 8 on this CPU: 1.12-1.23x predicted, 0.92-1.17x measured.)
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
FINALIST_FLOOR = 0.8  # a kind whose best prediction is below this is not run (no cold-timing error is that large)


def mode_label(draft: str, gamma: int | None) -> str:
    """How measurements name a mode (the plan's, and the running loop's stats "mode_rates"): "target",
    "jacobi:<L>", "model:<g>"."""
    return "target" if gamma is None else f"{draft}:{gamma}"


@dataclass
class GammaChoice:
    gamma: int | None                 # None: target-only
    reason: str
    target_step_ms: float = 0.0
    candidates: list = field(default_factory=list)   # {draft, gamma, tokens_per_round, rollout_ms, verify_ms, ...}
    draft: str = "model"              # what proposes: the draft model or the target's own Jacobi guesses
    measured: dict = field(default_factory=dict)     # {mode_label: {ms_per_token, runs}} of the whole-image check
    confidence: dict = field(default_factory=dict)   # the whole-image check's test, level, pairs and verdicts

    @property
    def mode(self) -> str:
        return "target" if self.gamma is None else "speculative"

    @property
    def label(self) -> str:
        return mode_label(self.draft, self.gamma)

    def table(self) -> str:
        lines = [f"gamma auto: {self.reason}",
                 f"  target-only {self.target_step_ms:.3f} ms/token (engine + host)",
                 "  draft   gamma  tokens/round  rollout ms  verify ms  host ms  predicted speedup  measured"]
        for c in self.candidates:
            measured = f"{c['measured_speedup']:>8.3f}" if "measured_speedup" in c else f"{'-':>8}"
            lines.append(f"  {c.get('draft', 'model'):<6}  {c['gamma']:>5}  {c['tokens_per_round']:>12.3f}  "
                         f"{c['rollout_ms']:>10.3f}  {c['verify_ms']:>9.3f}  {c.get('host_ms', 0.0):>7.3f}  "
                         f"{c['speedup']:>17.3f}  {measured}")
        if self.confidence:
            k = self.confidence
            verdicts = "; ".join(f"{name} {v['speedup']:.2f}x [{v['low']:.2f}, {v['high']:.2f}] {v['verdict']}"
                                 for name, v in k["finalists"].items())
            lines.append(f"  confidence {100 * k['level']:g} % ({k['pairs']} paired runs, {k['stopped']}): "
                         f"{verdicts}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"gamma": self.gamma, "mode": self.mode, "draft": self.draft, "reason": self.reason,
                "target_step_ms": self.target_step_ms, "candidates": self.candidates,
                **({"measured": self.measured} if self.measured else {}),
                **({"confidence": self.confidence} if self.confidence else {})}


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

    device = engines.capabilities.cache_device    # caches where the loop keeps them (runtime/kv_cache.py)

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
    rollouts = engines.rollouts if engines.capabilities.rollout_gammas else {}
    scalars = (np.ones(1, np.float32), np.full(1, cfg_scale, np.float32))

    def rollout(fn, g):
        d_cache = cache(shape.draft_layers, rollout_capacity(engines.manifest, g))
        tokens = rng.standard_normal((rows, 1, shape.token_dim), dtype=np.float32)
        noise = rng.standard_normal((batch, g, shape.token_dim), dtype=np.float32)
        threshold = np.full(batch, -np.inf, np.float32)
        max_drafts = np.full(batch, g, np.int64)
        return lambda: fn(tokens, lengths, d_cache, d_cache, cond, noise, threshold, max_drafts, *scalars)

    def draft_steps(g):           # engines without draft_rollout (a foreign model's draft): g draft_step calls
        d_cache = cache(shape.draft_layers, shape.seq_len)
        tokens = rng.standard_normal((rows, 1, shape.token_dim), dtype=np.float32)
        return lambda: [engines.draft_step(tokens, lengths, d_cache, d_cache, cond) for _ in range(g)]

    for g in gammas:
        if g in rollouts:
            calls[("rollout", g)] = rollout(rollouts[g], g)
        elif "draft_step" in engines.manifest.engines:
            calls[("rollout", g)] = draft_steps(g)
    jacobi = engines.target_jacobi if jacobi_windows and engines.capabilities.target_jacobi else None
    if jacobi is not None:
        from .generation import on_accelerator
        from .jacobi import residual_proposals

        c, d, flag = residual_proposals(batch, on_accelerator(engines)), shape.token_dim, np.ones(1, np.float32)

        def jacobi_round(w):
            sampling = (np.zeros((batch, w, d), np.float32), np.ones((batch, w), np.float32), np.full(batch, w),
                        np.full((batch, w), 0.5, np.float32), np.zeros((batch, w + 1, d), np.float32),
                        np.zeros((batch, w + 1, c, d), np.float32), np.full((batch, w + 1, c), 0.5, np.float32))
            tokens = rng.standard_normal((rows, w + 1, shape.token_dim), dtype=np.float32)
            room = jacobi_cache_capacity(shape, w, batch, engines.capabilities.cache_limit)
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


def _timed_runs(engines, batch: int, cfg_scale: float, runs: dict, tokens: int, repeats: int,
                settings: dict | None, vary: bool, budget_s: float = math.inf, stop=None,
                min_repeats: int = 2) -> dict:
    """{key: [RunStats of each timed run]}: generations of `tokens` tokens for each run {key: (mode, draft, gamma)}
    with the extra GenerationConfig `settings`: one warm-up each, then up to `repeats` timed runs interleaved
    (A B C A B C ...; vary: the classes and the seed move each repeat, else class 0 and seed 0 throughout). From
    `min_repeats` on, it stops early where stop(timed) says so or where one more repeat (as long as the mean one
    so far) would end past `budget_s` seconds of timed repeats."""
    from .generation import GenerationConfig, ModelShape
    from .speculative import generate
    from .stats import RunStats

    num_classes = ModelShape.from_config(engines.manifest.config).num_classes
    gens = {key: dict(mode=mode, draft=draft, gamma=gamma, cfg_scale=cfg_scale, num_tokens=tokens, **(settings or {}))
            for key, (mode, draft, gamma) in runs.items()}
    base = np.arange(batch) % num_classes if vary else np.zeros(batch, np.int64)
    for gen in gens.values():                                       # warm-up
        generate(engines, base, GenerationConfig(**gen))
    timed = {key: [] for key in gens}
    started = time.perf_counter()
    for r in range(repeats):
        if r >= min_repeats:
            elapsed = time.perf_counter() - started
            if elapsed + elapsed / r > budget_s or (stop is not None and stop(timed)):
                break
        classes = (base + r) % num_classes if vary else base
        for key, gen in gens.items():
            stats = RunStats()
            generate(engines, classes, GenerationConfig(**({"seed": r + 1} if vary else {}), **gen), stats)
            timed[key].append(stats)
    return timed


def choose_gamma(engines, batch: int, cfg_scale: float, margin: float = 1.10,
                 drafts=("model", "jacobi"), options: dict | None = None, confirm: bool = True) -> GammaChoice:
    """Pick the proposal kind in `drafts` and its length (model: gamma in the exported rollouts; jacobi: a
    calibrated window the verify engine accepts), or target-only, with the figures behind it. `options`: the
    request's diffusion-head options (head, shared_noise, inner_temperature) for families that have one.
    confirm: the cost model's best candidates are run as whole images against target-only and the measured
    speedup decides with a stated confidence (gamma_runs.confirm_by_runs); False: the prediction alone decides."""
    from .gamma_runs import choose_by_runs, confirm_by_runs
    from .manifest import HEAD_FAMILIES
    from .speculative import GenerationConfig, ModelShape, in_engine_acceptance, verify_limit

    manifest = engines.manifest
    if manifest.family in HEAD_FAMILIES:
        if "draft_step" not in manifest.engines or "model" not in drafts:
            return GammaChoice(None, "no draft model in these engines; target-only")
        return choose_by_runs(engines, batch, cfg_scale, margin, dict(options or {}))
    gammas = sorted(engines.capabilities.rollout_gammas) if "model" in drafts else []
    if "model" in drafts and not gammas and "draft_step" in manifest.engines:   # drafted by draft_step calls
        gammas = list(range(1, int(manifest.gamma) + 1))
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

"""`--gamma auto`: choose the draft length (or target-only) that maximises expected tokens per second.

Expected tokens per round at draft length g, from the per-position acceptance a_1, a_2, ... calibrated on the
trained model (a_i = P(draft i accepted | drafts before it accepted), stored in the checkpoint's and the
manifest's calibration as `acceptance_by_position`, one curve per guidance scale):
    tau(g) = 1 + a_1 + a_1 a_2 + ... + a_1 ... a_g
Cost of a round: t_rollout(g) + t_verify(g + 1) + h_round, target-only t_step + h_step per token: engine calls
timed on the loaded engines in a short warm-up at the requested batch, the host work per round / per step (the
loop's numpy sampling, acceptance and bookkeeping) measured by two short real generations (16 tokens).
Predicted speedup(g) = tau(g) (t_step + h_step) / (t_rollout(g) + t_verify(g+1) + h_round). Speculation runs only
where its best predicted speedup exceeds `margin` (default 1.10: the bench measured up to ~9 % below the
prediction on this CPU): never slower than
target-only; otherwise target-only, and the choice says why.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("fastardiff.runtime")

WARMUP_CALLS = 2
TIMED_CALLS = 7


@dataclass
class GammaChoice:
    gamma: int | None                 # None: target-only
    reason: str
    target_step_ms: float = 0.0
    candidates: list = field(default_factory=list)   # {gamma, tokens_per_round, rollout_ms, verify_ms, speedup}

    @property
    def mode(self) -> str:
        return "target" if self.gamma is None else "speculative"

    def table(self) -> str:
        lines = [f"gamma auto: {self.reason}",
                 f"  target-only {self.target_step_ms:.3f} ms/token (engine + host)",
                 "  gamma  tokens/round  rollout ms  verify ms  host ms  predicted speedup"]
        for c in self.candidates:
            lines.append(f"  {c['gamma']:>5}  {c['tokens_per_round']:>12.3f}  {c['rollout_ms']:>10.3f}  "
                         f"{c['verify_ms']:>9.3f}  {c.get('host_ms', 0.0):>7.3f}  {c['speedup']:>17.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"gamma": self.gamma, "mode": self.mode, "reason": self.reason,
                "target_step_ms": self.target_step_ms, "candidates": self.candidates}


def acceptance_curve(calibration: dict, cfg_scale: float) -> list[float] | None:
    """The calibrated per-position acceptance for the guidance scale nearest `cfg_scale` (None if absent)."""
    curves = (calibration.get("extra") or {}).get("acceptance_by_position") or {}
    if not curves:
        return None
    scale = min(curves, key=lambda k: abs(float(k) - cfg_scale))
    return [min(max(float(a), 0.0), 1.0) for a in curves[scale]]


def expected_tokens(curve: list[float], gamma: int) -> float:
    """tau(g) = 1 + sum_i prod_{j<=i} a_j; positions past the curve reuse its last value."""
    tokens, run = 1.0, 1.0
    for i in range(gamma):
        run *= curve[min(i, len(curve) - 1)] if curve else 0.0
        tokens += run
    return tokens


def _median_ms(call, calls: int = TIMED_CALLS) -> float:
    for _ in range(WARMUP_CALLS):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def time_engine_calls(engines, batch: int, cfg_scale: float, gammas) -> dict:
    """Per-call milliseconds at `batch` samples (2x rows with guidance), mid-sequence cache lengths:
    {"step": target 1-token step, ("verify", k): k-token verify, ("rollout", g): draft_rollout(g)}."""
    from .speculative import ModelShape, rollout_capacity

    cfg = engines.manifest.config
    shape = ModelShape.from_config(cfg)
    rows = batch * (2 if cfg_scale != 1.0 else 1)
    cond = np.zeros(rows, np.int64)
    if cfg_scale != 1.0:
        cond[batch:] = shape.num_classes
    mid = shape.seq_len // 2
    lengths = np.full(rows, mid, np.int64)
    t_cache = np.zeros((shape.target_layers, rows, shape.heads, mid, shape.head_dim), np.float32)
    out = {}

    def verify(k):
        tokens = np.zeros((rows, k, shape.token_dim), np.float32)
        return lambda: engines.target_verify(tokens, lengths, t_cache, t_cache, cond)

    out["step"] = _median_ms(verify(1))
    rollouts = getattr(engines, "rollouts", {})
    scalars = (np.ones(1, np.float32), np.full(1, cfg_scale, np.float32))
    for g in gammas:
        out[("verify", g + 1)] = _median_ms(verify(g + 1))
        if g not in rollouts:
            continue
        cap = rollout_capacity(engines.manifest, g)
        d_cache = np.zeros((shape.draft_layers, rows, shape.heads, cap, shape.head_dim), np.float32)
        tokens = np.zeros((rows, 1, shape.token_dim), np.float32)
        noise = np.zeros((batch, g, shape.token_dim), np.float32)
        threshold = np.full(batch, -np.inf, np.float32)
        max_drafts = np.full(batch, g, np.int64)
        fn = rollouts[g]
        out[("rollout", g)] = _median_ms(lambda: fn(tokens, lengths, d_cache, d_cache, cond, noise, threshold,
                                                     max_drafts, *scalars))
    return out


def host_ms(engines, batch: int, cfg_scale: float, gamma: int, tokens: int = 16) -> tuple[float, float]:
    """(host ms per target-only step, host ms per speculative round) from two short real generations."""
    from .speculative import GenerationConfig, ModelShape, generate
    from .stats import RunStats

    shape = ModelShape.from_config(engines.manifest.config)
    tokens = min(tokens, shape.num_tokens)
    classes = np.zeros(batch, np.int64)
    out = []
    for mode in ("target", "speculative"):
        gen = GenerationConfig(mode=mode, gamma=gamma, early_stop="off", cfg_scale=cfg_scale, eta=0.0,
                               num_tokens=tokens)
        generate(engines, classes, gen)                       # warm-up
        stats = RunStats()
        generate(engines, classes, gen, stats)
        out.append(1000 * stats.seconds.get("host", 0.0) / max(stats.target_calls, 1))
    return out[0], out[1]


def choose_gamma(engines, batch: int, cfg_scale: float, margin: float = 1.10) -> GammaChoice:
    """Pick gamma in [1, gamma_max] (the exported rollouts) or target-only, with the figures behind it."""
    manifest = engines.manifest
    gammas = sorted(getattr(engines, "rollouts", {}) or {})
    curve = acceptance_curve(manifest.calibration, cfg_scale)
    if not gammas:
        return GammaChoice(None, "these engines have no draft_rollout engine; target-only "
                                 "(re-export with fastardiff-export to get them)")
    if curve is None:
        return GammaChoice(None, "the model has no calibrated per-position acceptance "
                                 "(calibration.extra.acceptance_by_position); target-only")
    costs = time_engine_calls(engines, batch, cfg_scale, gammas)
    host_step, host_round = host_ms(engines, batch, cfg_scale, max(gammas))
    step = costs["step"] + host_step
    candidates = []
    for g in gammas:
        tau = expected_tokens(curve, g)
        rollout, verify = costs[("rollout", g)], costs[("verify", g + 1)]
        candidates.append({"gamma": g, "tokens_per_round": tau, "rollout_ms": rollout, "verify_ms": verify,
                           "host_ms": host_round, "speedup": tau * step / (rollout + verify + host_round)})
    best = max(candidates, key=lambda c: c["speedup"])
    if best["speedup"] < margin:
        return GammaChoice(None, f"speculation cannot pay here (best predicted speedup {best['speedup']:.2f}x at "
                                 f"gamma {best['gamma']} < {margin:.2f}x); running target-only", step, candidates)
    return GammaChoice(best["gamma"], f"gamma {best['gamma']} (predicted {best['speedup']:.2f}x over target-only "
                                      f"at batch {batch})", step, candidates)

"""`--gamma auto`'s whole-image check: speculation runs only where paired, interleaved runs separate it from
target-only with a stated confidence.

Target-only and each finalist run as real generations (runtime/gamma_auto.py `_timed_runs`: one warm-up each,
then repeats interleaved T A B T A B ..., the classes and the seed moving each repeat). Repeat r gives one pair per
finalist: d_r = log(target ms/token_r / finalist ms/token_r), both timed within the same few hundred milliseconds,
so a load that comes and goes moves both. The estimate is the geometric-mean speedup exp(mean d); its one-sided
`CONFIDENCE` bounds use Student's t over the pairs, Bonferroni-corrected over the finalists. A finalist is
  faster:               measured speedup >= margin and the lower bound > 1 (confidently not slower),
  short of the margin:  the upper bound < margin (confidently not worth it),
  undecided:            otherwise.
Pairs are added until every finalist is decided (at least MIN_PAIRS), MAX_PAIRS are run or the time budget is
spent; the fastest "faster" finalist runs, and target-only otherwise (an undecided finalist is not separated from
target-only: never slower by a noisy choice). The verdicts, the interval and the pairs are kept in
GammaChoice.confidence, the per-mode ms/token in GammaChoice.measured (stats JSON, the table, the plan cache).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from . import gamma_auto
from .gamma_auto import FINALIST_FLOOR, GammaChoice, mode_label

CONFIDENCE = 0.95       # one-sided, for the whole set of finalists (Bonferroni)
MIN_PAIRS = 3           # paired repeats before any verdict (t over 2 degrees of freedom)
MAX_PAIRS = 16          # never more, however close the candidates
CONFIRM_BUDGET_S = 4.0  # nor more repeats (beyond MIN_PAIRS) than fit in this many seconds after the warm-ups
TEST = "one-sided paired t on log ms/token ratios to target-only, Bonferroni over the finalists"


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: exact for 1 and 2 degrees of freedom, else the Cornish-Fisher expansion around the
    normal quantile (within 0.4 % of the exact value from 3 degrees of freedom at p <= 0.99)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(term / df ** (i + 1) for i, term in enumerate(terms))


def paired_verdicts(ms: dict, margin: float, target=None, level: float = CONFIDENCE) -> dict:
    """{finalist: {speedup, low, high, pairs, verdict}} from per-repeat ms/token lists {key: [...]}, the target-only
    run under `target`; see the module docstring."""
    finalists = [k for k in ms if k != target]
    alpha = (1 - level) / max(1, len(finalists))
    out = {}
    for key in finalists:
        n = min(len(ms[key]), len(ms[target]))
        d = np.log(np.maximum(ms[target][:n], 1e-12) / np.maximum(ms[key][:n], 1e-12))
        mean = float(d.mean()) if n else 0.0
        half = t_quantile(1 - alpha, n - 1) * float(d.std(ddof=1)) / math.sqrt(n) if n >= 2 else math.inf
        speedup, low, high = math.exp(mean), math.exp(mean - half), math.exp(min(mean + half, 700.0))
        verdict = ("faster" if speedup >= margin and low > 1.0 else
                   "short of the margin" if high < margin else "undecided")
        out[key] = {"speedup": round(speedup, 4), "low": round(low, 4), "high": round(high, 4), "pairs": n,
                    "verdict": verdict}
    return out


def decide_by_runs(engines, batch: int, cfg_scale: float, margin: float, runs: dict, tokens: int | None = None,
                   options: dict | None = None, max_pairs: int = MAX_PAIRS, budget_s: float = CONFIRM_BUDGET_S):
    """Paired, interleaved generations of `runs` {key: (mode, draft, gamma)} (the key None: target-only) until
    the finalists are separated. Returns (verdicts {key: ...}, measured {label: {ms_per_token, runs}},
    confidence dict, summaries {key: the last run's stats summary})."""
    from .generation import ModelShape

    tokens = min(tokens or ModelShape.from_config(engines.manifest.config).num_tokens,
                 ModelShape.from_config(engines.manifest.config).num_tokens)

    def per_token(timed):
        return {key: [1000 * s.total_seconds / (batch * tokens) for s in stats] for key, stats in timed.items()}

    def separated(timed) -> bool:
        verdicts = paired_verdicts(per_token(timed), margin)
        return all(v["verdict"] != "undecided" for v in verdicts.values())

    timed = gamma_auto._timed_runs(engines, batch, cfg_scale, runs, tokens, max(max_pairs, MIN_PAIRS), options,
                                   vary=True, budget_s=budget_s, stop=separated, min_repeats=MIN_PAIRS)
    ms = per_token(timed)
    verdicts = paired_verdicts(ms, margin)
    pairs = len(ms[None])
    stopped = ("separated" if all(v["verdict"] != "undecided" for v in verdicts.values()) else
               "at most pairs" if pairs >= max_pairs else "time budget")
    measured = {mode_label(*_draft_gamma(runs[key])): {"ms_per_token": round(float(np.median(v)), 6), "runs": len(v)}
                for key, v in ms.items()}
    confidence = {"test": TEST, "level": CONFIDENCE, "margin": margin, "pairs": pairs, "stopped": stopped,
                  "finalists": {mode_label(*_draft_gamma(runs[key])): v for key, v in verdicts.items()}}
    return verdicts, measured, confidence, {key: stats[-1].summary() for key, stats in timed.items()}


def _draft_gamma(run: tuple) -> tuple:
    mode, draft, gamma = run
    return (draft, None) if mode == "target" else (draft, gamma)


def _decide(finalists: list, verdicts: dict, keys: list, margin: float, batch: int, step_ms: float,
            candidates: list, measured: dict, confidence: dict, what: str, predicted: bool = True) -> GammaChoice:
    """The fastest finalist whose verdict is "faster", else target-only with the reason (predicted: the
    finalists' "speedup" is the cost model's prediction, else the measured one)."""
    for c, key in zip(finalists, keys):
        c["measured_speedup"] = verdicts[key]["speedup"]
    extra = {"measured": measured, "confidence": confidence}
    faster = [(c, verdicts[k]) for c, k in zip(finalists, keys) if verdicts[k]["verdict"] == "faster"]
    level, pairs = f"{100 * CONFIDENCE:g} %", confidence["pairs"]
    if faster:
        c, v = max(faster, key=lambda cv: cv[1]["speedup"])
        note = f", predicted {c['speedup']:.2f}x" if predicted else ""
        return GammaChoice(c["gamma"], f"{c['draft']} gamma {c['gamma']} (measured {v['speedup']:.2f}x over "
                                       f"target-only in {what} at batch {batch}{note}; {level} interval "
                                       f"[{v['low']:.2f}, {v['high']:.2f}] from {pairs} paired runs)",
                           step_ms, candidates, c["draft"], **extra)
    c, key = max(zip(finalists, keys), key=lambda ck: verdicts[ck[1]]["speedup"])
    v = verdicts[key]
    if v["speedup"] >= margin:
        return GammaChoice(None, f"speculation not separated from target-only: {c['draft']} gamma {c['gamma']} "
                                 f"measured {v['speedup']:.2f}x, {level} interval [{v['low']:.2f}, {v['high']:.2f}] "
                                 f"after {pairs} paired runs ({confidence['stopped']}); running target-only",
                           step_ms, candidates, **extra)
    note = f", predicted {c['speedup']:.2f}x" if predicted else ""
    return GammaChoice(None, f"speculation cannot pay here: it did not in {what} (best measured {v['speedup']:.2f}x "
                             f"with {c['draft']} gamma {c['gamma']}{note}; < {margin:.2f}x, "
                             f"{level} interval [{v['low']:.2f}, {v['high']:.2f}] from {pairs} paired runs); "
                             "running target-only", step_ms, candidates, **extra)


def confirm_by_runs(engines, batch: int, cfg_scale: float, margin: float, candidates: list, step_ms: float,
                    max_pairs: int = MAX_PAIRS) -> GammaChoice:
    """The cost model ranks; whole-image generations decide. The best predicted candidate of each proposal kind
    runs against target-only (decide_by_runs), unless even its prediction is hopeless (< FINALIST_FLOOR: the
    warm-up times calls cold, which has under-predicted by up to ~25 % here, and over-predicted at batch 8:
    Jacobi L = 8 1.12-1.23x predicted, 0.92-1.17x measured)."""
    finalists = []
    for draft in ("model", "jacobi"):
        mine = [c for c in candidates if c["draft"] == draft and c["speedup"] >= FINALIST_FLOOR]
        if mine:
            finalists.append(max(mine, key=lambda c: c["speedup"]))
    if not finalists:
        best = max(candidates, key=lambda c: c["speedup"])
        return GammaChoice(None, f"speculation cannot pay here (best predicted speedup {best['speedup']:.2f}x with "
                                 f"{best['draft']} gamma {best['gamma']}); running target-only", step_ms, candidates)
    keys = [(c["draft"], c["gamma"]) for c in finalists]
    runs = {None: ("target", "model", 1), **{k: ("speculative", *k) for k in keys}}
    verdicts, measured, confidence, _ = decide_by_runs(engines, batch, cfg_scale, margin, runs, max_pairs=max_pairs)
    return _decide(finalists, verdicts, keys, margin, batch, step_ms, candidates, measured, confidence,
                   "whole-image runs")


def choose_by_runs(engines, batch: int, cfg_scale: float, margin: float, options: dict,
                   tokens: int = 32) -> GammaChoice:
    """Diffusion-head families: every token also costs head calls (draft and target side), which the call-cost
    model does not time, so short real generations decide: target-only and the model draft at each gamma up to
    the export's, `tokens` tokens each, paired and interleaved (decide_by_runs)."""
    from .speculative import ModelShape, verify_limit

    shape = ModelShape.from_config(engines.manifest.config)
    tokens = min(tokens, shape.num_tokens)
    top = min(int(engines.manifest.gamma), (verify_limit(engines) or 1 << 30) - 1, tokens - 1)
    if top < 1:
        return GammaChoice(None, "no draft length fits these engines; target-only")
    keys = [("model", g) for g in range(1, top + 1)]
    runs = {None: ("target", "model", 1), **{k: ("speculative", *k) for k in keys}}
    verdicts, measured, confidence, summaries = decide_by_runs(engines, batch, cfg_scale, margin, runs, tokens,
                                                               options)
    step = measured["target"]["ms_per_token"]
    candidates = [{"draft": "model", "gamma": k[1], "tokens_per_round": 1 + summaries[k]["mean_accepted_per_verify"],
                   "rollout_ms": 0.0, "verify_ms": measured[mode_label(*k)]["ms_per_token"], "host_ms": 0.0,
                   "speedup": verdicts[k]["speedup"]} for k in keys]
    return _decide(candidates, verdicts, keys, margin, batch, step, candidates, measured, confidence,
                   f"{tokens}-token runs", predicted=False)

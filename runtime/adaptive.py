"""A generation that follows the machine (`--gamma auto` plans are a starting point, not a verdict).

The plan (runtime/gamma_auto.py) picks a proposal kind from a short timing; a busy or quiet spell during that
timing can pick the wrong one. So while it generates, a run measures what it runs (wall seconds and tokens of
every round, by proposal kind: `RunStats.mode_rates`), now and then runs a few rounds of one alternative (the best
speculative kind of the plan while running target-only, target-only steps while speculating: a probe), and
switches kind when the alternative is measured faster by a margin and with confidence (`AdaptPolicy`), recorded in
`RunStats.switches`. Switching is changing the proposal object between rounds (runtime/proposals.py): every kind
samples the target's distribution given the accepted prefix, so the output distribution is the same whatever the
switches (tests/test_adaptive.py checks it).

Labels (RunStats, GenerationConfig.alternative): "target", "jacobi:<L>", "model:<g>" (draft_step calls),
"rollout:<g>" (draft_rollout calls).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .generation import EXACT_GAUSSIAN_FAMILIES, GenerationError, next_round, round_limit


def parse_label(label: str) -> tuple[str, int]:
    """(kind, gamma) of a proposal label: ("target", 0), ("jacobi", L) or ("model", g) (model: and rollout: both)."""
    kind, _, g = str(label).partition(":")
    if kind == "target" and not g:
        return "target", 0
    if kind in ("jacobi", "model", "rollout") and g.isdigit() and int(g) >= 1:
        return ("jacobi" if kind == "jacobi" else "model"), int(g)
    raise GenerationError(f"unknown proposal '{label}' to adapt to; use target, jacobi:<L>, model:<g> or "
                          "rollout:<g> (L, g positive)")


def alternative_for(choice, manifest) -> str | None:
    """What a run planned by `choice` (a GammaChoice) re-checks while it generates: target-only steps when the plan
    speculates; when it runs target-only, the candidate measured fastest in whole-image runs (else predicted
    fastest) that these engines can run; None when there is none."""
    if choice.gamma is not None:
        return "target"
    runnable = [c for c in choice.candidates if c.get("gamma") and (
        c.get("draft") == "jacobi" and manifest.family in EXACT_GAUSSIAN_FAMILIES
        or c.get("draft", "model") == "model" and "draft_step" in manifest.engines)]
    measured = [c for c in runnable if "measured_speedup" in c]
    pool = measured or runnable
    if not pool:
        return None
    best = max(pool, key=lambda c: c["measured_speedup"] if measured else c["speedup"])
    return f"{best.get('draft', 'model')}:{int(best['gamma'])}"


def plan_rates_of(choice) -> tuple:
    """((label, ms per token), ...) of the kinds a GammaChoice measured in whole-image runs (its `measured`), the
    labels sorted; () where it measured none or the entries are malformed (a hand-edited cache)."""
    out = []
    for label, entry in (choice.measured or {}).items() if isinstance(choice.measured, dict) else ():
        try:
            ms = float(entry["ms_per_token"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(ms) and ms > 0:
            out.append((str(label), ms))
    return tuple(sorted(out))


@dataclass(frozen=True)
class AdaptPolicy:
    first_probe: int = 4        # rounds of the planned kind before the first probe
    probe_rounds: int = 4       # rounds of the alternative in a probe (its first is not scored: the switch's cost)
    min_gap: int = 4            # rounds of the current kind between two probes at least
    budget: float = 0.05        # what probes may cost: their expected loss (time beyond what the current kind
                                # would have taken for the same tokens) at most this fraction of the run's time
    margin: float = 1.10        # switch only to a kind measured this much faster (tokens per second) ...
    z: float = 2.0              # ... by this many standard errors of the difference (noise does not flap)
    window: int = 16            # scored rounds kept per kind (older ones fade: the machine changes)
    probe_all_rows: bool = False  # probe speculation beside target-only over several rows too (probes_pay; the
                                  # tests that force a switch at every probe, to check the switching path's output)

    def __post_init__(self):
        if self.probe_rounds < 2 or self.first_probe < 0 or self.min_gap < 0 or self.window < 2 or self.budget < 0:
            raise ValueError(f"bad adaptation policy {self}")


# the alternative's speed relative to the current kind before it is measured: target-only steps beside a planned
# speculation are guessed at half its rate (a probe of them is priced as a loss), a speculative kind beside
# target-only at par (probed at once: that is the switch the plan may have missed)
PRIOR_RATIO = {"target": 0.5}


class Estimate:
    """Seconds per token (per row of the round) of one proposal kind over its recent scored rounds: the ratio of
    sums and its standard error (the ratio estimator's, from per-round residuals; infinite below two rounds).
    Each round keeps its row count: a round of few rows (a ragged batch's tail) costs less per row than a full
    one, so kinds are compared over rounds of about the same rows (`value(rows)`); mixing them judged Jacobi L8
    1.43x faster than target-only at 16 images where whole runs measured 0.92-1.07x."""

    def __init__(self, window: int):
        self.rounds: deque = deque(maxlen=window)

    def add(self, tokens: float, seconds: float, rows: int = 1) -> None:
        if tokens > 0:
            self.rounds.append((tokens, seconds, rows))

    def clear(self) -> None:
        self.rounds.clear()

    def value(self, rows: int | None = None) -> tuple[float, float]:
        """(seconds per token per row, its standard error) over the kept rounds of `rows` rows within ROW_MATCH
        (None: every kept round)."""
        kept = [(t, s) for t, s, r in self.rounds if rows is None or rows * ROW_MATCH <= r <= rows / ROW_MATCH]
        n = len(kept)
        if not n:
            return math.inf, math.inf
        tokens, seconds = np.array(kept, np.float64).T
        m = seconds.sum() / tokens.sum()
        if n < 2:
            return m, math.inf
        residual = seconds - m * tokens
        return m, math.sqrt((residual ** 2).sum() / (n * (n - 1))) / tokens.mean()


# rounds compared with a probe's: at least this fraction of its rows and at most its rows over this fraction
ROW_MATCH = 0.75


class Adapter:
    """The switching of one run (or one serving replica's requests of one plan): which kind runs each round, the
    probes, the estimates, the decisions. It outlives a chunk of the batch: the kind a run switched to goes on in
    its next chunk, and the estimates with it. clock: seconds (time.perf_counter; a test's counted cost model).

    When to probe: after `first_probe` rounds, and then whenever the probes' accumulated loss plus the next
    probe's expected loss stays within `budget` of the run's time so far (a probe that lost much delays the next
    one; a probe of a kind about as fast as the current one costs nothing and may come every `min_gap` rounds)."""

    def __init__(self, policy: AdaptPolicy | None = None, clock=time.perf_counter, plan_rates=()):
        self.policy, self.clock = policy or AdaptPolicy(), clock
        # {label: ms per token} the plan measured (GenerationConfig.plan_rates): the prior of ratio()
        self.plan_rates = {str(label): float(ms) for label, ms in plan_rates if float(ms) > 0}
        self.current: str | None = None        # the label running between probes (None: the plan's, at the start)
        self.estimates: dict[str, Estimate] = {}
        self.rounds = 0                        # rounds run by this adapter (RunStats.switches' round)
        self.elapsed = 0.0                     # seconds of every round so far
        self.loss = 0.0                        # seconds the probes cost beyond the current kind's rate
        self.gap = self.policy.first_probe     # rounds of the current kind until a probe may start

    def estimate(self, label: str) -> Estimate:
        if label not in self.estimates:
            self.estimates[label] = Estimate(self.policy.window)
        return self.estimates[label]

    def run(self, loop, plan, alternative, stats) -> None:
        """Every round of `loop` until its rows are done, on the planned kind or the alternative (two proposal
        objects over the same loop)."""
        kinds = {plan.label: plan, alternative.label: alternative}
        if self.current not in kinds:
            self.current = plan.label
        current = kinds[self.current]
        other = alternative if current is plan else plan
        probing, scored, probe_seconds, rows = 0, True, 0.0, None
        clock, policy = self.clock, self.policy
        rounds, limit = 0, round_limit(loop.n, loop.total)
        while (act := loop.active()).size:
            rounds = next_round(rounds, limit, "adaptive")
            if not probing and self.gap <= 0 and loop.total - int(loop.n[act].min()) > policy.probe_rounds \
                    and probes_pay(current.label, other.label, act.size, policy.probe_all_rows) \
                    and self.loss + self.expected_loss(current.label, other.label, act.size) \
                    <= policy.budget * self.elapsed:
                probing, scored, probe_seconds, rows = policy.probe_rounds, False, 0.0, act.size
                other.enter(act)
            running = other if probing else current
            began = clock()
            tokens = int(running.round(act).sum())
            seconds = clock() - began
            record_rate(stats, running.label, tokens, seconds)
            if scored:      # per row: rows a probe left ragged finish apart (rounds of fewer rows) in any kind
                self.estimate(running.label).add(tokens / len(act), seconds, len(act))
            scored = True
            self.rounds += 1
            self.elapsed += seconds
            if not probing:
                self.gap -= 1
                continue
            probing -= 1
            probe_seconds += seconds
            if probing:
                continue
            self.loss += probe_seconds * max(0.0, 1.0 - self.ratio(other.label, current.label, rows))
            verdict = self.decide(current.label, other.label, rows)
            if verdict == "switch":
                stats.switches.append({"round": self.rounds, "from": current.label, "to": other.label,
                                       "reason": self.reason(other.label, current.label, rows)})
                self.estimate(current.label).clear()      # re-measured at its next probe
                current, other = other, current
                self.current = current.label
            else:
                current.enter(act := loop.active())
                scored = False
            self.gap = policy.min_gap

    def ratio(self, other: str, current: str, rows: int | None = None) -> float:
        """`other`'s token rate over `current`'s in rounds of about `rows` rows: measured where both are, else the
        plan's measurement of both (its whole-image runs on this machine), else PRIOR_RATIO. A plan that measured
        the alternative much slower makes its probes rarer from the start (a first probe of Jacobi L8 at 16
        images on a busy machine is otherwise priced at par)."""
        m_c, _ = self.estimate(current).value(rows)
        m_o, _ = self.estimate(other).value(rows)
        if math.isfinite(m_c) and math.isfinite(m_o) and m_o > 0:
            return m_c / m_o
        planned = [self.plan_rates.get(label.replace("rollout:", "model:", 1)) for label in (current, other)]
        if None not in planned:                  # the plan names the model draft model:<g> however it ran
            return planned[0] / planned[1]
        return PRIOR_RATIO.get(other, 1.0)

    def expected_loss(self, current: str, other: str, rows: int | None = None) -> float:
        """Seconds a probe of `other` over `rows` rows is expected to cost beyond running `current`: its rounds'
        time (as the current kind's rounds take) times the share of it the slower rate wastes."""
        rounds = self.estimate(current).rounds
        per_round = sum(s for _, s, _ in rounds) / len(rounds) if rounds else 0.0
        return self.policy.probe_rounds * per_round * max(0.0, 1.0 - self.ratio(other, current, rows))

    def decide(self, current: str, other: str, rows: int | None = None) -> str:
        """"switch" when `other` is faster than `current` by the margin, z standard errors clear, in rounds of
        about `rows` rows (the probe's); "slower" when its measured rate does not even clear the margin; else
        "unsure": promising but not yet certain, or not measured at these rows (its rounds are kept and pooled with
        the next probe's)."""
        m_c, se_c = self.estimate(current).value(rows)
        m_o, se_o = self.estimate(other).value(rows)
        margin = self.policy.margin
        if not (math.isfinite(m_c) and math.isfinite(m_o)):
            return "unsure"
        gain = m_c - margin * m_o                # seconds per token saved beyond the margin
        if gain <= 0:
            return "slower"
        noise = self.policy.z * math.hypot(se_c, margin * se_o) if self.policy.z else 0.0
        return "switch" if gain > noise else "unsure"

    def reason(self, to: str, frm: str, rows: int | None = None) -> str:
        m_t, _ = self.estimate(to).value(rows)
        m_f, _ = self.estimate(frm).value(rows)
        return (f"{to} measured {m_f / m_t:.2f}x the token rate of {frm} ({1e3 * m_t:.3f} vs {1e3 * m_f:.3f} ms "
                f"per token per row, rounds of ~{rows} rows, margin {self.policy.margin:.2f}x)")


def probes_pay(current: str, other: str, rows: int, all_rows: bool = False) -> bool:
    """Whether a probe of `other` while running `current` over `rows` rows can be judged: not a speculative kind
    beside target-only over several rows. Its rounds mid-run cannot see what speculation costs a batch at its end
    (rows finish apart, and the last rounds run for a few stragglers at nearly a full call's price): at 16 images
    a probe measured Jacobi L8 faster by the margin where whole runs of it measured 0.74x target-only. Falling
    back to target-only (the other way) is always judged; at several rows, speculation is the plan's call (its
    whole-image runs), and a plan the machine outgrew is timed again (plan_cache.update_from_run)."""
    return all_rows or rows == 1 or current != "target" or other == "target"


def record_rate(stats, label: str, tokens: int, seconds: float) -> None:
    rate = stats.mode_rates.get(label)
    if rate is None:
        rate = stats.mode_rates[label] = {"tokens": 0, "seconds": 0.0}
    rate["tokens"] += tokens
    rate["seconds"] += seconds


def measured_rounds(loop, proposal, stats, clock=time.perf_counter) -> None:
    """Every round of `loop` on one proposal kind, its tokens and seconds recorded (RunStats.mode_rates)."""
    label = proposal.label
    rounds, limit = 0, round_limit(loop.n, loop.total)
    while (act := loop.active()).size:
        rounds = next_round(rounds, limit, proposal.label)
        began = clock()
        tokens = proposal.round(act)
        record_rate(stats, label, int(tokens.sum()), clock() - began)

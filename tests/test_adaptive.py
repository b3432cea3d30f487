"""A run that follows the machine (runtime/adaptive.py): with per-call costs stubbed by a counted cost model (a
virtual clock the engine calls advance; nothing is timed), a run switches to the kind that is faster now, both
ways, does not flap where the kinds are close, and reports what it measured. Exactness of runs that switch
mid-image is tested with the two-sample tests in tests/test_speculative.py."""
from __future__ import annotations

import numpy as np
import pytest

from fastardiff.runtime.adaptive import Adapter, AdaptPolicy, Estimate, alternative_for, parse_label
from fastardiff.runtime.generation import GenerationConfig, GenerationError
from fastardiff.runtime.speculative import generate
from fastardiff.runtime.stats import RunStats

QUIET = lambda k: 1.0 + 0.05 * (k - 1)   # noqa: E731  a call over k tokens costs little more than a step
BUSY = lambda k: 1.0 + 1.5 * (k - 1)     # noqa: E731  ... or as much as k steps and more (memory-bound, loaded)


class CountedCosts:
    """The engines with every AR call charged to a virtual clock by `cost(k)` of the phase it falls in: `phases`
    [(calls, cost), ...] (the last phase lasts). `clock` reads it; `calls` counts every charged call."""

    def __init__(self, engines, phases):
        self.inner, self.manifest, self.capabilities = engines, engines.manifest, engines.capabilities
        self.phases, self.now, self.calls = phases, 0.0, 0
        self.rollouts = {g: self._drafting(fn) for g, fn in engines.rollouts.items()}
        jacobi = engines.target_jacobi
        self.target_jacobi = None if jacobi is None else self._charged(jacobi)

    def cost(self, k: int) -> float:
        left = self.calls
        for calls, cost in self.phases:
            if left < calls:
                return cost(k)
            left -= calls
        return self.phases[-1][1](k)

    def phase_at(self, call: int) -> int:
        return next((i for i, at in enumerate(np.cumsum([c for c, _ in self.phases])) if call < at),
                    len(self.phases) - 1)

    def clock(self) -> float:
        return self.now

    def _charged(self, fn):
        def call(tokens, *rest):
            self.now += self.cost(tokens.shape[1])
            self.calls += 1
            return fn(tokens, *rest)
        return call

    def _drafting(self, fn):
        def call(*args):
            self.now += 0.1                 # the shallow draft: cheap in every phase
            return fn(*args)
        return call

    def target_verify(self, tokens, *rest):
        return self._charged(self.inner.target_verify)(tokens, *rest)

    def draft_step(self, *args):
        return self._drafting(self.inner.draft_step)(*args)

    def decoder(self, *args):
        return self.inner.decoder(*args)


@pytest.fixture(scope="module")
def engines(shipped_checkpoint):
    from fastardiff.exporter.torch_backend import TorchEngines

    return TorchEngines(shipped_checkpoint, max_gamma=4)


def adaptive_run(engines, phases, mode, alternative, images=24, **settings):
    """One image per call: target-only probes a speculative kind at one row only (adaptive.probes_pay)."""
    costed = CountedCosts(engines, phases)
    gen = GenerationConfig(mode=mode, alternative=alternative, seed=3, **settings)
    stats = RunStats()
    adapter = Adapter(AdaptPolicy(), clock=costed.clock)
    generate(costed, np.arange(images) % 10, gen, stats, max_batch=1, adapter=adapter)
    return stats, costed


@pytest.mark.parametrize("start", ["quiet", "busy"])
def test_a_run_follows_the_cost_of_its_calls_both_ways(engines, start):
    """Quiet then busy (the plan target-only), and busy then quiet (the plan Jacobi): each run switches to the kind
    that is faster in the phase it is in, once per phase change, and back when the phase turns."""
    flip = 100                                      # charged calls in the first phase
    if start == "quiet":
        phases, mode, draft, alternative = [(flip, QUIET), (10 ** 9, BUSY)], "target", "model", "jacobi:8"
        first, second = ("target", "jacobi:8"), ("jacobi:8", "target")
    else:
        phases, mode, draft, alternative = [(flip, BUSY), (10 ** 9, QUIET)], "speculative", "jacobi", "target"
        first, second = ("jacobi:8", "target"), ("target", "jacobi:8")
    stats, costed = adaptive_run(engines, phases, mode, alternative, gamma=8, draft=draft)
    moves = [(s["from"], s["to"]) for s in stats.switches]
    assert moves == [first, second], stats.switches
    # the first switch inside the first phase, the second soon after the phase turned
    assert costed.calls > flip + 60
    summary = stats.summary()
    assert summary["switches"] == stats.switches and set(summary["mode_rates"]) == {"target", "jacobi:8"}
    rates = summary["mode_rates"]
    assert sum(r["tokens"] for r in rates.values()) == stats.tokens == 24 * 64
    assert all(r["seconds"] > 0 for r in rates.values())
    assert "switch at round" in stats.table() and "rate jacobi:8" in stats.table()


def test_switch_rounds_fall_in_the_right_phase(engines):
    """The switches happen where the costs changed: the first one before the first phase ends, the second one
    within a few probes after it (counted in engine calls)."""
    calls_at_round = []

    class Recording(Adapter):
        def decide(self, current, other, rows=None):
            verdict = super().decide(current, other, rows)
            if verdict == "switch":
                calls_at_round.append(costed.calls)
            return verdict

    costed = CountedCosts(engines, [(60, QUIET), (10 ** 9, BUSY)])
    adapter = Recording(AdaptPolicy(), clock=costed.clock)
    stats = RunStats()
    generate(costed, np.arange(12) % 10, GenerationConfig(mode="target", gamma=8, alternative="jacobi:8", seed=3),
             stats, max_batch=1, adapter=adapter)
    assert len(calls_at_round) == 2
    assert costed.phase_at(calls_at_round[0] - 1) == 0 and costed.phase_at(calls_at_round[1] - 1) == 1
    assert calls_at_round[1] - 60 < 60                    # corrected within a few probes of the change


@pytest.mark.parametrize("costs", ["near", "busy"])
def test_a_slower_or_close_alternative_is_never_switched_to_and_probing_stays_cheap(engines, costs):
    """Where the alternative is about as fast as the plan (within the margin) or much slower, the run never
    switches, and its probes cost at most the policy's budget: the run's time stays within 5 % (+ one probe's
    worth of slack) of what target-only alone would have taken for its tokens at the rate it measured."""
    cost = BUSY if costs == "busy" else (lambda k: 1.0 + 0.42 * (k - 1))   # Jacobi L = 8 ~10 % slower here
    stats, _ = adaptive_run(engines, [(10 ** 9, cost)], "target", "jacobi:8", gamma=8)
    assert stats.switches == []
    rates = stats.mode_rates
    assert rates["jacobi:8"]["tokens"] > 0                       # it did look
    alone = stats.tokens * rates["target"]["seconds"] / rates["target"]["tokens"]
    spent = sum(r["seconds"] for r in rates.values())
    assert spent <= 1.05 * alone + 4 * BUSY(9), (spent, alone)


def test_the_model_draft_catches_up_after_target_steps(engines):
    """Switching into the model draft after target-only rounds feeds the draft the tokens it missed (its first
    draft then reads the exact prefix): every draft call's cache length is at most one short of the accepted
    tokens' positions."""
    seen = []

    class Watch(CountedCosts):
        def draft_step(self, tokens, lengths, *rest):
            seen.append((tokens.shape[1], lengths.copy()))
            return super().draft_step(tokens, lengths, *rest)

    costed = Watch(engines, [(10 ** 9, QUIET)])
    stats = RunStats()
    gen = GenerationConfig(mode="target", gamma=3, alternative="model:3", seed=2)
    generate(costed, np.arange(4) % 10, gen, stats, max_batch=1, adapter=Adapter(clock=costed.clock))
    assert any(s["to"] == "rollout:3" for s in stats.switches), stats.switches
    assert max(width for width, _ in seen) == 4       # the catch-up, in chunks of gamma + 1 positions


def test_estimates_and_labels():
    e = Estimate(4)
    assert e.value() == (np.inf, np.inf)
    for tokens, seconds in ((2, 1.0), (4, 2.0), (2, 1.0)):
        e.add(tokens, seconds, rows=8)
    m, se = e.value()
    assert m == pytest.approx(0.5) and se == pytest.approx(0.0)
    e.add(1, 3.0, rows=8)
    assert e.value()[1] > 0
    e.add(10, 0.1, rows=2)                   # a ragged tail's round: compared only with rounds of about 2 rows
    assert e.value(8) == e.value(7) != e.value() and e.value(2) == (pytest.approx(0.01), np.inf)
    assert e.value(4) == (np.inf, np.inf)
    assert parse_label("target") == ("target", 0) and parse_label("jacobi:8") == ("jacobi", 8)
    assert parse_label("rollout:3") == parse_label("model:3") == ("model", 3)
    for bad in ("jacobi", "model:0", "target:2", "draft:2"):
        with pytest.raises(GenerationError, match="unknown proposal"):
            parse_label(bad)


def test_the_alternative_of_a_plan():
    from types import SimpleNamespace

    from fastardiff.runtime.gamma_auto import GammaChoice

    manifest = SimpleNamespace(family="drift-ar", engines={"draft_step": None, "target_verify": None})
    candidates = [{"draft": "model", "gamma": 4, "speedup": 1.3, "measured_speedup": 0.9},
                  {"draft": "jacobi", "gamma": 8, "speedup": 2.0, "measured_speedup": 1.05},
                  {"draft": "jacobi", "gamma": 16, "speedup": 2.2}]
    assert alternative_for(GammaChoice(None, "busy", 1.0, candidates), manifest) == "jacobi:8"
    assert alternative_for(GammaChoice(8, "fast", 1.0, candidates, "jacobi"), manifest) == "target"
    unmeasured = [{k: v for k, v in c.items() if k != "measured_speedup"} for c in candidates]
    assert alternative_for(GammaChoice(None, "busy", 1.0, unmeasured), manifest) == "jacobi:16"
    heads = SimpleNamespace(family="fast-ardiff", engines={"draft_step": None})
    assert alternative_for(GammaChoice(None, "busy", 1.0, candidates), heads) == "model:4"
    assert alternative_for(GammaChoice(None, "no candidates"), manifest) is None


def test_bad_alternatives_are_refused(engines):
    for gen, says in ((GenerationConfig(mode="draft", alternative="target"), "draft-only run does not adapt"),
                      (GenerationConfig(mode="target", alternative="jacobi:64"), "gamma 64"),
                      (GenerationConfig(mode="target", alternative="bogus"), "unknown proposal")):
        with pytest.raises(GenerationError, match=says):
            generate(engines, [1], gen)


def test_the_run_cli_adapts_planned_runs_only(engines):
    """--gamma auto adapts (to the plan's alternative) unless --adapt off; an explicit --gamma never does."""
    from fastardiff.runtime.cli import plan_generation
    from fastardiff.runtime.gamma_auto import GammaChoice

    busy = GammaChoice(None, "busy", 1.0, [{"draft": "jacobi", "gamma": 8, "speedup": 2.0, "measured_speedup": 0.9}],
                       "model", {"target": {"ms_per_token": 0.9}, "jacobi:8": {"ms_per_token": 1.0}})

    def plan(gamma, adapt):
        return plan_generation(engines, 1, gamma, "auto", True, "static", "speculative", 1.0, 1.0, 0.0, 0,
                               lambda *a: busy, None, adapt)[0]

    assert plan("auto", True).alternative == "jacobi:8" and plan("auto", True).mode == "target"
    assert plan("auto", True).plan_rates == (("jacobi:8", 1.0), ("target", 0.9))     # the run's prior
    assert plan("auto", False).alternative is None and plan("auto", False).plan_rates == ()
    assert plan(4, True).alternative is None


class RowCosts(CountedCosts):
    """A call costs a fixed part plus one per row and fed token (`per`): rounds over a ragged batch's few last rows
    are cheap per row in every kind."""

    def __init__(self, engines, per):
        super().__init__(engines, [(10 ** 9, None)])
        self.per = per

    def _charged(self, fn):
        def call(tokens, *rest):
            self.now += 1.0 + self.per * tokens.shape[0] * tokens.shape[1]
            self.calls += 1
            return fn(tokens, *rest)
        return call


def test_a_probe_is_judged_against_rounds_of_its_own_rows():
    """A ragged batch's tail rounds of few rows cost less per row: Jacobi rounds over 2 rows look 3x faster per
    token per row than target-only's over 8, but a probe over 8 rows has only target-only's 8-row rounds to be
    compared with: no switch on the tail's evidence ("unsure" until it is measured at 8 rows), and the switch
    once it is, measured faster there."""
    adapter = Adapter(AdaptPolicy())
    for _ in range(6):
        adapter.estimate("target").add(1.0, 1.0, rows=8)
        adapter.estimate("jacobi:8").add(3.0, 1.0, rows=2)
    assert adapter.decide("target", "jacobi:8") == "switch"             # every round pooled: the bias
    assert adapter.decide("target", "jacobi:8", rows=8) == "unsure"
    assert adapter.ratio("jacobi:8", "target", rows=8) == 1.0            # the prior: not measured at 8 rows
    for seconds in (0.70, 0.72, 0.71, 0.69):
        adapter.estimate("jacobi:8").add(1.0, seconds, rows=8)
    assert adapter.decide("target", "jacobi:8", rows=8) == "switch"
    assert "rounds of ~8 rows" in adapter.reason("jacobi:8", "target", 8)


def test_target_only_over_several_rows_never_probes_speculation(engines):
    """Costs that grow with a call's rows and fed tokens, 16 images in chunks of 8: a planned target-only run does
    not probe Jacobi at all (mid-run rounds cannot show what speculation costs a batch at its ragged end:
    adaptive.probes_pay), where the same run one image per call does; a planned Jacobi run over 8 rows still
    probes target-only (falling back is always judged)."""
    from fastardiff.runtime.adaptive import probes_pay

    assert probes_pay("target", "jacobi:8", 1) and not probes_pay("target", "jacobi:8", 2)
    assert probes_pay("jacobi:8", "target", 8) and probes_pay("model:4", "jacobi:8", 8)
    runs = {}
    for plan, alternative, per_call in (("target", "jacobi:8", 8), ("target", "jacobi:8", 1),
                                        ("jacobi", "target", 8)):
        costed = RowCosts(engines, per=0.2)
        stats = RunStats()
        gen = GenerationConfig(mode="target" if plan == "target" else "speculative", draft="jacobi", gamma=8,
                               alternative=alternative, seed=5, num_tokens=24)
        generate(costed, np.arange(16 if per_call == 8 else 4) % 10, gen, stats, max_batch=per_call,
                 adapter=Adapter(AdaptPolicy(budget=1.0), clock=costed.clock))
        runs[plan, per_call] = stats.mode_rates
    assert set(runs["target", 8]) == {"target"}
    assert runs["target", 1]["jacobi:8"]["tokens"] > 0
    assert runs["jacobi", 8]["target"]["tokens"] > 0


def test_an_alternative_never_probed_is_not_set_up(engines):
    """Target-only over several rows with a Jacobi alternative: the loop has one proposal kind and the KV cache of
    the sequence alone (no spare window positions, which attention would read every step; set up, 4 rows would
    get them); one row sets up both."""
    from fastardiff.runtime.speculative import ModelShape, start_loop

    gen = GenerationConfig(mode="target", gamma=8, alternative="jacobi:8", seed=1)
    seq_len = ModelShape.from_config(engines.manifest.config).seq_len
    shapes = {}
    for rows in (4, 1):
        loop, proposals = start_loop(engines, np.arange(rows), gen, np.random.default_rng(0), RunStats())
        shapes[rows] = [p.label for p in proposals], loop.target.cache.capacity
        loop.release()
    assert shapes[4] == (["target"], seq_len)
    assert shapes[1][0] == ["target", "jacobi:8"]

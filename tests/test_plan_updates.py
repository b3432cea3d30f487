"""A cached `--gamma auto` plan that later runs correct (runtime/plan_cache.py update_from_run): rates measured in
one run decide, a run's switch alone marks the plan stale, a drifted mode is timed again, any summary or cache is
tolerated, a stale plan is corrected within one run, and serving replicas follow their requests' rates."""
from __future__ import annotations

import json
import logging

from fastardiff.runtime.gamma_auto import GammaChoice
from fastardiff.runtime.plan_cache import (MIN_EVIDENCE_TOKENS, cached_choice, load_plan, plan_key, plan_path,
                                           store_plan, update_from_run)
from test_plan_cache import DRAFTS, cache, jacobi_choice, stub_engines  # noqa: F401  (cache: the fixture)


def _rates(**modes):
    """A run's stats summary with mode_rates {label: (tokens, ms per token)} (labels with ':' as '_')."""
    return {"mode_rates": {label.replace("_", ":"): {"tokens": t, "seconds": t * ms / 1000}
                           for label, (t, ms) in modes.items()}}


def _target_plan():
    return GammaChoice(None, "speculation cannot pay here (planned on a busy machine)", 10.0,
                       jacobi_choice().candidates, "model", {"target": {"ms_per_token": 10.0, "runs": 5},
                                                             "jacobi:12": {"ms_per_token": 11.0, "runs": 5}},
                       {"level": 0.95, "margin": 1.10, "pairs": 5, "stopped": "separated", "finalists": {}})


def test_a_run_that_contradicts_the_plan_corrects_it(cache, caplog):
    """Rates measured in the same run decide: a speculative mode that ran the margin faster than the planned
    target-only replaces it (and back: target-only faster than the planned speculation); a contradiction inside
    the margin or on too few tokens changes nothing. The loop's own switch never rewrites the plan: with
    whole-run rates inside the margin the plan stays (its probes judged short stretches), without rates of the
    planned mode the plan is marked stale and timed again. Every run's rates are kept in the plan (observed)."""
    key = plan_key(stub_engines(), 1, 1.0, DRAFTS, {})
    store_plan(key, _target_plan())
    enough = MIN_EVIDENCE_TOKENS
    kept = update_from_run(key, _target_plan(), _rates(target=(200, 5.0), jacobi_12=(enough, 4.6)))   # 1.09x
    assert kept.gamma is None and load_plan(key).gamma is None
    few = update_from_run(key, _target_plan(), _rates(target=(200, 5.0), jacobi_12=(enough - 1, 2.5)))
    assert few.gamma is None
    with caplog.at_level(logging.INFO, logger="fastardiff.runtime"):
        fixed = update_from_run(key, _target_plan(), _rates(target=(200, 5.0), jacobi_12=(enough, 2.5)))
    assert (fixed.draft, fixed.gamma) == ("jacobi", 12) and "updated by a later run" in fixed.reason
    assert "updated the cached --gamma auto plan" in caplog.text
    assert load_plan(key).to_dict() == fixed.to_dict()
    record = json.loads(plan_path(key).read_text())
    assert record["observed"]["jacobi:12"]["runs"] == 3 and record["observed"]["target"]["tokens"] == 600
    back = update_from_run(key, fixed, _rates(target=(enough, 5.0), jacobi_12=(200, 5.5)))     # busy again
    assert back.gamma is None and load_plan(key).gamma is None
    moved = [{"round": 3, "from": "target", "to": "jacobi:12", "reason": "measured faster"}]
    close = update_from_run(key, back, {**_rates(target=(200, 5.0), jacobi_12=(enough, 4.6)), "switches": moved})
    assert close.gamma is None and load_plan(key).gamma is None          # 1.09x over the whole run: kept
    moved = [{"round": 3, "from": "target", "to": "rollout:2", "reason": "measured faster"}]
    with caplog.at_level(logging.INFO, logger="fastardiff.runtime"):
        switched = update_from_run(key, back, {**_rates(target=(8, 5.0), rollout_2=(300, 4.0)), "switches": moved})
    assert switched.gamma is None and load_plan(key) is None            # stale: the next run times again
    assert "switched from the planned target to model:2" in caplog.text


def test_a_plan_whose_mode_drifted_is_timed_again(cache, caplog):
    """A run of the planned mode alone that ran far from the plan's own measurement (the machine changed since
    planning) marks the plan stale: the next run times the engines again; within DRIFT it is kept."""
    from fastardiff.runtime.plan_cache import DRIFT

    key = plan_key(stub_engines(), 1, 1.0, DRAFTS, {})
    store_plan(key, _target_plan())
    update_from_run(key, _target_plan(), _rates(target=(500, 10.0 / DRIFT * 1.01)))
    assert load_plan(key) is not None
    with caplog.at_level(logging.INFO, logger="fastardiff.runtime"):
        update_from_run(key, _target_plan(), _rates(target=(500, 10.0 / DRIFT / 1.01)))
        assert load_plan(key) is None and "contradicted by a later run" in caplog.text
    timed = []
    cached_choice(stub_engines(), 1, 1.0, DRAFTS, {}, lambda: timed.append(1) or _target_plan())
    assert timed == [1] and load_plan(key) is not None                   # re-planned, no longer stale


def test_update_from_run_tolerates_any_summary_and_cache(cache, caplog):
    """Summaries without rates (or with garbage, unknown modes, modes the request did not ask for) change nothing
    and raise nothing; a corrupt cache is replaced by the run's plan; no key (no engine hashes): nothing written."""
    key = plan_key(stub_engines(), 1, 1.0, ("jacobi",), {})
    store_plan(key, _target_plan())
    before = plan_path(key).read_bytes()
    for summary in (None, {}, [], {"mode_rates": "fast"}, {"mode_rates": {"target": {"tokens": "a"}}},
                    {"mode_rates": {"target": {"tokens": 100, "seconds": -1.0}}},
                    {"mode_rates": {"warp:3": {"tokens": 100, "seconds": 0.1}}, "switches": "many"},
                    _rates(model_2=(200, 1.0))):                         # the model draft was not asked for
        assert update_from_run(key, _target_plan(), summary).to_dict() == _target_plan().to_dict()
        assert plan_path(key).read_bytes() == before, summary
    for summary in (_rates(target=(200, 10.0), model_2=(200, 1.0)), {**_rates(target=(200, 10.0)), "switches": [7]}):
        assert update_from_run(key, _target_plan(), summary).gamma is None and load_plan(key).gamma is None
    plan_path(key).write_text("{broken")
    with caplog.at_level(logging.WARNING, logger="fastardiff.runtime"):
        got = update_from_run(key, _target_plan(), _rates(target=(200, 5.0), jacobi_12=(100, 2.0)))
    assert got.gamma == 12 and "ignoring the cached --gamma auto plan" in caplog.text
    assert load_plan(key).gamma == 12
    assert update_from_run(None, _target_plan(), _rates(target=(200, 5.0))) is not None


def test_a_stale_plan_is_corrected_within_one_run(shared_onnx_export, cache, tmp_path, capsys, monkeypatch):
    """Stubbed costs that change between runs. Planned while the machine was busy (every speculative mode measured
    slower than target-only): target-only is cached. The machine goes quiet: the next run takes the cached plan
    (nothing timed), runs target-only, and its loop's re-check of the planned Jacobi finalist (the per-mode rates
    the loop reports in its stats, stubbed here) shows it 2x faster: that one run corrects the plan, and the next
    speculates without timing anything. And back: busy again, a run whose loop fell back to target-only (its
    switch and rates) puts target-only back in the plan."""
    import numpy as np

    from cli_runner import run_cli
    from fastardiff.runtime import gamma_auto, speculative
    from fastardiff.runtime.stats import RunStats
    from test_gamma_auto import _fixed_planning_costs

    machine, probe, planned_runs = {"busy": True}, {}, []
    _fixed_planning_costs(monkeypatch)
    timed_calls, costs = [], gamma_auto.time_engine_calls
    monkeypatch.setattr(gamma_auto, "time_engine_calls", lambda *a, **kw: timed_calls.append(1) or costs(*a, **kw))

    def ms(mode):                          # per token: speculation slower than target-only on the busy machine
        return 10.0 if mode == "target" else 11.0 if machine["busy"] else 5.0

    class LoopStats(RunStats):
        rates = None
        switches = None

        def summary(self):
            return {**super().summary(), "mode_rates": self.rates, **({"switches": self.switches}
                                                                      if self.switches else {})}

    def fake_generate(engines, classes, gen, stats=None, max_batch=None, on_images=None, warm=False):
        if gen.num_tokens is not None:                       # --gamma auto's whole-image check
            planned_runs.append(gen)
            stats = stats or RunStats()
            stats.tokens = len(classes) * gen.num_tokens
            stats.total_seconds = ms(gen.mode) * stats.tokens / 1000
            return None, stats
        c = engines.manifest.config
        n = len(classes) * (c["image_size"] // c["patch"]) ** 2
        stats = LoopStats(mode=gen.mode, gamma=gen.gamma, draft=gen.draft, images=len(classes), tokens=n)
        running = "target" if gen.mode == "target" else f"{gen.draft}:{gen.gamma}"
        other = probe.get("label") if running == "target" else "target"     # what the loop re-checks
        stats.rates = {running: {"tokens": n // 2, "seconds": n // 2 * ms(gen.mode) / 1000}}
        if other:
            stats.rates[other] = {"tokens": n // 2, "seconds": n // 2 * ms("target" if other == "target" else
                                                                          "speculative") / 1000}
        if machine["busy"] and running != "target":          # the loop fell back to target-only
            stats.switches = [{"round": 5, "from": running, "to": "target", "reason": "measured slower"}]
        images = np.zeros((len(classes), c["channels"], c["image_size"], c["image_size"]), np.float32)
        on_images(images, 0)
        return None, stats

    monkeypatch.setattr(speculative, "generate", fake_generate)
    args = ["run", "--engine", str(shared_onnx_export[0]), "--prompt", "3", "--num-images", "1", "--out",
            str(tmp_path / "a.png"), "--stats-json", str(tmp_path / "s.json")]

    def run():
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
        return json.loads((tmp_path / "s.json").read_text()), err

    stats, err = run()
    assert "timed now" in err and stats["mode"] == "target" and timed_calls == [1] and planned_runs
    finalists = stats["gamma_choice"]["confidence"]["finalists"]
    probe["label"] = next(label for label in finalists if label.startswith("jacobi:"))
    machine["busy"], planned = False, len(planned_runs)
    stats, err = run()                                       # quiet: the cached plan, corrected by this run
    assert "cached plan" in err and stats["mode"] == "target"
    stats, err = run()
    assert "cached plan" in err and (stats["mode"], f"{stats['draft']}:{stats['gamma']}") == ("speculative",
                                                                                            probe["label"])
    assert "updated by a later run" in stats["gamma_choice"]["reason"]
    machine["busy"] = True
    stats, err = run()                                       # busy again: the loop's fallback corrects it back
    stats, err = run()
    assert "cached plan" in err and stats["mode"] == "target"
    assert timed_calls == [1] and len(planned_runs) == planned      # nothing timed after the first run


def test_over_several_images_rates_move_a_plan_to_target_only_only(cache):
    """A plan for several images: a speculative mode that ran faster mid-run does not replace the planned
    target-only (its rate there does not see a speculative batch's ragged end: adaptive.probes_pay), target-only
    that ran faster replaces a planned speculation, and a drifted target-only is timed again."""
    key = plan_key(stub_engines(), 16, 1.0, DRAFTS, {})
    store_plan(key, _target_plan())
    kept = update_from_run(key, _target_plan(), _rates(target=(200, 10.0), jacobi_12=(200, 5.0)))
    assert kept.gamma is None and load_plan(key).gamma is None
    store_plan(key, jacobi_choice())
    back = update_from_run(key, jacobi_choice(), _rates(target=(200, 1.0), **{jacobi_choice().label.replace(":", "_"):
                                                                             (200, 5.0)}))
    assert back.gamma is None and load_plan(key).gamma is None and "updated by a later run" in back.reason


def test_a_serving_replica_follows_its_requests_rates(cache):
    """A replica folds each request's measured rates into its plan (the user's plan cache and its own later
    requests), as `fastardiff run` does: a request whose loop measured Jacobi 2x faster than the planned
    target-only makes the replica's next requests speculate; a request without rates changes nothing."""
    import threading

    from fastardiff.runtime.serve.replica import Generator

    key = plan_key(stub_engines(), 1, 1.0, DRAFTS, {})
    store_plan(key, _target_plan())
    replica = object.__new__(Generator)
    replica._choice_lock, planned = threading.Lock(), _target_plan()
    replica._choices, replica._plan_keys = {(1.0, DRAFTS): planned}, {(1.0, DRAFTS): key}
    replica._follow_run(planned, {"images": 1})
    assert replica._choices[(1.0, DRAFTS)] is planned
    replica._follow_run(planned, _rates(target=(200, 10.0), jacobi_12=(MIN_EVIDENCE_TOKENS, 5.0)))
    now = replica._choices[(1.0, DRAFTS)]
    assert (now.draft, now.gamma) == ("jacobi", 12) and load_plan(key).gamma == 12
    replica._follow_run(planned, _rates(target=(200, 10.0), jacobi_12=(MIN_EVIDENCE_TOKENS, 5.0)))  # a stale one
    assert replica._choices[(1.0, DRAFTS)] is now

"""--gamma auto: the cost model, and the choice on engines where speculation cannot pay."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fastardiff.runtime.gamma_auto import acceptance_curve, choose_gamma, expected_tokens


def test_expected_tokens_is_the_accepted_prefix_mean():
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([0.8, 0.5, 0.25], 3) == pytest.approx(1 + 0.8 + 0.4 + 0.1)
    assert expected_tokens([0.9], 3) == pytest.approx(1 + 0.9 + 0.81 + 0.729)  # the last value repeats
    assert expected_tokens([1.0] * 4, 4) == 5.0
    assert expected_tokens([0.0] * 4, 4) == 1.0


def test_acceptance_curve_picks_the_nearest_guidance_scale():
    cal = {"extra": {"acceptance_by_position": {"1": [0.7, 0.8], "2": [0.5, 0.6]}}}
    assert acceptance_curve(cal, 1.0) == [0.7, 0.8]
    assert acceptance_curve(cal, 1.8) == [0.5, 0.6]
    assert acceptance_curve({"extra": {}}, 1.0) is None


def _stub_call_costs(step: float, rollout: float, verify: float, jacobi: float | None = None):
    """A stand-in for gamma_auto.time_engine_calls with fixed milliseconds per call (jacobi None: no Jacobi key)."""
    def costs(engines, batch, cfg_scale, gammas, verify_widths=(), jacobi_windows=()):
        out = {"step": step, **{("rollout", g): rollout for g in gammas}}
        out.update({("verify", k): verify for k in {g + 1 for g in gammas} | set(verify_widths)})
        if jacobi is not None:
            out.update({("jacobi", w): jacobi for w in jacobi_windows})
        return out
    return costs


def _engines_with_extra(checkpoint, extra: dict, max_gamma: int):
    """Torch engines of `checkpoint` whose calibration's extra figures are `extra`."""
    from fastardiff.exporter.torch_backend import TorchEngines

    ckpt = dataclasses.replace(checkpoint, calibration=dataclasses.replace(checkpoint.calibration, extra=extra))
    return TorchEngines(ckpt, max_gamma=max_gamma)


def _engines_with_curve(checkpoint, curve):
    return _engines_with_extra(checkpoint, {"acceptance_by_position": {"1": curve}}, 4)


def _with_jacobi_table(checkpoint, table):
    return _engines_with_extra(checkpoint, {"jacobi_tokens_per_call": {"1": table}}, 2)


def test_draft_as_deep_as_target_runs_target_only(monkeypatch):
    """Even at 95 % acceptance a draft as deep as its target cannot pay: each draft costs a target step. The
    per-call costs are those of such a pair (a rollout of g drafts = g target steps, a k-token verify slightly more
    than a step), fixed here: measured on a busy 2-core machine, one stalled step timing flipped this decision."""
    import torch

    from fastardiff.runtime import gamma_auto

    def costs(engines, batch, cfg_scale, gammas, verify_widths=(), jacobi_windows=()):
        out = {"step": 1.0, **{("rollout", g): 1.0 * g for g in gammas}}
        out.update({("verify", k): 1.0 + 0.05 * k for k in {g + 1 for g in gammas} | set(verify_widths)})
        return out

    monkeypatch.setattr(gamma_auto, "time_engine_calls", costs)
    monkeypatch.setattr(gamma_auto, "host_ms", lambda engines, batch, cfg_scale, runs, tokens=16:
                        {key: 0.1 for key in runs})

    from fastardiff.recipes.checkpoint import DriftARCheckpoint
    from fastardiff.recipes.config import Calibration, DriftARConfig
    from fastardiff.recipes.models import build_models

    cfg = DriftARConfig(name="deep-draft", target_layers=3, draft_layers=3)
    torch.manual_seed(0)
    ckpt = DriftARCheckpoint(cfg, Calibration(e_max=1.0), *build_models(cfg)).eval()
    choice = choose_gamma(_engines_with_curve(ckpt, [0.95] * 8), batch=1, cfg_scale=1.0)
    assert choice.gamma is None and choice.mode == "target"
    assert "cannot pay" in choice.reason
    assert len(choice.candidates) == 4 and all(c["speedup"] < 1.10 for c in choice.candidates), choice.table()


def test_no_calibration_or_no_rollouts_runs_target_only(random_checkpoint):
    from fastardiff.exporter.torch_backend import TorchEngines

    choice = choose_gamma(TorchEngines(random_checkpoint, max_gamma=2), batch=1, cfg_scale=1.0)
    assert choice.gamma is None and "acceptance" in choice.reason
    engines = _engines_with_curve(random_checkpoint, [0.9] * 8)
    engines.rollouts = {}
    engines.capabilities = dataclasses.replace(engines.capabilities, rollout_gammas=frozenset())
    assert choose_gamma(engines, batch=1, cfg_scale=1.0).gamma is None


def test_run_cli_gamma_auto_reports_its_choice(random_checkpoint_path, tmp_path, capsys):
    """`fastardiff run --gamma auto` (the default) prints the table and records the choice in the stats."""
    import json

    from cli_runner import run_cli

    stats = tmp_path / "stats.json"
    code, out, err = run_cli(["run", "--ckpt", str(random_checkpoint_path), "--prompt", "3", "--out",
                              str(tmp_path / "a.png"), "--stats-json", str(stats)], capsys)
    assert code == 0, err
    assert "gamma auto:" in err
    summary = json.loads(stats.read_text())
    assert summary["gamma_choice"]["mode"] == summary["mode"]
    assert (tmp_path / "a.png").exists()


def test_gamma_flag_rejects_garbage(random_checkpoint_path, tmp_path, capsys):
    from cli_runner import run_cli

    for bad in ("0", "-2", "abc", "2.5"):
        code, out, err = run_cli(["run", "--ckpt", str(random_checkpoint_path), "--prompt", "3", "--gamma", bad,
                                  "--out", str(tmp_path / "x.png")], capsys)
        assert code == 2, (bad, err)
        assert "--gamma" in err
        assert not (tmp_path / "x.png").exists()


def test_engine_timings_are_interleaved_and_a_wider_call_is_never_cheaper(random_checkpoint, monkeypatch):
    """The calls are timed round-robin (a stall hits every candidate alike), and a verify timed below the 1-token
    step (noise: it runs the same network over more tokens) is raised to the step's cost."""
    import time

    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.gamma_auto import TIMED_CALLS, WARMUP_CALLS, time_engine_calls

    engines = TorchEngines(random_checkpoint, max_gamma=2)
    real, widths = engines.target_verify, []

    def slow_step_verify(tokens, *rest):
        widths.append(tokens.shape[1])
        if tokens.shape[1] == 1:
            time.sleep(0.02)                 # a step far slower than the wider calls: what a stall looks like
        return real(tokens, *rest)

    engines.target_verify = slow_step_verify
    costs = time_engine_calls(engines, 1, 1.0, [], verify_widths=[3, 5])
    assert costs["step"] >= 20.0
    assert costs[("verify", 3)] >= costs["step"] and costs[("verify", 5)] >= costs["step"]
    timed = widths[3 * WARMUP_CALLS:]
    assert timed == [1, 3, 5] * TIMED_CALLS
    # the raise itself, on fixed timings (a loaded machine can make the wide calls slower than the stalled step)
    from fastardiff.runtime import gamma_auto

    fixed = {"step": 5.0, ("verify", 3): 1.0, ("verify", 5): 7.0}
    monkeypatch.setattr(gamma_auto, "interleaved_median_ms", lambda calls: {k: fixed[k] for k in calls})
    costs = time_engine_calls(engines, 1, 1.0, [], verify_widths=[3, 5])
    assert costs == {"step": 5.0, ("verify", 3): 5.0, ("verify", 5): 7.0}


def test_target_only_is_costed_warm_as_it_runs(random_checkpoint, monkeypatch):
    """The target step is costed as target-only runs it (back to back, warm), never above the interleaved, cold
    per-call timing: a cold 1 s step (stubbed) must not credit speculation with 1 s per token saved."""
    from fastardiff.runtime import gamma_auto

    monkeypatch.setattr(gamma_auto, "time_engine_calls", _stub_call_costs(step=1000.0, rollout=1.0, verify=1000.0))
    monkeypatch.setattr(gamma_auto, "host_ms", lambda engines, batch, cfg_scale, runs, tokens=16:
                        {key: 0.0 for key in runs})
    engines = _engines_with_curve(random_checkpoint, [0.9] * 8)
    warm = gamma_auto.warm_step_ms(engines, 1, 1.0)
    choice = choose_gamma(engines, batch=1, cfg_scale=1.0)
    assert 0.0 < warm < 1000.0 and choice.target_step_ms < 1000.0
    # verifies still cost 1000 ms, the step only what it runs at: no draft length can pay
    assert choice.gamma is None and all(c["speedup"] < 1.0 for c in choice.candidates), choice.table()


def _stub_run_costs(monkeypatch, ms_per_token):
    """speculative.generate replaced by a stand-in that runs no engine and reports ms_per_token(gen) milliseconds
    per token as its time (gen: the GenerationConfig; its seed moves with each paired repeat). Returns the list of
    the configs it was called with."""
    from fastardiff.runtime import speculative
    from fastardiff.runtime.stats import RunStats

    calls = []

    def fake_generate(engines, classes, gen, stats=None, **kw):
        calls.append(gen)
        stats = stats or RunStats(mode=gen.mode, gamma=gen.gamma, draft=gen.draft)
        tokens = len(classes) * gen.num_tokens
        stats.tokens, stats.target_calls = stats.tokens + tokens, stats.target_calls + gen.num_tokens
        stats.total_seconds += ms_per_token(gen) * tokens / 1000
        return None, stats

    monkeypatch.setattr(speculative, "generate", fake_generate)
    return calls


def _fixed_planning_costs(monkeypatch):
    """The cost model's inputs fixed: a Jacobi round of window L costs 1.5 steps (predicted well above the margin
    for the 4.9 tokens per call of _with_jacobi_table below)."""
    from fastardiff.runtime import gamma_auto

    monkeypatch.setattr(gamma_auto, "time_engine_calls", _stub_call_costs(step=1.0, rollout=0.5, verify=1.2,
                                                                          jacobi=1.5))
    monkeypatch.setattr(gamma_auto, "warm_step_ms", lambda engines, batch, cfg_scale, tokens=16: 1.0)
    monkeypatch.setattr(gamma_auto, "host_ms", lambda engines, batch, cfg_scale, runs, tokens=16:
                        {key: 0.1 for key in runs})


def test_whole_image_runs_overrule_the_prediction(random_checkpoint, monkeypatch):
    """A calibration that promises 4.9 tokens per call predicts Jacobi far ahead; whole-image runs decide: measured
    slower -> target-only, measured faster -> the finalist runs. One finalist per proposal kind (its best predicted
    candidate) runs against target-only."""
    from fastardiff.runtime.gamma_runs import MIN_PAIRS

    engines = _with_jacobi_table(random_checkpoint, {"2": 2.9, "4": 4.9})
    _fixed_planning_costs(monkeypatch)
    speedup = {"jacobi": 0.8}
    calls = _stub_run_costs(monkeypatch, lambda gen: 10.0 if gen.mode == "target" else 10.0 / speedup[gen.draft])
    slow = choose_gamma(engines, batch=1, cfg_scale=1.0)
    predicted = max(slow.candidates, key=lambda c: c["speedup"])
    assert predicted["speedup"] >= 1.10                                  # the prediction alone would speculate
    assert {(g.mode, g.draft, g.gamma) for g in calls} == {("target", "model", 1),
                                                          ("speculative", "jacobi", predicted["gamma"])}
    assert len(calls) == 2 * (1 + MIN_PAIRS)          # constant costs: separated after the fewest pairs
    assert slow.gamma is None and slow.mode == "target" and "did not in whole-image runs" in slow.reason, slow.table()
    assert predicted["measured_speedup"] == pytest.approx(0.8)
    speedup["jacobi"] = 2.0
    fast = choose_gamma(engines, batch=1, cfg_scale=1.0)
    predicted = max(fast.candidates, key=lambda c: c["speedup"])        # timed again: the ranking may move
    assert (fast.draft, fast.gamma) == ("jacobi", predicted["gamma"]) and "measured 2.00x" in fast.reason
    assert "measured" in fast.table()


@pytest.mark.parametrize("measured, runs", [(1.0, None), (1.099, None), (1.101, "jacobi"), (1.5, "jacobi")])
def test_a_finalist_runs_only_above_the_margin(random_checkpoint, monkeypatch, measured, runs):
    """The 1.10x margin at both sides: a finalist measured between 1.00x and the margin (just below it) leaves
    target-only running; just above it, the finalist runs. The whole-image costs are stubbed (constant: the
    verdict is certain after the fewest pairs) and the figures land in the choice's confidence record."""
    from fastardiff.runtime.gamma_runs import MIN_PAIRS

    _fixed_planning_costs(monkeypatch)
    calls = _stub_run_costs(monkeypatch, lambda gen: 10.0 if gen.mode == "target" else 10.0 / measured)
    choice = choose_gamma(_with_jacobi_table(random_checkpoint, {"2": 2.9, "4": 4.9}), batch=1, cfg_scale=1.0)
    assert (choice.draft if choice.gamma else None) == runs, choice.table()
    finalist = choice.confidence["finalists"][f"jacobi:{max(c['gamma'] for c in choice.candidates)}"]
    assert finalist["speedup"] == pytest.approx(measured, abs=1e-4)
    assert finalist["verdict"] == ("faster" if runs else "short of the margin")
    assert choice.confidence["pairs"] == MIN_PAIRS and choice.confidence["stopped"] == "separated"
    assert len(calls) == 2 * (1 + MIN_PAIRS)
    assert set(choice.measured) == {"target", f"jacobi:{max(c['gamma'] for c in choice.candidates)}"}
    assert choice.to_dict()["confidence"] == choice.confidence and "confidence 95 %" in choice.table()


@pytest.mark.parametrize("measured, runs", [(1.099, None), (1.101, 2)])
def test_diffusion_head_runs_take_the_margin_too(random_checkpoint, monkeypatch, measured, runs):
    """choose_by_runs (the diffusion-head families' whole-run choice) at both sides of the margin: only the
    draft length measured above it runs."""
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.gamma_runs import choose_by_runs

    _stub_run_costs(monkeypatch, lambda gen: 10.0 if gen.mode == "target" else
                    10.0 / (measured if gen.gamma == 2 else 0.9))
    choice = choose_by_runs(TorchEngines(random_checkpoint, max_gamma=3), 1, 1.0, 1.10, {})
    assert [c["gamma"] for c in choice.candidates] == [1, 2, 3]
    assert choice.gamma == runs, choice.table()
    assert choice.confidence["finalists"]["model:2"]["speedup"] == pytest.approx(measured, abs=1e-4)


def test_noisy_runs_that_cannot_be_separated_run_target_only(random_checkpoint, monkeypatch):
    """Pairs alternating 1.6x and 0.8x average above the margin but cannot be told from target-only at the stated
    confidence: every allowed pair runs, then target-only, and the choice says why and how sure it was."""
    from fastardiff.runtime.gamma_runs import MAX_PAIRS

    _fixed_planning_costs(monkeypatch)
    calls = _stub_run_costs(monkeypatch, lambda gen: 10.0 if gen.mode == "target" else
                            10.0 / (1.6 if gen.seed % 2 else 0.8))
    choice = choose_gamma(_with_jacobi_table(random_checkpoint, {"4": 4.9}), batch=1, cfg_scale=1.0)
    assert choice.gamma is None and "not separated from target-only" in choice.reason, choice.table()
    verdict = choice.confidence["finalists"]["jacobi:4"]
    assert verdict["verdict"] == "undecided" and verdict["speedup"] >= 1.10 and verdict["low"] < 1.0
    assert choice.confidence["pairs"] == MAX_PAIRS and choice.confidence["stopped"] == "at most pairs"
    assert len(calls) == 2 * (1 + MAX_PAIRS)


@pytest.mark.parametrize("speedups, runs", [((1.8, 2.2, 1.9), "jacobi"), ((0.7, 0.9, 0.8), None)])
def test_separated_noisy_runs_stop_early(random_checkpoint, monkeypatch, speedups, runs):
    """Noisy pairs that are clearly faster (or clearly slower) are separated well before MAX_PAIRS: the check
    stops adding runs once the confidence says so."""
    from fastardiff.runtime.gamma_runs import MAX_PAIRS

    _fixed_planning_costs(monkeypatch)
    calls = _stub_run_costs(monkeypatch, lambda gen: 10.0 if gen.mode == "target" else
                            10.0 / speedups[gen.seed % 3])
    choice = choose_gamma(_with_jacobi_table(random_checkpoint, {"4": 4.9}), batch=1, cfg_scale=1.0)
    assert (choice.draft if choice.gamma else None) == runs, choice.table()
    assert choice.confidence["stopped"] == "separated" and choice.confidence["pairs"] < MAX_PAIRS
    assert len(calls) == 2 * (1 + choice.confidence["pairs"])


def test_t_quantile_matches_students_table():
    from fastardiff.runtime.gamma_runs import t_quantile

    table = {(0.95, 2): 2.920, (0.95, 3): 2.353, (0.95, 5): 2.015, (0.95, 10): 1.812, (0.95, 30): 1.697,
             (0.975, 2): 4.303, (0.975, 4): 2.776, (0.975, 15): 2.131, (0.99, 3): 4.541, (0.99, 8): 2.896}
    for (p, df), t in table.items():
        assert t_quantile(p, df) == pytest.approx(t, rel=5e-3), (p, df)


def test_paired_runs_interleave_whole_images(random_checkpoint, monkeypatch):
    """Each run gets one warm-up, then the timed repeats go round-robin (A B A B ...) with the classes and the seed
    moving each repeat; a whole image's tokens, not decoded; each pair's two runs are one repeat."""
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime import speculative
    from fastardiff.runtime.gamma_runs import MIN_PAIRS, decide_by_runs

    calls, real = [], speculative.generate

    def recording(engines, classes, gen, stats=None, **kw):
        calls.append((gen.mode, gen.gamma, gen.seed, tuple(classes), gen.num_tokens))
        return real(engines, classes, gen, stats, **kw)

    monkeypatch.setattr(speculative, "generate", recording)
    engines = TorchEngines(random_checkpoint, max_gamma=2)
    verdicts, measured, confidence, summaries = decide_by_runs(
        engines, 2, 1.0, 1.10, {None: ("target", "model", 1), "j": ("speculative", "jacobi", 2)},
        max_pairs=MIN_PAIRS, budget_s=1e6)
    tokens = random_checkpoint.config.num_tokens
    assert [c[:2] for c in calls] == [("target", 1), ("speculative", 2)] * (1 + MIN_PAIRS)
    assert all(c[4] == tokens for c in calls)
    timed = calls[2:]
    assert [c[2] for c in timed] == [1, 1, 2, 2, 3, 3] and timed[0][3] != timed[2][3]
    assert set(measured) == {"target", "jacobi:2"} and all(m["runs"] == MIN_PAIRS for m in measured.values())
    assert verdicts["j"]["pairs"] == confidence["pairs"] == MIN_PAIRS
    assert summaries["j"]["target_calls"] < summaries[None]["target_calls"]    # its own summary: fewer calls


def test_timed_runs_keep_to_their_time_budget(random_checkpoint, monkeypatch):
    """Where the repeats so far say one more would end past the budget, no more run (never below the minimum)."""
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime import gamma_auto, speculative

    calls, real = [], speculative.generate
    monkeypatch.setattr(speculative, "generate", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    engines = TorchEngines(random_checkpoint, max_gamma=2)
    runs = {None: ("target", "model", 1), "j": ("speculative", "jacobi", 2)}
    gamma_auto._timed_runs(engines, 1, 1.0, runs, 8, 5, None, vary=True, budget_s=0.0)
    assert len(calls) == 2 + 2 * 2                   # warm-ups, then 2 repeats of both
    calls.clear()
    gamma_auto._timed_runs(engines, 1, 1.0, runs, 8, 5, None, vary=True, budget_s=1e6)
    assert len(calls) == 2 + 5 * 2


def test_a_named_draft_the_engines_cannot_run_is_refused_whatever_gamma_says():
    """One rule for `--draft jacobi` on a family without Gaussian tokens and `--draft model` on engines without
    a draft model: refused in one line naming the option and the fix, with `--gamma auto` as with `--gamma 2`,
    before anything is timed."""
    from types import SimpleNamespace

    from fastardiff.runtime.cli import plan_generation
    from fastardiff.runtime.generation import GenerationError

    def engines(family, names):
        return SimpleNamespace(manifest=SimpleNamespace(family=family, engines=dict.fromkeys(names), gamma=2,
                                                        max_batch=8, config={}))

    timed = []
    for eng, draft, message in ((engines("fast-ardiff", ["target_verify", "draft_step"]), "jacobi",
                                 "--draft jacobi needs explicit Gaussian tokens"),
                                (engines("drift-ar", ["target_verify", "decoder"]), "model",
                                 "no draft model .* run with --draft jacobi")):
        for gamma in ("auto", 2):
            with pytest.raises(GenerationError, match=message):
                plan_generation(eng, 1, gamma, draft, True, "static", "speculative", 1.0, 1.0, 0.0, 0,
                                lambda *a: timed.append(a))
    assert timed == []

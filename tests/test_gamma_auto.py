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


def test_engine_timings_are_interleaved_and_a_wider_call_is_never_cheaper(random_checkpoint):
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
    assert costs[("verify", 3)] == costs[("verify", 5)] == costs["step"]
    timed = widths[3 * WARMUP_CALLS:]
    assert timed == [1, 3, 5] * TIMED_CALLS


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


def test_whole_image_runs_overrule_the_prediction(random_checkpoint, monkeypatch):
    """A calibration that promises 4.9 tokens per call predicts Jacobi far ahead; whole-image runs decide: measured
    slower than the margin -> target-only, measured faster -> the finalist runs. One finalist per proposal kind
    (its best predicted candidate) runs against target-only."""
    from fastardiff.runtime import gamma_auto

    engines = _with_jacobi_table(random_checkpoint, {"2": 2.9, "4": 4.9})
    asked, measured = [], {"jacobi": 1.25}

    # per-call costs fixed (a loaded machine's timings must not decide what the prediction says)
    monkeypatch.setattr(gamma_auto, "time_engine_calls",
                        _stub_call_costs(step=1.0, rollout=0.5, verify=1.2, jacobi=1.5))
    monkeypatch.setattr(gamma_auto, "warm_step_ms", lambda engines, batch, cfg_scale, tokens=16: 1.0)
    monkeypatch.setattr(gamma_auto, "host_ms", lambda engines, batch, cfg_scale, runs, tokens=16:
                        {key: 0.1 for key in runs})

    def runs(engines, batch, cfg_scale, runs, tokens=None, repeats=gamma_auto.CONFIRM_RUNS, options=None,
             budget_s=None):
        asked.append(dict(runs))
        return {key: (1.0 if key is None else measured[key[0]], {}) for key in runs}

    monkeypatch.setattr(gamma_auto, "measure_runs", runs)
    slow = choose_gamma(engines, batch=1, cfg_scale=1.0)
    predicted = max(slow.candidates, key=lambda c: c["speedup"])
    assert predicted["speedup"] >= 1.10                                  # the prediction alone would speculate
    assert asked == [{None: ("target", "model", 1), ("jacobi", predicted["gamma"]):
                      ("speculative", "jacobi", predicted["gamma"])}]
    assert slow.gamma is None and slow.mode == "target" and "did not in whole-image runs" in slow.reason, slow.table()
    assert predicted["measured_speedup"] == pytest.approx(0.8)
    measured["jacobi"] = 0.5
    fast = choose_gamma(engines, batch=1, cfg_scale=1.0)
    predicted = max(fast.candidates, key=lambda c: c["speedup"])        # timed again: the ranking may move
    assert (fast.draft, fast.gamma) == ("jacobi", predicted["gamma"]) and "measured 2.00x" in fast.reason
    assert "measured" in fast.table()


def test_measure_runs_interleaves_whole_images(random_checkpoint, monkeypatch):
    """Each run gets one warm-up, then the timed repeats go round-robin (A B A B ...) with the classes and the seed
    moving each repeat; a whole image's tokens, not decoded."""
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime import gamma_auto, speculative

    calls, real = [], speculative.generate

    def recording(engines, classes, gen, stats=None, **kw):
        calls.append((gen.mode, gen.gamma, gen.seed, tuple(classes), gen.num_tokens))
        return real(engines, classes, gen, stats, **kw)

    monkeypatch.setattr(speculative, "generate", recording)
    engines = TorchEngines(random_checkpoint, max_gamma=2)
    out = gamma_auto.measure_runs(engines, 2, 1.0, {None: ("target", "model", 1), "j": ("speculative", "jacobi", 2)},
                                  repeats=3, budget_s=1e6)      # no time cut: the order is what is checked
    tokens = random_checkpoint.config.num_tokens
    assert [c[:2] for c in calls] == [("target", 1), ("speculative", 2)] * 4
    assert all(c[4] == tokens for c in calls)
    timed = calls[2:]
    assert [c[2] for c in timed] == [1, 1, 2, 2, 3, 3] and timed[0][3] != timed[2][3]
    assert set(out) == {None, "j"} and all(ms > 0 for ms, _ in out.values())
    assert out["j"][1]["target_calls"] < out[None][1]["target_calls"]    # its own summary: fewer target calls


def test_measure_runs_keeps_to_its_time_budget(random_checkpoint, monkeypatch):
    """Where the warm-ups say the repeats would take longer than the budget, fewer run (never below 2)."""
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime import gamma_auto, speculative

    calls, real = [], speculative.generate
    monkeypatch.setattr(speculative, "generate", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    engines = TorchEngines(random_checkpoint, max_gamma=2)
    runs = {None: ("target", "model", 1), "j": ("speculative", "jacobi", 2)}
    gamma_auto.measure_runs(engines, 1, 1.0, runs, tokens=8, repeats=5, budget_s=0.0)
    assert len(calls) == 2 + 2 * 2                   # warm-ups, then 2 repeats of both
    calls.clear()
    gamma_auto.measure_runs(engines, 1, 1.0, runs, tokens=8, repeats=5, budget_s=1e6)
    assert len(calls) == 2 + 5 * 2

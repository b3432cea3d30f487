"""The `--gamma auto` plan cache: reused for the same engines, machine and request only; stale, malformed or
unwritable caches cost a new timing, never the run."""
from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest

from fastardiff.runtime.capabilities import EngineCapabilities
from fastardiff.runtime.gamma_auto import GammaChoice
from fastardiff.runtime.plan_cache import MAX_AGE_S, cached_choice, load_plan, plan_key, plan_path, store_plan

DRAFTS = ("model", "jacobi")


CONFIG = {"image_size": 32, "patch": 4, "n_cond": 1, "token_dim": 16, "heads": 2, "width": 32, "target_layers": 2,
          "draft_layers": 1, "num_classes": 10}          # 64 tokens an image


def stub_engines(sha="ab" * 32, calibration=None, family="drift-ar", names=("target_verify", "decoder"),
                 rollouts=()):
    entry = SimpleNamespace(sha256=sha)
    manifest = SimpleNamespace(engines=dict.fromkeys(names, entry), backend="onnxruntime", device="cpu",
                               calibration=calibration or {"e_max": 1.0}, family=family, config=CONFIG, gamma=4)
    return SimpleNamespace(manifest=manifest, providers=["CPUExecutionProvider"], threads=1,
                           rollouts=dict.fromkeys(rollouts),
                           capabilities=EngineCapabilities.host(rollout_gammas=frozenset(rollouts)))


def jacobi_choice():
    return GammaChoice(12, "jacobi gamma 12 (predicted 1.80x over target-only at batch 1)", 0.5,
                       [{"draft": "jacobi", "gamma": 12, "tokens_per_round": 3.9, "rollout_ms": 0.0,
                         "verify_ms": 1.1, "host_ms": 0.2, "speedup": 1.8}], "jacobi")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTARDIFF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_stored_plan_is_returned_for_the_same_key_only(cache):
    key = plan_key(stub_engines(), 1, 1.0, DRAFTS, {})
    path = store_plan(key, jacobi_choice())
    assert path is not None and path.is_relative_to(cache)
    got = load_plan(key)
    assert got is not None and got.to_dict() == jacobi_choice().to_dict()
    for other in (plan_key(stub_engines(), 8, 1.0, DRAFTS, {}),               # another batch
                  plan_key(stub_engines(), 1, 2.0, DRAFTS, {}),               # another guidance scale
                  plan_key(stub_engines(), 1, 1.0, ("model",), {}),           # other proposal kinds
                  plan_key(stub_engines("cd" * 32), 1, 1.0, DRAFTS, {}),      # other engine files
                  plan_key(stub_engines(calibration={"e_max": 2.0}), 1, 1.0, DRAFTS, {})):
        assert other != key and load_plan(other) is None
    assert load_plan(key, now=time.time() + MAX_AGE_S + 1) is None        # stale: timed again


def test_a_changed_runtime_times_again(cache, monkeypatch):
    """The plan is keyed by the runtime's own sources: another loop (other host costs) is timed again."""
    from fastardiff.runtime import plan_cache

    key = plan_key(stub_engines(), 1, 1.0, DRAFTS, {})
    store_plan(key, jacobi_choice())
    assert key["runtime_code"] == plan_cache.runtime_code_hash() and len(key["runtime_code"]) == 16
    monkeypatch.setattr(plan_cache, "runtime_code_hash", lambda: "0" * 16)
    changed = plan_key(stub_engines(), 1, 1.0, DRAFTS, {})
    assert changed != key and load_plan(changed) is None


def test_malformed_or_unwritable_caches_cost_only_a_new_timing(cache, tmp_path, monkeypatch, caplog):
    key = plan_key(stub_engines(), 1, 1.0, DRAFTS, {})
    path = plan_path(key)
    path.parent.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="fastardiff.runtime"):
        for text in ("{not json", "[1, 2]", json.dumps({"key": key, "written": time.time(), "choice": {"gamma": "12"}}),
                     json.dumps({"key": key, "written": time.time(),
                                 "choice": {**jacobi_choice().to_dict(), "gamma": 0}}),
                     json.dumps({"key": key, "written": time.time(),
                                 "choice": {**jacobi_choice().to_dict(), "draft": "oracle"}})):
            path.write_text(text)
            assert load_plan(key) is None
    assert caplog.text.count("ignoring the cached --gamma auto plan") == 5
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("FASTARDIFF_CACHE_DIR", str(blocker))
    assert store_plan(key, jacobi_choice()) is None                        # logged, not raised
    calls = []
    choice, source = cached_choice(stub_engines(), 1, 1.0, DRAFTS, {}, lambda: calls.append(1) or jacobi_choice())
    assert calls == [1] and choice.gamma == 12 and source == "timed now"


def test_engines_without_hashes_are_timed_every_time(cache):
    calls = []
    for _ in range(2):
        cached_choice(stub_engines(sha=""), 1, 1.0, DRAFTS, {}, lambda: calls.append(1) or jacobi_choice())
    assert calls == [1, 1] and plan_key(stub_engines(sha=""), 1, 1.0, DRAFTS, {}) is None
    assert not cache.exists()


def test_run_reuses_the_plan_and_replan_times_again(shared_onnx_export, cache, tmp_path, capsys, monkeypatch):
    import fastardiff.runtime.gamma_auto as gamma_auto
    import fastardiff.runtime.plan_cache as plan_cache
    from cli_runner import run_cli

    # what a run measured may correct its plan (a busy machine's run may mark it stale: test_plan_updates.py); here
    # the plan is only to be reused, so the corrections are counted, not applied
    updates = []
    monkeypatch.setattr(plan_cache, "update_from_run", lambda key, choice, summary: updates.append(key))
    engine_dir = shared_onnx_export[0]
    args = ["run", "--engine", str(engine_dir), "--prompt", "3", "--out", str(tmp_path / "a.png"),
            "--stats-json", str(tmp_path / "s.json")]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "timed now; cached in" in err
    first = json.loads((tmp_path / "s.json").read_text())["gamma_choice"]

    def must_not_time(*args, **kwargs):
        raise AssertionError("the engines were timed although a cached plan matches")

    monkeypatch.setattr(gamma_auto, "choose_gamma", must_not_time)
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "cached plan" in err and json.loads((tmp_path / "s.json").read_text())["gamma_choice"] == first
    assert len(updates) == 2 and updates[0] == updates[1] is not None     # every planned run offers its rates
    monkeypatch.setattr(gamma_auto, "choose_gamma", lambda engines, batch, cfg, **kw: GammaChoice(
        None, "replanned: target-only"))
    code, _, err = run_cli(args + ["--replan"], capsys)
    assert code == 0, err
    assert "replanned: target-only" in err and "timed now" in err
    assert json.loads((tmp_path / "s.json").read_text())["mode"] == "target"


def test_run_threads_reach_the_engines_and_are_range_checked(shared_onnx_export, cache, tmp_path, capsys,
                                                              monkeypatch):
    """`--threads N` loads the ONNX Runtime sessions with N intra-op threads (no flag: the backend's default of
    one); out-of-range values are one error line, exit 2, nothing written."""
    import fastardiff.runtime.engine as engine
    from cli_runner import run_cli
    from fastardiff.runtime.backend_onnxruntime import DEFAULT_THREADS

    loaded = []
    real = engine.load_engines

    def recording(engine_dir, **options):
        loaded.append(real(engine_dir, **options).threads)
        return real(engine_dir, **options)

    monkeypatch.setattr(engine, "load_engines", recording)
    base = ["run", "--engine", str(shared_onnx_export[0]), "--prompt", "3", "--gamma", "2"]
    for flags, threads in (([], DEFAULT_THREADS), (["--threads", "2"], 2), (["--threads", "0"], 0)):
        code, _, err = run_cli(base + flags + ["--out", str(tmp_path / "a.png")], capsys)
        assert code == 0, err
        assert loaded[-1] == threads
    for bad in ("-1", "1025", "two"):
        code, _, err = run_cli(base + ["--threads", bad, "--out", str(tmp_path / "b.png")], capsys)
        assert code == 2 and "--threads" in err and not (tmp_path / "b.png").exists(), err


def _record(key, **choice):
    return json.dumps({"key": key, "written": time.time(), "choice": {**jacobi_choice().to_dict(), **choice}})


def test_impossible_cached_choices_cost_a_retiming(cache, caplog):
    """A cached plan edited to a choice these engines cannot run (a window past the model's tokens, a draft length
    not exported, a proposal kind the family or the engines cannot do, one the request did not ask for) or to
    wrong types is ignored with one log line and the engines are timed again: never an error."""
    jacobi_only = stub_engines()
    cases = [(jacobi_only, _record(None, gamma=64)),                              # 65 tokens a call > 64
             (jacobi_only, _record(None, gamma=12.0)), (jacobi_only, _record(None, gamma=True)),
             (jacobi_only, _record(None, draft="model", gamma=2)),                # no draft model in the engines
             (stub_engines(family="fast-ardiff", names=("target_verify", "draft_step")), _record(None)),
             (stub_engines(names=("target_verify", "draft_step"), rollouts=(1, 2)),
              _record(None, draft="model", gamma=3)),                              # rollouts 1, 2 only
             (jacobi_only, _record(None, candidates=[{"draft": "jacobi"}])),       # what the table prints
             (jacobi_only, _record(None, candidates=[{**jacobi_choice().candidates[0], "speedup": "fast"}])),
             (jacobi_only, _record(None, target_step_ms=float("nan"))),
             (jacobi_only, _record(None, confidence="sure")),
             (jacobi_only, _record(None, measured={"target": {"ms_per_token": "x"}}))]
    with caplog.at_level(logging.WARNING, logger="fastardiff.runtime"):
        for i, (engines, text) in enumerate(cases):
            key = plan_key(engines, 1, 1.0, DRAFTS, {})
            plan_path(key).parent.mkdir(parents=True, exist_ok=True)
            plan_path(key).write_text(text.replace("null", json.dumps(key), 1))
            timed = []
            choice, source = cached_choice(engines, 1, 1.0, DRAFTS, {},
                                           lambda: timed.append(1) or GammaChoice(None, "timed again"))
            assert timed == [1] and choice.reason == "timed again" and source.startswith("timed now"), (i, text)
            assert caplog.text.count("ignoring the cached --gamma auto plan") == i + 1, (i, caplog.text)
    good = stub_engines(names=("target_verify", "draft_step"), rollouts=(1, 2))
    key = plan_key(good, 1, 1.0, DRAFTS, {})
    store_plan(key, GammaChoice(2, "model gamma 2", 0.5, [], "model"))
    choice, source = cached_choice(good, 1, 1.0, DRAFTS, {}, lambda: pytest.fail("a valid plan was timed again"))
    assert (choice.draft, choice.gamma) == ("model", 2) and source.startswith("cached plan")


def _load_in_thread(key, seconds=10.0):
    """load_plan(key) in a thread: (finished, result)."""
    import threading

    out = []
    thread = threading.Thread(target=lambda: out.append(load_plan(key)), daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), (out[0] if out else None)


def test_non_regular_or_unreadable_plan_files_cost_a_retiming_never_a_hang(cache, caplog, monkeypatch):
    """A FIFO, a directory, a device or an oversized file where the plan is read, or a file that cannot be read:
    one log line and a new timing, at once (stat before open: a FIFO must not block the run)."""
    import os

    key = plan_key(stub_engines(), 1, 1.0, DRAFTS, {})
    path = plan_path(key)
    path.parent.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="fastardiff.runtime"):
        os.mkfifo(path)
        try:
            finished, result = _load_in_thread(key)
        finally:
            if not finished:                     # release the blocked reader before failing
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        assert finished and result is None, "reading a FIFO where the plan cache reads blocked"
        path.unlink()
        for make in (lambda: path.mkdir(), lambda: path.symlink_to("/dev/zero"),
                     lambda: path.write_text(" " * (2 << 20))):
            make()
            assert _load_in_thread(key) == (True, None)
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        store_plan(key, jacobi_choice())
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda p, *a, **kw: (_ for _ in ()).throw(PermissionError(13, "denied"))
                            if str(p) == str(path) else real_open(p, *a, **kw))
        assert load_plan(key) is None
    assert caplog.text.count("ignoring the cached --gamma auto plan") == 5, caplog.text
    monkeypatch.setattr(os, "open", real_open)
    assert load_plan(key).to_dict() == jacobi_choice().to_dict()


def test_a_plan_cache_hit_does_no_timing(cache, random_checkpoint, monkeypatch):
    """Counted, not timed: the first request plans (engine calls timed, whole images run), the same request again
    takes the cached plan and times nothing; --replan times again."""
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime import gamma_auto, plan_cache
    from test_gamma_auto import _fixed_planning_costs, _stub_run_costs

    engines = TorchEngines(random_checkpoint, max_gamma=2)
    engines.manifest.calibration = {"extra": {"jacobi_tokens_per_call": {"1": {"4": 4.9}}}}
    monkeypatch.setattr(plan_cache, "plan_key", lambda *a: plan_key(stub_engines(), 1, 1.0, DRAFTS, {}))
    _fixed_planning_costs(monkeypatch)
    timed_calls = []
    costs = gamma_auto.time_engine_calls
    monkeypatch.setattr(gamma_auto, "time_engine_calls", lambda *a, **kw: timed_calls.append(1) or costs(*a, **kw))
    runs = _stub_run_costs(monkeypatch, lambda gen: 10.0 if gen.mode == "target" else 5.0)

    def plan(replan=False):
        return cached_choice(engines, 1, 1.0, DRAFTS, {}, lambda: gamma_auto.choose_gamma(engines, 1, 1.0), replan)

    first, source = plan()
    assert source.startswith("timed now") and first.draft == "jacobi" and len(timed_calls) == 1 and runs
    before = len(runs)
    second, source = plan()
    assert source.startswith("cached plan") and second.to_dict() == first.to_dict()
    assert len(timed_calls) == 1 and len(runs) == before                # nothing timed, nothing run
    plan(replan=True)
    assert len(timed_calls) == 2 and len(runs) > before

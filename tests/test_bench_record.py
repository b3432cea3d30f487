"""`fastardiff bench pipeline --record`: the run appended to one history file and the current plot redrawn, on a
fake run (no benchmark is timed here), and the committed history of earlier runs."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli_runner import run_cli
from fastardiff.errors import FastardiffError
from fastardiff.exporter import bench_record
from fastardiff.exporter.bench_record import append_run, load_history, make_run, plot_latest
from fastardiff.runtime.capabilities import EngineCapabilities

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_rows(speedup: float) -> list[dict]:
    row = {"backend": "onnxruntime", "batch": 1, "ms/image": 10.0, "model speedup": 1.0, "speedup": 1.0,
           "tok/target call": 1.0}
    return [{**row, "mode": "target", "gamma": "-"},
            {**row, "mode": "jacobi", "gamma": 8, "ms/image": 10.0 / speedup, "speedup": speedup,
             "model speedup": speedup * 1.05, "tok/target call": 4.3}]


def fake_run(speedup: float, label: str = "fake") -> dict:
    machine = bench_record.machine_info("cpu", "x86_64, 2 CPUs, threads 1")
    return make_run(fake_rows(speedup), {"batches": [1], "repeats": 1}, machine, label)


def test_append_keeps_earlier_runs_and_records_where_and_what_ran(tmp_path):
    history = tmp_path / "docs" / "bench-history.jsonl"
    assert append_run(history, fake_run(2.0, "first")) == 1
    assert append_run(history, fake_run(2.5, "second")) == 2
    runs = load_history(history)
    assert [r["label"] for r in runs] == ["first", "second"]
    assert runs[1]["rows"][1]["speedup"] == 2.5 and runs[0]["rows"][1]["speedup"] == 2.0
    run = runs[1]
    assert run["machine"]["cpu_model"] and run["machine"]["cpus"] >= 1
    assert run["versions"]["numpy"] and run["versions"]["python"]
    assert run["date"].endswith("Z") and run["settings"] == {"batches": [1], "repeats": 1}
    if (REPO / ".git").exists():        # a checkout: the commit that ran is the checkout's HEAD
        assert len(run["commit"]) == 40 and isinstance(run["dirty"], bool)
    assert len(history.read_text().splitlines()) == 2


def test_the_plot_is_redrawn_from_the_newest_run(tmp_path, monkeypatch):
    history = tmp_path / "bench-history.jsonl"
    append_run(history, fake_run(2.0))
    append_run(history, fake_run(3.0))
    drawn = []
    real = bench_record.write_plot
    monkeypatch.setattr(bench_record, "write_plot", lambda rows, path, title=None: drawn.append(rows) or
                        real(rows, path, title))
    png = plot_latest(history)
    assert png == tmp_path / "bench-pipeline.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert [r["speedup"] for r in drawn[0] if r["mode"] == "jacobi"] == [3.0]


def test_a_history_that_does_not_parse_is_refused_and_left_as_it_was(tmp_path):
    history = tmp_path / "bench-history.jsonl"
    append_run(history, fake_run(2.0))
    broken = history.read_text() + "{not json\n"
    history.write_text(broken)
    with pytest.raises(FastardiffError, match="line 2 is not JSON"):
        append_run(history, fake_run(2.5))
    assert history.read_text() == broken
    history.write_text(json.dumps({"schema": 1, "date": "x"}) + "\n")
    with pytest.raises(FastardiffError, match="lacks commit, machine"):
        load_history(history)


class FakeEngines:
    """What `bench pipeline` reads of an engine set before it times anything."""
    rollouts = {4: None}
    capabilities = EngineCapabilities.host(rollout_gammas=frozenset({4}))
    manifest = SimpleNamespace(export={}, max_batch=8, family="drift-ar", engines={"draft_step": {}},
                               config={"name": "tiny-mnist", "num_classes": 10})


def test_bench_pipeline_record_appends_the_run_and_redraws_the_plot(tmp_path, monkeypatch, capsys):
    import fastardiff.exporter.bench_cli as bench_cli
    import fastardiff.runtime.engine as engine_module

    timed = []
    monkeypatch.setattr(engine_module, "load_engines", lambda *a, **k: FakeEngines())
    monkeypatch.setattr(bench_cli, "pipeline_rows", lambda backends, batch, *a: timed.append(batch) or
                        [{**r, "batch": batch, "verify %": 0.0, "draft %": 0.0, "decode %": 0.0,
                          "outside engines %": 0.0, "accept rate": 0.5,
                          "per call ms": {"target step": 1.0, "rollout": 0.0, "verify": 1.0, "decode": 1.0}}
                         for r in fake_rows(2.2)])
    (tmp_path / "engines").mkdir()
    history = tmp_path / "hist" / "bench-history.jsonl"
    append_run(history, fake_run(1.5, "earlier"))
    code, out, err = run_cli(["bench", "pipeline", "--engine", str(tmp_path / "engines"), "--no-torch",
                              "--no-export", "--batch", "1,8", "--gamma", "4", "--jacobi", "8", "--record",
                              "--history", str(history), "--label", "a fake run"], capsys)
    assert code == 0, err
    assert timed == [1, 8]
    runs = load_history(history)
    assert [r["label"] for r in runs] == ["earlier", "a fake run"]
    assert {r["batch"] for r in runs[1]["rows"]} == {1, 8}
    assert runs[1]["settings"]["gamma"] == "4" and runs[1]["settings"]["engines"]["onnxruntime"]
    assert (history.parent / "bench-pipeline.png").read_bytes()[:8] == PNG_MAGIC
    assert "recorded run 2" in out


@pytest.mark.parametrize("args, message", [(["--label", "x"], "add --record"),
                                           (["--history", "h.jsonl"], "add --record")])
def test_record_options_without_record_fail_before_any_work(args, message, tmp_path, capsys):
    code, _, err = run_cli(["bench", "pipeline", "--no-torch", "--no-export", *args], capsys)
    assert code == 2 and message in err


def test_the_committed_history_holds_every_earlier_run():
    runs = load_history(REPO / "docs" / "bench-history.jsonl")
    assert len(runs) >= 20
    folded = [r for r in runs if "folded_from" in r]
    assert len(folded) == 20 and all(r["rows"] and r["date"].startswith("2026-12-0") for r in folded)
    assert not list((REPO / "docs").glob("bench-pipeline-*"))
    newest = runs[-1]
    assert any(r["mode"] == "jacobi" and r["speedup"] > 1 for r in newest["rows"])

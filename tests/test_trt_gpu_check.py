"""benchmarks/gpu_check.sh without a GPU: its syntax, and its --dry-run plumbing on CPU (per-step timeouts, a
failing step not stopping the others, summary.json, the weight-bandwidth floor report). It never produces a GPU
figure here; on a GPU machine it is run as is (docs/backends.md, "What ran where, and what did not")."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BASH = shutil.which("bash")
needs_tools = pytest.mark.skipif(BASH is None or shutil.which("timeout") is None, reason="needs bash and timeout")


@needs_tools
def test_script_parses_and_refuses_a_missing_out():
    subprocess.run([BASH, "-n", SCRIPT], check=True)
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([BASH, SCRIPT, "--dry-run"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("error: set OUT")


@needs_tools
def test_dry_run_records_every_step_and_computes_the_floor_ratio(tmp_path):
    import torch

    from fastardiff.recipes.config import get_config
    from fastardiff.recipes.models import ARTransformer

    out = tmp_path / "out"
    out.mkdir()
    # a pipeline result as the bench writes it (fixture numbers: the report must only do arithmetic on them)
    row = {"backend": "torch", "batch": 1, "mode": "target", "per call ms": {"target step": 2.5}}
    (out / "pipeline-fixture.json").write_text(json.dumps({"meta": {"config": "tiny-mnist"}, "rows": [row]}))
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_TIMEOUT_PYTEST_GPU": "1"}  # forces one step to time out
    proc = subprocess.run([BASH, SCRIPT, "--dry-run"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    # a step that times out and one that fails (no CUDA GPU) do not stop the ones after them
    assert status == {"env": "ok", "pytest-gpu": "timeout", "kernels": "failed", "pipeline": "skipped",
                      "report": "ok"}
    assert summary["dry_run"] is True and summary["ran"] == ["env", "report"] and summary["total_seconds"] < 240
    assert "no CUDA GPU" in (out / "logs" / "kernels.log").read_text()
    assert not (out / "kernels.json").exists()  # a step that did not run leaves no figure
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cpu" and "no GPU figure" in report["figures"]
    cfg = get_config("tiny-mnist")
    with torch.device("meta"):
        weights = 4 * sum(p.numel() for p in ARTransformer(cfg, cfg.target_layers).parameters())
    (floor,) = report["target_verify_vs_weight_floor"]
    bandwidth = report["copy_bandwidth"]["bytes_per_second"]
    assert floor["target_weight_bytes"] == weights and bandwidth > 0
    assert floor["ratio"] == pytest.approx(2.5 / (1e3 * weights / bandwidth))


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "--device cuda was asked for but torch sees no CUDA device"),
    (["--config", "mar-b-like", "--ckpt", "x.pt"], "--ckpt and --config both name the model"),
    (["--config", "mar-z-like"], "unknown model config 'mar-z-like'"),
    (["--batch", "65"], "batch sizes must be in 1..64"),
])
def test_bench_pipeline_options_of_the_gpu_check_fail_before_any_work(args, message, tmp_path, monkeypatch):
    import torch

    from fastardiff.errors import FastardiffError
    from fastardiff.exporter.bench_cli import bench_command

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FastardiffError, match=message):
        bench_command.main(["pipeline", *args, "--json", str(tmp_path / "b.json")], standalone_mode=False)
    assert list(tmp_path.iterdir()) == []

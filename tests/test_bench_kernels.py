"""The kernel benchmark: honest refusal without a GPU, CPU interpreter smoke run, same-semantics baselines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastardiff.errors import FastardiffError
from fastardiff.exporter import bench_kernels

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_without_cuda_says_so_and_fails(capsys):
    with pytest.raises(FastardiffError, match="no CUDA GPU.*--interpret-smoke"):
        bench_kernels.main([])
    assert "ms" not in capsys.readouterr().out  # no table, no numbers


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
@pytest.mark.parametrize("command", [
    [str(SCRIPT)],
    ["-c", "from fastardiff.cli import main; main(['bench', 'kernels', '--batch', '1'])"],
])
def test_without_cuda_script_and_cli_exit_non_zero(command):
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_list_argument_is_a_usage_error(capsys):
    """argparse's usage errors are FastardiffError (one `error:` line, exit 2 in the CLI and the script)."""
    with pytest.raises(FastardiffError, match="argument --n: expected positive integers") as err:
        bench_kernels.main(["--n", "0,256"])
    assert "see `fastardiff bench kernels --help`" in str(err.value) and "\n" not in str(err.value)
    assert capsys.readouterr().err == ""    # no usage block printed before the error line


def test_interpret_smoke_runs_the_kernel_on_cpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    proc = subprocess.run([sys.executable, str(SCRIPT), "--interpret-smoke"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no timings" in proc.stdout and "ok: the fused kernel ran under the interpreter" in proc.stdout
    assert proc.stdout.count("\n") >= 2 + 8  # header + one row per smoke shape


@pytest.mark.parametrize("ragged", [False, True])
def test_sdpa_baseline_attends_the_same_keys_as_the_reference(ragged):
    q, k, v, lengths, cache = bench_kernels.make_case(torch, 3, 2, 40, 5, 16, torch.float32, "cpu", ragged)
    fns = bench_kernels.implementations(torch, q, k, v, lengths, cache, ragged)
    ref_out, _ = fns["reference"]()
    torch.testing.assert_close(fns["sdpa"](), ref_out, atol=1e-5, rtol=1e-5)
    out, ent = fns["fused"]()  # CPU without the interpreter: the op's reference body
    assert ent.shape == (3, 2, 5)


def test_kv_bytes_counts_valid_cache_and_new_keys():
    lengths = torch.tensor([10, 3, 100])
    # keys per sample: min(len, cache=50) + K=2 -> 12 + 5 + 52 = 69; K and V, 4 heads, head dim 8, 2 bytes
    assert bench_kernels.kv_bytes(lengths, 50, 2, 4, 8, 2) == 2 * 69 * 4 * 8 * 2


@pytest.mark.gpu
def test_gpu_benchmark_prints_all_three_columns(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench_kernels.main(["--n", "256", "--k", "1,5", "--batch", "1,8", "--repeats", "2", "--inner", "2",
                               "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 4
    for row in rows:
        assert row["fused_ms"] > 0 and row["sdpa_ms"] > 0 and row["reference_ms"] > 0
        assert row["fused_GBps"] > 0 and row["entropy_err"] < 1e-2
    assert "fused/sdpa" in capsys.readouterr().out

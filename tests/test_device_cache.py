"""KV caches kept on the engines' device (runtime/kv_cache.py `device`, a backend's `cache_device`): the same
contents as the numpy cache for every kind of write, and the same runs through the torch reference backend
(on the CPU here: torch tensors as the storage, the code path a CUDA run takes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastardiff.runtime.kv_cache import KVCache


def test_device_cache_writes_and_views_equal_numpy():
    rng = np.random.default_rng(0)
    L, B, H, S, Dh = 2, 5, 3, 12, 4
    host, dev = KVCache(L, B, H, S, Dh), KVCache(L, B, H, S, Dh, device=torch.device("cpu"))
    assert isinstance(dev.k, torch.Tensor)
    writes = [(None, np.full(B, 0), 3), (None, np.array([3, 4, 3, 5, 6]), 2),          # uniform, ragged
              (np.array([1, 3]), np.array([5, 5]), 4), (np.array([0, 2, 4]), np.array([6, 8, 7]), 3)]
    for rows, starts, K in writes:
        R = B if rows is None else len(rows)
        new_k = rng.standard_normal((L, R, H, K, Dh), dtype=np.float32)
        new_v = rng.standard_normal((L, R, H, K, Dh), dtype=np.float32)
        host.write(rows, starts, new_k, new_v)
        dev.write(rows, starts, torch.from_numpy(new_k) if K % 2 else new_k, new_v)   # tensors or arrays
    np.testing.assert_array_equal(dev.k.numpy(), host.k)
    np.testing.assert_array_equal(dev.v.numpy(), host.v)
    for rows in (None, np.array([4, 1])):
        for a, b in zip(dev.view(rows, 7), host.view(rows, 7)):
            np.testing.assert_array_equal(a.numpy(), b)
    np.testing.assert_array_equal(dev.rows(np.array([3, 0]))[0].numpy(), host.k[:, [3, 0]])


@pytest.mark.parametrize("gen", [dict(mode="target"), dict(draft="model", gamma=3, early_stop="off"),
                                 dict(draft="jacobi", gamma=4)], ids=["target", "model", "jacobi"])
def test_torch_backend_device_cache_runs_equal_host_cache_runs(random_checkpoint, gen):
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    device, host = (TorchEngines(random_checkpoint, max_gamma=4, device_cache=True),
                    TorchEngines(random_checkpoint, max_gamma=4))
    assert device.cache_device is not None and host.cache_device is None
    out = device.target_verify(*_verify_inputs(device))
    assert isinstance(out.new_k, torch.Tensor) and isinstance(out.mean, np.ndarray)
    if gen.get("draft") == "model":      # --gamma auto's warm-up times calls on caches where the loop keeps them
        from fastardiff.runtime.gamma_auto import time_engine_calls

        timed = time_engine_calls(device, 2, 1.5, [3], jacobi_windows=[4])
        assert {"step", ("verify", 4), ("rollout", 3), ("jacobi", 4)} <= set(timed)
        assert all(ms > 0 for ms in timed.values())
    config = GenerationConfig(seed=3, cfg_scale=1.5, **gen)
    a, sa = generate(device, np.array([2, 5, 7]), config)
    b, sb = generate(host, np.array([2, 5, 7]), config)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert sa.summary()["target_calls"] == sb.summary()["target_calls"]


def _verify_inputs(engines):
    c = engines.manifest.config
    L, H, Dh = c["target_layers"], c["heads"], c["width"] // c["heads"]
    cache = torch.zeros(L, 2, H, 8, Dh)
    return (np.zeros((2, 1, c["token_dim"]), np.float32), np.zeros(2, np.int64), cache, cache.clone(),
            np.zeros(2, np.int64))


def test_device_cache_bench_runs_and_writes_its_rows(random_checkpoint_path, tmp_path):
    """benchmarks/device_cache_bench.py (a gpu_check.sh step) end to end on the CPU: every mode timed with both
    storages, rows written (the figures themselves mean nothing on the CPU, where both storages are host memory)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "device_cache_bench.py"
    spec = importlib.util.spec_from_file_location("device_cache_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "device-cache.json"
    assert bench.main(["--ckpt", str(random_checkpoint_path), "--batch", "2", "--repeats", "1",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["backend"] == "torch" and data["device"] == "cpu"
    assert [r["mode"] for r in data["rows"]] == ["target", "model gamma 4", "jacobi 8"]
    assert all(r["batch"] == 2 and r["host cache ms/image"] > 0 and r["device cache ms/image"] > 0
               for r in data["rows"])

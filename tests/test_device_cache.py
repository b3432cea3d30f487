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
                                 dict(draft="model", gamma=3, early_stop="off", engine_acceptance=False),
                                 dict(draft="jacobi", gamma=4)],
                         ids=["target", "model-engine-acceptance", "model-host-acceptance", "jacobi"])
def test_torch_backend_device_cache_runs_equal_host_cache_runs(random_checkpoint, gen):
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    device, host = (TorchEngines(random_checkpoint, max_gamma=4, device_cache=True),
                    TorchEngines(random_checkpoint, max_gamma=4))
    assert device.capabilities.cache_device is not None and host.capabilities.cache_device is None
    out = device.target_verify(*_verify_inputs(device))
    assert isinstance(out.new_k, torch.Tensor) and isinstance(out.mean, np.ndarray)
    if gen.get("draft") == "model":      # --gamma auto's warm-up times calls on caches where the loop keeps them
        from fastardiff.runtime.gamma_auto import time_engine_calls

        timed = time_engine_calls(device, 2, 1.5, [3], jacobi_windows=[4])
        assert {"step", ("verify", 4), ("rollout", 3), ("jacobi", 4)} <= set(timed)
        assert all(ms > 0 for ms in timed.values())
    # model draft on device caches accepts in the target_jacobi engine by default: the host-cache run is asked
    # for the same (the two acceptance paths draw different random numbers)
    config = GenerationConfig(seed=3, cfg_scale=1.5, **{"engine_acceptance": True, **gen})
    a, sa = generate(device, np.array([2, 5, 7]), config)
    b, sb = generate(host, np.array([2, 5, 7]), config)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert sa.summary()["target_calls"] == sb.summary()["target_calls"]


def count_readbacks(monkeypatch) -> tuple[list, list]:
    """(readbacks, host finishes): lists that grow by one at each device-loop readback (DeviceArrays.readback) and
    each residual finished on the host (jacobi.finish_residuals); both still run."""
    from fastardiff.runtime import arrays, jacobi

    readbacks, finishes = [], []
    real_readback, real_finish = arrays.DeviceArrays.readback, jacobi.finish_residuals
    monkeypatch.setattr(arrays.DeviceArrays, "readback", lambda self, *a: (readbacks.append(1),
                                                                          real_readback(self, *a))[1])
    monkeypatch.setattr(jacobi, "finish_residuals", lambda *a: (finishes.append(1), real_finish(*a))[1])
    return readbacks, finishes


@pytest.mark.parametrize("gen", [dict(mode="target", cfg_scale=1.5), dict(gamma=3, early_stop="context", cfg_scale=1.5),
                                 dict(gamma=2, seed=6), dict(draft="jacobi", gamma=4, cfg_scale=1.5),
                                 dict(draft="jacobi", gamma=3, coupling=False)],
                         ids=["target", "model-guided", "model", "jacobi", "jacobi-independent"])
def test_device_loop_equals_host_loop_with_one_readback_per_round(random_checkpoint, gen, monkeypatch):
    """The loop with its token buffer, noise and engine outputs kept as torch tensors (runtime/arrays.py, the
    path a CUDA run takes; here torch on the CPU) gives the numpy loop's tokens bit for bit for the same seed
    (both with the caches on the device and the model draft accepted in the engine, so the same random numbers
    are drawn), and reads back once per round: the round's counts and entropies, plus the final tokens and the rare
    residual finished on the host."""
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    host = TorchEngines(random_checkpoint, max_gamma=4, device_cache=True, device_loop=False)
    device = TorchEngines(random_checkpoint, max_gamma=4, device_loop=True)
    assert host.capabilities.loop_device is None
    assert device.capabilities.loop_device is not None and device.capabilities.cache_device is not None
    readbacks, finishes = count_readbacks(monkeypatch)
    # the model draft accepted in the engine on both (the device loop's default; asked for on the host loop)
    config = GenerationConfig(**{"seed": 3, "engine_acceptance": True, **gen})
    classes = np.array([2, 5, 7])
    a, sa = generate(host, classes, config)
    assert not readbacks                      # the host loop reads nothing back from a device
    finishes.clear()
    b, sb = generate(device, classes, config)
    np.testing.assert_array_equal(a, b)
    timing = ("seconds", "total_seconds", "mode_rates")
    assert {k: v for k, v in sa.summary().items() if k not in timing} == \
        {k: v for k, v in sb.summary().items() if k not in timing}
    assert len(readbacks) == sb.target_calls + 1 + len(finishes)


def _verify_inputs(engines):
    c = engines.manifest.config
    L, H, Dh = c["target_layers"], c["heads"], c["width"] // c["heads"]
    cache = torch.zeros(L, 2, H, 8, Dh)
    return (np.zeros((2, 1, c["token_dim"]), np.float32), np.zeros(2, np.int64), cache, cache.clone(),
            np.zeros(2, np.int64))


def test_device_cache_bench_runs_and_writes_its_rows(random_checkpoint_path, tmp_path):
    """benchmarks/device_cache_bench.py (a gpu_check.sh step) end to end on the CPU: the modes asked for timed with
    host caches, device caches and the device loop, rows written (the figures themselves mean nothing on the CPU,
    where every storage is host memory)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "device_cache_bench.py"
    spec = importlib.util.spec_from_file_location("device_cache_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "device-cache.json"
    assert bench.main(["--ckpt", str(random_checkpoint_path), "--batch", "2", "--repeats", "1",
                       "--modes", "model gamma 4,jacobi 8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["backend"] == "torch" and data["device"] == "cpu"
    assert [r["mode"] for r in data["rows"]] == ["model gamma 4", "jacobi 8"]
    assert all(r["batch"] == 2 and r["host cache ms/image"] > 0 and r["device cache ms/image"] > 0
               and r["device loop ms/image"] > 0 for r in data["rows"])
    with pytest.raises(SystemExit):                                  # a mode it does not have: a usage error
        bench.main(["--ckpt", str(random_checkpoint_path), "--modes", "model gamma 9"])


class EagerCapture:
    """A stand-in for CUDA graph capture: records fn and its static inputs; replay runs fn eagerly on those same
    buffers (what a replay computes), counting replays."""

    def __init__(self):
        self.replays = 0

    def __call__(self, fn, static_inputs):
        def replay():
            self.replays += 1
            return fn(*static_inputs)

        return replay


def test_cuda_graph_buckets_copy_inputs_and_clone_outputs():
    from fastardiff.runtime.cuda_graphs import GraphedCalls

    capture = EagerCapture()
    graphed = GraphedCalls(lambda name, a, b: (a * 2 + b, a.sum(-1)), capture)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    first = graphed("e", x, y)
    second = graphed("e", y, x)                       # same bucket: new values copied into the static buffers
    third = graphed("e", torch.ones(4, 3), torch.ones(4, 3))   # another shape: another capture
    torch.testing.assert_close(first[0], x * 2 + y)
    torch.testing.assert_close(second[0], y * 2 + x)   # and `first` was cloned out, not overwritten by it:
    torch.testing.assert_close(first[1], x.sum(-1))
    torch.testing.assert_close(third[0], torch.full((4, 3), 3.0))
    assert graphed.captures == 2 and capture.replays == 3


def test_torch_backend_with_cuda_graphs_runs_equal_eager_runs(random_checkpoint):
    """TorchEngines(cuda_graphs=True) with the stand-in capture: whole static caches, one bucket per shape, and
    the same tokens as the eager engines (target-only, model draft, Jacobi; batch 3 with guidance). The real
    capture needs CUDA: without it, a clear error."""
    from fastardiff.errors import FastardiffError
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    graphed = TorchEngines(random_checkpoint, max_gamma=3, cuda_graphs=True, graph_capture=EagerCapture())
    eager = TorchEngines(random_checkpoint, max_gamma=3)
    assert graphed.capabilities.cache_device is not None and not graphed.capabilities.cache_views
    for gen in (GenerationConfig(mode="target", seed=5),
                GenerationConfig(gamma=3, seed=5, early_stop="off", engine_acceptance=True),
                GenerationConfig(draft="jacobi", gamma=3, seed=5)):
        config = GenerationConfig(**{**gen.__dict__, "cfg_scale": 1.5})
        np.testing.assert_allclose(generate(graphed, np.array([1, 4, 8]), config)[0],
                                   generate(eager, np.array([1, 4, 8]), config)[0], atol=1e-5)
    captures = graphed.graphs.captures
    assert captures == len(graphed.graphs.buckets) > 0
    again = GenerationConfig(draft="jacobi", gamma=3, seed=5, cfg_scale=1.5)
    generate(graphed, np.array([1, 4, 8]), again)          # the same run again: replays only, no new capture
    assert graphed.graphs.captures == captures
    with pytest.raises(FastardiffError, match="CUDA graphs need a CUDA device"):
        TorchEngines(random_checkpoint, cuda_graphs=True)


@pytest.mark.parametrize("gen", [dict(mode="target", cfg_scale=1.5), dict(gamma=2, early_stop="context", cfg_scale=1.5),
                                 dict(draft="jacobi", gamma=2)], ids=["target", "model-guided", "jacobi"])
def test_onnxruntime_device_loop_equals_numpy_loop(shared_onnx_export, gen, monkeypatch):
    """The onnxruntime backend's device path (runtime/ort_tensors.py: torch tensors bound by address through
    IOBinding, the in-place engines' cache outputs bound to the loop's own cache layers, outputs back through
    DLPack; the path the CUDA provider takes, here on the CPU provider) gives the numpy loop's tokens bit for bit,
    with one readback per round; device caches under a host loop too."""
    from fastardiff.runtime.engine import load_engines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    engine_dir = shared_onnx_export[0]
    host = load_engines(engine_dir)
    caches = load_engines(engine_dir, device_cache=True, device_loop=False)
    device = load_engines(engine_dir, device_loop=True)
    assert host.capabilities.loop_device is None and host.capabilities.cache_device is None
    assert caches.capabilities.loop_device is None and device.capabilities.kv_in_place
    assert device.capabilities.loop_device == device.capabilities.cache_device == torch.device("cpu")
    readbacks, finishes = count_readbacks(monkeypatch)
    config = GenerationConfig(**{"seed": 4, "engine_acceptance": True, "num_tokens": 20, **gen})
    classes = np.array([3, 0, 9])
    a, sa = generate(host, classes, config)
    c, sc = generate(caches, classes, config)
    assert not readbacks
    finishes.clear()
    b, sb = generate(device, classes, config)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    timing = ("seconds", "total_seconds", "mode_rates")
    assert {k: v for k, v in sa.summary().items() if k not in timing} == \
        {k: v for k, v in sb.summary().items() if k not in timing}
    assert len(readbacks) == sb.target_calls + 1 + len(finishes)
    # an engine call on device caches returns its outputs as torch tensors and writes the cache in place
    cfg = device.manifest.config
    L, H, Dh = cfg["target_layers"], cfg["heads"], cfg["width"] // cfg["heads"]
    k_cache, v_cache = torch.zeros(L, 2, H, 9, Dh), torch.zeros(L, 2, H, 9, Dh)
    tokens = torch.randn(2, 3, cfg["token_dim"])
    out = device.target_verify(tokens, np.array([4, 0]), k_cache, v_cache, np.array([1, 2]))
    assert isinstance(out.mean, torch.Tensor) and out.mean.shape == (2, 3, cfg["token_dim"])
    torch.testing.assert_close(k_cache[:, 0, :, 4:7], out.new_k[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(v_cache[:, 1, :, 0:3], out.new_v[:, 1], rtol=0, atol=0)
    assert not k_cache[:, 0, :, :4].any() and not k_cache[:, 1, :, 3:].any()

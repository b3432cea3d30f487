"""The GPU-only parts of loading TensorRT-RTX engines, driven through stand-ins (nothing here can deserialise or
run an engine: no GPU): the runtime cache kept in the user's cache dir, a static cache axis fed from a shorter
buffer, the library choice and ONNX Runtime's TensorRT-RTX plugin EP registration and its no-GPU error."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from fastardiff.errors import EngineError


class FakeRuntimeCache:
    def __init__(self, accept: bool):
        self.accept, self.loaded, self.blob = accept, None, b""

    def deserialize(self, blob):
        if self.accept:
            self.loaded = bytes(blob)
        return self.accept

    def serialize(self):
        return (self.loaded or b"") + b"+jit"


class FakeRuntimeConfig:
    def __init__(self, accept: bool):
        self.cache, self.accept, self.attached = None, accept, None

    def create_runtime_cache(self):
        self.cache = FakeRuntimeCache(self.accept)
        return self.cache

    def set_runtime_cache(self, cache):
        self.attached = cache
        return True


class FakeEngine:
    def __init__(self, accept: bool = True):
        self.accept = accept

    def create_runtime_config(self):
        return FakeRuntimeConfig(self.accept)


@pytest.mark.parametrize("accept", [True, False], ids=["same-gpu", "other-gpu"])
def test_runtime_cache_is_kept_in_the_users_cache_dir(tmp_path, monkeypatch, accept):
    from fastardiff.runtime.trt_rtx_runtime import RuntimeCache, runtime_cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gpu = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    path = runtime_cache_path("ab" * 32, gpu, "1.7.1.116")
    assert path.parent == tmp_path / "fastardiff" / "tensorrt-rtx"
    assert path != runtime_cache_path("ab" * 32, {**gpu, "name": "NVIDIA RTX A6000"}, "1.7.1.116")
    first = RuntimeCache(FakeEngine(accept), path, "target_verify")
    assert first.config.attached is first.cache and first.cache.loaded is None    # nothing kept yet
    assert first.save() and path.read_bytes() == b"+jit"
    second = RuntimeCache(FakeEngine(accept), path, "target_verify")
    assert second.cache.loaded == (b"+jit" if accept else None)   # refused (other GPU/driver): compiled afresh
    assert not list(path.parent.glob(".*.tmp"))


def test_library_choice(monkeypatch):
    from fastardiff.runtime import trt_library

    installed = {"tensorrt": True, "tensorrt_rtx": True}
    monkeypatch.setattr(trt_library, "is_installed", lambda lib: installed[lib.key])
    assert trt_library.resolve_library("auto", gpu=True).key == "tensorrt"       # built on the GPU at hand
    assert trt_library.resolve_library("auto", gpu=False).key == "tensorrt_rtx"  # no GPU: ahead of time
    installed["tensorrt"] = False
    assert trt_library.resolve_library("auto", gpu=True).key == "tensorrt_rtx"
    assert trt_library.resolve_library("tensorrt", gpu=False).key == "tensorrt"
    with pytest.raises(Exception, match="unknown --trt-library 'trt'"):
        trt_library.resolve_library("trt")


def test_static_cache_axis_is_fed_from_a_shorter_buffer():
    """An in-place TensorRT-RTX engine has a static cache axis (profile cache min = max); a caller's shorter
    buffer runs on a padded copy and gets the engine's update written back."""
    from trt_standin import StandInEngine, StandInKVEngine, StandInStream

    from fastardiff.runtime.backend_tensorrt import TensorRTRunner, run_engine, static_cache_length
    from fastardiff.runtime.manifest import EngineEntry

    inputs, outputs = ["tokens", "lengths", "k_cache_0", "v_cache_0"], ["mean", "new_k", "new_v", "k_cache_out_0",
                                                                        "v_cache_out_0"]
    engine = StandInKVEngine()
    runner = TensorRTRunner(StandInEngine, torch, engine, StandInStream("engine", []), "target_verify", inputs,
                            outputs, device="cpu", aliases=StandInKVEngine.ALIASES)
    entry = EngineEntry(file="x", sha256="0", inputs=inputs, outputs=outputs, cache_layers=1,
                        profile={"batch": [1, 4, 8], "K": [1, 5, 5], "cache": [12, 12, 12]})
    assert static_cache_length(entry) == 12
    assert static_cache_length(EngineEntry(file="x", sha256="0", inputs=inputs, outputs=outputs, cache_layers=1,
                                           profile={"cache": [0, 8, 12]})) == 0
    g = np.random.default_rng(1)
    tokens = g.standard_normal((2, 3, 4)).astype(np.float32)
    k, v = (g.standard_normal((1, 2, 1, 9, 4)).astype(np.float32) for _ in range(2))
    want_k, want_v = k.copy(), v.copy()
    for r, start in enumerate([5, 1]):
        want_k[0, r, 0, start:start + 3], want_v[0, r, 0, start:start + 3] = tokens[r], -tokens[r]
    out = run_engine(runner, entry, (tokens, np.array([5, 1]), k, v), device_cache=False)
    assert engine.shapes["k_cache_0"] == (2, 1, 12, 4)          # the engine saw its static length
    np.testing.assert_array_equal(out[0], 2 * tokens)
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)


@pytest.fixture
def fake_ep(monkeypatch):
    from fastardiff.runtime import trt_rtx_ep

    module = types.ModuleType(trt_rtx_ep.EP_MODULE)
    module.get_ep_name = lambda: "NvTensorRTRTXExecutionProvider"
    module.get_library_path = lambda: "/opt/libonnxruntime_providers_nv_tensorrt_rtx.so"
    monkeypatch.setitem(sys.modules, trt_rtx_ep.EP_MODULE, module)
    monkeypatch.setattr(trt_rtx_ep, "installed", lambda: True)
    monkeypatch.setattr(trt_rtx_ep, "_registered", set())
    return module


class FakeOrt:
    def __init__(self, devices=()):
        self.registered, self.devices = [], list(devices)

    def get_available_providers(self):
        return ["CPUExecutionProvider"]

    def register_execution_provider_library(self, name, path):
        self.registered.append((name, path))

    def get_ep_devices(self):
        return self.devices


def test_onnx_engines_use_the_tensorrt_rtx_plugin_ep_for_cuda(fake_ep):
    from fastardiff.runtime import trt_rtx_ep
    from fastardiff.runtime.backend_onnxruntime import device_providers

    ort = FakeOrt([types.SimpleNamespace(ep_name="NvTensorRTRTXExecutionProvider", device_id=0)])
    assert device_providers(ort, "cuda") == [trt_rtx_ep.EP_PROVIDER]
    attached = []
    options = types.SimpleNamespace(add_provider_for_devices=lambda devices, opts: attached.append(devices))
    trt_rtx_ep.add_to_session(ort, options)
    trt_rtx_ep.add_to_session(ort, options)
    assert ort.registered == [("NvTensorRTRTXExecutionProvider", fake_ep.get_library_path())]   # registered once
    assert attached == [ort.devices, ort.devices]
    with pytest.raises(EngineError, match="cuda:1: .* sees 1 GPU"):
        trt_rtx_ep.ep_devices(ort, 1)


def test_tensorrt_rtx_ep_without_a_gpu_is_one_clear_error(fake_ep):
    from fastardiff.runtime import trt_rtx_ep

    with pytest.raises(EngineError, match="TensorRT-RTX execution provider is installed but finds no NVIDIA RTX"):
        trt_rtx_ep.ep_devices(FakeOrt([]))

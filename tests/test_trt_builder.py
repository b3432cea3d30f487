"""The TensorRT engine builder (exporter/trt_target.build_engine) and the runtime's engine runner driven through
recorded stand-ins for the TensorRT Python API: TensorRT cannot be installed here, so this checks call sequences,
flags, profiles, timing-cache handling and buffer binding, not TensorRT itself (see /work/notes/trt.md)."""
from __future__ import annotations

import pytest


class _Recorder:
    """Fake TensorRT Python API surface used by build_engine (names and signatures as in TensorRT 10's pybind
    sources: python/src/infer/pyCore.cpp, parsers/pyOnnx.cpp). Records calls; builds no engine."""

    def __init__(self, parse_ok=True):
        self.calls, self.parse_ok, self.shapes, self.flags = [], parse_ok, {}, []
        rec = self

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class BuilderFlag:
            FP16, BF16 = "FP16", "BF16"

        class IProgressMonitor:
            def __init__(self):
                rec.calls.append("IProgressMonitor.__init__")

        class TimingCache:
            def __init__(self, blob):
                self.blob = bytes(blob)

            def serialize(self):
                return self.blob + b"+tuned"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Config:
            progress_monitor = None

            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(f"pool {pool} {size}")

            def set_flag(self, flag):
                rec.flags.append(flag)

            def add_optimization_profile(self, profile):
                rec.calls.append("add_optimization_profile")

            def create_timing_cache(self, serialized_timing_cache):
                return TimingCache(serialized_timing_cache)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                rec.calls.append(f"set_timing_cache {cache.blob!r} {ignore_mismatch}")

            def get_timing_cache(self):
                return self.cache

        class Network:
            pass

        class Builder:
            def __init__(self, logger):
                rec.calls.append("Builder")

            def create_network(self, flags):
                rec.calls.append(f"create_network {flags}")
                return Network()

            def create_builder_config(self):
                rec.config = Config()
                return rec.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.calls.append("build_serialized_network")
                rec.monitor = config.progress_monitor
                return b"serialized-engine"

        class OnnxParser:
            num_errors = 1

            def __init__(self, network, logger):
                rec.calls.append("OnnxParser")

            def parse_from_file(self, model):
                rec.calls.append(f"parse_from_file {model}")
                return rec.parse_ok

            def get_error(self, i):
                return "In node 7 (FallbackPluginImporter): Plugin not found"

        self.MemoryPoolType, self.BuilderFlag, self.IProgressMonitor = MemoryPoolType, BuilderFlag, IProgressMonitor
        self.Builder, self.OnnxParser, self.__version__ = Builder, OnnxParser, "10.16.1"


@pytest.mark.parametrize("precision,flag", [("fp32", None), ("fp16", "FP16"), ("bf16", "BF16")])
def test_build_engine_drives_the_tensorrt_builder(tmp_path, tiny_config, precision, flag):
    from fastardiff.exporter.engine_modules import shape_profiles
    from fastardiff.exporter.trt_target import build_engine, profile_shapes

    trt = _Recorder()
    shapes = profile_shapes(tiny_config.to_dict(), "draft_step", tiny_config.draft_layers,
                            shape_profiles(tiny_config, 4, 3)["draft_step"])
    cache = tmp_path / ".timing.cache"
    cache.write_bytes(b"previous")
    build_engine(trt, "logger", tmp_path / "m.onnx", tmp_path / "m.engine", shapes, precision, cache, "draft_step")
    assert (tmp_path / "m.engine").read_bytes() == b"serialized-engine"
    assert trt.calls.index("OnnxParser") < trt.calls.index("build_serialized_network")
    assert f"parse_from_file {tmp_path / 'm.onnx'}" in trt.calls
    assert "set_timing_cache b'previous' False" in trt.calls       # the kept cache is reused ...
    assert cache.read_bytes() == b"previous+tuned"                  # ... and updated after the build
    assert trt.flags == ([flag] if flag else [])
    assert trt.shapes == shapes and set(shapes) == {"tokens", "lengths", "k_cache", "v_cache", "cond"}
    assert isinstance(trt.monitor, trt.IProgressMonitor) and trt.monitor.step_complete("phase", 1) is True


def test_build_engine_reports_parser_errors(tmp_path, tiny_config):
    from fastardiff.errors import FastardiffError
    from fastardiff.exporter.trt_target import build_engine

    with pytest.raises(FastardiffError, match="could not parse 'm.onnx'.*Plugin not found"):
        build_engine(_Recorder(parse_ok=False), "logger", tmp_path / "m.onnx", tmp_path / "m.engine", {}, "fp32",
                     tmp_path / "cache", "x")
    assert not (tmp_path / "m.engine").exists()


class _FakeEngine:
    """Stand-in engine/context: lists its outputs in a different order than the contract and 'executes' by reading
    the bound input addresses and writing the bound output addresses (host memory, via ctypes)."""

    class DataType:
        FLOAT, HALF, INT32, INT64, BOOL = "f32", "f16", "i32", "i64", "bool"

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    def __init__(self):
        self.tensors = [("tokens", "in", "f32"), ("lengths", "in", "i64"), ("entropy", "out", "f32"),
                        ("mean", "out", "f32")]
        self.num_io_tensors = len(self.tensors)
        self.shapes, self.addresses, self.executed = {}, {}, 0

    def get_tensor_name(self, i):
        return self.tensors[i][0]

    def get_tensor_mode(self, name):
        return dict((n, m) for n, m, _ in self.tensors)[name]

    def get_tensor_dtype(self, name):
        return dict((n, t) for n, _, t in self.tensors)[name]

    def create_execution_context(self):
        return self

    def set_input_shape(self, name, shape):
        if name == "tokens" and shape[0] > 8:
            return False  # outside the profile
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        b, k, _ = self.shapes["tokens"]
        return (b, k, self.shapes["tokens"][2]) if name == "mean" else (b, k)

    def execute_async_v3(self, stream_handle):
        import ctypes

        import numpy as np

        b, k, d = self.shapes["tokens"]
        tokens = np.ctypeslib.as_array((ctypes.c_float * (b * k * d)).from_address(self.addresses["tokens"]))
        lengths = np.ctypeslib.as_array((ctypes.c_int64 * b).from_address(self.addresses["lengths"]))
        mean = (tokens.reshape(b, k, d) * 2).astype(np.float32)
        entropy = (tokens.reshape(b, k, d).sum(-1) + lengths[:, None]).astype(np.float32)
        ctypes.memmove(self.addresses["mean"], mean.ctypes.data, mean.nbytes)
        ctypes.memmove(self.addresses["entropy"], entropy.ctypes.data, entropy.nbytes)
        self.executed += 1
        return True


class _HostStream:
    cuda_stream = 0

    def synchronize(self):
        pass


def test_runner_binds_by_address_in_contract_order():
    import numpy as np
    import torch

    from fastardiff.errors import EngineError
    from fastardiff.runtime.backend_tensorrt import TensorRTRunner

    engine = _FakeEngine()
    runner = TensorRTRunner(_FakeEngine, torch, engine, _HostStream(), "draft_step", ["tokens", "lengths"],
                            ["mean", "entropy"], device="cpu")
    tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    lengths = np.array([5, 7])  # int64, as the runtime passes them
    mean, entropy = runner([tokens, lengths])
    np.testing.assert_array_equal(mean, tokens * 2)
    np.testing.assert_array_equal(entropy, tokens.sum(-1) + lengths[:, None])
    assert engine.shapes == {"tokens": (2, 3, 4), "lengths": (2,)}
    # a tensor already on the engine's device, of the engine's dtype, is bound in place (no copy)
    on_device = torch.from_numpy(tokens.copy())
    runner.run_device([on_device, torch.from_numpy(lengths)])
    assert engine.addresses["tokens"] == on_device.data_ptr() and engine.executed == 2
    with pytest.raises(EngineError, match="outside the optimisation profile"):
        runner([np.zeros((9, 3, 4), np.float32), np.zeros(9, np.int64)])
    with pytest.raises(EngineError, match="expected"):
        TensorRTRunner(_FakeEngine, torch, _FakeEngine(), _HostStream(), "x", ["tokens", "cond"], None, device="cpu")

"""The TensorRT engine builder (exporter/trt_target.build_engine) driven through a recorded stand-in for the
TensorRT Python API: TensorRT cannot be installed here, so this checks the call sequence, flags, profile and timing
cache handling, not TensorRT itself (see /work/notes/trt.md)."""
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

"""Recorded stand-ins for the TensorRT Python API, for tests on machines where TensorRT cannot be installed.

Two surfaces, following the Python bindings of TensorRT 10.16 and 11.1 (python/src/infer/pyCore.cpp and the
NvInfer.h enums of those releases; read, not copied):
  10.16  BuilderFlag has FP16 and BF16 (deprecated) besides TF32; NetworkDefinitionCreationFlag has
         EXPLICIT_BATCH = 0 (ignored) and STRONGLY_TYPED = 1. The stand-in fails a strongly typed build that has
         FP16/BF16 set (build_serialized_network returns None): the flags contradict strong typing, so the
         builder code must never set them.
  11.1   no FP16/BF16 builder flags (accessing them raises AttributeError, as on the real module);
         STRONGLY_TYPED = 0, deprecated and ignored: every network is strongly typed.
Both: TF32 is on in a fresh builder config; set_timing_cache returns a bool; get_timing_cache returns None while no
cache is attached; create_timing_cache may return None for a blob it cannot read.

`cache_policy` picks how the stand-in treats timing caches:
  accept       every cache is attached
  reject_kept  a cache made from a non-empty blob is refused (another GPU / TensorRT): set_timing_cache -> False
  reject_all   every cache is refused, a fresh one too (get_timing_cache then stays None)
  unreadable   create_timing_cache(non-empty blob) returns None
"""
from __future__ import annotations

import ctypes
import enum

import numpy as np

SURFACES = ("10.16", "11.1")
CACHE_POLICIES = ("accept", "reject_kept", "reject_all", "unreadable")


def builder_flag_enum(surface: str):
    if surface.startswith("10."):
        return enum.IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "DEBUG": 2, "TF32": 6, "BF16": 17})
    return enum.IntEnum("BuilderFlag", {"DEBUG": 2, "TF32": 6, "STRICT_NANS": 23})


def network_flag_enum(surface: str):
    if surface.startswith("10."):
        return enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1,
                                                              "PREFER_JIT_PYTHON_PLUGINS": 2})
    return enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1})


class StandInTensorRT:
    """The builder side of the `tensorrt` module as exporter/trt_target.build_engine uses it; records calls."""

    def __init__(self, surface: str = "10.16", parse_ok: bool = True, cache_policy: str = "accept"):
        assert surface in SURFACES and cache_policy in CACHE_POLICIES
        self.surface, self.parse_ok, self.cache_policy = surface, parse_ok, cache_policy
        self.__version__ = {"10.16": "10.16.0", "11.1": "11.1.0"}[surface]
        self.calls, self.shapes, self.config, self.network, self.monitor = [], {}, None, None, None
        self.BuilderFlag = builder_flag_enum(surface)
        self.NetworkDefinitionCreationFlag = network_flag_enum(surface)
        rec = self

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

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

            def __init__(self):
                self.flags = {rec.BuilderFlag.TF32}  # on by default in both releases
                self.cache = None

            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(f"pool {pool} {size}")

            def set_flag(self, flag):
                self.flags.add(flag)

            def clear_flag(self, flag):
                self.flags.discard(flag)

            def get_flag(self, flag):
                return flag in self.flags

            def add_optimization_profile(self, profile):
                rec.calls.append("add_optimization_profile")
                return 0                         # the profile's index (TensorRT: -1 where it is refused)

            def create_timing_cache(self, serialized_timing_cache):
                blob = bytes(serialized_timing_cache)
                rec.calls.append(f"create_timing_cache {blob!r}")
                if blob and rec.cache_policy == "unreadable":
                    return None
                return TimingCache(blob)

            def set_timing_cache(self, cache, ignore_mismatch):
                ok = {"accept": True, "reject_kept": not cache.blob, "reject_all": False,
                      "unreadable": True}[rec.cache_policy]
                rec.calls.append(f"set_timing_cache {cache.blob!r} {ignore_mismatch} -> {ok}")
                if ok:
                    self.cache = cache
                return ok

            def get_timing_cache(self):
                return self.cache  # None while no cache is attached

        class Network:
            num_layers = 0      # nothing is parsed: the layer census (trt_build.count_layers) counts none,
            num_inputs = 0      # and the held profile (trt_build.read_profile) reads no input

            def __init__(self, flags):
                self.flags = flags
                bit = 1 << int(rec.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
                self.strongly_typed = rec.surface.startswith("11.") or bool(flags & bit)

        class Builder:
            def __init__(self, logger):
                rec.calls.append("Builder")

            def create_network(self, flags=0):
                rec.calls.append(f"create_network {flags}")
                rec.network = Network(flags)
                return rec.network

            def create_builder_config(self):
                rec.config = Config()
                return rec.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.calls.append("build_serialized_network")
                rec.monitor = config.progress_monitor
                typed_flags = {getattr(rec.BuilderFlag, n) for n in ("FP16", "BF16") if hasattr(rec.BuilderFlag, n)}
                if network.strongly_typed and config.flags & typed_flags:
                    rec.calls.append("error: precision flags are not allowed with a strongly typed network")
                    return None
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

        self.MemoryPoolType, self.IProgressMonitor = MemoryPoolType, IProgressMonitor
        self.LayerType = enum.Enum("LayerType", ["PLUGIN_V3", "KV_CACHE_UPDATE", "MATRIX_MULTIPLY"])
        self.Builder, self.OnnxParser = Builder, OnnxParser


# ---------------------------------------------------------------------------------------------- runtime side

class StandInStream:
    """A stream that records waits in a shared event log (host memory: nothing is asynchronous here)."""

    def __init__(self, name: str, events: list):
        self.name, self.events, self.cuda_stream = name, events, 0

    def wait_stream(self, other):
        self.events.append(f"{self.name} waits {other.name}")

    def synchronize(self):
        self.events.append(f"{self.name} synchronize")


class StandInEngine:
    """Engine + execution context. Lists its outputs in another order than the contract, refuses null or
    misaligned addresses as TensorRT does, and 'executes' by reading the bound input addresses and writing the
    bound output addresses (host memory, via ctypes): mean = 2 * tokens, entropy = tokens.sum(-1) + lengths."""

    class DataType:
        FLOAT, HALF, INT32, INT64, BOOL = "f32", "f16", "i32", "i64", "bool"

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    def __init__(self, events: list | None = None):
        self.tensors = [("tokens", "in", "f32"), ("lengths", "in", "i64"), ("entropy", "out", "f32"),
                        ("mean", "out", "f32")]
        self.num_io_tensors = len(self.tensors)
        self.shapes, self.addresses, self.executed = {}, {}, 0
        self.events = events if events is not None else []

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
        if address % 256:
            return False
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name):
        b, k, d = self.shapes["tokens"]
        return (b, k, d) if name == "mean" else (b, k)

    def execute_async_v3(self, stream_handle):
        if any(not self.addresses.get(n) for n, _, _ in self.tensors):
            return False  # every input and output needs a non-null address
        b, k, d = self.shapes["tokens"]
        tokens = np.ctypeslib.as_array((ctypes.c_float * (b * k * d)).from_address(self.addresses["tokens"]))
        lengths = np.ctypeslib.as_array((ctypes.c_int64 * b).from_address(self.addresses["lengths"]))
        mean = (tokens.reshape(b, k, d) * 2).astype(np.float32)
        entropy = (tokens.reshape(b, k, d).sum(-1) + lengths[:, None]).astype(np.float32)
        ctypes.memmove(self.addresses["mean"], mean.ctypes.data, mean.nbytes)
        ctypes.memmove(self.addresses["entropy"], entropy.ctypes.data, entropy.nbytes)
        self.executed += 1
        self.events.append("execute")
        return True


class StandInKVEngine(StandInEngine):
    """An in-place KV engine as TensorRT 10.15+ builds it from the ONNX TensorScatter: inputs tokens [B, K, Dh],
    lengths, k_cache_0 / v_cache_0 [B, 1, S, Dh]; outputs mean (= 2 * tokens), new_k (= tokens), new_v (= -tokens)
    and k_cache_out_0 / v_cache_out_0, aliased to the cache inputs (get_aliased_input_tensor; `aliases=None`: a
    surface without that method). Executing writes new_k / new_v into the cache at each row's length through the
    OUTPUT addresses, and refuses (False) an aliased output not bound to its input's address, as TensorRT requires."""

    ALIASES = {"k_cache_out_0": "k_cache_0", "v_cache_out_0": "v_cache_0"}

    def __init__(self, events: list | None = None, aliases: dict | None = ALIASES):
        super().__init__(events)
        self.tensors = [("tokens", "in", "f32"), ("lengths", "in", "i64"), ("k_cache_0", "in", "f32"),
                        ("v_cache_0", "in", "f32"), ("v_cache_out_0", "out", "f32"), ("mean", "out", "f32"),
                        ("new_k", "out", "f32"), ("new_v", "out", "f32"), ("k_cache_out_0", "out", "f32")]
        self.num_io_tensors = len(self.tensors)
        if aliases is not None:
            self.get_aliased_input_tensor = lambda name: aliases.get(name)

    def get_tensor_shape(self, name):
        b, k, d = self.shapes["tokens"]
        if name in self.ALIASES:
            return self.shapes[self.ALIASES[name]]
        return (b, k, d) if name == "mean" else (b, 1, k, d)

    def execute_async_v3(self, stream_handle):
        if any(not self.addresses.get(n) for n, _, _ in self.tensors):
            return False
        if any(self.addresses[out] != self.addresses[inp] for out, inp in self.ALIASES.items()):
            return False     # an aliased output must share its input's memory
        b, k, d = self.shapes["tokens"]
        s = self.shapes["k_cache_0"][2]

        def view(name, ctype, count, shape):
            return np.ctypeslib.as_array((ctype * count).from_address(self.addresses[name])).reshape(shape)

        tokens = view("tokens", ctypes.c_float, b * k * d, (b, k, d)).copy()
        lengths = view("lengths", ctypes.c_int64, b, (b,)).copy()
        for out, sign in (("k_cache_out_0", 1), ("v_cache_out_0", -1)):
            cache = view(out, ctypes.c_float, b * s * d, (b, 1, s, d))
            for r in range(b):
                cache[r, 0, lengths[r]:lengths[r] + k] = sign * tokens[r]
        for name, value in (("mean", 2 * tokens), ("new_k", tokens[:, None]), ("new_v", -tokens[:, None])):
            value = np.ascontiguousarray(value, np.float32)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        self.executed += 1
        self.events.append("execute")
        return True

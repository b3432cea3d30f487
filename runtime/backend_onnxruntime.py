"""ONNX Runtime backend: one InferenceSession per engine. Never imports torch.

Execution providers: the CPU provider by default; when the installed onnxruntime offers them, the TensorRT
and CUDA providers come first (TensorRT gets the manifest's shape profiles as its optimisation profile).
Pass providers=[...] to choose explicitly.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from fastardiff.errors import EngineError, MissingDependencyError

from .engine import CACHE_OUTPUTS, EngineCalls, check_cache_room
from .manifest import Manifest, verify_engine_files

log = logging.getLogger("fastardiff.runtime")

_ENGINE_DTYPES = (np.dtype(np.float32), np.dtype(np.int64))   # what the engines take: passed through as is
_NUMPY_TYPES = {np.dtype(np.float32): np.float32, np.dtype(np.int64): np.int64}
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _profile_shapes(manifest: Manifest, name: str, corner: int) -> str:
    """TensorRT EP profile string 'input:dim x dim,...' for one corner (0 min, 1 opt, 2 max) of the profile: the
    engine contract's input shapes, as the tensorrt backend builds its profiles (one definition of them)."""
    from .backend_tensorrt import engine_input_shapes

    cfg, entry = manifest.config, manifest.engines[name]
    profile = entry.profile
    k = profile["K"][corner] if "K" in profile else 0
    s = profile["cache"][corner] if "cache" in profile else 0
    layers = cfg["target_layers"] if name in ("target_verify", "target_jacobi") else cfg["draft_layers"]
    shapes = engine_input_shapes(cfg, name, layers, profile["batch"][corner], k, s,
                                 entry.gamma if entry.kind == "draft_rollout" else 0)
    return ",".join(f"{n}:{'x'.join(str(d) for d in dims)}" for n, dims in shapes.items())


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def device_providers(ort, device: str | None) -> list | None:
    """The execution providers `--device` asks for (None: no request, the preferred ones): cpu -> the CPU provider
    only; cuda[:N] -> the GPU providers this onnxruntime has (on device N), or a clear error when it has none."""
    if device is None:
        return None
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if not gpu:
        raise EngineError(f"--device {device}: this onnxruntime has no CUDA execution provider (available: "
                          f"{', '.join(available)}); install onnxruntime-gpu on a machine with CUDA, or run with "
                          "--device cpu")
    return gpu + ["CPUExecutionProvider"]


def choose_providers(ort, manifest: Manifest, name: str, providers=None, device_id: int = 0) -> list:
    available = ort.get_available_providers()
    if providers:
        missing = [p for p in providers if p not in available]
        if missing:
            raise EngineError(f"onnxruntime execution providers {missing} are not available here "
                              f"(available: {available})")
        wanted = list(providers)
    else:
        wanted = [p for p in PREFERRED_PROVIDERS if p in available]
    chosen = []
    for p in wanted:
        if p == "TensorrtExecutionProvider":
            chosen.append((p, {"device_id": device_id, "trt_profile_min_shapes": _profile_shapes(manifest, name, 0),
                               "trt_profile_opt_shapes": _profile_shapes(manifest, name, 1),
                               "trt_profile_max_shapes": _profile_shapes(manifest, name, 2),
                               "trt_fp16_enable": manifest.precision == "fp16"}))
        elif p == "CUDAExecutionProvider":
            chosen.append((p, {"device_id": device_id}))
        else:
            chosen.append(p)
    return chosen or ["CPUExecutionProvider"]


# Intra-op threads when none are asked for. These engines are small graphs whose calls cost by node count: on a
# 2-core CPU one thread ran the shipped model ~1.8x faster per image than ONNX Runtime's default of one thread per
# core (batch 1: 51 vs 97 ms; batch 8: 16.4 vs 29.3 ms), the pool's hand-offs costing more than they parallelise.
DEFAULT_THREADS = 1


class OnnxRuntimeEngines(EngineCalls):
    """The Engines interface over three onnxruntime sessions (numpy in, numpy out). threads: intra-op threads
    (None: DEFAULT_THREADS; 0: the library's default, one per core)."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest, providers=None, threads: int | None = None,
                 spinning: bool = False, verify: bool = True, in_place: bool = True, device: str | None = None,
                 **other):
        if other:
            log.debug("onnxruntime backend ignores options %s", sorted(other))
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "onnx", "running ONNX engines") from None
        providers = providers or device_providers(ort, device)
        device_id = int(device.split(":")[1]) if device and ":" in device else 0
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.threads = DEFAULT_THREADS if threads is None else threads
        if verify:
            verify_engine_files(self.engine_dir, manifest)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        # Spinning worker threads busy-wait between calls and steal the CPU from the sampling loop that runs
        # between engine calls (measured 4x slower per image on a 2-core box); off unless asked for.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.sessions = {}
        for name in manifest.engines:
            entry = manifest.engines[name]
            chosen = choose_providers(ort, manifest, name, providers, device_id)
            try:
                self.sessions[name] = ort.InferenceSession(str(self.engine_dir / entry.file), options,
                                                           providers=chosen)
            except Exception as err:  # onnxruntime raises its own exception types for bad models
                raise EngineError(f"onnxruntime cannot load engine '{self.engine_dir / entry.file}' "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); re-export it") from None
            self._check_io(name)
        # engines that write their new keys/values into the cache buffers they are given (exporter/onnx_passes.py)
        # (in_place=False: run them as plain calls, the caller writes the cache)
        has_cache_outputs = {n for n, e in manifest.engines.items() if e.outputs[-2:] == CACHE_OUTPUTS}
        self.kv_in_place = frozenset(has_cache_outputs if in_place else ())
        # their caches must hold the fed positions (the scatter writes them there, bound or not)
        self.needs_cache_room = bool(has_cache_outputs)
        self._bindings = {n: self.sessions[n].io_binding()._iobinding for n in self.kv_in_place}
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._contract_outputs = {n: (e.outputs[:-2] if n in has_cache_outputs else None)
                                  for n, e in manifest.engines.items()}
        self.providers = self.sessions["target_verify"].get_providers()
        log.debug("onnxruntime engines from %s on %s", self.engine_dir, self.providers)

    @property
    def cache_limit(self) -> float:
        """The longest KV cache axis the target engines accept: any (inf) on the CPU and CUDA providers, which run
        the graph's dynamic axes as they are; the exported shape profile's under the TensorRT provider."""
        if "TensorrtExecutionProvider" not in self.providers:
            return math.inf
        cache = self.manifest.engines["target_verify"].profile.get("cache")
        return int(cache[-1]) if cache else 0      # unknown: only the prefix a call reads

    def _check_io(self, name: str) -> None:
        session, entry = self.sessions[name], self.manifest.engines[name]
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if got_in != list(entry.inputs) or got_out != list(entry.outputs):
            raise EngineError(f"engine '{name}' has inputs {got_in} / outputs {got_out}, the manifest says "
                              f"{entry.inputs} / {entry.outputs}; re-export")

    def _run(self, name: str, arrays) -> list[np.ndarray]:
        names = self.manifest.engines[name].inputs
        feed = {}
        for n, a in zip(names, arrays):
            if not (type(a) is np.ndarray and a.dtype in _ENGINE_DTYPES and a.flags.c_contiguous):
                a = np.asarray(a)
                a = np.ascontiguousarray(a, dtype=np.int64 if a.dtype.kind in "iu" else np.float32)
            feed[n] = a
        if self._contract_outputs[name] is not None:
            check_cache_room(name, feed["tokens"], feed["lengths"], feed["k_cache"])
        if name in self.kv_in_place:
            return self._run_in_place(name, feed)
        return self.sessions[name].run(self._contract_outputs[name], feed)

    def _run_in_place(self, name: str, feed: dict) -> list[np.ndarray]:
        """IOBinding: every input bound where it lies (no copy), the cache outputs bound to the cache inputs'
        own memory, so the engine's scatter writes the new keys/values into the buffers the caller passed (the
        runtime's KV cache when it passes it whole: AREngine then leaves its host write out). Returns the
        contract outputs; an input array that was converted above (not the caller's) absorbs the write instead.
        Through the binding's own C object (the Python wrapper makes a device object per bind): a call costs
        ~40 us less at batch 1, where a call is ~0.5 ms."""
        binding, device = self._bindings[name], self._cpu
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for n, a in feed.items():
            binding.bind_input(n, device, _NUMPY_TYPES[a.dtype], a.shape, a.ctypes.data)
        contract, caches = self._contract_outputs[name], self.manifest.engines[name].outputs[-2:]
        for n in contract:
            binding.bind_output(n, device)
        for n, cache in zip(caches, ("k_cache", "v_cache")):
            a = feed[cache]
            binding.bind_output(n, device, np.float32, (a.shape[0] * a.shape[1],) + a.shape[2:], a.ctypes.data)
        self.sessions[name]._sess.run_with_iobinding(binding, None)
        values = binding.get_outputs()
        return [values[i].numpy() for i in range(len(contract))]


def load_onnxruntime_engines(engine_dir, manifest: Manifest, **options) -> OnnxRuntimeEngines:
    return OnnxRuntimeEngines(engine_dir, manifest, **options)

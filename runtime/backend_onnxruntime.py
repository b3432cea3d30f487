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

from . import trt_rtx_ep
from .denormals import DenormalFlush
from .capabilities import EngineCapabilities, accelerator_for
from .engine import EngineCalls, check_cache_room, per_layer_cache_inputs
from .kv_cache import HostBufferPool, cache_device_for, loop_device_for, loop_noise_for
from .manifest import Manifest, check_input_dims, verify_engine_files

log = logging.getLogger("fastardiff.runtime")

_ENGINE_DTYPES = (np.dtype(np.float32), np.dtype(np.int64))   # what the engines take: passed through as is
_NUMPY_TYPES = {np.dtype(np.float32): np.float32, np.dtype(np.int64): np.int64}
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _profile_shapes(manifest: Manifest, name: str, corner: int) -> str:
    """TensorRT EP profile string 'input:dim x dim,...' for one corner (0 min, 1 opt, 2 max) of the profile: the
    engine contract's input shapes, as the tensorrt backend builds its profiles (one definition of them)."""
    from .engine_shapes import engine_input_shapes, profile_proposals

    cfg, entry = manifest.config, manifest.engines[name]
    profile = entry.profile
    k = profile["K"][corner] if "K" in profile else 0
    s = profile["cache"][corner] if "cache" in profile else 0
    layers = cfg["target_layers"] if name in ("target_verify", "target_jacobi") else cfg["draft_layers"]
    shapes = engine_input_shapes(cfg, name, layers, profile["batch"][corner], k, s,
                                 entry.gamma if entry.kind == "draft_rollout" else 0,
                                 profile_proposals(corner, profile["batch"][corner]))
    if entry.cache_layers:             # one [R, H, S, Dh] buffer per layer (per_layer_io)
        for cache in ("k_cache", "v_cache"):
            dims = shapes.pop(cache)[1:]
            shapes.update({f"{cache}_{layer}": dims for layer in range(entry.cache_layers)})
    order = entry.inputs or list(shapes)
    return ",".join(f"{n}:{'x'.join(str(d) for d in shapes[n])}" for n in order)


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
    if not gpu and trt_rtx_ep.installed():     # ONNX Runtime's TensorRT-RTX plugin EP (runtime/trt_rtx_ep.py)
        return [trt_rtx_ep.EP_PROVIDER]
    if not gpu:
        raise EngineError(f"--device {device}: this onnxruntime has no CUDA execution provider (available: "
                          f"{', '.join(available)}); install onnxruntime-gpu on a machine with CUDA, or run with "
                          "--device cpu")
    return gpu + ["CPUExecutionProvider"]


def tensor_device(ort, providers, device_id: int, device_cache: bool | None, device_loop: bool | None):
    """(torch device, CUDA stream handle or None) the engines bind torch tensors on, or (None, None): the CUDA
    provider's GPU where it will run the engines and torch is installed, unless device_cache / device_loop say
    False; the CPU only where device_cache or device_loop asks for it (the CPU tests of the device path)."""
    wanted = bool(device_cache or device_loop)
    gpu = "CUDAExecutionProvider" in (providers or ort.get_available_providers())
    if not (wanted or (gpu and device_cache is not False and device_loop is not False)):
        return None, None
    try:
        import torch
    except ImportError:
        if wanted:
            raise MissingDependencyError("torch", "export", "device caches with onnxruntime") from None
        return None, None
    if gpu and torch.cuda.is_available():
        with torch.cuda.device(device_id):
            return torch.device("cuda", device_id), torch.cuda.current_stream().cuda_stream
    return torch.device("cpu"), None


def choose_providers(ort, manifest: Manifest, name: str, providers=None, device_id: int = 0,
                     stream: int | None = None) -> list:
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
        elif p == "CUDAExecutionProvider":   # on torch's stream when the loop's tensors are torch's (ort_tensors)
            chosen.append((p, {"device_id": device_id, **({"user_compute_stream": str(stream)} if stream else {})}))
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
                 device_cache: bool | None = None, device_loop: bool | None = None, loop_noise: str | None = None,
                 flush_denormals: bool = True, **other):
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
        # flush_denormals (below): every CPU call runs with denormals flushed to zero on the calling thread and the
        # caller's floating-point state put back after it (runtime/denormals.py: a masked softmax row's underflow is
        # ~5x slower arithmetic on x86); not ONNX Runtime's `session.set_denormal_as_zero`, which leaves the flags
        # set on the thread that created the process's first session
        # the device loop / device caches (runtime/ort_tensors.py): torch tensors bound where they lie, on the CUDA
        # provider's GPU (on by default there, when torch is installed) or, asked for, on the CPU
        torch_device, stream = tensor_device(ort, providers, device_id, device_cache, device_loop)
        rtx_ep = providers == [trt_rtx_ep.EP_PROVIDER]
        if rtx_ep:        # attached to the session options (a plugin EP), not named in providers=
            trt_rtx_ep.add_to_session(ort, options, device_id)
        self.sessions = {}
        for name in manifest.engines:
            entry = manifest.engines[name]
            chosen = None if rtx_ep else choose_providers(ort, manifest, name, providers, device_id, stream)
            try:
                self.sessions[name] = ort.InferenceSession(str(self.engine_dir / entry.file), options,
                                                           providers=chosen)
            except Exception as err:  # onnxruntime raises its own exception types for bad models
                raise EngineError(f"onnxruntime cannot load engine '{self.engine_dir / entry.file}' "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); re-export it") from None
            self._check_io(name)
        # engines that write their new keys/values into the cache buffers they are given: one buffer per layer
        # (manifest cache_layers; exporter/onnx_passes.py), bound to the layers of the caller's [L, R, H, S, Dh]
        # buffer (in_place=False: run them as plain calls, the caller writes the cache)
        self._cache_layers = {n: e.cache_layers for n, e in manifest.engines.items() if e.cache_layers}
        kv_in_place = frozenset(self._cache_layers if in_place else ())
        self._bindings = {n: self.sessions[n].io_binding()._iobinding for n in kv_in_place}
        self._bound_caches: dict = {}     # engine -> (k, v addresses and shapes) its cache bindings point at
        # engine -> {input: (array, address, shape, dtype)} of the array each input binding points at
        self._bound_inputs: dict = {n: {} for n in kv_in_place}
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._contract_outputs = {n: e.outputs[:len(e.outputs) - 2 * e.cache_layers]
                                  for n, e in manifest.engines.items()}
        self._plain_inputs = {n: [i for i in e.inputs if i not in per_layer_cache_inputs(e.cache_layers)]
                              for n, e in manifest.engines.items()}
        self.providers = self.sessions["target_verify"].get_providers()
        self.denormals = DenormalFlush(flush_denormals and self.providers[0] == "CPUExecutionProvider")
        cache_device = loop_device = self._tensors = None
        if torch_device is not None:
            from .ort_tensors import TensorCalls

            cache_device = cache_device_for(torch_device, True if device_loop else device_cache)
            loop_device = loop_device_for(cache_device, device_loop)
            if cache_device is not None:
                import torch

                self._tensors = TensorCalls(ort, torch, self.sessions, manifest, cache_device)
        self.capabilities = EngineCapabilities(
            cache_views=False, cache_limit=ort_cache_limit(manifest, self.providers), kv_in_place=kv_in_place,
            # the in-place engines' caches must hold the fed positions (the scatter writes them there, bound or not)
            needs_cache_room=bool(self._cache_layers), cache_device=cache_device,
            # host caches: the same buffers run after run keep the cache bindings above (kv_cache.HostBufferPool)
            cache_pool=HostBufferPool() if cache_device is None else None,
            loop_device=loop_device, loop_noise=loop_noise_for(loop_device, loop_noise),
            rollout_gammas=frozenset(manifest.rollout_engines()), target_jacobi="target_jacobi" in manifest.engines,
            accelerator=accelerator_for("onnxruntime", self.providers, cache_device=cache_device))
        log.debug("onnxruntime engines from %s on %s", self.engine_dir, self.providers)

    @property
    def flush_denormals(self) -> bool:
        """Whether engine calls run with denormals flushed (asked for, the CPU provider, a platform that can)."""
        return self.denormals.available

    def _check_io(self, name: str) -> None:
        session, entry = self.sessions[name], self.manifest.engines[name]
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if got_in != list(entry.inputs) or got_out != list(entry.outputs):
            raise EngineError(f"engine '{name}' has inputs {got_in} / outputs {got_out}, the manifest says "
                              f"{entry.inputs} / {entry.outputs}; re-export")
        check_input_dims(self.manifest, name, {i.name: i.shape for i in session.get_inputs()})

    def _run(self, name: str, arrays) -> list[np.ndarray]:
        if self._tensors is not None and any(type(a) is not np.ndarray for a in arrays[:4]):
            entry = self.manifest.engines[name]
            keep = 2 if "new_v" in entry.outputs else 0
            with self.denormals:
                return self._tensors.run(name, arrays, name in self.capabilities.kv_in_place, keep)
        arrays = [a if type(a) is np.ndarray and a.dtype in _ENGINE_DTYPES and a.flags.c_contiguous
                  else np.ascontiguousarray(a, dtype=np.int64 if np.asarray(a).dtype.kind in "iu" else np.float32)
                  for a in arrays]
        layers = self._cache_layers.get(name, 0)
        if not layers:
            with self.denormals:
                return self.sessions[name].run(self._contract_outputs[name],
                                               dict(zip(self._plain_inputs[name], arrays)))
        tokens, lengths, k_cache, v_cache, *rest = arrays        # the contract's order (runtime/engine.py)
        check_cache_room(name, tokens, lengths, k_cache)
        feed = dict(zip(self._plain_inputs[name], (tokens, lengths, *rest)))
        if name in self.capabilities.kv_in_place:
            return self._run_in_place(name, feed, k_cache, v_cache, layers)
        feed.update({f"{c}_{layer}": cache[layer] for c, cache in (("k_cache", k_cache), ("v_cache", v_cache))
                     for layer in range(layers)})
        with self.denormals:
            return self.sessions[name].run(self._contract_outputs[name], feed)

    def _run_in_place(self, name: str, feed: dict, k_cache: np.ndarray, v_cache: np.ndarray,
                      layers: int) -> list[np.ndarray]:
        """IOBinding: every input bound where it lies (no copy), layer l's cache input and output both bound to
        layer l of the caller's contiguous cache buffer, so the engine's scatter writes the new keys/values into
        it (the runtime's KV cache when it passes it whole: AREngine then leaves its host write out). Returns the
        contract outputs; a cache that was converted above (not the caller's) absorbs the write instead.
        Through the binding's own C object (the Python wrapper makes a device object per bind): a call costs
        ~40 us less at batch 1, where a call is ~0.5 ms."""
        binding, device, bound = self._bindings[name], self._cpu, self._bound_inputs[name]
        for n, a in feed.items():          # binding a name again replaces its binding
            # a binding is an address and a shape: the very array bound last time (kept alive here, refilled by
            # the caller: runtime/arrays.py kept), or an array at the address and of the shape already bound (numpy
            # reused the memory), needs none (~3 us a bind, ~1 us to read an address)
            last = bound.get(n)
            if last is not None and last[0] is a:
                continue
            at = (a.__array_interface__["data"][0], a.shape, a.dtype)
            if last is None or last[1:] != at:
                binding.bind_input(n, device, _NUMPY_TYPES[a.dtype], a.shape, at[0])
            bound[n] = (a, *at)
        contract = self._contract_outputs[name]
        for n in contract:                 # unallocated: a fresh output each call (never last call's buffer)
            binding.bind_output(n, device)
        # the 4L cache bindings point at memory, not at arrays: the same address and shape as the last call's
        # (the runtime passes its one buffer call after call) is the same binding, so it is kept (saves ~0.1 ms
        # a call at batch 1, a tenth of a 12-layer step)
        where = (k_cache.ctypes.data, v_cache.ctypes.data, k_cache.shape, v_cache.shape)
        if self._bound_caches.get(name) != where:
            for c, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
                shape, base, step = cache.shape[1:], cache.ctypes.data, cache.strides[0]
                for layer in range(layers):
                    binding.bind_input(f"{c}_{layer}", device, np.float32, shape, base + layer * step)
                    binding.bind_output(f"{c}_out_{layer}", device, np.float32, shape, base + layer * step)
            self._bound_caches[name] = where
        with self.denormals:
            self.sessions[name]._sess.run_with_iobinding(binding, None)
        values = binding.get_outputs()
        return [values[i].numpy() for i in range(len(contract))]


def ort_cache_limit(manifest: Manifest, providers) -> float:
    """The longest KV cache axis the target engines accept: any (inf) on the CPU and CUDA providers, which run the
    graph's dynamic axes as they are; the exported shape profile's under the TensorRT provider."""
    if "TensorrtExecutionProvider" not in providers:
        return math.inf
    cache = manifest.engines["target_verify"].profile.get("cache")
    return int(cache[-1]) if cache else 0      # unknown: only the prefix a call reads


def load_onnxruntime_engines(engine_dir, manifest: Manifest, **options) -> OnnxRuntimeEngines:
    return OnnxRuntimeEngines(engine_dir, manifest, **options)

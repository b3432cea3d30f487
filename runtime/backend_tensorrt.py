"""TensorRT backend: one serialised engine per network, the entropy-attention plugin library loaded first.

Load order: import tensorrt (MissingDependencyError otherwise) -> verify engine files (sha256) -> TensorRT version
equals the manifest's (engines are tied to the version that built them) -> the plugin library named by the manifest
exists and has its sha256 -> a CUDA GPU with the manifest's compute capability -> plugin registered
(IPluginRegistry.load_library) -> engines deserialised -> one execution context per engine, one CUDA stream.

Device memory is torch CUDA tensors (torch imported lazily, only by this backend). Inputs bind by address with
set_tensor_address: numpy arrays are copied to the device once per call (the Engines interface is numpy), while
torch CUDA tensors of the engine's dtype, contiguous and 256-byte aligned (TensorRT's requirement for bound
addresses) are bound as they are, without a copy (`run_device`), which is how a caller that keeps its KV cache on
the GPU avoids copies; any other tensor is copied into a 256-byte aligned buffer. Zero-element tensors (an empty
cache) are bound to a small dummy buffer: TensorRT wants a non-null address for every input and output.

Streams: the engine runs on its own stream, which first waits on the caller's stream (the inputs the caller
produced there are ready); outputs are allocated on the caller's stream and the caller's stream waits on the
engine's after the enqueue, so the caller may use them, or free them, in stream order without a host sync.
Outputs come back as numpy through the interface (the copy to the host synchronises the caller's stream).

In-place KV engines (`--kv-update in-place`, manifest cache_layers): one cache buffer per layer, each an input
k_cache_<l> and an output k_cache_out_<l> that TensorRT aliases to it (IKVCacheUpdateLayer, parsed from the ONNX
TensorScatter; ICudaEngine.get_aliased_input_tensor names the pair). Both are bound to the same address: layer l
of the runtime's [L, R, H, S, Dh] cache on the GPU, so a call copies no cache. A layer that cannot be bound where
it lies (host memory, misaligned) is staged on the device and written back to the caller's memory after the call.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from fastardiff.errors import EngineError, MissingDependencyError

from .capabilities import EngineCapabilities
from .engine import EngineCalls, check_cache_room, per_layer_aliases
from .kv_cache import cache_device_for, loop_device_for, loop_noise_for
from .manifest import Manifest, sha256_file, verify_engine_files
from .trt_library import TRT_LIBRARIES, TensorRTLibrary, import_library
from .trt_rtx_runtime import RuntimeCache, check_compute_capability, check_engine_validity, manifest_library
from .trt_rtx_runtime import pad_cache_axis, runtime_cache_path, static_cache_length

log = logging.getLogger("fastardiff.runtime")

PLUGIN_LIBRARY = "libfastardiff_trt_plugin.so"
ALIGNMENT = 256  # bytes: the alignment TensorRT requires of every address bound with set_tensor_address
PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION = "EntropyAttention", "fastardiff", "1"
BUILD_HINT = ("build it with `cmake -S . -B build/plugin -DTENSORRT_ROOT=/path/to/TensorRT && "
              "cmake --build build/plugin -j` (from the fastardiff source tree)")


def import_tensorrt(purpose: str, library: TensorRTLibrary | None = None):
    """The library's module (standard TensorRT unless named): runtime/trt_library.py import_library."""
    return import_library(library or TRT_LIBRARIES["tensorrt"], purpose)


def find_plugin_library(engine_dir: Path, manifest: Manifest, plugin_path: str | Path | None = None) -> Path:
    """The plugin library: plugin_path, else $FASTARDIFF_TRT_PLUGIN, else the copy in the engine dir."""
    recorded = manifest.plugin.get("file", PLUGIN_LIBRARY)
    path = Path(plugin_path or os.environ.get("FASTARDIFF_TRT_PLUGIN") or engine_dir / recorded)
    if not path.is_file():
        raise EngineError(f"TensorRT plugin library '{path}' is missing (the engines need the EntropyAttention "
                          f"plugin); {BUILD_HINT}, then copy build/plugin/{PLUGIN_LIBRARY} to {engine_dir / recorded} "
                          "or set FASTARDIFF_TRT_PLUGIN")
    expected = manifest.plugin.get("sha256")
    if expected and sha256_file(path) != expected:
        raise EngineError(f"TensorRT plugin library '{path}' differs from the one the engines were built with "
                          "(sha256 mismatch); use the library from the export or re-export with --force")
    return path


def load_plugin_library(trt, path: Path) -> None:
    """Register the plugin's creators with TensorRT (idempotent within a process)."""
    registry = trt.get_plugin_registry()
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None:
        return
    handle = registry.load_library(str(path))
    if handle is None or registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise EngineError(f"TensorRT could not load the plugin library '{path}' (no {PLUGIN_NAMESPACE}::{PLUGIN_NAME} "
                          f"v{PLUGIN_VERSION} creator registered); rebuild it against this TensorRT: {BUILD_HINT}")


def current_gpu(torch) -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def check_versions(trt, manifest: Manifest, engine_dir: Path, library: TensorRTLibrary | None = None) -> None:
    key = (library or TRT_LIBRARIES["tensorrt"]).key
    built = manifest.library_versions.get(key)
    name = "TensorRT-RTX" if key == "tensorrt_rtx" else "TensorRT"
    if built and built != trt.__version__:
        raise EngineError(f"engines in '{engine_dir}' were built with {name} {built}, this is {name} "
                          f"{trt.__version__}; rebuild them here with `fastardiff export --target trt --force`")


def check_gpu(torch, manifest: Manifest, engine_dir: Path) -> dict:
    if not torch.cuda.is_available():
        raise EngineError(f"TensorRT engines in '{engine_dir}' need a CUDA GPU and torch sees none")
    gpu = current_gpu(torch)
    want = manifest.gpu or {}
    if want.get("compute_capability") and want["compute_capability"] != gpu["compute_capability"]:
        raise EngineError(f"engines in '{engine_dir}' were built for {want.get('name')} (compute capability "
                          f"{want['compute_capability']}), this GPU is {gpu['name']} ({gpu['compute_capability']}); "
                          "rebuild them on this GPU with `fastardiff export --target trt --force`")
    if want.get("name") and want["name"] != gpu["name"]:
        log.warning("engines were built on %s, running on %s (same compute capability): rebuild for best speed",
                    want["name"], gpu["name"])
    return gpu


class TensorRTRunner:
    """One deserialised engine + execution context; binds device buffers by address and runs on `stream`.
    `device` is "cuda" for TensorRT; tests pass "cpu" with a stand-in engine to check the binding logic."""

    def __init__(self, trt, torch, engine, stream, label: str, inputs=None, outputs=None, device: str = "cuda",
                 aliases: dict | None = None, runtime_config=None):
        self.trt, self.torch, self.engine, self.stream, self.label = trt, torch, engine, stream, label
        self.device = device
        # TensorRT-RTX: the context takes the IRuntimeConfig carrying the engine's runtime cache
        self.context = (engine.create_execution_context() if runtime_config is None
                        else engine.create_execution_context(runtime_config=runtime_config))
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for '{label}'")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) != mode]
        # the engine contract's order (ENGINE_IO / manifest), not whatever order the engine lists its tensors in
        for kind, have, want in (("inputs", self.inputs, inputs), ("outputs", self.outputs, outputs)):
            if want is not None and sorted(have) != sorted(want):
                raise EngineError(f"engine '{label}' has {kind} {have}, expected {list(want)}; re-export")
        self.inputs = list(inputs) if inputs is not None else self.inputs
        self.outputs = list(outputs) if outputs is not None else self.outputs
        self.dtypes = {n: self._torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self.aliases = checked_aliases(engine, label, self.inputs, self.outputs, aliases or {})
        self._updated_inputs = frozenset(self.aliases.values())
        self._dummy = None  # the address bound for zero-element tensors, allocated on first use
        # (name, shape, dtype) -> an aligned buffer reused by every host-facing call of that shape: staged inputs
        # and outputs, so a run at a shape seen before allocates nothing (__call__ only: it reads the outputs
        # back before returning; run_device's outputs belong to the caller)
        self._pool: dict[tuple, object] = {}

    def _torch_dtype(self, dt):
        trt, torch = self.trt, self.torch
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                 trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        if hasattr(trt.DataType, "BF16"):
            table[trt.DataType.BF16] = torch.bfloat16
        if dt not in table:
            raise EngineError(f"engine '{self.label}' has a tensor of TensorRT type {dt}, which this runtime "
                              "cannot bind")
        return table[dt]

    def _aligned_empty(self, shape, dtype):
        """An uninitialised tensor whose storage starts on a 256-byte boundary (torch's CUDA allocator already
        aligns to 512; the CPU allocator used by the tests only to 64, hence the explicit offset)."""
        torch = self.torch
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=self.device)
        offset = (-raw.data_ptr()) % ALIGNMENT
        return raw[offset:offset + nbytes].view(dtype).view(shape)

    def _buffer(self, name: str, shape: tuple, pooled: bool):
        if not pooled:
            return self._aligned_empty(shape, self.dtypes[name])
        key = (name, shape)
        if key not in self._pool:
            self._pool[key] = self._aligned_empty(shape, self.dtypes[name])
        return self._pool[key]

    def _device_tensor(self, name: str, x, pooled: bool = False):
        torch = self.torch
        if (isinstance(x, torch.Tensor) and x.device.type == self.device and x.dtype == self.dtypes[name]
                and x.is_contiguous() and x.data_ptr() % ALIGNMENT == 0):
            return x  # bound in place: no copy
        if not isinstance(x, torch.Tensor):
            x = torch.from_numpy(np.ascontiguousarray(x))
        out = self._buffer(name, tuple(x.shape), pooled)
        out.copy_(x, non_blocking=True)
        return out

    def _address(self, t) -> int:
        if t.numel() == 0:  # torch gives empty tensors address 0; TensorRT refuses null I/O addresses
            if self._dummy is None:
                self._dummy = self._aligned_empty((ALIGNMENT,), self.torch.uint8)
            return self._dummy.data_ptr()
        return t.data_ptr()

    def _bind(self, name: str, t) -> None:
        address = self._address(t)
        if not self.context.set_tensor_address(name, address):
            raise EngineError(f"engine '{self.label}': TensorRT refused address {address:#x} for tensor '{name}' "
                              "(not one of the engine's tensors, or not a 256-byte aligned device pointer); re-export "
                              "the engines with `fastardiff export --target trt --force`")

    def run_device(self, arrays, caller_stream=None, pooled: bool = False) -> list:
        """Inputs in engine order (numpy or torch tensors) -> output torch tensors on the engine's device, ready
        in the order of `caller_stream` (default: torch's current stream; no host synchronisation here).
        pooled: staged inputs and outputs in buffers reused across calls of the same shapes (the outputs are
        overwritten by the next pooled call: for callers that copy them out first, as __call__ does)."""
        torch = self.torch
        if len(arrays) != len(self.inputs):
            raise EngineError(f"engine '{self.label}' takes {len(self.inputs)} inputs {self.inputs}, got {len(arrays)}")
        caller = caller_stream if caller_stream is not None else (
            torch.cuda.current_stream() if self.device == "cuda" else self.stream)
        bound = [self._device_tensor(n, a, pooled) for n, a in zip(self.inputs, arrays)]  # on the caller's stream
        for name, t in zip(self.inputs, bound):
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise EngineError(f"engine '{self.label}': input '{name}' shape {tuple(t.shape)} is outside the "
                                  "optimisation profile it was built with; re-export with a larger --batch/--gamma")
            self._bind(name, t)
        by_name = dict(zip(self.inputs, bound))
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if name in self.aliases:          # updated in place: the output is its input's memory
                out = by_name[self.aliases[name]]
                if tuple(out.shape) != shape:
                    raise EngineError(f"engine '{self.label}': output '{name}' has shape {shape}, its aliased input "
                                      f"'{self.aliases[name]}' {tuple(out.shape)}; re-export")
            else:
                out = self._buffer(name, shape, pooled)
            self._bind(name, out)
            outs.append(out)
        self.stream.wait_stream(caller)       # inputs (and the output buffers) are ready before the engine reads
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"TensorRT failed to enqueue engine '{self.label}' (see the TensorRT log above)")
        if self.device == "cuda":
            for t in bound + outs:            # memory the engine stream still uses is not reused before it is done
                t.record_stream(self.stream)
        caller.wait_stream(self.stream)       # the caller's later work sees the outputs
        for name, given in zip(self.inputs, arrays):
            staged = by_name[name]
            if name in self._updated_inputs and staged is not given:   # staged copy: the update goes back
                write_back(self.torch, given, staged)
        return outs

    def __call__(self, arrays) -> list[np.ndarray]:
        """Host arrays in and out; no allocation on the device at shapes seen before (the copies back to the
        host finish before this returns, so the pooled buffers are free for the next call)."""
        host = [(o.float() if o.is_floating_point() else o).cpu().numpy() for o in self.run_device(arrays, pooled=True)]
        # on a CPU device (the tests' stand-in) .cpu() is the pooled buffer itself: copy it out
        return [a.copy() for a in host] if self.device == "cpu" else host


def checked_aliases(engine, label: str, inputs, outputs, contract: dict) -> dict:
    """Output -> the input it updates in place: the contract's pairs (runtime/engine.py per_layer_aliases),
    checked against the engine's own where its TensorRT reports them (get_aliased_input_tensor, 10.15+)."""
    ask = getattr(engine, "get_aliased_input_tensor", None)
    for out in outputs:
        own = ask(out) if ask is not None else contract.get(out)
        if (own or None) != contract.get(out):
            raise EngineError(f"engine '{label}': output '{out}' aliases input {own!r} in the engine but "
                              f"{contract.get(out)!r} in the manifest; re-export")
    missing = [f"{o} -> {i}" for o, i in contract.items() if o not in outputs or i not in inputs]
    if missing:
        raise EngineError(f"engine '{label}' lacks the in-place cache tensors {missing}; re-export")
    return dict(contract)


def write_back(torch, given, staged) -> None:
    """An in-place update made on a staged copy, written into the caller's array (numpy or torch)."""
    if isinstance(given, torch.Tensor):
        given.copy_(staged)
    else:
        host = staged if isinstance(staged, np.ndarray) else staged.cpu().numpy()
        np.copyto(given, host.astype(given.dtype, copy=False))


def run_for_loop(runner: TensorRTRunner, arrays, keep: int) -> list:
    """An engine call as the loop needs it: tokens given as a torch tensor (the device loop, runtime/arrays.py)
    -> every output stays a device tensor; else the outputs come to the host except the last `keep` (an AR
    engine's new keys/values when the KV caches live on the device), which stay there."""
    if isinstance(arrays[0], runner.torch.Tensor):
        return runner.run_device(arrays)
    if not keep:
        return runner(arrays)
    outs = runner.run_device(arrays)
    host = [(o.float() if o.is_floating_point() else o).cpu().numpy() for o in outs[:len(outs) - keep]]
    return host + outs[len(outs) - keep:]


def deserialize_engine(trt, runtime, path: Path):
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT could not deserialise '{path}' (built by another TensorRT version, for another "
                          "GPU, or without the plugin loaded); re-export with `fastardiff export --target trt --force`")
    return engine


class TensorRTEngines(EngineCalls):
    """The Engines interface over three TensorRT engines sharing one CUDA stream."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest, plugin_path: str | Path | None = None,
                 verify: bool = True, device: str | None = None, device_cache: bool | None = None,
                 device_loop: bool | None = None, loop_noise: str | None = None, **other):
        if device is not None and not device.startswith("cuda"):
            raise EngineError(f"--device {device}: TensorRT engines run on a CUDA GPU only; use --device cuda, or "
                              "export `--target onnx` to run on the CPU")
        library = manifest_library(manifest)
        trt = import_tensorrt("running TensorRT engines", library)
        if other:
            log.debug("tensorrt backend ignores options %s", sorted(other))
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        if verify:
            verify_engine_files(self.engine_dir, manifest)
        check_versions(trt, manifest, self.engine_dir, library)
        embedded = library.builds_without_gpu and bool((manifest.export.get("trt") or {}).get("plugin_embedded"))
        plugin = None if embedded and not (plugin_path or os.environ.get("FASTARDIFF_TRT_PLUGIN")) else \
            find_plugin_library(self.engine_dir, manifest, plugin_path)
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("torch", "export", "TensorRT device buffers") from None
        if library.builds_without_gpu:      # portable engines: any GPU of the compute capabilities built for
            if not torch.cuda.is_available():
                raise EngineError(f"TensorRT-RTX engines in '{engine_dir}' need an NVIDIA RTX / Ampere-or-later GPU "
                                  "and torch sees none; export `--target onnx` to run on the CPU")
            self.gpu = current_gpu(torch)
            check_compute_capability(manifest, self.gpu, self.engine_dir)
        else:                               # standard TensorRT: engines are for the GPU they were built on
            self.gpu = check_gpu(torch, manifest, self.engine_dir)
        if plugin is not None:
            load_plugin_library(trt, plugin)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if embedded:     # the engines carry the plugin library (sha256-verified above with the engine files)
            self.runtime.engine_host_code_allowed = True
        self.stream = torch.cuda.Stream()
        # the KV caches (device_cache) and the loop's buffers and outputs (device_loop) on the GPU, by default:
        # bound by address where they lie, so a call moves no cache (runtime/kv_cache.py, runtime/arrays.py)
        cache_device = cache_device_for("cuda", True if device_loop else device_cache)
        loop_device = loop_device_for(cache_device, device_loop)
        self.runners, self.runtime_caches = {}, []
        for name in manifest.engines:
            entry = manifest.engines[name]
            path = self.engine_dir / entry.file
            config = None
            if library.builds_without_gpu:
                check_engine_validity(trt, self.runtime, path.read_bytes(), path, self.gpu)
            engine = deserialize_engine(trt, self.runtime, path)
            if library.builds_without_gpu:  # JIT kernels kept in the user's cache dir across runs
                cache = RuntimeCache(engine, runtime_cache_path(entry.sha256, self.gpu, trt.__version__), name)
                self.runtime_caches.append(cache)
                config = cache.config
            self.runners[name] = TensorRTRunner(trt, torch, engine, self.stream, name, entry.inputs, entry.outputs,
                                                aliases=per_layer_aliases(entry.cache_layers), runtime_config=config)
        # engines that update the caches they are given (one buffer per layer, bound in place): the loop passes
        # its whole buffer (room for the fed positions) and leaves its own write out
        self._cache_layers = {n: e.cache_layers for n, e in manifest.engines.items() if e.cache_layers}
        cache = manifest.engines["target_verify"].profile.get("cache")   # the optimisation profile's longest axis
        self.capabilities = EngineCapabilities(
            cache_views=False, cache_limit=int(cache[-1]) if cache else 0,
            kv_in_place=frozenset(self._cache_layers), needs_cache_room=bool(self._cache_layers),
            cache_device=cache_device, cache_pool=None, loop_device=loop_device,
            loop_noise=loop_noise_for(loop_device, loop_noise),   # runtime/arrays.py
            rollout_gammas=frozenset(manifest.rollout_engines()), target_jacobi="target_jacobi" in manifest.engines,
            accelerator=True)

    def save_runtime_caches(self) -> int:
        """Keep the TensorRT-RTX runtime caches (JIT kernels) in the user's cache dir; returns how many were kept."""
        return sum(cache.save() for cache in self.runtime_caches)

    def __del__(self):
        try:
            self.save_runtime_caches()
        except Exception:   # interpreter shutdown: the next load compiles again
            pass

    def _run(self, name: str, arrays: tuple) -> list:
        return run_engine(self.runners[name], self.manifest.engines[name], arrays,
                          self.capabilities.cache_device is not None)


def run_engine(runner: TensorRTRunner, entry, arrays: tuple, device_cache: bool) -> list:
    """One contract call: an in-place engine gets layer l of the caller's caches as k_cache_<l> / v_cache_<l>
    and returns the contract outputs (its updated buffers are the caches themselves). The new keys/values stay
    on the device when the caches live there."""
    layers = entry.cache_layers
    keep = 2 if device_cache and "new_v" in entry.outputs else 0
    if not layers:
        return run_for_loop(runner, arrays, keep)
    tokens, lengths, k_cache, v_cache, *rest = arrays
    check_cache_room(runner.label, tokens, lengths, k_cache)
    per_layer = [cache[layer] for cache in (k_cache, v_cache) for layer in range(layers)]
    static = static_cache_length(entry)
    padded = static and k_cache.shape[3] != static
    if padded:   # a static cache axis (TensorRT-RTX) longer than the caller's buffer: run on a padded copy
        per_layer = [pad_cache_axis(runner.torch, c, static) for c in per_layer]
    outs = run_for_loop(runner, (tokens, lengths, *per_layer, *rest), keep + 2 * layers)
    if padded:
        given = [cache[layer] for cache in (k_cache, v_cache) for layer in range(layers)]
        for target, staged in zip(given, per_layer):
            write_back(runner.torch, target, staged[:, :, :target.shape[2]])
    return outs[:len(outs) - 2 * layers]


def load_tensorrt_engines(engine_dir, manifest: Manifest, **options) -> TensorRTEngines:
    return TensorRTEngines(engine_dir, manifest, **options)


def refuse_unbuilt_engines(engine_dir, manifest: Manifest, **options):
    """Backend "tensorrt-onnx": an `--onnx-only` export holds ONNX graphs with plugin nodes, not engines."""
    raise EngineError(f"'{engine_dir}' holds ONNX graphs with TensorRT plugin nodes (exported with --onnx-only), "
                      "not engines: build them on a machine with TensorRT and a GPU with `fastardiff export --target "
                      f"trt --out DIR`, or run `trtexec --onnx={Path(engine_dir) / 'target_verify.onnx'} "
                      f"--dynamicPlugins=build/plugin/{PLUGIN_LIBRARY}`; or export `--target onnx` to run on CPU")

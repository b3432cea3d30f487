"""Loading TensorRT-RTX engines: the checks before deserialising and the runtime cache of JIT artifacts.

A TensorRT-RTX engine is built ahead of time for a set of compute capabilities (manifest export.trt
.compute_capabilities) and specialised just in time on the GPU at load; the kernels it compiles are kept in a
runtime cache, persisted here in the user's cache directory ($XDG_CACHE_HOME or ~/.cache, fastardiff/tensorrt-rtx/),
one file per engine and GPU, so a second load does not compile again. Before any engine is deserialised:
  - the GPU's compute capability must be one the engines were built for (one line naming the GPU and the fix);
  - Runtime.get_engine_validity must not say INVALID (its diagnostics named: another TensorRT-RTX version, an
    unsupported compute capability, an old CUDA driver, too little memory, a damaged file).
An engine that embeds the C++ plugin library needs Runtime.engine_host_code_allowed (off by default); it is turned
on only for engines whose manifest records the embedded plugin, after their sha256 has been verified.
An in-place engine's cache axis is static (its KV-cache-update layer needs that): static_cache_length reads it from
the manifest entry and pad_cache_axis gives a shorter caller buffer that length for the call.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from fastardiff.errors import EngineError

from .manifest import Manifest
from .trt_library import TRT_LIBRARIES, TensorRTLibrary

log = logging.getLogger("fastardiff.runtime")

DIAGNOSTIC_TEXT = {
    "VERSION_MISMATCH": "built by another TensorRT-RTX version",
    "UNSUPPORTED_CC": "not built for this GPU's compute capability",
    "OLD_CUDA_DRIVER": "the CUDA driver is older than the engines need",
    "OLD_CUDA_RUNTIME": "the CUDA runtime is older than the engines need",
    "INSUFFICIENT_GPU_MEMORY": "the GPU has too little free memory",
    "MALFORMED_ENGINE": "the engine file is damaged",
    "CUDA_ERROR": "CUDA reported an error (no usable GPU or driver)",
}


def manifest_library(manifest: Manifest) -> TensorRTLibrary:
    """The library that built the engines (manifests before TensorRT-RTX support: standard TensorRT)."""
    key = (manifest.export.get("trt") or {}).get("library", "tensorrt")
    if key not in TRT_LIBRARIES:
        raise EngineError(f"the manifest names TensorRT library '{key}', which this fastardiff does not know; "
                          "re-export with `fastardiff export --target trt --force`")
    return TRT_LIBRARIES[key]


def rebuild_hint(capability: str) -> str:
    """The fix for a GPU the engines were not built for."""
    from .trt_library import parse_compute_capabilities

    try:
        parse_compute_capabilities(capability)
    except Exception:   # not an architecture TensorRT-RTX builds for (e.g. data-centre Hopper 9.0)
        return ("TensorRT-RTX does not build for it: install standard TensorRT (`pip install 'fastardiff[trt]'`) "
                "and export on this GPU with `fastardiff export --target trt --trt-library tensorrt --force`")
    return f"rebuild with `fastardiff export --target trt --compute-capability {capability} --force`"


def check_compute_capability(manifest: Manifest, gpu: dict, engine_dir: Path) -> None:
    built_for = list((manifest.export.get("trt") or {}).get("compute_capabilities") or [])
    capability = gpu["compute_capability"]
    if built_for and capability not in built_for:
        raise EngineError(f"TensorRT-RTX engines in '{engine_dir}' were built for compute capabilities "
                          f"{', '.join(built_for)}; this GPU is {gpu['name']} ({capability}): "
                          f"{rebuild_hint(capability)}")


def diagnostics_text(trt, diagnostics: int) -> str:
    flags = trt.EngineInvalidityDiagnostics
    found = [text for name, text in DIAGNOSTIC_TEXT.items() if int(diagnostics) & int(getattr(flags, name))]
    return "; ".join(found) or "no diagnostics given"


def check_engine_validity(trt, runtime, blob: bytes, path: Path, gpu: dict) -> None:
    """Runtime.get_engine_validity before deserialising: INVALID -> one line naming the GPU, the reason and the
    fix; SUBOPTIMAL -> a warning (it runs, specialised less well)."""
    validity, diagnostics = runtime.get_engine_validity(blob)
    if validity == trt.EngineValidity.INVALID:
        raise EngineError(f"TensorRT-RTX cannot use engine '{path}' on {gpu.get('name', 'this machine')} "
                          f"({gpu.get('compute_capability', 'no GPU')}): {diagnostics_text(trt, diagnostics)}; "
                          f"{rebuild_hint(gpu.get('compute_capability', ''))}")
    if validity == trt.EngineValidity.SUBOPTIMAL:
        log.warning("engine %s is usable but not optimal on %s (%s); rebuild for this GPU for best speed", path.name,
                    gpu.get("name"), diagnostics_text(trt, diagnostics))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastardiff" / "tensorrt-rtx"


def runtime_cache_path(engine_sha256: str, gpu: dict, version: str) -> Path:
    """One runtime cache per engine, GPU model and TensorRT-RTX version."""
    ident = hashlib.sha256(f"{engine_sha256}|{gpu.get('name')}|{gpu.get('compute_capability')}|{version}"
                           .encode()).hexdigest()[:24]
    return cache_dir() / f"{ident}.runtime-cache"


class RuntimeCache:
    """An engine's IRuntimeConfig with its runtime cache loaded from, and saved back to, the user's cache dir."""

    def __init__(self, engine, path: Path, label: str):
        self.path, self.label = path, label
        self.config = engine.create_runtime_config()
        self.cache = self.config.create_runtime_cache()
        if path.is_file():
            if self.cache.deserialize(path.read_bytes()):
                log.debug("%s: runtime cache %s loaded", label, path)
            else:
                log.info("%s: runtime cache %s is for another GPU, driver or TensorRT-RTX; compiling afresh", label,
                         path)
        self.config.set_runtime_cache(self.cache)

    def save(self) -> bool:
        """Write the cache atomically (after the engines ran: the JIT kernels are in it). False if empty."""
        blob = self.cache.serialize()
        data = bytes(blob) if blob is not None else b""
        if not data:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            log.warning("%s: runtime cache not kept (%s): the next load compiles again", self.label, err)
            return False
        return True


def static_cache_length(entry) -> int:
    """The engine's static cache axis length (profile cache min = max, an in-place TensorRT-RTX engine), or 0."""
    cache = (entry.profile or {}).get("cache")
    return int(cache[0]) if entry.cache_layers and cache and cache[0] == cache[-1] else 0


def pad_cache_axis(torch, layer, length: int):
    """A copy of one cache layer [R, H, S, Dh] with its axis 2 grown to `length` (zeros past S)."""
    if isinstance(layer, torch.Tensor):
        out = layer.new_zeros((*layer.shape[:2], length, layer.shape[3]))
    else:
        out = np.zeros((*layer.shape[:2], length, layer.shape[3]), layer.dtype)
    out[:, :, :layer.shape[2]] = layer
    return out

"""Which TensorRT builds and runs the `trt` engines: a registry of the two Python distributions of TensorRT.

  tensorrt_rtx  TensorRT for RTX (`pip install 'fastardiff[trt-rtx]'`): builds ahead of time on any machine, no GPU
                needed, for a chosen set of compute capabilities (Ampere and later RTX GPUs); a just-in-time step
                specialises the engine on the GPU at load, kept in a runtime cache.
  tensorrt      TensorRT 10.x / 11.x (`pip install 'fastardiff[trt]'`): builds on the GPU at hand, for that GPU only.

Everything the exporter and the backend need to know about a library is declared here once (no probing of the
module with getattr at the call sites). Importing happens in `import_library`, lazily.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastardiff.errors import FastardiffError, MissingDependencyError

log = logging.getLogger("fastardiff.runtime")


@dataclass(frozen=True)
class TensorRTLibrary:
    key: str                        # what the manifest and --trt-library call it
    module: str                     # the Python module
    distributions: tuple[str, ...]  # pip distributions that carry the module (for the version without importing)
    extra: str                      # the fastardiff extra that installs it
    builds_without_gpu: bool        # ahead-of-time build for chosen compute capabilities
    engine_magic: bytes             # the first bytes of its serialized engines
    static_kv_cache: bool           # its KV-cache-update layer needs a static cache sequence axis
    timing_cache: bool              # it keeps tactic timings in a timing cache (TensorRT-RTX: a no-op)
    unversioned_links: tuple[str, ...] = ()   # libraries its ONNX parser dlopens by the unversioned name
    libs_package: str = ""          # the package holding the shared libraries (where those links go)
    description: str = ""


TRT_LIBRARIES: dict[str, TensorRTLibrary] = {
    "tensorrt_rtx": TensorRTLibrary(
        key="tensorrt_rtx", module="tensorrt_rtx", distributions=("tensorrt_rtx_cu12", "tensorrt_rtx_cu13"),
        extra="trt-rtx", builds_without_gpu=True, engine_magic=b"vtrt",
        static_kv_cache=True, timing_cache=False,
        unversioned_links=("libtensorrt_rtx.so",), libs_package="tensorrt_rtx_libs",
        description="TensorRT for RTX (ahead-of-time build on any machine; RTX / Ampere+ GPUs)"),
    "tensorrt": TensorRTLibrary(
        key="tensorrt", module="tensorrt", distributions=("tensorrt", "tensorrt_cu12", "tensorrt_cu13"),
        extra="trt", builds_without_gpu=False, engine_magic=b"ftrt",
        static_kv_cache=False, timing_cache=True,
        description="TensorRT (built on the GPU it runs on)"),
}
LIBRARY_CHOICES = ("auto", *TRT_LIBRARIES)

# --compute-capability default for TensorRT-RTX: the Ampere-and-later RTX architectures it builds for on a CPU
# (SM75 fails on fp32 GEMM in 1.7; CURRENT needs a GPU). Workstation Ampere (8.6), Ada (8.9), Blackwell RTX
# (12.0), and 8.0 for A100-class Ampere.
DEFAULT_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0")


def installed_version(library: TensorRTLibrary) -> str | None:
    """The library's version from package metadata, without importing it (None: not installed)."""
    for dist in library.distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def is_installed(library: TensorRTLibrary) -> bool:
    return installed_version(library) is not None and importlib.util.find_spec(library.module) is not None


def torch_sees_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_library(choice: str = "auto", gpu: bool | None = None) -> TensorRTLibrary:
    """--trt-library: a named library, or auto: standard TensorRT where it is installed and a GPU is present (its
    engines are for that GPU), else TensorRT-RTX where it is installed (no GPU needed), else standard TensorRT
    (whose import then names what is missing)."""
    if choice != "auto":
        if choice not in TRT_LIBRARIES:
            raise FastardiffError(f"unknown --trt-library '{choice}'; choose one of {', '.join(LIBRARY_CHOICES)}")
        return TRT_LIBRARIES[choice]
    standard, rtx = TRT_LIBRARIES["tensorrt"], TRT_LIBRARIES["tensorrt_rtx"]
    if is_installed(standard) and (torch_sees_gpu() if gpu is None else gpu):
        return standard
    if is_installed(rtx):
        return rtx
    return standard


def ensure_unversioned_links(library: TensorRTLibrary) -> list[Path]:
    """TensorRT-RTX's ONNX parser dlopens the unversioned `libtensorrt_rtx.so` when it meets a plugin node, but the
    wheel ships only `libtensorrt_rtx.so.1`; the failure is thrown inside a noexcept initializer and aborts the
    process. The parser's RPATH is $ORIGIN, so a link `libtensorrt_rtx.so -> libtensorrt_rtx.so.1` beside it
    fixes that: made here (atomically) before the library is imported. Returns the links made."""
    if not library.unversioned_links:
        return []
    spec = importlib.util.find_spec(library.libs_package)
    if spec is None or not spec.submodule_search_locations:
        return []          # not a wheel layout: a system install has its own unversioned links
    libs = Path(list(spec.submodule_search_locations)[0])
    made = []
    for name in library.unversioned_links:
        link, target = libs / name, libs / f"{name}.1"
        if link.exists() or not target.exists():
            continue
        tmp = libs / f".{name}.{os.getpid()}.tmp"
        try:
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(target.name)
            os.replace(tmp, link)
        except OSError as err:
            raise FastardiffError(f"{library.key}: its ONNX parser needs '{link}' (a link to {target.name}) and it "
                                  f"cannot be made ({err.strerror}); run `ln -s {target.name} {link}` as the owner "
                                  "of that directory, or install fastardiff[trt-rtx] into a virtual environment") \
                from None
        log.debug("linked %s -> %s (the ONNX parser's plugin importer loads the unversioned name)", link, target.name)
        made.append(link)
    return made


def import_library(library: TensorRTLibrary, purpose: str):
    """Import the library's module (after its unversioned links are in place); MissingDependencyError naming the
    extra when it is absent or is one of the registry's placeholder packages without the API."""
    ensure_unversioned_links(library)        # nothing to do where its libs package is absent
    try:
        module = importlib.import_module(library.module)
    except ImportError:
        raise MissingDependencyError(library.module, library.extra, purpose) from None
    if not hasattr(module, "Builder"):  # the PyPI placeholder packages install a module without the API
        raise MissingDependencyError(library.module, library.extra, f"{purpose}; the installed '{library.module}' is "
                                     "a placeholder without the TensorRT API")
    return module


def parse_compute_capabilities(text: str | tuple | list | None) -> tuple[str, ...]:
    """'8.6,8.9' / ('8.6', '8.9') -> ('8.6', '8.9'), checked against what TensorRT-RTX builds for."""
    if text is None or text == "" or text == ():
        return DEFAULT_COMPUTE_CAPABILITIES
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    known = {"8.0", "8.6", "8.9", "12.0", "12.1"}   # 7.5 is in its enum but fails fp32 GEMM in 1.7
    bad = [t for t in items if t not in known]
    if bad or not items:
        named = ",".join(bad) or repr(text)
        raise FastardiffError(f"--compute-capability {named}: TensorRT-RTX builds for "
                              f"{', '.join(sorted(known, key=float))} (comma-separated; default "
                              f"{','.join(DEFAULT_COMPUTE_CAPABILITIES)}); for other GPUs (e.g. H100, 9.0) build "
                              "with standard TensorRT on that GPU: --trt-library tensorrt")
    return tuple(dict.fromkeys(items))


def compute_capability_enum(trt, capability: str):
    """'8.6' -> trt.ComputeCapability.SM86."""
    return getattr(trt.ComputeCapability, "SM" + capability.replace(".", ""))

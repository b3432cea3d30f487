"""`trt` target: ONNX with the entropy-attention layers as TensorRT plugin nodes, then TensorRT engines.

Per engine: export ONNX with the plugin op (exporter/trt_graph.py: custom torch op -> fastardiff::EntropyAttention
node, graph pass stamps plugin_namespace / plugin_version), check that every other node is a standard op, then

  --onnx-only   stop there (backend "tensorrt-onnx"; the runtime refuses these with a message saying they need a
                TensorRT build). Parity: the graph with the plugin nodes swapped back to the reference decomposition,
                run by ONNX Runtime when it is installed (the plugin itself does not run).
  otherwise     TensorRT Python API: plugin library registered before parsing, OnnxParser into a strongly typed
                network, one optimisation profile (min/opt/max of batch, K, cache), a timing cache kept beside the
                engine directory, a progress monitor; the serialised .engine is run by the tensorrt backend's
                runner for parity. The manifest records the TensorRT version, the plugin library (copied into the
                engine dir) with its sha256, and the GPU name / compute capability.

Precision (TensorRT 10.x and 11.x alike): the network is strongly typed (NetworkDefinitionCreationFlag
.STRONGLY_TYPED; 11.x is always strongly typed and ignores the flag), so every tensor keeps the type the ONNX
graph gives it. An fp16/bf16 export is an fp16/bf16-typed graph (CastWrapper: weights and activations in that
type, fp32 at the engine interface), checked by trt_graph.check_graph_precision; the FP16/BF16 builder flags are
never set (deprecated since 10.12, gone in 11.x, refused with a strongly typed network). fp32 builds clear
BuilderFlag.TF32 (on by default), or fp32 matmuls would round their inputs to 10-bit mantissas.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from fastardiff.errors import FastardiffError, MissingDependencyError
from fastardiff.recipes.checkpoint import DriftARCheckpoint
from fastardiff.runtime import backend_tensorrt as trt_backend
from fastardiff.runtime.manifest import sha256_file

from . import trt_graph
from fastardiff.runtime.engine import per_layer_io
from fastardiff.runtime.engine_shapes import engine_input_shapes, profile_proposals

from .engine_modules import ENGINE_IO, IN_PLACE_ENGINES, ROLLOUT_GAMMA, ShapeProfile
from .onnx_passes import scatter_in_place
from .onnx_target import export_onnx_file, in_buffer_form, ort_runner
from .parity import check_engine_parity, per_layer_runner
from .head_engines import HEAD_ENGINES
from .targets import (TARGET_LIBRARIES, ExportOptions, TargetResult, build_all_engines, dynamic_shapes, engine_layers,
                      library_versions, trace_inputs)

log = logging.getLogger("fastardiff.export")

SOURCE_ROOT = Path(__file__).resolve().parents[1]
WORKSPACE_BYTES = 1 << 30


def plugin_library_path() -> Path:
    """$FASTARDIFF_TRT_PLUGIN, else the CMake build in the source tree (build/plugin/)."""
    env = os.environ.get("FASTARDIFF_TRT_PLUGIN")
    return Path(env) if env else SOURCE_ROOT / "build" / "plugin" / trt_backend.PLUGIN_LIBRARY


def require_tensorrt():
    try:
        return trt_backend.import_tensorrt("building TensorRT engines")
    except MissingDependencyError as err:
        err.args = (f"{err.args[0]}. Without TensorRT, `fastardiff export --target trt --onnx-only` writes the "
                    "plugin-bearing ONNX graphs to build on a TensorRT machine later",)
        raise


def require_plugin_library() -> Path:
    path = plugin_library_path()
    if not path.is_file():
        raise FastardiffError(f"TensorRT plugin library '{path}' not found; {trt_backend.BUILD_HINT}, or point "
                              "FASTARDIFF_TRT_PLUGIN at the built libfastardiff_trt_plugin.so")
    return path


def require_gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise FastardiffError("building TensorRT engines needs a CUDA GPU and torch sees none; use --onnx-only to "
                              "write the plugin-bearing ONNX graphs and build them on a GPU machine")
    return trt_backend.current_gpu(torch)


# ---------------------------------------------------------------------------------------------- ONNX

def export_plugin_onnx(name: str, module: nn.Module, example: tuple, profile: ShapeProfile, path: Path,
                       precision: str = "fp32", cache_layers: int = 0) -> int:
    """Export one engine with entropy-attention plugin nodes; returns the number of plugin nodes. The graph's
    weights must be of `precision`'s type: a strongly typed TensorRT build takes its precision from them.
    cache_layers > 0: the in-place form (`--kv-update in-place`): one cache buffer per layer, each updated by a
    TensorScatter (axis -2, opset 24) that TensorRT 10.15+ parses into an IKVCacheUpdateLayer whose output aliases
    the buffer, and the entropy layers' plugin nodes attend over that buffer (in_buffer = 1)."""
    inputs, outputs = ENGINE_IO[name]
    shapes = dynamic_shapes(name, profile, derived_dims=False)
    if cache_layers:
        module, example, shapes, inputs, outputs = in_buffer_form(name, module, example, shapes, cache_layers)
    trt_graph.use_plugin_attention(module)
    export_onnx_file(module, example, path, inputs, outputs, shapes,
                     custom_translation_table=trt_graph.custom_translation_table(),
                     optimize=name not in HEAD_ENGINES)   # TensorRT optimises the graph itself
    if cache_layers:
        scatter_in_place(path, cache_layers, axis=-2)
    model = onnx.load(str(path))
    count = trt_graph.mark_plugin_nodes(model, expected=trt_graph.expected_plugin_nodes(module))
    trt_graph.check_plugin_graph(model)
    trt_graph.check_graph_precision(model, precision, name)
    onnx.checker.check_model(model)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return count


def decomposed_onnx_runner(path: Path, name: str, cache_layers: int = 0):
    """(run, None) running the plugin graph with the plugin nodes swapped back to the reference on ONNX Runtime's
    CPU provider (in-place graphs: fed per-layer buffers and their updates checked, onnx_target.ort_runner), or
    (None, reason) when that cannot run here (no onnxruntime; bf16 kernels ORT's CPU lacks)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, "onnxruntime is not installed"
    model = trt_graph.decompose_plugin_nodes(onnx.load(str(path)))
    try:
        return ort_runner(model.SerializeToString(), name, "cpu", cache_layers), None
    except Exception as err:  # onnxruntime raises its own types, e.g. NOT_IMPLEMENTED for bf16 MatMul on CPU
        return None, f"onnxruntime cannot run the decomposed graph ({str(err).splitlines()[0][:160]})"


# ---------------------------------------------------------------------------------------------- TensorRT

def make_progress_monitor(trt):
    """A trt.IProgressMonitor that logs TensorRT's build phases (top-level ones at INFO, nested at DEBUG)."""

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self, label: str):
            trt.IProgressMonitor.__init__(self)
            self.label = label

        def phase_start(self, phase_name, parent_phase, num_steps):
            level = logging.INFO if parent_phase is None else logging.DEBUG
            log.log(level, "  %s: TensorRT %s (%d steps)", self.label, phase_name, num_steps)

        def step_complete(self, phase_name, step):
            log.debug("  %s: %s step %d", self.label, phase_name, step)
            return True  # keep building

        def phase_finish(self, phase_name):
            log.debug("  %s: %s done", self.label, phase_name)

    return BuildProgress


def profile_shapes(config: dict, name: str, layers: int, profile: ShapeProfile,
                   cache_layers: int = 0) -> dict[str, tuple]:
    """Input name -> (min, opt, max) shapes of the engine's optimisation profile (cache_layers: per-layer buffers
    k_cache_<l> / v_cache_<l> [B, H, S, Dh] in place of k_cache / v_cache [L, B, H, S, Dh])."""
    corners = [engine_input_shapes(config, name, layers, profile.batch[c], profile.new_tokens[c], profile.cache[c],
                                   ROLLOUT_GAMMA.get(name, 0), profile_proposals(c, profile.batch[c]))
               for c in range(3)]
    shapes = {n: (corners[0][n], corners[1][n], corners[2][n]) for n in corners[0]}
    if cache_layers:
        for cache in ("k_cache", "v_cache"):
            dims = tuple(corner[1:] for corner in shapes.pop(cache))
            shapes.update({f"{cache}_{layer}": dims for layer in range(cache_layers)})
    return shapes


def in_place_profile(profile: ShapeProfile) -> ShapeProfile:
    """An in-place engine is given the runtime's whole cache buffer, with room for the fed positions past the
    sequence (runtime/speculative.py jacobi_cache_capacity): the cache axis reaches max cache + max K."""
    lo, opt, hi = profile.cache
    return dataclasses.replace(profile, cache=(lo, opt, hi + profile.new_tokens[2]))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "unknown"


def timing_cache_path(work_dir: Path, trt, gpu: dict) -> Path:
    """Beside the engine directory (work_dir is a temp dir in the same parent), one file per TensorRT version and
    GPU model (name and compute capability: two GPUs of one architecture time tactics differently)."""
    cc = gpu.get("compute_capability", "unknown").replace(".", "")
    return work_dir.parent / f".fastardiff-trt-timing-{trt.__version__}-{_slug(gpu.get('name', ''))}-sm{cc}.cache"


def network_flags(trt) -> int:
    """create_network flags for a strongly typed network. The enum value differs (10.x: STRONGLY_TYPED = 1 after
    the deprecated EXPLICIT_BATCH; 11.x: 0, kept for compatibility and ignored), so the bit comes from the enum."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)  # no such flag: a TensorRT where strong typing is the only mode


def configure_precision(trt, config, precision: str) -> None:
    """The strongly typed network carries the precision; no FP16/BF16 flag. fp32: TF32 off (on by default)."""
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)


def attach_timing_cache(config, path: Path, label: str):
    """Attach the kept timing cache, or a fresh one when TensorRT refuses it (other GPU / TensorRT, or corrupt:
    set_timing_cache returns False, create_timing_cache may return None). Returns the attached cache (keep it
    alive until the build is done) or None when not even a fresh cache was accepted."""
    blob = path.read_bytes() if path.exists() else b""
    if blob:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        log.warning("%s: TensorRT refused the timing cache '%s' (built on another GPU or TensorRT, or damaged); "
                    "timing tactics from scratch with a fresh cache", label, path.name)
    cache = config.create_timing_cache(b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    log.warning("%s: TensorRT refused a fresh timing cache; building without one (tactic timings are not kept)",
                label)
    return None


def save_timing_cache(config, path: Path, label: str) -> bool:
    """Write the config's timing cache (atomically); False when there is none to write."""
    cache = config.get_timing_cache()  # None when no cache is attached
    blob = cache.serialize() if cache is not None else None
    data = bytes(blob) if blob is not None else b""
    if not data:
        log.warning("%s: no timing cache to keep (TensorRT returned none); the next build times tactics again",
                    label)
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def build_engine(trt, logger, onnx_path: Path, engine_path: Path, shapes: dict, precision: str,
                 timing_cache: Path, label: str) -> None:
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FastardiffError(f"TensorRT could not parse '{onnx_path.name}': {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    configure_precision(trt, config, precision)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = attach_timing_cache(config, timing_cache, label)
    config.progress_monitor = make_progress_monitor(trt)(label)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FastardiffError(f"TensorRT failed to build '{label}' (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        save_timing_cache(config, timing_cache, label)


def tensorrt_runner(trt, logger, engine_path: Path, label: str, cache_layers: int = 0):
    import torch

    runtime = trt.Runtime(logger)
    engine = trt_backend.deserialize_engine(trt, runtime, engine_path)
    inputs, outputs = ENGINE_IO[label]
    if cache_layers:
        inputs, outputs = per_layer_io(inputs, outputs, cache_layers)
    runner = trt_backend.TensorRTRunner(trt, torch, engine, torch.cuda.Stream(), label, inputs, outputs)
    if cache_layers:   # the updated buffers are the inputs' own memory (aliased outputs), checked every call
        return per_layer_runner(label, cache_layers, lambda feed: runner([feed[n] for n in inputs]))
    return lambda inputs: runner(list(inputs))


# ---------------------------------------------------------------------------------------------- target

def build_trt(ckpt: DriftARCheckpoint, work_dir: Path, opts: ExportOptions) -> TargetResult:
    cfg = ckpt.config
    trt = gpu = plugin = logger = None
    if not opts.onnx_only:  # every missing piece is reported before any export work
        trt = require_tensorrt()
        plugin = require_plugin_library()
        gpu = require_gpu()
        trt_backend.load_plugin_library(trt, plugin)
        logger = trt.Logger(trt.Logger.WARNING)
    plugin_counts: dict[str, int] = {}

    def build_one(name: str, module: nn.Module, reference: nn.Module, profile: ShapeProfile):
        layers = engine_layers(ckpt, name)
        cache_layers = layers if opts.kv_update == "in-place" and name in IN_PLACE_ENGINES else 0
        onnx_file = f"{name}.onnx"
        io = {}
        build_profile = profile      # what TensorRT is built for; parity runs the export's shapes
        if cache_layers:
            build_profile = in_place_profile(profile)
            inputs, outputs = per_layer_io(*ENGINE_IO[name], cache_layers)
            io = {"inputs": inputs, "outputs": outputs, "cache_layers": cache_layers, "profile": build_profile}
        example = trace_inputs(cfg, name, layers, profile, "cpu")
        plugin_counts[name] = export_plugin_onnx(name, module.cpu(), example, profile, work_dir / onnx_file,
                                                 opts.precision, cache_layers)
        log.debug("%s: %d plugin nodes", name, plugin_counts[name])
        if opts.onnx_only:
            run, why_not = decomposed_onnx_runner(work_dir / onnx_file, name, cache_layers)
            if run is None:
                log.warning("%s: parity not checked: %s", name, why_not)
                return onnx_file, {"skipped": why_not, "atol": opts.atol, "rtol": opts.rtol}, io
            parity = check_engine_parity(name, run, reference, cfg, layers, profile, opts.atol, opts.rtol)
            parity["runtime"] = ("onnxruntime CPU on the plugin graph with EntropyAttention swapped back to the "
                                 "reference decomposition (the plugin itself did not run)")
            return onnx_file, parity, io
        engine_file = f"{name}.engine"
        shapes = profile_shapes(cfg.to_dict(), name, layers, build_profile, cache_layers)
        build_engine(trt, logger, work_dir / onnx_file, work_dir / engine_file, shapes, opts.precision,
                     timing_cache_path(work_dir, trt, gpu), name)
        run = tensorrt_runner(trt, logger, work_dir / engine_file, name, cache_layers)
        parity = check_engine_parity(name, run, reference, cfg, layers, profile, opts.atol, opts.rtol)
        parity["runtime"] = f"tensorrt {trt.__version__} on {gpu['name']}"
        return engine_file, parity, io

    engines = build_all_engines(ckpt, work_dir, opts, build_one)
    versions = library_versions(TARGET_LIBRARIES["trt"])
    identity = {"name": trt_graph.PLUGIN_OP, "namespace": trt_graph.PLUGIN_NAMESPACE,
                "version": trt_graph.PLUGIN_VERSION}
    extra = {"plugin_nodes": plugin_counts, "onnx_opset": 18,
             "kv_update": ("in place in the AR engines (per-layer buffers, TensorScatter -> IKVCacheUpdateLayer, "
                           "opset 24)" if opts.kv_update == "in-place" else "host")}
    if opts.onnx_only:
        extra["note"] = ("ONNX graphs with TensorRT plugin nodes, not engines: build them with `fastardiff export "
                         "--target trt` on a machine with TensorRT and a GPU")
        return TargetResult(backend="tensorrt-onnx", engines=engines, library_versions=versions, plugin=identity,
                            extra=extra)
    shutil.copy2(plugin, work_dir / trt_backend.PLUGIN_LIBRARY)
    versions["tensorrt"] = trt.__version__
    return TargetResult(backend="tensorrt", engines=engines, library_versions=versions, gpu=gpu,
                        plugin={**identity, "file": trt_backend.PLUGIN_LIBRARY,
                                "sha256": sha256_file(work_dir / trt_backend.PLUGIN_LIBRARY)},
                        extra={**extra, "timing_cache": timing_cache_path(work_dir, trt, gpu).name})

"""`trt` target: ONNX with the entropy-attention layers as TensorRT plugin nodes, then TensorRT engines.

Per engine: export ONNX with the plugin op (exporter/trt_graph.py: custom torch op -> fastardiff::EntropyAttention
node, graph pass stamps plugin_namespace / plugin_version), check that every other node is a standard op, rewrite
what the TensorRT parser does not take (exporter/trt_onnx_fixes.py: torch.chunk's SplitToSequence -> Slice), then

  --onnx-only   stop there (backend "tensorrt-onnx"; the runtime refuses these with a message saying they need a
                TensorRT build). Parity: the graph with the plugin nodes swapped back to the reference decomposition,
                run by ONNX Runtime when it is installed (the plugin itself does not run).
  otherwise     build with the TensorRT library --trt-library picks (runtime/trt_library.py; exporter/trt_build.py):
    tensorrt_rtx  TensorRT for RTX, on any machine, no GPU: the Python build-time creator of the plugin
                  (exporter/trt_plugin_creator.py) registered before parsing, the in-place engines' cache axis made
                  static (what its KV-cache-update layer needs), built for --compute-capability; the C++ plugin
                  library, where it is built, embedded in every engine (plugins_to_serialize). Parity: the decomposed
                  graph on ONNX Runtime, as for --onnx-only (nothing can run the engine without a GPU).
    tensorrt      TensorRT 10.x / 11.x on the GPU at hand: the C++ plugin library registered, a timing cache kept
                  beside the engine directory, the engine run by the tensorrt backend's runner for parity.
The manifest records the library, its version, the compute capabilities (or the GPU), the plugin library and each
engine's build seconds, bytes and layer counts (plugin and KV-cache-update layers) under export.trt.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import onnx
from torch import nn

from fastardiff.errors import FastardiffError, MissingDependencyError
from fastardiff.recipes.checkpoint import DriftARCheckpoint
from fastardiff.runtime import backend_tensorrt as trt_backend
from fastardiff.runtime import trt_library
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
from .trt_build import build_engine, timing_cache_path
from .trt_onnx_fixes import sequences_to_slices, static_cache_axis

log = logging.getLogger("fastardiff.export")

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def plugin_library_path() -> Path:
    """$FASTARDIFF_TRT_PLUGIN, else the CMake build in the source tree (build/plugin/)."""
    env = os.environ.get("FASTARDIFF_TRT_PLUGIN")
    return Path(env) if env else SOURCE_ROOT / "build" / "plugin" / trt_backend.PLUGIN_LIBRARY


def require_tensorrt(library: trt_library.TensorRTLibrary | None = None):
    library = library or trt_library.TRT_LIBRARIES["tensorrt"]
    try:
        return trt_library.import_library(library, "building TensorRT engines")
    except MissingDependencyError as err:
        err.args = (f"{err.args[0]}. Without TensorRT, `fastardiff export --target trt --onnx-only` writes the "
                    "plugin-bearing ONNX graphs to build on a TensorRT machine later; `pip install "
                    "'fastardiff[trt-rtx]'` builds TensorRT-RTX engines on any machine",)
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
    slices = sequences_to_slices(model)      # torch.chunk's SplitToSequence/SequenceAt: the parser takes neither
    if slices:
        log.debug("%s: %d SequenceAt nodes rewritten to Slice", name, slices)
    trt_graph.check_graph_precision(model, precision, name)
    onnx.checker.check_model(model)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return count


def make_cache_axis_static(path: Path, cache_layers: int, length: int) -> None:
    """Fix the per-layer caches' sequence axis of the graph at `path` to `length` (rewritten atomically)."""
    model = onnx.load(str(path))
    static_cache_axis(model, cache_layers, length)
    onnx.checker.check_model(model)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


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

def profile_shapes(config: dict, name: str, layers: int, profile: ShapeProfile,
                   cache_layers: int = 0) -> dict[str, tuple]:
    """Input name -> (min, opt, max) shapes of the engine's optimisation profile (cache_layers: per-layer buffers
    k_cache_<l> / v_cache_<l> [B, H, S, Dh] in place of k_cache / v_cache [L, B, H, S, Dh]; a static cache axis is
    a profile whose cache min = opt = max, static_profile)."""
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


def static_profile(profile: ShapeProfile) -> ShapeProfile:
    """The in-place profile with the cache axis fixed at its longest (a library whose KV-cache-update layer needs
    a static sequence axis, TensorRT-RTX): the runtime passes buffers of exactly that length."""
    return dataclasses.replace(profile, cache=(profile.cache[2],) * 3)


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

class TensorRTBuild:
    """What the non --onnx-only build needs, found before any export work (every missing piece reported first)."""

    def __init__(self, opts: ExportOptions):
        from .trt_plugin_creator import register_build_creator

        self.library = trt_library.resolve_library(opts.trt_library)
        self.trt = require_tensorrt(self.library)
        self.gpu: dict = {}
        self.capabilities: tuple[str, ...] = ()
        if self.library.builds_without_gpu:
            # the Python build-time creator makes the plugin layers; the C++ library, where it is built, is
            # embedded in the engines so that they run without a separate plugin file
            self.capabilities = trt_library.parse_compute_capabilities(opts.compute_capabilities)
            path = plugin_library_path()
            self.plugin = path if path.is_file() else None
            if self.plugin is None:
                log.info("TensorRT plugin library %s not built: engines carry the plugin layers' fields only; the "
                         "runtime loads the plugin from FASTARDIFF_TRT_PLUGIN (%s)", path, trt_backend.BUILD_HINT)
            register_build_creator(self.trt)
        else:
            self.plugin = require_plugin_library()
            self.gpu = require_gpu()
            trt_backend.load_plugin_library(self.trt, self.plugin)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.stats: dict[str, dict] = {}

    @property
    def version(self) -> str:
        return self.trt.__version__

    def profile(self, profile: ShapeProfile, cache_layers: int) -> ShapeProfile:
        """The optimisation profile an engine is built for (in place: the runtime's whole buffer)."""
        if not cache_layers:
            return profile
        room = in_place_profile(profile)
        return static_profile(room) if self.library.static_kv_cache else room

    def build(self, work_dir: Path, name: str, onnx_file: str, shapes: dict, precision: str) -> str:
        engine_file = f"{name}.engine"
        embed = self.plugin if self.library.builds_without_gpu else None
        self.stats[name] = build_engine(self.trt, self.logger, work_dir / onnx_file, work_dir / engine_file, shapes,
                                        precision, timing_cache_path(work_dir, self.trt, self.gpu), name,
                                        self.library, self.capabilities, embed)
        stats = self.stats[name]
        log.info("  %s: built in %.1f s, %.1f MB, %d plugin / %d KV-cache-update layers", name, stats["seconds"],
                 stats["bytes"] / 1e6, stats["plugin_layers"], stats["kv_cache_update_layers"])
        return engine_file

    def manifest_fields(self, work_dir: Path) -> dict:
        """library / version / targets / per-engine figures (manifest.export.trt) and the plugin entry."""
        fields = {"library": self.library.key, "version": self.version,
                  "compute_capabilities": list(self.capabilities), "gpu": self.gpu, "engines": self.stats,
                  "plugin_embedded": bool(self.library.builds_without_gpu and self.plugin is not None),
                  "static_kv_cache": self.library.static_kv_cache}
        if self.library.timing_cache:
            fields["timing_cache"] = timing_cache_path(work_dir, self.trt, self.gpu).name
        return fields


@dataclasses.dataclass
class EngineGraph:
    """One engine's exported plugin graph and what its TensorRT build needs."""
    name: str
    onnx_file: str
    layers: int              # KV-cache layers of the model it calls
    cache_layers: int        # > 0: the in-place form (per-layer buffers)
    profile: ShapeProfile    # the export's (what parity runs)
    build_profile: ShapeProfile
    plugin_nodes: int
    io: dict                 # the manifest entry's own fields (in place: per-layer inputs/outputs, profile)


def export_engine_graph(ckpt: DriftARCheckpoint, name: str, module: nn.Module, profile: ShapeProfile,
                        work_dir: Path, opts: ExportOptions, built: TensorRTBuild | None) -> EngineGraph:
    layers = engine_layers(ckpt, name)
    cache_layers = layers if opts.kv_update == "in-place" and name in IN_PLACE_ENGINES else 0
    build_profile, io = profile, {}
    if cache_layers:     # what TensorRT is built for; parity runs the export's shapes
        build_profile = built.profile(profile, cache_layers) if built else in_place_profile(profile)
        inputs, outputs = per_layer_io(*ENGINE_IO[name], cache_layers)
        io = {"inputs": inputs, "outputs": outputs, "cache_layers": cache_layers, "profile": build_profile}
    example = trace_inputs(ckpt.config, name, layers, profile, "cpu")
    count = export_plugin_onnx(name, module.cpu(), example, profile, work_dir / f"{name}.onnx", opts.precision,
                               cache_layers)
    log.debug("%s: %d plugin nodes", name, count)
    return EngineGraph(name, f"{name}.onnx", layers, cache_layers, profile, build_profile, count, io)


def build_engine_file(built: TensorRTBuild, config: dict, graph: EngineGraph, work_dir: Path, precision: str) -> str:
    """The TensorRT build of an exported graph (a static cache axis first where the library needs it)."""
    if graph.cache_layers and built.library.static_kv_cache:
        make_cache_axis_static(work_dir / graph.onnx_file, graph.cache_layers, graph.build_profile.cache[2])
    shapes = profile_shapes(config, graph.name, graph.layers, graph.build_profile, graph.cache_layers)
    return built.build(work_dir, graph.name, graph.onnx_file, shapes, precision)


def graph_parity(graph: EngineGraph, reference: nn.Module, ckpt: DriftARCheckpoint, work_dir: Path,
                 opts: ExportOptions, engine_built: bool) -> dict:
    """Parity of the plugin graph swapped back to the reference, on ONNX Runtime (where no engine can run)."""
    run, why_not = decomposed_onnx_runner(work_dir / graph.onnx_file, graph.name, graph.cache_layers)
    if run is None:
        log.warning("%s: parity not checked: %s", graph.name, why_not)
        return {"skipped": why_not, "atol": opts.atol, "rtol": opts.rtol}
    parity = check_engine_parity(graph.name, run, reference, ckpt.config, graph.layers, graph.profile, opts.atol,
                                 opts.rtol)
    parity["runtime"] = ("onnxruntime CPU on the plugin graph with EntropyAttention swapped back to the reference "
                         "decomposition (the plugin itself did not run"
                         + ("; the TensorRT engine did not run: no GPU" if engine_built else "") + ")")
    return parity


def build_trt(ckpt: DriftARCheckpoint, work_dir: Path, opts: ExportOptions) -> TargetResult:
    cfg = ckpt.config
    built = None if opts.onnx_only else TensorRTBuild(opts)
    plugin_counts: dict[str, int] = {}

    def build_one(name: str, module: nn.Module, reference: nn.Module, profile: ShapeProfile):
        graph = export_engine_graph(ckpt, name, module, profile, work_dir, opts, built)
        plugin_counts[name] = graph.plugin_nodes
        if built is None or built.library.builds_without_gpu:   # nothing here can run an engine: the graph's parity
            parity = graph_parity(graph, reference, ckpt, work_dir, opts, built is not None)
            if built is None:
                return graph.onnx_file, parity, graph.io
        engine_file = build_engine_file(built, cfg.to_dict(), graph, work_dir, opts.precision)
        if built.library.builds_without_gpu:
            return engine_file, parity, graph.io
        run = tensorrt_runner(built.trt, built.logger, work_dir / engine_file, name, graph.cache_layers)
        parity = check_engine_parity(name, run, reference, cfg, graph.layers, profile, opts.atol, opts.rtol)
        parity["runtime"] = f"tensorrt {built.version} on {built.gpu['name']}"
        return engine_file, parity, graph.io

    engines = build_all_engines(ckpt, work_dir, opts, build_one)
    versions = library_versions(TARGET_LIBRARIES["trt"])
    identity = {"name": trt_graph.PLUGIN_OP, "namespace": trt_graph.PLUGIN_NAMESPACE,
                "version": trt_graph.PLUGIN_VERSION}
    extra = {"plugin_nodes": plugin_counts, "onnx_opset": 18,
             "kv_update": ("in place in the AR engines (per-layer buffers, TensorScatter -> IKVCacheUpdateLayer, "
                           "opset 24)" if opts.kv_update == "in-place" else "host")}
    if built is None:
        extra["note"] = ("ONNX graphs with TensorRT plugin nodes, not engines: build them with `fastardiff export "
                         "--target trt` (TensorRT-RTX: on any machine; TensorRT: on the GPU machine)")
        return TargetResult(backend="tensorrt-onnx", engines=engines, library_versions=versions, plugin=identity,
                            extra=extra)
    versions[built.library.key] = built.version
    plugin = dict(identity)
    if built.plugin is not None:
        shutil.copy2(built.plugin, work_dir / trt_backend.PLUGIN_LIBRARY)
        plugin.update({"file": trt_backend.PLUGIN_LIBRARY,
                       "sha256": sha256_file(work_dir / trt_backend.PLUGIN_LIBRARY)})
    return TargetResult(backend="tensorrt", engines=engines, library_versions=versions, gpu=built.gpu, plugin=plugin,
                        extra={**extra, "trt": built.manifest_fields(work_dir)})

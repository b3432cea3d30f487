"""One TensorRT engine from one ONNX graph: parse, configure, build, write atomically; with TensorRT or TensorRT-RTX.

  TensorRT (`tensorrt`)          strongly typed network, one optimisation profile, a timing cache kept beside the
                                 engine directory (per TensorRT version and GPU), built for the GPU at hand.
  TensorRT-RTX (`tensorrt_rtx`)  the same network and profile, built ahead of time on the CPU for the compute
                                 capabilities asked for (IBuilderConfig.set_compute_capability); it has no timing
                                 cache (tactics are chosen just in time on the GPU, kept in its runtime cache).
  both                           the entropy-attention plugin's creator registered before parsing (the C++
                                 library, or the Python build-time creator: exporter/trt_plugin_creator.py); where
                                 the C++ library is given it is embedded in the engine (plugins_to_serialize);
                                 the builder's progress monitor reports phases; the parsed network's layer types
                                 are counted (plugin and KV-cache-update layers) for the manifest.

Precision (TensorRT 10.x, 11.x and TensorRT-RTX alike): the network is strongly typed, so every tensor keeps the
type the ONNX graph gives it; the FP16/BF16 builder flags are never set. fp32 builds clear BuilderFlag.TF32 (on by
default), or fp32 matmuls would round their inputs to 10-bit mantissas.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fastardiff.errors import FastardiffError
from fastardiff.runtime.trt_library import TensorRTLibrary, compute_capability_enum

log = logging.getLogger("fastardiff.export")

WORKSPACE_BYTES = 1 << 30
COUNTED_LAYERS = {"plugin_layers": ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN"), "kv_cache_update_layers": ("KV_CACHE_UPDATE",),
                  "attention_layers": ("ATTENTION_INPUT",)}


def make_progress_monitor(trt):
    """A trt.IProgressMonitor that logs TensorRT's build phases (top-level ones at INFO, nested at DEBUG) and
    counts the callbacks it receives (`calls`: how many times the builder reported progress)."""

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self, label: str):
            trt.IProgressMonitor.__init__(self)
            self.label = label
            self.calls = 0

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.calls += 1
            level = logging.INFO if parent_phase is None else logging.DEBUG
            log.log(level, "  %s: TensorRT %s (%d steps)", self.label, phase_name, num_steps)

        def step_complete(self, phase_name, step):
            self.calls += 1
            log.debug("  %s: %s step %d", self.label, phase_name, step)
            return True  # keep building

        def phase_finish(self, phase_name):
            self.calls += 1
            log.debug("  %s: %s done", self.label, phase_name)

    return BuildProgress


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "unknown"


def timing_cache_path(work_dir: Path, trt, gpu: dict) -> Path:
    """Beside the engine directory (work_dir is a temp dir in the same parent), one file per TensorRT version and
    GPU model (name and compute capability: two GPUs of one architecture time tactics differently)."""
    cc = gpu.get("compute_capability", "unknown").replace(".", "")
    return work_dir.parent / f".fastardiff-trt-timing-{trt.__version__}-{_slug(gpu.get('name', ''))}-sm{cc}.cache"


def network_flags(trt) -> int:
    """create_network flags for a strongly typed network. The enum value differs (10.x: STRONGLY_TYPED = 1 after
    the deprecated EXPLICIT_BATCH; 11.x and TensorRT-RTX: 0, kept for compatibility and ignored)."""
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
    write_atomically(path, data)
    return True


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def count_layers(trt, network) -> dict[str, int]:
    """The parsed network's layer count and its plugin / KV-cache-update / built-in attention layers."""
    counts = {"layers": int(network.num_layers), **{key: 0 for key in COUNTED_LAYERS}}
    wanted = {getattr(trt.LayerType, name): key for key, names in COUNTED_LAYERS.items() for name in names
              if hasattr(trt.LayerType, name)}
    for i in range(network.num_layers):
        key = wanted.get(network.get_layer(i).type)
        if key:
            counts[key] += 1
    return counts


def configure_targets(trt, config, library: TensorRTLibrary | None, compute_capabilities) -> None:
    """TensorRT-RTX: the compute capabilities the engine is built for (ahead of time, no GPU)."""
    if library is None or not library.builds_without_gpu:
        return
    config.num_compute_capabilities = len(compute_capabilities)
    for index, capability in enumerate(compute_capabilities):
        if not config.set_compute_capability(compute_capability_enum(trt, capability), index):
            raise FastardiffError(f"TensorRT-RTX refused compute capability {capability}; choose from 8.0, 8.6, "
                                  "8.9, 12.0, 12.1 with --compute-capability")


def read_profile(network, profile) -> dict[str, list[list[int]]]:
    """The optimisation profile as TensorRT holds it: every dynamic network input -> [min, opt, max] shapes (the
    manifest's record of what the engine accepts; a static input has none)."""
    held = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            held[tensor.name] = [[int(d) for d in shape] for shape in profile.get_shape(tensor.name)]
    return held


def profile_text(shapes: dict) -> str:
    return ", ".join(f"{name} {list(lo)}..{list(hi)}" for name, (lo, _, hi) in shapes.items())


def parse_network(trt, logger, builder, onnx_path: Path):
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FastardiffError(f"TensorRT could not parse '{onnx_path.name}': {errors[:400]}")
    return network, parser


def build_engine(trt, logger, onnx_path: Path, engine_path: Path, shapes: dict, precision: str,
                 timing_cache: Path | None, label: str, library: TensorRTLibrary | None = None,
                 compute_capabilities=(), embed_plugin: Path | None = None) -> dict:
    """Parse `onnx_path`, build for `shapes` (input -> (min, opt, max)) and write the serialized engine to
    `engine_path` (atomically). Returns the build's figures: seconds, bytes, layer counts, progress callbacks,
    whether the plugin library was embedded. library None: standard TensorRT (timing cache at `timing_cache`)."""
    start = time.perf_counter()
    builder = trt.Builder(logger)
    network, parser = parse_network(trt, logger, builder, onnx_path)
    counts = count_layers(trt, network)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    configure_precision(trt, config, precision)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise FastardiffError(f"TensorRT refused the optimisation profile of '{label}' ({profile_text(shapes)}); "
                              "the engine's inputs and the profile disagree: report it with the model's config")
    held = read_profile(network, profile)
    cache = None
    if library is None or library.timing_cache:
        cache = attach_timing_cache(config, timing_cache, label)
    configure_targets(trt, config, library, compute_capabilities)
    if embed_plugin is not None and counts["plugin_layers"]:   # only engines that have plugin layers carry it
        config.plugins_to_serialize = [str(embed_plugin)]
    monitor = make_progress_monitor(trt)(label)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FastardiffError(f"TensorRT failed to build '{label}' (see the TensorRT log above)")
    data = bytes(serialized)
    write_atomically(engine_path, data)
    if cache is not None:
        save_timing_cache(config, timing_cache, label)
    return {"seconds": round(time.perf_counter() - start, 2), "bytes": len(data), **counts,
            "progress_callbacks": monitor.calls, "profile": held,
            "plugin_embedded": bool(embed_plugin is not None and counts["plugin_layers"])}

"""`onnx` target: each engine as one ONNX file (torch.onnx dynamo exporter, dynamic batch / K / cache axes),
run by ONNX Runtime. Entropy attention is exported in its decomposed standard-op form, so the graph runs
anywhere ONNX Runtime runs.

`export_onnx_file` is the reusable step: the TensorRT target calls it with a custom translation table that
turns the entropy-attention op into a plugin node. Keep its signature stable.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fastardiff.recipes.checkpoint import DriftARCheckpoint

from fastardiff.runtime.engine import per_layer_io

from .engine_modules import ENGINE_IO, IN_PLACE_ENGINES, ShapeProfile, in_buffer_engine, per_layer_inputs
from .onnx_passes import fuse_gelu, scatter_in_place
from .parity import check_engine_parity, per_layer_runner
from .head_engines import HEAD_ENGINES
from .targets import (TARGET_LIBRARIES, ExportOptions, TargetResult, build_all_engines, dynamic_shapes, engine_layers,
                      library_versions, trace_inputs)

log = logging.getLogger("fastardiff.export")

OPSET = 18


@contextlib.contextmanager
def _quiet_torch_onnx(verbose: bool):
    """The dynamo exporter logs warnings about optional torchvision ops; keep them out of normal output."""
    names = ["torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "torch._dynamo",
             "onnxscript", "onnx_ir"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING if verbose else logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx_file(module: nn.Module, example_inputs: tuple, path: str | Path, input_names: Sequence[str],
                     output_names: Sequence[str], dynamic_shapes: dict | None = None,
                     custom_translation_table: dict | None = None, opset: int = OPSET, optimize: bool = True) -> Path:
    """Export `module` to a self-contained ONNX file with torch.onnx.export(dynamo=True).

    dynamic_shapes: {input name: {axis: torch.export.Dim}} (as torch.export takes them); the ONNX graph gets
    symbolic dims named after the Dims. custom_translation_table: {torch op overload: onnxscript function},
    used to emit custom nodes (e.g. a TensorRT plugin op) instead of the decomposed form. optimize=False skips
    torch.onnx's graph optimizer: for the unrolled many-step diffusion heads it takes tens of minutes (superlinear
    in the node count) while ONNX Runtime's own session optimizations give the same call time (measured on the
    10-step head: 576 vs 1373 nodes, 2.05 vs 1.92 ms per call, export 61 vs 34 s).
    """
    import warnings

    path = Path(path)
    if isinstance(dynamic_shapes, dict) and set(dynamic_shapes) == set(input_names):
        dynamic_shapes = tuple(dynamic_shapes[n] for n in input_names)  # positional: works for wrapper modules too
    verbose = logging.getLogger("fastardiff").isEnabledFor(logging.DEBUG)
    with _quiet_torch_onnx(verbose), warnings.catch_warnings(), torch.no_grad():
        if not verbose:
            warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, tuple(example_inputs), None, input_names=list(input_names), output_names=list(output_names),
            dynamic_shapes=dynamic_shapes, custom_translation_table=custom_translation_table, opset_version=opset,
            dynamo=True, external_data=False, optimize=optimize, verbose=verbose, report=False)
    _rename_shadowed_outputs(program.model.graph, output_names)
    program.save(str(path), external_data=False)
    return path


def _rename_shadowed_outputs(graph, output_names: Sequence[str]) -> None:
    """An internal value named like a graph output (the exporter names a `.mean()` node 'mean', as in a library's
    RMSNorm) would define that name twice: rename the internal one."""
    outputs = {id(v) for v in graph.outputs}
    names = set(output_names)
    for node in graph:
        for value in node.outputs:
            if value.name in names and id(value) not in outputs:
                value.name = f"{value.name}__internal_{len(names)}"
                names.add(value.name)


def ort_providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def ort_runner(model, name: str, device: str, cache_layers: int = 0) -> Callable[[tuple], list[np.ndarray]]:
    """The engine's contract outputs for contract torch inputs (model: an ONNX file's path or serialised bytes). An
    in-place engine (cache_layers > 0: per-layer cache buffers, exporter/onnx_passes.py) is fed the caches with
    room for the fed positions, one buffer per layer, and also checked on every call: its updated buffers must
    equal the input caches with the call's new keys/values written at each row's length, bit for bit
    (parity.per_layer_runner; ParityError otherwise)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model) if isinstance(model, Path) else model, opts,
                                   providers=ort_providers(device))
    if cache_layers:
        return per_layer_runner(name, cache_layers, lambda feed: session.run(None, feed))
    input_names = ENGINE_IO[name][0]
    return lambda inputs: session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(input_names, inputs)})


def per_layer_shapes(shapes: dict, names, layers: int) -> tuple:
    """dynamic_shapes of the contract inputs `names` for an in_buffer engine's inputs (per-layer cache tuples)."""
    def layer_dims(cache_dims):
        return tuple({0: cache_dims[1], 2: cache_dims[3]} for _ in range(layers))

    return tuple(layer_dims(shapes[n]) if n in ("k_cache", "v_cache") else shapes[n] for n in names)


def in_buffer_form(name: str, module: nn.Module, example: tuple, shapes, layers: int) -> tuple:
    """AR engine `name` in its in-place form (one cache buffer per layer, models.py in_buffer; the onnx and trt
    targets): (module, example inputs, dynamic shapes, input names, output names) to export it with."""
    inputs, outputs = ENGINE_IO[name]
    return (in_buffer_engine(name, module), per_layer_inputs(example), per_layer_shapes(shapes, inputs, layers),
            *per_layer_io(inputs, outputs, layers))


def build_onnx(ckpt: DriftARCheckpoint, work_dir: Path, opts: ExportOptions) -> TargetResult:
    cfg = ckpt.config

    def build_one(name: str, module: nn.Module, reference: nn.Module, profile: ShapeProfile):
        layers = engine_layers(ckpt, name)
        inputs, outputs = ENGINE_IO[name]
        file = f"{name}.onnx"
        example = trace_inputs(cfg, name, layers, profile, opts.device)
        log.debug("%s: exporting with example shapes %s", name, [tuple(x.shape) for x in example])
        shapes = dynamic_shapes(name, profile, derived_dims=False)
        io = {}
        if opts.kv_update == "in-place" and name in IN_PLACE_ENGINES:   # per-layer buffers, updated in place
            module, example, shapes, inputs, outputs = in_buffer_form(name, module, example, shapes, layers)
            io = {"inputs": inputs, "outputs": outputs, "cache_layers": layers}
        export_onnx_file(module, example, work_dir / file, inputs, outputs, shapes,
                         optimize=name not in HEAD_ENGINES)
        if io:
            scatter_in_place(work_dir / file, layers)
        log.debug("%s: %d GELU chains fused into Gelu", name, fuse_gelu(work_dir / file))
        run = ort_runner(work_dir / file, name, opts.device, io.get("cache_layers", 0))
        parity = check_engine_parity(name, run, reference, cfg, layers, profile, opts.atol, opts.rtol)
        parity["runtime"] = "onnxruntime " + ",".join(ort_providers(opts.device))
        return file, parity, io

    engines = build_all_engines(ckpt, work_dir, opts, build_one)
    return TargetResult(backend="onnxruntime", engines=engines,
                        library_versions=library_versions(TARGET_LIBRARIES["onnx"]),
                        extra={"opset": OPSET, "exporter": "torch.onnx dynamo",
                               "kv_update": ("in place in the AR engines (per-layer buffers, TensorScatter, opset 24)"
                                             if opts.kv_update == "in-place" else "host")})

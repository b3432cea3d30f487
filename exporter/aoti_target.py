"""`aoti` target: each engine torch.export-ed with Dim ranges for batch / K / cache and compiled ahead of time
by AOTInductor into one `.pt2` package, loaded by the runtime with torch._inductor.aoti_load_package."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastardiff.recipes.checkpoint import DriftARCheckpoint

from .engine_modules import ENGINE_IO, IN_PLACE_ENGINES, ShapeProfile, cache_update_in_place
from .parity import check_cache_update, check_engine_parity, with_room
from .targets import (TARGET_LIBRARIES, ExportOptions, TargetResult, build_all_engines, dynamic_shapes, engine_layers,
                      library_versions, set_attention_impl, trace_inputs)

log = logging.getLogger("fastardiff.export")


def export_program(module: nn.Module, example: tuple, shapes: dict, input_names) -> torch.export.ExportedProgram:
    shapes = tuple(shapes[n] for n in input_names)  # positional: works for precision wrapper modules too
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, example, dynamic_shapes=shapes, strict=False)


def compile_package(program: torch.export.ExportedProgram, path: Path) -> Path:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


def aoti_runner(path: Path, device: str, name: str = "", in_place: bool = False):
    """The engine's outputs for torch inputs; an in-place engine (CacheUpdateInPlace) runs on caches with room for
    the fed positions and its update of them is checked bit for bit (ParityError otherwise)."""
    runner = torch._inductor.aoti_load_package(str(path))

    def run(inputs: tuple) -> list[np.ndarray]:
        inputs = [x.to(device) for x in inputs]
        if in_place:
            before = with_room(inputs[2].cpu().numpy(), inputs[3].cpu().numpy(), inputs[0].shape[1])
            inputs[2:4] = [torch.from_numpy(a.copy()).to(device) for a in before]
        with torch.no_grad():
            out = runner(*inputs)
        out = out if isinstance(out, (tuple, list)) else (out,)
        out = [o.detach().float().cpu().numpy() for o in out]
        if in_place:
            check_cache_update(name, inputs[1].cpu().numpy(), before, [x.cpu().numpy() for x in inputs[2:4]],
                               out[-2:])
        return out

    return run


def build_aoti(ckpt: DriftARCheckpoint, work_dir: Path, opts: ExportOptions) -> TargetResult:
    from fastardiff.recipes.entropy_attention import default_attention_impl

    cfg = ckpt.config
    attention = default_attention_impl(opts.device)  # the fused Triton op on CUDA (survives AOTInductor)

    def build_one(name: str, module: nn.Module, reference: nn.Module, profile: ShapeProfile):
        layers = engine_layers(ckpt, name)
        file = f"{name}.pt2"
        example = trace_inputs(cfg, name, layers, profile, opts.device)
        set_attention_impl(module, attention)
        in_place = opts.kv_update == "in-place" and name in IN_PLACE_ENGINES
        if in_place:
            module = cache_update_in_place(name, module)
        log.debug("%s: torch.export with example shapes %s", name, [tuple(x.shape) for x in example])
        program = export_program(module, example, dynamic_shapes(name, profile), ENGINE_IO[name][0])
        log.debug("%s: AOTInductor compile", name)
        compile_package(program, work_dir / file)
        run = aoti_runner(work_dir / file, opts.device, name, in_place)
        parity = check_engine_parity(name, run, reference, cfg, layers, profile, opts.atol, opts.rtol)
        parity["runtime"] = f"aoti {opts.device}, entropy attention '{attention}'"
        return file, parity

    engines = build_all_engines(ckpt, work_dir, opts, build_one)
    return TargetResult(backend="aoti", engines=engines, library_versions=library_versions(TARGET_LIBRARIES["aoti"]),
                        extra={"entropy_attention": attention, "kv_update": opts.kv_update})

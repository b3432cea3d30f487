"""`fastardiff export` / `fastardiff-export`: checkpoint -> engine directory (heavy imports inside the command)."""
from __future__ import annotations

import logging

import click

from fastardiff.cli import set_verbose
from fastardiff.params import Number

# Default parity tolerances per precision when --atol/--rtol are not given.
DEFAULT_TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2), "bf16": (6e-2, 6e-2)}


@click.command("export")
@click.option("--ckpt", type=click.Path(dir_okay=True, path_type=str), default=None,
              help="Checkpoint .pt file (default: the shipped tiny-mnist model).")
@click.option("--model", "model", default=None, metavar="PACKAGE.MODULE:FACTORY",
              help="A model trained elsewhere: the factory (your code, imported by module path) that builds it; "
                   "--ckpt is then its state dict (.pt, loaded as tensors only, or .safetensors). See "
                   "docs/export-your-model.md.")
@click.option("--draft-ckpt", "draft_ckpt", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="With --model: a draft made for that model (`python -m fastardiff.recipes.foreign_draft`); adds "
                   "its draft_step engine, for `fastardiff-run --draft model`.")
@click.option("--target", required=True, metavar="onnx|aoti|trt", help="Engine format to build.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Engine directory to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", "max_batch", type=click.IntRange(1, 8), default=8, show_default=True,
              help="Largest batch the engines accept (top of the batch profile).")
@click.option("--gamma", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Longest draft: draft_rollout engines 1..gamma are exported, the verify profile is optimised "
                   "for K = gamma + 1 (each rollout is one more engine to build).")
@click.option("--atol", type=Number(float, 0.0, 1.0), default=None,
              help="Parity absolute tolerance in [0, 1] (default 1e-4 for fp32).")
@click.option("--rtol", type=Number(float, 0.0, 1.0), default=None,
              help="Parity relative tolerance in [0, 1] (default 1e-3 for fp32).")
@click.option("--force", is_flag=True, help="Rebuild even when the engine cache matches.")
@click.option("--onnx-only", is_flag=True, help="trt: stop after writing the ONNX graph with plugin nodes.")
@click.option("--draft/--no-draft", default=True, show_default=True,
              help="Export the draft model (draft_step, draft_rollout_*); --no-draft: only target_verify and the "
                   "decoder, for `fastardiff-run --draft jacobi` (smaller, faster export).")
@click.option("--kv-update", type=click.Choice(["auto", "host", "in-place"]), default="auto", show_default=True,
              help="'in-place' makes the AR engines write their new keys/values into the KV cache buffer (onnx: "
                   "one buffer per layer, TensorScatter bound by IOBinding, attention over the buffer; trt: the same "
                   "graph, TensorScatter parsed into IKVCacheUpdateLayer, TensorRT 10.15+; aoti: an in-place "
                   "scatter_) instead of the runtime writing them. 'auto': in-place for onnx (measured as fast at "
                   "batch 1 and faster at batch 8) and trt (10.15+ / TensorRT-RTX; host below), host for aoti; host at "
                   "fp16/bf16 (the cast graph would update a copy of the fp32 cache).")
@click.option("--trt-library", type=click.Choice(["auto", "tensorrt_rtx", "tensorrt"]), default="auto",
              show_default=True,
              help="trt: TensorRT-RTX (builds on any machine, no GPU, for --compute-capability) or TensorRT (builds on "
                   "and for the GPU here). auto: TensorRT where it is installed and a GPU is present, else TensorRT-RTX.")
@click.option("--compute-capability", "compute_capabilities", default="", metavar="8.6,8.9,...",
              help="trt with TensorRT-RTX: the GPU architectures to build for, comma-separated (default "
                   "8.0,8.6,8.9,12.0: Ampere, Ada and Blackwell RTX).")
@click.option("-v", "--verbose", count=True, callback=set_verbose,
              help="Detail: shapes, exporter messages; on an internal error, the traceback.")
def export_command(ckpt, model, draft_ckpt, target, out, precision, device, max_batch, gamma, atol, rtol, force,
                   onnx_only, draft, kv_update, trt_library, compute_capabilities, verbose):
    """Export the draft_step, target_verify and decoder engines of a checkpoint, check them against PyTorch
    and write manifest.json (reused when nothing changed)."""
    if verbose:
        logging.getLogger("fastardiff").setLevel(logging.DEBUG)
    elif not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fastardiff.errors import FastardiffError, require

    require("torch", "export", "`fastardiff export`")   # before importing the targets, which import torch
    from .targets import TARGETS, ExportOptions

    if target not in TARGETS:  # before importing torch: a typo should fail fast
        raise FastardiffError(f"unknown export target '{target}'; choose one of: {', '.join(sorted(TARGETS))}")
    from fastardiff.recipes.checkpoint import default_checkpoint_path
    from fastardiff.runtime.manifest import ENGINE_NAMES

    from .export import export_engines

    default_atol, default_rtol = DEFAULT_TOLERANCES[precision]
    opts = ExportOptions(target=target, precision=precision, device=device, max_batch=max_batch, gamma=gamma,
                         atol=default_atol if atol is None else atol, rtol=default_rtol if rtol is None else rtol,
                         force=force, onnx_only=onnx_only, draft=draft, kv_update=kv_update, trt_library=trt_library,
                         compute_capabilities=tuple(c for c in compute_capabilities.split(",") if c.strip()))
    if model is not None and ckpt is None:
        raise FastardiffError("--model needs --ckpt: the state dict of the model its factory builds")
    from pathlib import Path

    from fastardiff.runtime.files import RunInputs, protected

    ckpt = ckpt or default_checkpoint_path()
    inputs = RunInputs().add(ckpt, "the checkpoint").add(Path(ckpt).with_suffix(".json"), "the checkpoint's JSON")
    if draft_ckpt is not None:
        inputs.add(draft_ckpt, "the draft checkpoint")
    inputs.refuse_output(out, "--out", is_dir=True)       # the export replaces --out whole: no input may be in it
    with protected(inputs):
        manifest, hit = export_engines(ckpt, out, opts, model=model, draft_ckpt=draft_ckpt)
    click.echo(f"{'cache hit' if hit else 'built'}: {out} (backend {manifest.backend}, {manifest.precision}, "
               f"{manifest.device})")
    listed = [n for n in ENGINE_NAMES if n in manifest.engines]   # the core engines first, then the others
    for name in listed + sorted(n for n in manifest.engines if n not in listed):
        entry = manifest.engines[name]
        outputs = entry.parity.get("outputs", {}) or {}
        worst_abs = max((float(v.get("max_abs", float("nan"))) for v in outputs.values() if isinstance(v, dict)),
                        default=float("nan"))
        click.echo(f"  {name:<15} {entry.file:<20} parity max abs {worst_abs:.2e} (atol {entry.parity.get('atol')}, "
                   f"rtol {entry.parity.get('rtol')}, shapes {len(entry.parity.get('shapes', []))})")

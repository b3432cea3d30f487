"""`fastardiff bench`: benchmarks, not timed tests.

  fastardiff bench pipeline   per-image time of target-only vs speculative decoding on ONNX Runtime and on the
                              torch reference backend, side by side in one run, with the share of wall time
                              spent outside the engines (sampling, KV-cache bookkeeping, Python).
  fastardiff bench kernels    the entropy-attention kernel benchmark (fastardiff.exporter.bench_kernels or
                              benchmarks/bench_kernels.py, when present).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

import click

from fastardiff.errors import FastardiffError

log = logging.getLogger("fastardiff.bench")

COLUMNS = ("backend", "mode", "ms/image", "speedup", "draft %", "verify %", "decode %", "outside engines %",
           "tok/target call", "accept rate")


@click.group("bench")
def bench_command():
    """Benchmarks (CPU or GPU figures, always side by side in one run)."""


def _time_runs(engines, classes, gen, repeats: int, max_batch: int):
    """One warm-up generate, then `repeats` timed ones; returns the stats summed over the timed runs."""
    from dataclasses import replace

    from fastardiff.runtime.speculative import generate
    from fastardiff.runtime.stats import RunStats

    generate(engines, classes, gen, max_batch=max_batch)
    stats = RunStats(mode=gen.mode, early_stop=gen.early_stop, gamma=gen.gamma)
    for r in range(repeats):
        generate(engines, classes, replace(gen, seed=gen.seed + r), stats, max_batch)
    return stats


def pipeline_rows(backends: dict, batch: int, repeats: int, gamma: int, early_stop: str, seed: int) -> list[dict]:
    import numpy as np

    from fastardiff.runtime.speculative import GenerationConfig

    rows = []
    for backend, engines in backends.items():
        num_classes = engines.manifest.config["num_classes"]
        classes = np.arange(batch) % num_classes
        target_ms = None
        for mode in ("target", "speculative"):
            gen = GenerationConfig(mode=mode, gamma=gamma, early_stop=early_stop, seed=seed)
            stats = _time_runs(engines, classes, gen, repeats, batch)
            s = stats.summary()
            total = max(stats.total_seconds, 1e-12)
            ms = 1000 * stats.total_seconds / max(stats.images, 1)
            target_ms = ms if mode == "target" else target_ms
            rows.append({"backend": backend, "mode": mode, "ms/image": ms, "speedup": target_ms / ms,
                         "draft %": 100 * stats.seconds.get("draft", 0) / total,
                         "verify %": 100 * stats.seconds.get("verify", 0) / total,
                         "decode %": 100 * stats.seconds.get("decode", 0) / total,
                         "outside engines %": 100 * stats.seconds.get("host", 0) / total,
                         "tok/target call": s["tokens_per_target_call"], "accept rate": s["acceptance_rate"],
                         "images": stats.images, "summary": s})
            log.info("%s %s: %.1f ms/image", backend, mode, ms)
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    table = [list(COLUMNS)] + [[cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@bench_command.command("pipeline")
@click.option("--ckpt", type=click.Path(dir_okay=False), default=None, help="Checkpoint (default: the shipped model).")
@click.option("--engine", "engine_dir", type=click.Path(file_okay=False), default=None,
              help="ONNX engine dir of the same checkpoint (default: export one into a temp dir).")
@click.option("--aoti-engine", "aoti_dir", type=click.Path(file_okay=False), default=None,
              help="Also time an AOTInductor engine dir of the same checkpoint.")
@click.option("--batch", type=click.IntRange(1, 8), default=8, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--gamma", type=click.IntRange(1, 32), default=4, show_default=True)
@click.option("--early-stop", type=click.Choice(["static", "context", "off"]), default="static", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="Intra-op threads for both backends (default: library's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write rows as JSON.")
def pipeline_command(ckpt, engine_dir, aoti_dir, batch, repeats, gamma, early_stop, seed, threads, json_path):
    """Per-image time, target-only vs speculative, ONNX Runtime vs torch backend, in one run (CPU)."""
    import platform
    import tempfile

    import torch

    from fastardiff.exporter.export import export_engines
    from fastardiff.exporter.targets import ExportOptions
    from fastardiff.exporter.torch_backend import load_torch_engines
    from fastardiff.recipes.checkpoint import default_checkpoint_path
    from fastardiff.runtime.engine import load_engines
    from fastardiff.runtime.manifest import sha256_file

    ckpt = Path(ckpt) if ckpt else default_checkpoint_path()
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="fastardiff-bench-") as tmp:
        if engine_dir is None:
            engine_dir = Path(tmp) / "onnx"
            export_engines(ckpt, engine_dir, ExportOptions(target="onnx", max_batch=batch, gamma=gamma))
        backends = {"onnxruntime": load_engines(engine_dir, threads=threads)}
        if aoti_dir:
            backends["aoti"] = load_engines(aoti_dir)
        for engines in backends.values():
            if engines.manifest.export.get("checkpoint_sha256") not in (None, sha256_file(ckpt)):
                raise FastardiffError(f"engines in '{engines.engine_dir}' were exported from a different checkpoint "
                                      f"than '{ckpt}'; pass the matching --ckpt or omit --engine/--aoti-engine")
        backends["torch"] = load_torch_engines(ckpt)
        rows = pipeline_rows(backends, batch, repeats, gamma, early_stop, seed)
    click.echo(f"pipeline benchmark: {ckpt.name}, batch {batch}, gamma {gamma}, early stop {early_stop}, "
               f"{repeats} timed runs after 1 warm-up; {platform.processor() or platform.machine()}, "
               f"torch threads {torch.get_num_threads()}")
    click.echo(format_table(rows))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")


@bench_command.command("kernels", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                                    "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def kernels_command(args):
    """Entropy-attention kernel benchmark (arguments are passed through)."""
    if importlib.util.find_spec("fastardiff.exporter.bench_kernels") is not None:
        _exit_with(importlib.import_module("fastardiff.exporter.bench_kernels").main(list(args)))
        return
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    if not script.exists():
        raise FastardiffError("the kernel benchmark is not part of this installation "
                              "(no fastardiff.exporter.bench_kernels or benchmarks/bench_kernels.py)")
    spec = importlib.util.spec_from_file_location("fastardiff_bench_kernels", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    _exit_with(module.main(list(args)))


def _exit_with(code) -> None:
    if isinstance(code, int) and code != 0:
        raise click.exceptions.Exit(code)

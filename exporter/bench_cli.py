"""`fastardiff bench`: benchmarks, not timed tests.

  fastardiff bench pipeline   per-image time of target-only vs speculative decoding on ONNX Runtime and on the
                              torch reference backend, side by side in one run, with the share of wall time
                              spent outside the engines (sampling, KV-cache bookkeeping, Python). --device cuda:
                              AOTInductor engines exported for CUDA and torch on CUDA instead; --config NAME:
                              a preset with seeded random weights (timing only) instead of a checkpoint.
  fastardiff bench kernels    the entropy-attention kernel benchmark (fastardiff.exporter.bench_kernels or
                              benchmarks/bench_kernels.py, when present).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import click

from fastardiff.errors import FastardiffError

from .bench_record import write_plot

log = logging.getLogger("fastardiff.bench")

COLUMNS = ("backend", "batch", "mode", "gamma", "ms/image", "speedup", "model speedup", "draft %", "verify %",
           "decode %", "outside engines %", "tok/target call", "accept rate")
COST_COLUMNS = ("backend", "batch", "gamma", "target step ms", "rollout ms", "verify ms", "decode ms")
EXPORT_MAX_BATCH = 8    # what `fastardiff export --batch` accepts (exporter/targets.check_options)
BENCH_MAX_BATCH = 64    # the torch backend takes any batch; exported engines only up to their export's


@click.group("bench")
def bench_command():
    """Benchmarks (CPU or GPU figures, always side by side in one run)."""


def _interleaved(engines, classes, gens: dict, repeats: int, max_batch: int, num_classes: int | None = None) -> dict:
    """One warm-up generate per configuration, then `repeats` rounds A B A B ... so that machine noise hits
    every configuration alike; returns {key: RunStats summed over the timed runs}. Round r uses seed + r and,
    with `num_classes`, the classes shifted by r (a batch-1 run covers the digits, not class 0 only); every
    configuration gets the same requests."""
    from dataclasses import replace

    from fastardiff.runtime.speculative import generate
    from fastardiff.runtime.stats import RunStats

    for gen in gens.values():
        generate(engines, classes, gen, max_batch=max_batch)
    stats = {key: RunStats(mode=gen.mode, early_stop=gen.early_stop, gamma=gen.gamma, draft=gen.draft)
             for key, gen in gens.items()}
    for r in range(repeats):
        request = classes if num_classes is None else (classes + r) % num_classes
        for key, gen in gens.items():
            generate(engines, request, replace(gen, seed=gen.seed + r), stats[key], max_batch)
    return stats


def cost_model_speedup(target, spec) -> float:
    """Speedup predicted from measured per-call costs and the measured call counts, host time zero:
    target-only engine time / speculative engine time (prefill steps at the target-only step cost)."""
    t_step = target.seconds.get("verify", 0.0) / max(target.target_calls, 1)
    t_dec = target.seconds.get("decode", 0.0) / max(target.decode_calls, 1)
    spec_engines = spec.seconds.get("draft", 0.0) + spec.seconds.get("verify", 0.0) + spec.decode_calls * t_dec
    target_engines = target.target_calls / max(target.images, 1) * spec.images * t_step + spec.decode_calls * t_dec
    return target_engines / spec_engines if spec_engines else 0.0


JACOBI_MODES = {"jacobi": True, "jacobi-independent": False}   # row mode -> maximal coupling


def pipeline_rows(backends: dict, batch: int, repeats: int, gammas, early_stop: str, seed: int,
                  jacobi_windows=()) -> list[dict]:
    """Rows for target-only, model-draft speculative at each gamma and Jacobi (coupled and independent) at each
    window, per backend, measured interleaved."""
    import numpy as np

    from fastardiff.runtime.speculative import GenerationConfig

    rows = []
    for backend, engines in backends.items():
        num_classes = engines.manifest.config["num_classes"]
        gens = {}
        classes = np.arange(batch) % num_classes
        gens[("target", 0)] = GenerationConfig(mode="target", early_stop=early_stop, seed=seed,
                                               gamma=max(list(gammas) + list(jacobi_windows), default=4))
        for g in gammas:
            gens[("speculative", g)] = GenerationConfig(mode="speculative", gamma=g, early_stop=early_stop, seed=seed)
        for w in jacobi_windows:
            for mode, coupling in JACOBI_MODES.items():
                gens[(mode, w)] = GenerationConfig(mode="speculative", draft="jacobi", coupling=coupling, gamma=w,
                                                   early_stop=early_stop, seed=seed)
        stats = _interleaved(engines, classes, gens, repeats, batch, num_classes)
        target = stats[("target", 0)]
        target_ms = 1000 * target.total_seconds / max(target.images, 1)
        for (mode, g), st in stats.items():
            s = st.summary()
            total = max(st.total_seconds, 1e-12)
            ms = 1000 * st.total_seconds / max(st.images, 1)
            rows.append({"backend": backend, "batch": batch, "mode": mode, "gamma": g if mode != "target" else "-",
                         "ms/image": ms, "speedup": target_ms / ms,
                         "model speedup": cost_model_speedup(target, st) if mode != "target" else 1.0,
                         "draft %": 100 * st.seconds.get("draft", 0) / total,
                         "verify %": 100 * st.seconds.get("verify", 0) / total,
                         "decode %": 100 * st.seconds.get("decode", 0) / total,
                         "outside engines %": 100 * st.seconds.get("host", 0) / total,
                         "tok/target call": s["tokens_per_target_call"], "accept rate": s["acceptance_rate"],
                         "images": st.images,
                         "per call ms": {"target step": 1000 * target.seconds.get("verify", 0.0)
                                         / max(target.target_calls, 1),
                                         "rollout": 1000 * st.seconds.get("draft", 0.0) / max(st.draft_calls, 1),
                                         "verify": 1000 * st.seconds.get("verify", 0.0) / max(st.target_calls, 1),
                                         "decode": 1000 * st.seconds.get("decode", 0.0) / max(st.decode_calls, 1)},
                         "summary": s})
            log.info("%s batch %d %s gamma %s: %.2f ms/image", backend, batch, mode, g, ms)
    return rows


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    table = [list(columns)] + [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cost_rows(rows: list[dict]) -> list[dict]:
    return [{"backend": r["backend"], "batch": r["batch"], "gamma": r["gamma"],
             "target step ms": r["per call ms"]["target step"], "rollout ms": r["per call ms"]["rollout"],
             "verify ms": r["per call ms"]["verify"], "decode ms": r["per call ms"]["decode"]}
            for r in rows if r["mode"] != "target"]


@bench_command.command("pipeline")
@click.option("--ckpt", type=click.Path(dir_okay=False), default=None, help="Checkpoint (default: the shipped model).")
@click.option("--engine", "engine_dir", type=click.Path(file_okay=False), default=None,
              help="ONNX engine dir of the same checkpoint (default: export one into a temp dir).")
@click.option("--aoti-engine", "aoti_dir", type=click.Path(file_okay=False), default=None,
              help="Also time an AOTInductor engine dir of the same checkpoint.")
@click.option("--no-torch", is_flag=True, help="Skip the torch reference backend.")
@click.option("--batch", "batches", default="8", show_default=True, help="Batch size(s), e.g. 1 or 1,8.")
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--gamma", default="auto", show_default=True,
              help="Draft length(s): N, a list '2,4,6', 'all' (every exported rollout), 'auto' (what --gamma "
                   "auto chooses per backend and batch) or 'none' (no model-draft rows).")
@click.option("--jacobi", "jacobi_spec", default="auto", show_default=True,
              help="Jacobi window length(s) for the `jacobi` / `jacobi-independent` rows: a list '2,4,8', 'auto' "
                   "(what --gamma auto chooses for Jacobi per backend and batch) or 'none'.")
@click.option("--early-stop", type=click.Choice(["static", "context", "off"]), default="static", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads for every backend (default: 1 for ONNX Runtime, as fastardiff-run; the "
                   "library's for torch).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write rows as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of speedup against gamma (default: beside --json).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu: ONNX Runtime (exported unless --engine) and torch on CPU. cuda: AOTInductor engines "
                   "exported for CUDA (unless --aoti-engine) and torch on CUDA; ONNX Runtime only with --engine.")
@click.option("--config", "config_name", default=None,
              help="A preset (e.g. mar-b-like) with seeded random weights instead of --ckpt: timing only.")
@click.option("--no-export", is_flag=True, help="Export nothing: time --engine / --aoti-engine and torch only.")
@click.option("--quality-images", type=click.IntRange(0, 10000), default=200, show_default=True,
              help="Diffusion-head families: images generated per row for class accuracy and Fréchet distance "
                   "(0: speed only).")
@click.option("--record", is_flag=True, help="Append this run (commit, machine, versions, settings, rows) to "
              "--history and redraw the current plot beside it (unless --plot names another).")
@click.option("--history", "history_path", type=click.Path(dir_okay=False), default=None,
              help="The history file --record appends to [default: docs/bench-history.jsonl under the current "
                   "directory: run from the checkout].")
@click.option("--label", default=None, help="With --record: a few words on what this run measures.")
def pipeline_command(ckpt, engine_dir, aoti_dir, no_torch, batches, repeats, gamma, jacobi_spec, early_stop, seed,
                     threads, json_path, plot_path, device, config_name, no_export, quality_images, record,
                     history_path, label):
    """Per-image time, target-only vs speculative, per backend, interleaved in one run (CPU or CUDA)."""
    import platform
    import tempfile

    import torch

    from fastardiff.exporter.export import export_engines
    from fastardiff.exporter.targets import ExportOptions
    from fastardiff.exporter.torch_backend import load_torch_engines
    from fastardiff.recipes.checkpoint import default_checkpoint_path, default_classifier_path
    from fastardiff.runtime.engine import load_engines
    from fastardiff.runtime.manifest import HEAD_FAMILIES
    from fastardiff.runtime.gamma_auto import choose_gamma
    from fastardiff.runtime.manifest import sha256_file

    try:
        batch_list = sorted({int(b) for b in str(batches).split(",") if b.strip()})
    except ValueError:
        raise FastardiffError(f"--batch '{batches}' is not a comma-separated list of integers") from None
    if not batch_list or min(batch_list) < 1 or max(batch_list) > BENCH_MAX_BATCH:
        raise FastardiffError(f"--batch '{batches}': batch sizes must be in 1..{BENCH_MAX_BATCH}")
    _windows(jacobi_spec)                      # a bad --jacobi fails before any export or timing
    if device == "cuda" and not torch.cuda.is_available():
        raise FastardiffError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if ckpt and config_name:
        raise FastardiffError("--ckpt and --config both name the model; give one")
    if config_name:
        from fastardiff.recipes.config import get_config

        get_config(config_name)                # an unknown preset fails before any work
    ckpt = Path(ckpt) if ckpt else default_checkpoint_path()
    from fastardiff.runtime.images import check_destination

    if (history_path or label) and not record:
        raise FastardiffError("--history and --label describe a recorded run; add --record")
    history = None
    if record:
        from .bench_record import DEFAULT_HISTORY, PLOT_NAME, load_history

        history = Path(history_path) if history_path else DEFAULT_HISTORY
        load_history(history)                  # a history that does not parse fails before any timing
        plot_path = plot_path or str(history.with_name(PLOT_NAME))
    for path, option in ((json_path, "--json"), (plot_path, "--plot"), (history, "--history")):
        if path:  # before any timing: a long benchmark must not end in an unwritable path
            check_destination(path, option)
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="fastardiff-bench-") as tmp:
        if config_name:
            ckpt = random_checkpoint(config_name, seed, Path(tmp) / f"{config_name}-random.pt")
        export = dict(max_batch=min(max(batch_list), EXPORT_MAX_BATCH), gamma=_export_gamma(gamma, jacobi_spec))
        if engine_dir is None and device == "cpu" and not no_export:
            engine_dir = Path(tmp) / "onnx"
            export_engines(ckpt, engine_dir, ExportOptions(target="onnx", **export))
        if aoti_dir is None and device == "cuda" and not no_export:
            aoti_dir = Path(tmp) / "aoti"
            export_engines(ckpt, aoti_dir, ExportOptions(target="aoti", device="cuda", **export))
        backends = {"onnxruntime": load_engines(engine_dir, threads=threads)} if engine_dir else {}
        if aoti_dir:
            backends["aoti"] = load_engines(aoti_dir)
        for engines in backends.values():
            if engines.manifest.export.get("checkpoint_sha256") not in (None, sha256_file(ckpt)):
                raise FastardiffError(f"engines in '{engines.engine_dir}' were exported from a different checkpoint "
                                      f"than '{ckpt}'; pass the matching --ckpt or omit --engine/--aoti-engine")
        if not no_torch:
            backends["torch"] = load_torch_engines(ckpt, device=device)
        if not backends:
            raise FastardiffError("nothing to time: --no-export and --no-torch without --engine / --aoti-engine")
        rows, choices, skipped = [], [], []
        scorer = None
        for batch in batch_list:
            for name, engines in backends.items():
                if batch > engines.manifest.max_batch:  # an export's profile ends at its --batch
                    skipped.append({"backend": name, "batch": batch, "reason": f"engines exported for batch <= "
                                    f"{engines.manifest.max_batch} (export accepts at most {EXPORT_MAX_BATCH})"})
                    log.warning("%s: batch %d skipped: %s", name, batch, skipped[-1]["reason"])
                    continue
                if engines.manifest.family in HEAD_FAMILIES:     # the paper's Table 1 rows
                    from .bench_heads import QualityScorer, head_family_rows

                    if scorer is None and quality_images and not config_name:
                        scorer = QualityScorer(default_classifier_path())
                    g = _gammas(gamma, [])
                    for g in ([int(engines.manifest.gamma)] if g in ("auto", []) else g):
                        rows += head_family_rows(name, engines, batch, repeats, g, early_stop, seed,
                                                 quality_images, scorer)
                    continue
                available = sorted(engines.capabilities.rollout_gammas)
                gammas = _gammas(gamma, available)
                if "draft_step" not in engines.manifest.engines:   # a --no-draft export: no model-draft rows
                    gammas = []
                if gammas == "auto":
                    choice = choose_gamma(engines, batch, 1.0, drafts=("model",))
                    choices.append({"backend": name, "batch": batch, **choice.to_dict()})
                    click.echo(f"[{name}, batch {batch}] {choice.table()}")
                    gammas = [choice.gamma] if choice.gamma else [available[0] if available else 1]
                windows = _windows(jacobi_spec)
                if windows == "auto":
                    choice = choose_gamma(engines, batch, 1.0, drafts=("jacobi",))
                    choices.append({"backend": name, "batch": batch, **choice.to_dict()})
                    click.echo(f"[{name}, batch {batch}] {choice.table()}")
                    windows = [choice.gamma] if choice.gamma else [max(gammas, default=4)]
                rows += pipeline_rows({name: engines}, batch, repeats, gammas, early_stop, seed, windows)
    where = (torch.cuda.get_device_name() if device == "cuda" else
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, threads {threads or 'default'}")
    click.echo(f"pipeline benchmark: {config_name + ' (random weights)' if config_name else ckpt.name}, batches "
               f"{batch_list}, early stop {early_stop}, {repeats} timed runs per configuration after 1 warm-up, "
               f"interleaved; {device}: {where}")
    head_rows = [r for r in rows if "head" in r]
    rows_ar = [r for r in rows if "head" not in r]
    if rows_ar:
        click.echo(format_table(rows_ar))
        click.echo("\nper-call engine cost (ms)")
        click.echo(format_table(cost_rows(rows_ar), COST_COLUMNS))
    if head_rows:
        from .bench_heads import HEAD_COLUMNS

        click.echo(format_table(head_rows, HEAD_COLUMNS))
    meta = {"model": config_name or ckpt.name, "config": next(iter(backends.values())).manifest.config.get("name"),
            "random_weights": bool(config_name), "device": device, "where": where, "batches": batch_list,
            "repeats": repeats}
    if record:
        from .bench_record import record_run

        engines = {"onnxruntime": engine_dir and str(engine_dir), "aoti": aoti_dir and str(aoti_dir)}
        click.echo(record_run(history, rows, {**meta, "gamma": gamma, "jacobi": jacobi_spec, "early_stop": early_stop,
                                              "seed": seed, "threads": threads, "checkpoint": str(ckpt),
                                              "engines": engines}, label, choices, skipped))
    if json_path:
        from fastardiff.runtime.stats import write_text_atomic

        write_text_atomic(Path(json_path), json.dumps({"meta": meta, "rows": rows, "gamma_auto": choices,
                                                       "skipped": skipped}, indent=2, default=str) + "\n")
        click.echo(f"wrote {json_path}")
    from fastardiff.errors import is_installed

    if rows_ar and record:                     # the newest recorded run, titled with its commit and machine
        from .bench_record import plot_latest

        click.echo(f"wrote {plot_latest(history, Path(plot_path))}")
    elif rows_ar and (plot_path or (json_path and is_installed("matplotlib"))):  # the CLI's gate asks for it
        path = write_plot(rows_ar, Path(plot_path) if plot_path else Path(json_path).with_suffix(".png"))
        click.echo(f"wrote {path}")


def random_checkpoint(config_name: str, seed: int, path: Path) -> Path:
    """A checkpoint of preset `config_name` with seeded random weights (calibration defaults), saved to `path`."""
    import torch

    from fastardiff.recipes.checkpoint import DriftARCheckpoint, save_checkpoint
    from fastardiff.recipes.config import Calibration, get_config
    from fastardiff.recipes.models import build_models

    cfg = get_config(config_name)
    torch.manual_seed(seed)
    target, draft, decoder = build_models(cfg)
    return save_checkpoint(path, DriftARCheckpoint(cfg, Calibration(), target, draft, decoder).eval())


MAX_LENGTH = 32     # the longest draft / Jacobi window an export builds engines for (`fastardiff-export --gamma`)


def _lengths(spec: str, option: str, forms: str, what: str) -> list[int]:
    """A comma-separated list of lengths in [1, MAX_LENGTH], sorted and deduplicated, or one error line naming
    `option` (its own name: the lengths become the export's --gamma, whose error would name the wrong option)."""
    try:
        values = sorted({int(v) for v in str(spec).split(",") if v.strip()})
    except ValueError:
        raise FastardiffError(f"{option} '{spec}' must be {forms}") from None
    if not values or min(values) < 1 or max(values) > MAX_LENGTH:
        raise FastardiffError(f"{option} '{spec}': {what} must be in 1..{MAX_LENGTH} (and below the model's tokens "
                              "per image)")
    return values


def _gammas(spec: str, available: list[int]):
    text = str(spec).strip().lower()
    if text == "auto":
        return "auto"
    if text == "all":
        return available or [4]
    if text == "none":
        return []
    return _lengths(spec, "--gamma", "N, a list like 2,4,6, 'all', 'auto' or 'none'", "draft lengths")


def _export_gamma(gamma_spec: str, jacobi_spec: str) -> int:
    """Rollout engines to export: up to the longest draft / window asked for (the export's default when 'auto' or
    'all' leave it open), so a benchmark does not compile engines it never times."""
    from fastardiff.exporter.targets import ExportOptions

    lengths = [] if str(gamma_spec).strip().lower() in ("auto", "all") else list(_gammas(gamma_spec, []))
    windows = _windows(jacobi_spec)
    if windows == "auto" or str(gamma_spec).strip().lower() in ("auto", "all"):
        return ExportOptions.gamma
    return max(lengths + list(windows), default=1)


def _windows(spec: str):
    text = str(spec).strip().lower()
    if text in ("auto", "none"):
        return "auto" if text == "auto" else []
    return _lengths(spec, "--jacobi", "a list like 2,4,8, 'auto' or 'none'", "window lengths")


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

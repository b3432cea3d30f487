"""`fastardiff calibrate`: measure the per-position draft acceptance `--gamma auto` plans with.

The real speculative loop (runtime/speculative.py) runs on the torch reference backend at gamma_max with early
stopping off, per guidance scale; for every draft position i it counts the verifies that proposed draft i after
accepting drafts < i and those that accepted it. a_i = accepted_i / proposed_i is written into the checkpoint's
calibration (`extra.acceptance_by_position`: {scale: [a_1 .. a_gmax]}), from where every export copies it into
the manifest. The target and draft weights are untouched; the checkpoint is rewritten atomically.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np

log = logging.getLogger("fastardiff.calibrate")


def measure_position_acceptance(ckpt, gamma: int = 8, images: int = 200, scales=(1.0, 2.0), seed: int = 0,
                                batch: int = 50) -> dict:
    """{str(scale): [a_1 .. a_gamma]} from the real loop over `images` images per scale (classes cycled)."""
    from fastardiff.runtime.speculative import GenerationConfig, generate
    from fastardiff.runtime.stats import RunStats

    from .torch_backend import TorchEngines

    engines = TorchEngines(ckpt, max_batch=2 * batch, max_gamma=gamma)
    classes = np.arange(images) % ckpt.config.num_classes
    curves = {}
    for scale in scales:
        gen = GenerationConfig(gamma=gamma, early_stop="off", cfg_scale=scale, seed=seed,
                               num_tokens=ckpt.config.num_tokens)
        stats = RunStats(gamma=gamma, track_positions=True)
        generate(engines, classes, gen, stats, max_batch=(2 if scale != 1.0 else 1) * batch)
        curves[f"{scale:g}"] = [round(a, 4) for a in stats.position_acceptance()]
        log.info("guidance %g: per-position acceptance %s (tokens per target call %.3f)", scale,
                 curves[f"{scale:g}"], stats.summary()["tokens_per_target_call"])
    return curves


@click.command("calibrate")
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True), required=True,
              help="Checkpoint to calibrate (rewritten in place, atomically).")
@click.option("--gamma", type=click.IntRange(1, 16), default=8, show_default=True, help="Longest draft measured.")
@click.option("--images", type=click.IntRange(10, 100000), default=200, show_default=True,
              help="Images per guidance scale.")
@click.option("--cfg-scales", default="1,2", show_default=True, help="Guidance scales to calibrate.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads.")
def calibrate_command(ckpt, gamma, images, cfg_scales, seed, threads):
    """Measure per-position draft acceptance (for --gamma auto) and store it in the checkpoint."""
    import torch

    from fastardiff.errors import FastardiffError
    from fastardiff.recipes.checkpoint import load_checkpoint, save_checkpoint

    try:
        scales = [float(s) for s in cfg_scales.split(",") if s.strip()]
    except ValueError:
        raise FastardiffError(f"--cfg-scales '{cfg_scales}' is not a comma-separated list of numbers") from None
    if not scales or not all(np.isfinite(scales)) or min(scales) < 0:
        raise FastardiffError(f"--cfg-scales '{cfg_scales}' needs finite, non-negative numbers, e.g. 1,2")
    torch.set_num_threads(threads)
    model = load_checkpoint(ckpt)
    curves = measure_position_acceptance(model, gamma, images, scales, seed)
    model.calibration.extra = {**model.calibration.extra, "acceptance_by_position": curves,
                               "acceptance_calibration": {"gamma": gamma, "images": images, "seed": seed,
                                                          "early_stop": "off", "loop": "runtime (torch backend)"}}
    save_checkpoint(Path(ckpt), model)
    click.echo(f"wrote per-position acceptance for guidance {', '.join(curves)} into {ckpt}")
    for scale, curve in curves.items():
        click.echo(f"  cfg {scale}: " + " ".join(f"{a:.3f}" for a in curve))

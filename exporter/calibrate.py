"""`fastardiff calibrate`: measure the per-position draft acceptance and the Jacobi tokens per target call that
`--gamma auto` plans with.

The real speculative loop (runtime/speculative.py) runs on the torch reference backend at gamma_max with early
stopping off, per guidance scale; for every draft position i it counts the verifies that proposed draft i after
accepting drafts < i and those that accepted it. a_i = accepted_i / proposed_i is written into the checkpoint's
calibration (`extra.acceptance_by_position`: {scale: [a_1 .. a_gmax]}), from where every export copies it into
the manifest. For `--draft jacobi` the same loop runs in Jacobi mode per window length L and guidance scale, and
the tokens per target call go into `extra.jacobi_tokens_per_call`: {scale: {L: tokens}}. Before that, the first
Jacobi window's proposal (`extra.jacobi_prior`, runtime Manifest.jacobi_prior): per class and token position the
mean of the target's own p means and the root mean square of its sigmas, over target-only samples at guidance 1.
The target and draft weights are untouched; the checkpoint is rewritten atomically.
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


def measure_jacobi_prior(ckpt, images: int = 200, seed: int = 0, batch: int = 100) -> dict:
    """runtime.manifest.encode_prior's table of mean [C, N, D] and sigma [C, N]: per class c and token j, the mean
    of p_j's mean and the root mean square of its sigma over `images` target-only samples per class (teacher-forced
    p at the sampled tokens, guidance 1, temperature 1). Any proposal is exact (its density is recorded with each guess); this one is near
    the target's p where the image is predictable from its class and position (MNIST's blank border: the first
    image row's guesses pass ~0.96 each instead of never)."""
    import torch

    from fastardiff.recipes.evaluate import sample_target_only, sigma_params
    from fastardiff.runtime.distribution import sigma_from_entropy
    from fastardiff.runtime.manifest import encode_prior

    cfg = ckpt.config
    generator = torch.Generator().manual_seed(seed)
    classes = np.repeat(np.arange(cfg.num_classes), images)
    mean_sum = np.zeros((cfg.num_classes, cfg.num_tokens, cfg.token_dim))
    var_sum = np.zeros((cfg.num_classes, cfg.num_tokens))
    with torch.no_grad():
        for lo in range(0, len(classes), batch):
            labels = torch.as_tensor(classes[lo: lo + batch])
            tokens, _ = sample_target_only(ckpt, labels, cfg_scale=1.0, generator=generator)
            mean, entropy, _ = ckpt.target.forward_sequence(tokens, labels)
            sigma = sigma_from_entropy(entropy, sigma_params(ckpt))
            np.add.at(mean_sum, labels.numpy(), mean.double().numpy())
            np.add.at(var_sum, labels.numpy(), (sigma.double() ** 2).numpy())
    return encode_prior(mean_sum / images, np.sqrt(var_sum / images), images_per_class=images, seed=seed,
                        cfg_scale=1.0)


def measure_jacobi_tokens(ckpt, windows=(2, 4, 8, 12, 16), images: int = 100, scales=(1.0, 2.0), seed: int = 0,
                          batch: int = 50) -> dict:
    """{str(scale): {str(L): tokens per target call}} of the real Jacobi loop (coupled), per window length."""
    from fastardiff.runtime.speculative import GenerationConfig, generate
    from fastardiff.runtime.stats import RunStats

    from .torch_backend import TorchEngines

    engines = TorchEngines(ckpt, max_batch=2 * batch, max_gamma=1)
    classes = np.arange(images) % ckpt.config.num_classes
    windows = [w for w in windows if w + 1 <= ckpt.config.num_tokens]
    out = {}
    for scale in scales:
        per_window = {}
        for window in windows:
            gen = GenerationConfig(gamma=window, draft="jacobi", cfg_scale=scale, seed=seed, eta=0.0,
                                   num_tokens=ckpt.config.num_tokens)
            stats = RunStats(gamma=window, draft="jacobi")
            generate(engines, classes, gen, stats, max_batch=(2 if scale != 1.0 else 1) * batch)
            per_window[str(window)] = round(stats.summary()["tokens_per_target_call"], 4)
            log.info("guidance %g, jacobi window %d: %.3f tokens per target call", scale, window,
                     per_window[str(window)])
        out[f"{scale:g}"] = per_window
    return out


MAX_CFG_SCALE = 20.0


def check_calibration_request(model, ckpt, gamma: int, windows) -> None:
    """FastardiffError (before any measuring, so the checkpoint is never rewritten) unless the checkpoint is of the
    family these measurements run (drift-ar: the Gaussian draft and Jacobi loops of the torch reference backend)
    and every length fits its image: a draft of gamma tokens and a Jacobi window of L verify gamma + 1 / L + 1
    tokens in one call, at most the model's N tokens."""
    from fastardiff.errors import FastardiffError

    family = getattr(model, "family", "drift-ar")
    if family != "drift-ar":
        raise FastardiffError(f"'{ckpt}' is a {family} checkpoint; `fastardiff calibrate` measures drift-ar models "
                              "(Gaussian draft acceptance and Jacobi windows), pass a drift-ar checkpoint such as "
                              "recipes/checkpoints/tiny-mnist.pt")
    n = model.config.num_tokens
    if gamma + 1 > n:
        raise FastardiffError(f"--gamma {gamma} is out of range for this model: a draft verifies gamma + 1 tokens in "
                              f"one call and an image has N = {n}; use 1..{n - 1}")
    too_long = [w for w in windows if w + 1 > n]
    if too_long:
        raise FastardiffError(f"--jacobi-windows: window {too_long[0]} is out of range for this model: a window of L "
                              f"verifies L + 1 tokens in one call and an image has N = {n}; use lengths in "
                              f"1..{n - 1}")


@click.command("calibrate")
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True), required=True,
              help="Checkpoint to calibrate (rewritten in place, atomically).")
@click.option("--gamma", type=click.IntRange(1, 16), default=8, show_default=True, help="Longest draft measured.")
@click.option("--images", type=click.IntRange(10, 100000), default=200, show_default=True,
              help="Images per guidance scale.")
@click.option("--cfg-scales", default="1,2", show_default=True, help="Guidance scales to calibrate.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads.")
@click.option("--measure", type=click.Choice(["all", "model", "jacobi"]), default="all", show_default=True,
              help="What to measure: the model draft's per-position acceptance, Jacobi tokens per call, or both.")
@click.option("--jacobi-windows", default="2,4,8,12,16", show_default=True, help="Jacobi window lengths measured.")
def calibrate_command(ckpt, gamma, images, cfg_scales, seed, threads, measure, jacobi_windows):
    """Measure per-position draft acceptance and Jacobi tokens per call (for --gamma auto) into the checkpoint."""
    import torch

    from fastardiff.errors import FastardiffError
    from fastardiff.recipes.checkpoint import load_checkpoint, save_checkpoint

    try:
        scales = [float(s) for s in cfg_scales.split(",") if s.strip()]
    except ValueError:
        raise FastardiffError(f"--cfg-scales '{cfg_scales}' is not a comma-separated list of numbers") from None
    if not scales or not all(np.isfinite(scales)) or min(scales) < 0 or max(scales) > MAX_CFG_SCALE:
        raise FastardiffError(f"--cfg-scales '{cfg_scales}' needs finite numbers in [0, {MAX_CFG_SCALE:g}] (as "
                              "`fastardiff run --cfg-scale`), e.g. 1,2")
    try:
        windows = sorted({int(w) for w in jacobi_windows.split(",") if w.strip()})
    except ValueError:
        raise FastardiffError(f"--jacobi-windows '{jacobi_windows}' is not a comma-separated list of integers") \
            from None
    if not windows or min(windows) < 1:
        raise FastardiffError(f"--jacobi-windows '{jacobi_windows}': window lengths must be >= 1, e.g. 2,4,8")
    torch.set_num_threads(threads)
    model = load_checkpoint(ckpt)
    check_calibration_request(model, ckpt, gamma, windows if measure in ("all", "jacobi") else [])
    extra = dict(model.calibration.extra)     # nothing below rewrites the checkpoint until every measure is done
    if measure in ("all", "model"):
        curves = measure_position_acceptance(model, gamma, images, scales, seed)
        extra["acceptance_by_position"] = curves
        extra["acceptance_calibration"] = {"gamma": gamma, "images": images, "seed": seed, "early_stop": "off",
                                           "loop": "runtime (torch backend)"}
        click.echo(f"per-position acceptance for guidance {', '.join(curves)}:")
        for scale, curve in curves.items():
            click.echo(f"  cfg {scale}: " + " ".join(f"{a:.3f}" for a in curve))
    if measure in ("all", "jacobi"):
        extra["jacobi_prior"] = measure_jacobi_prior(model, max(20, images // 2), seed)
        model.calibration.extra = extra          # the loop measured next starts from it
        click.echo(f"first-window proposal from {extra['jacobi_prior']['images_per_class']} images per class")
        jacobi = measure_jacobi_tokens(model, windows, images, scales, seed)
        extra["jacobi_tokens_per_call"] = jacobi
        extra["jacobi_calibration"] = {"windows": windows, "images": images, "seed": seed, "coupling": True,
                                       "eta": 0.0, "loop": "runtime (torch backend)"}
        click.echo("Jacobi tokens per target call:")
        for scale, per_window in jacobi.items():
            click.echo(f"  cfg {scale}: " + " ".join(f"L={w}: {t:.3f}" for w, t in per_window.items()))
    model.calibration.extra = extra
    save_checkpoint(Path(ckpt), model)
    click.echo(f"wrote the calibration into {ckpt}")

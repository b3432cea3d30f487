"""`fastardiff run` / `fastardiff-run`: generate images with speculative decoding over engines or a checkpoint.

Heavy libraries are imported inside the command; `--ckpt` imports torch (through the exporter's reference
backend) only when used, so running ONNX engines never imports torch.
"""
from __future__ import annotations

import logging

import click

from fastardiff.errors import FastardiffError

log = logging.getLogger(__name__)


@click.command("run")
@click.option("--engine", "engine_dir", type=click.Path(), help="Engine directory written by fastardiff-export.")
@click.option("--ckpt", type=click.Path(), help="Run a checkpoint directly with the torch reference backend.")
@click.option("--prompt", required=True, help="Class ids or names, e.g. '7', 'seven', '3,7,9'.")
@click.option("--num-images", type=int, default=None, help="Images to generate (prompts cycle) [default: one per prompt].")
@click.option("--gamma", default="auto", show_default=True,
              help="Draft tokens per target call, or 'auto': chosen at load time from the calibrated acceptance "
                   "and per-call costs timed on these engines (target-only where speculation cannot pay).")
@click.option("--early-stop", type=click.Choice(["static", "context", "off"]), default="static", show_default=True,
              help="Entropy early stopping of drafting.")
@click.option("--mode", type=click.Choice(["speculative", "target"]), default="speculative", show_default=True,
              help="'target' samples every token with the target alone (the baseline).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--cfg", "--cfg-scale", "cfg_scale", type=float, default=1.0, show_default=True,
              help="Classifier-free guidance scale (1 = none, as `fastardiff eval`; 2 sharpens the class).")
@click.option("--eta", type=float, default=5.0, show_default=True, help="Percent of tokens the target prefills.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG grid [default: samples.png].")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Also write one PNG per image here.")
@click.option("--stats-json", type=click.Path(dir_okay=False), default=None, help="Write run statistics as JSON.")
@click.option("--device", default="cpu", show_default=True, help="Torch device for --ckpt.")
def run_command(engine_dir, ckpt, prompt, num_images, gamma, early_stop, mode, temperature, cfg_scale, eta, seed,
                out, out_dir, stats_json, device):
    """Generate images: draft, verify in parallel, accept exactly; then the one-step decoder."""
    from fastardiff.runtime.images import save_images
    from fastardiff.runtime.prompts import parse_prompts
    from fastardiff.runtime.speculative import (GenerationConfig, GenerationError, ModelShape, check_request,
                                                generate, verify_limit)

    if (engine_dir is None) == (ckpt is None):
        raise FastardiffError("pass exactly one of --engine DIR (exported engines) or --ckpt PATH (a checkpoint)")
    gamma = parse_gamma(gamma)
    if out is None and out_dir is None:
        out = "samples.png"
    engines = _load(engine_dir, ckpt, device)
    classes = parse_prompts(prompt, engines.manifest.config["class_names"], num_images)
    choice = None
    if gamma == "auto":
        if mode == "speculative":
            from fastardiff.runtime.gamma_auto import choose_gamma

            per_call = 2 if cfg_scale != 1.0 else 1
            batch = max(1, min(len(classes), engines.manifest.max_batch // per_call))
            choice = choose_gamma(engines, batch, cfg_scale)
            click.echo(choice.table(), err=True)
            mode = choice.mode
        gamma = choice.gamma if choice is not None and choice.gamma else int(engines.manifest.gamma or 4)
    gen = GenerationConfig(mode=mode, gamma=gamma, early_stop=early_stop, temperature=temperature,
                           cfg_scale=cfg_scale, eta=eta, seed=seed)
    check_request(gen, ModelShape.from_config(engines.manifest.config), verify_limit(engines))
    log.info("generating %d image(s) for classes %s (%s, gamma=%d, early stop %s)", len(classes), classes, mode,
             gamma, early_stop)
    images, stats = generate(engines, classes, gen)
    names = [f"{i:04d}-{engines.manifest.config['class_names'][c]}" for i, c in enumerate(classes)]
    for path in save_images(images, out, out_dir, names):
        log.info("wrote %s", path)
    click.echo(stats.table())
    if stats_json:
        if choice is not None:
            stats.gamma_choice = choice.to_dict()
        stats.write_json(stats_json)
        log.info("wrote %s", stats_json)


def parse_gamma(value) -> int | str:
    """--gamma: a positive integer or 'auto'."""
    from fastardiff.runtime.speculative import GenerationError

    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        gamma = int(text)
    except ValueError:
        raise GenerationError(f"--gamma must be a positive integer or 'auto' (got '{value}')") from None
    if gamma < 1:
        raise GenerationError(f"--gamma must be at least 1 (got {gamma}): it is the number of draft tokens per "
                              "target call")
    return gamma


def _load(engine_dir, ckpt, device):
    if engine_dir is not None:
        from fastardiff.runtime.engine import load_engines

        return load_engines(engine_dir)
    try:
        from fastardiff.exporter.torch_backend import load_torch_engines
    except ImportError as err:
        from fastardiff.errors import MissingDependencyError

        raise MissingDependencyError("torch", "export", "running a checkpoint with --ckpt") from err
    return load_torch_engines(ckpt, device=device)

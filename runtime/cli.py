"""`fastardiff run` / `fastardiff-run`: generate images with speculative decoding over engines or a checkpoint.

Heavy libraries are imported inside the command; `--ckpt` imports torch (through the exporter's reference
backend) only when used, so running ONNX engines never imports torch.

Bad input fails before any work: numbers are checked by their option types (finite, in range), the output
destinations are probed for writability before the engines load, and the request is checked against the model.
The grid, the single images and the statistics JSON are written all-or-nothing: staged in hidden directories
beside their destinations and renamed into place together at the end (runtime/images.py StagedOutputs).
Single images are staged as `generate` decodes each engine-sized chunk (its `on_images` hook,
runtime/images.py StreamedImages); of the grid only the 8-bit pixels are held until the end.
"""
from __future__ import annotations

import logging
import re

import click

from fastardiff.cli import verbose_option
from fastardiff.errors import FastardiffError, require
from fastardiff.params import Number, Seed

log = logging.getLogger(__name__)

MAX_IMAGES = 10000          # per run: the images of a run are held in memory until they are written
TEMPERATURE = Number(float, 0.0, 10.0, low_open=True)
CFG_SCALE = Number(float, 0.0, 20.0)
ETA = Number(float, 0.0, 100.0, high_open=True)


@click.command("run")
@click.option("--engine", "engine_dir", type=click.Path(), help="Engine directory written by fastardiff-export.")
@click.option("--ckpt", type=click.Path(), help="Run a checkpoint directly with the torch reference backend.")
@click.option("--prompt", required=True, help="Class ids or names, e.g. '7', 'seven', '3,7,9'.")
@click.option("--num-images", type=Number(int, 1, MAX_IMAGES), default=None,
              help=f"Images to generate, 1..{MAX_IMAGES} (prompts cycle) [default: one per prompt].")
@click.option("--gamma", default="auto", show_default=True,
              help="Draft tokens per target call, or 'auto': chosen at load time from the calibrated acceptance "
                   "and per-call costs timed on these engines (target-only where speculation cannot pay).")
@click.option("--draft", type=click.Choice(["auto", "model", "jacobi"]), default="auto", show_default=True,
              help="What proposes the tokens the target verifies: the draft model, or the target's own previous "
                   "guesses (speculative Jacobi decoding, no draft engine needed); 'auto' picks the faster with "
                   "--gamma auto (the model draft with an explicit --gamma).")
@click.option("--coupling", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Jacobi: maximal coupling of new guesses with the old ones ('off': independent guesses, SJD).")
@click.option("--early-stop", type=click.Choice(["static", "context", "off"]), default="static", show_default=True,
              help="Entropy early stopping of drafting.")
@click.option("--mode", type=click.Choice(["speculative", "target"]), default="speculative", show_default=True,
              help="'target' samples every token with the target alone (the baseline).")
@click.option("--temperature", type=TEMPERATURE, default=1.0, show_default=True, help="Scales sigma(E), in (0, 10].")
@click.option("--cfg", "--cfg-scale", "cfg_scale", type=CFG_SCALE, default=1.0, show_default=True,
              help="Classifier-free guidance scale in [0, 20] (1 = none, as `fastardiff eval`; 2 sharpens the class).")
@click.option("--eta", type=ETA, default=0.0, show_default=True, help="Percent of tokens the target prefills before the model draft starts (fast-ardiff's eta), [0, 100) (Jacobi needs none).")
@click.option("--seed", type=Seed, default=0, show_default=True, help="Random seed, 0..2^32-1.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG grid [default: samples.png].")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Also write one PNG per image here.")
@click.option("--stats-json", type=click.Path(dir_okay=False), default=None, help="Write run statistics as JSON.")
@click.option("--device", default=None,
              help="cpu, cuda or cuda:N: the torch device for --ckpt [default: cpu]; with --engine, where the engines "
                   "must run (checked against their backend: a clear error, never a silent fallback) [default: "
                   "the backend's choice].")
@click.option("--head", type=click.Choice(["student", "teacher"]), default=None,
              help="Diffusion-head families (fast-ardiff): the distilled few-step head or the many-step teacher "
                   "[student].")
@click.option("--shared-noise", type=click.Choice(["on", "off"]), default=None,
              help="Diffusion-head families: draft and target share each token's noise trajectory (CSpD) [on].")
@click.option("--inner-temperature", type=Number(float, 0.0, 1000.0, low_open=True), default=None,
              help="Diffusion-head families: CSpD's inner temperature of the acceptance ratio (its official code: "
                   "42; not exact) [1].")
@click.option("--acceptance", type=click.Choice(["cspd", "conditional"]), default=None,
              help="Diffusion-head families: the acceptance ratio. cspd: the paper's (final-step density ratio times "
                   "the earlier steps' sigma ratios); conditional: the final-step density ratio alone, exact given "
                   "the shared trajectory noise (needs --shared-noise on) [cspd].")
@click.option("--threads", type=Number(int, 0, 1024), default=None,
              help="Intra-op threads of ONNX Runtime CPU engines, 0..1024 (0: the library's one per core) [1: these "
                   "small graphs ran ~1.8x faster per image on one thread than on two cores here].")
@click.option("--replan", is_flag=True,
              help="--gamma auto: time the engines again even when a cached plan matches these engines, this "
                   "machine and this request (plans are cached per user, see runtime/plan_cache.py).")
@click.option("--adapt", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="--gamma auto: while generating, measure the planned proposal kind, now and then re-check its best "
                   "alternative, and switch when it is measured faster (docs/gamma-auto.md); an explicit --gamma "
                   "never adapts.")
@verbose_option()
def run_command(engine_dir, ckpt, prompt, num_images, gamma, draft, coupling, early_stop, mode, temperature, cfg_scale, eta, seed,
                out, out_dir, stats_json, device, head, shared_noise, inner_temperature, acceptance, threads, replan,
                adapt):
    """Generate images: draft, verify in parallel, accept exactly; then the one-step decoder."""
    from fastardiff.runtime.files import protected
    from fastardiff.runtime.images import StagedOutputs, StreamedImages, check_destination
    from fastardiff.runtime.speculative import generate

    if (engine_dir is None) == (ckpt is None):
        raise FastardiffError("pass exactly one of --engine DIR (exported engines) or --ckpt PATH (a checkpoint)")
    gamma = parse_gamma(gamma)
    if out is None and out_dir is None:
        out = "samples.png"
    check_outputs(out, out_dir, stats_json, check_destination)   # before any engine is loaded
    engines = _load(engine_dir, ckpt, device, **({} if threads is None else {"threads": threads}))
    classes = request_classes(prompt, engines.manifest.config["class_names"], num_images)
    names = [f"{i:04d}-{engines.manifest.config['class_names'][c]}" for i, c in enumerate(classes)]
    inputs = run_inputs(engine_dir, ckpt, engines.manifest)
    refuse_overwriting_inputs(inputs, out, out_dir, stats_json, names)   # before any generating

    planned = {}     # the plan cache key of this run's --gamma auto plan, which the run's rates then correct

    def choose(batch, cfg, drafts, options):
        from fastardiff.runtime.gamma_auto import choose_gamma
        from fastardiff.runtime.plan_cache import cached_choice, plan_key

        choice, source = cached_choice(engines, batch, cfg, drafts, options,
                                       lambda: choose_gamma(engines, batch, cfg, drafts=drafts, options=options),
                                       replan)
        planned["key"] = plan_key(engines, batch, cfg, drafts, options)
        click.echo(f"{choice.table()}\n  ({source})", err=True)
        return choice

    head_options = {k: v for k, v in (("head", head), ("shared_noise", None if shared_noise is None
                                                                  else shared_noise == "on"),
                                       ("inner_temperature", inner_temperature), ("acceptance", acceptance))
                    if v is not None}
    gen, choice = plan_generation(engines, len(classes), gamma, draft, coupling == "on", early_stop, mode,
                                  temperature, cfg_scale, eta, seed, choose, head_options, adapt == "on")
    shown = ", ".join(map(str, classes[:16])) + (", ..." if len(classes) > 16 else "")
    log.info("generating %d image(s) for classes %s (%s, %s draft, gamma=%d, early stop %s)", len(classes), shown,
             gen.mode, gen.draft, gen.gamma, early_stop)
    with protected(inputs), StagedOutputs() as staged:   # nothing reaches the destinations unless every output
        written = StreamedImages(staged, out, out_dir, names)    # single images staged as each chunk decodes
        _, stats = generate(engines, classes, gen, on_images=written.add, warm=True)
        written.finish()
        if stats_json:
            if choice is not None:
                stats.gamma_choice = choice.to_dict()
            stats.write_json(staged.path_for(stats_json))
        for path in staged.commit():
            log.info("wrote %s", path)
    if planned.get("key") is not None:        # what this run measured corrects the cached plan
        from fastardiff.runtime.plan_cache import update_from_run

        update_from_run(planned["key"], choice, stats.summary())
    click.echo(stats.table())


def request_classes(prompt, class_names, num_images, max_images: int = MAX_IMAGES, what: str = "a run",
                    fix: str = "split it into several runs") -> list[int]:
    """The class id of every image: the prompt parsed and cycled to `num_images`, at most `max_images` of them
    (`fastardiff run` and `fastardiff serve`, whose requests are smaller)."""
    from fastardiff.runtime.prompts import parse_prompts

    classes = parse_prompts(prompt, class_names, num_images)
    if len(classes) > max_images:
        raise FastardiffError(f"--prompt asks for {len(classes)} images; {what} makes 1..{max_images} ({fix})")
    return classes


def plan_generation(engines, num_images: int, gamma, draft: str, coupling: bool, early_stop: str, mode: str,
                    temperature: float, cfg_scale: float, eta: float, seed: int, choose,
                    head_options: dict | None = None, adapt: bool = True):
    """(GenerationConfig, GammaChoice or None) of a request, checked against the model and its engines; shared by
    `fastardiff run` and `fastardiff serve`. gamma 'auto' in speculative mode is `choose(batch, cfg_scale,
    drafts, head_options)` (a GammaChoice; it may choose target-only), else the engines' exported gamma; draft 'auto' is the
    model draft where the engines have one (Jacobi otherwise; only the model draft for diffusion-head families).
    head_options (head, shared_noise, inner_temperature, acceptance) apply to diffusion-head families only.
    adapt: a planned run re-checks the plan's alternative while it generates (runtime/adaptive.py)."""
    from fastardiff.runtime.generation import check_draft_supported
    from fastardiff.runtime.manifest import HEAD_FAMILIES
    from fastardiff.runtime.speculative import (GenerationConfig, ModelShape, check_request, samples_per_call,
                                                verify_limit)

    if draft != "auto":    # a proposal kind asked for by name: refused where the engines cannot run it, any --gamma
        check_draft_supported(engines.manifest, mode, draft)
    head_options = dict(head_options or {})
    family = engines.manifest.family
    if head_options and family not in HEAD_FAMILIES:
        names = ", ".join("--" + k.replace("_", "-") for k in head_options)
        verb = "applies" if len(head_options) == 1 else "apply"
        raise FastardiffError(f"{names} {verb} to diffusion-head model families ({', '.join(HEAD_FAMILIES)}); these "
                              f"engines are of family '{family}': drop {names}")
    if family in HEAD_FAMILIES and draft == "auto":
        draft = "model"
    choice = None
    per_call = samples_per_call(engines, cfg_scale)     # refuses a request no engine call can hold, before any work
    if gamma == "auto":
        if mode == "speculative":
            batch = max(1, min(num_images, per_call))
            choice = choose(batch, cfg_scale, ("model", "jacobi") if draft == "auto" else (draft,), head_options)
            mode = choice.mode
            draft = choice.draft if choice.gamma else draft
        gamma = choice.gamma if choice is not None and choice.gamma else int(engines.manifest.gamma or 4)
    if draft == "auto":   # an explicit --gamma (or target-only): the model draft where the engines have one
        draft = "model" if "draft_step" in engines.manifest.engines else "jacobi"
    alternative, plan_rates = None, ()
    if adapt and choice is not None:
        from fastardiff.runtime.adaptive import alternative_for, plan_rates_of

        alternative, plan_rates = alternative_for(choice, engines.manifest), plan_rates_of(choice)
    gen = GenerationConfig(mode=mode, gamma=gamma, draft=draft, coupling=coupling, early_stop=early_stop,
                           temperature=temperature, cfg_scale=cfg_scale, eta=eta, seed=seed, alternative=alternative,
                           plan_rates=plan_rates if alternative else (), **head_options)
    check_request(gen, ModelShape.from_config(engines.manifest.config), verify_limit(engines))
    return gen, choice


def check_outputs(out, out_dir, stats_json, check_destination) -> None:
    """Every destination writable, and no two outputs on one path (before any work)."""
    from pathlib import Path

    if out is not None:
        check_destination(out, "--out")
    if out_dir is not None:
        check_destination(out_dir, "--out-dir", is_dir=True)
    if stats_json is not None:
        check_destination(stats_json, "--stats-json")
    if out is not None and stats_json is not None and Path(out).resolve() == Path(stats_json).resolve():
        raise FastardiffError(f"--out and --stats-json both name '{out}'; give them different paths")


def run_inputs(engine_dir, ckpt, manifest):
    """Every file a run reads: the checkpoint (and its JSON beside it), or the manifest, engine files and plugin
    library of the engine directory; and the `--gamma auto` plans of the plan cache."""
    from pathlib import Path

    from fastardiff.runtime.files import RunInputs
    from fastardiff.runtime.manifest import MANIFEST_NAME
    from fastardiff.runtime.plan_cache import cache_dir

    inputs = RunInputs()
    if ckpt is not None:
        inputs.add(ckpt, "the checkpoint").add(Path(ckpt).with_suffix(".json"), "the checkpoint's JSON")
    if engine_dir is not None:
        inputs.add(Path(engine_dir) / MANIFEST_NAME, "the engine manifest")
        inputs.add_dir_files(engine_dir, [e.file for e in manifest.engines.values()], "an engine file")
        if (manifest.plugin or {}).get("file"):
            inputs.add(Path(engine_dir) / manifest.plugin["file"], "the engines' plugin library")
    plans = cache_dir()
    if plans.is_dir():
        inputs.add_dir_files(plans, sorted(p.name for p in plans.iterdir() if p.suffix == ".json"),
                             "a cached --gamma auto plan")
    return inputs


def refuse_overwriting_inputs(inputs, out, out_dir, stats_json, names) -> None:
    """OutputError if --out, --stats-json or any single image --out-dir would get (names: the images' names, as
    StreamedImages writes them) is one of the run's inputs (same path or same file: links count)."""
    from pathlib import Path

    from fastardiff.runtime.images import safe_name

    if out is not None:
        inputs.refuse_output(out, "--out")
    if stats_json is not None:
        inputs.refuse_output(stats_json, "--stats-json")
    if out_dir is not None:
        for name in names:
            inputs.refuse_output(Path(out_dir) / f"{safe_name(name)}.png", "--out-dir")


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


def _load(engine_dir, ckpt, device, threads: int | None = None):
    if device is not None and not re.fullmatch(r"cpu|cuda(:[0-9]+)?", str(device)):
        raise FastardiffError(f"--device '{device}' is not a device this runs on; use cpu, cuda or cuda:N")
    if engine_dir is not None:
        from fastardiff.runtime.engine import load_engines

        options = {} if device is None else {"device": device}
        return load_engines(engine_dir, threads=threads, **options)      # None: the backend's default
    device = device or "cpu"
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", str(device)):
        raise FastardiffError(f"--device '{device}' is not a torch device this runs on; use cpu, cuda or cuda:N")
    require("torch", "export", "running a checkpoint with --ckpt")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise FastardiffError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise FastardiffError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"device(s), 0..{torch.cuda.device_count() - 1}")
    try:
        from fastardiff.exporter.torch_backend import load_torch_engines
    except ImportError as err:
        from fastardiff.errors import MissingDependencyError

        raise MissingDependencyError("torch", "export", "running a checkpoint with --ckpt") from err
    return load_torch_engines(ckpt, device=device)

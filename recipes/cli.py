"""`fastardiff train`, `fastardiff eval`, `fastardiff info`. Heavy libraries are imported inside the commands."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from fastardiff.errors import FastardiffError
from fastardiff.params import Number, Seed

log = logging.getLogger(__name__)


def _default_ckpt() -> str:
    return str(Path(__file__).resolve().parent / "checkpoints" / "tiny-mnist.pt")


def _default_classifier() -> str:
    return str(Path(__file__).resolve().parent / "checkpoints" / "digit-classifier.pt")


@click.command("train")
@click.option("--stage", type=click.Choice(["full", "draft-onpolicy"]), default="full", show_default=True,
              help="full: the whole recipe; draft-onpolicy: fine-tune only the draft of --init on sequences "
                   "sampled by its frozen target (writes DIR/<recipe>.pt; --steps [3000], --entropy-weight, "
                   "--seed, --threads apply).")
@click.option("--init", "init_ckpt", type=click.Path(dir_okay=False), default=None,
              help="draft-onpolicy: the checkpoint to start from [the shipped tiny-mnist].")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="draft-onpolicy: target-sampled sequences, half at guidance 1, half at 2 [20000].")
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="draft-onpolicy: peak learning rate of the draft (cosine schedule) [3e-4].")
@click.option("--residual-contexts", type=click.FloatRange(0.0, 1.0), default=None,
              help="draft-onpolicy: add this fraction of --samples again with one token replaced by a residual "
                   "sample (the contexts after a rejection), the next position weighted 4x [0: off].")
@click.option("--recipe", default="tiny-mnist", show_default=True, help="Model config to train.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Total steps (target AR + joint) [4000].")
@click.option("--target-fraction", type=click.FloatRange(0.0, 1.0), default=None,
              help="Share of the steps spent on the target AR alone [0.6].")
@click.option("--classifier-steps", type=click.IntRange(min=0), default=None,
              help="Steps of the digit classifier (0: skip it) [1500].")
@click.option("--schedule", type=click.Choice(["linear", "two-phase"]), default="linear", show_default=True,
              help="alpha(t): linear 0.95->0.05 (fast-ardiff) or two-phase with T_freeze = 0.8 T (drift-ar).")
@click.option("--entropy-weight", type=click.FloatRange(min=0.0), default=None,
              help="Weight of the draft's entropy-alignment loss [10].")
@click.option("--init-decoder", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Warm-start the one-step decoder from this checkpoint (same decoder shape).")
@click.option("--grow-target-from", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Start the target from this checkpoint's shallower target, grown function-preservingly (its "
                   "blocks keep their roles, the new ones start as identities); the target stage fine-tunes it.")
@click.option("--target-lr", type=click.FloatRange(min=0.0, min_open=True, max=1.0), default=None,
              help="Peak learning rate of the target stage [1e-3].")
@click.option("--seed", type=Seed, default=0, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=None, help="Steps between resume states [200].")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads.")
@click.option("--resume", is_flag=True, help="Continue from DIR/resume-state.pt.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Pause at this step (state saved, checkpoint so far written); continue later with --resume.")
@click.option("--calibration-images", type=click.IntRange(min=1), default=None, hidden=True,
              help="Training digits used for the entropy statistics (tests use few).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--stages", default=None,
              help="fast-ardiff recipes: comma-separated stages to run, of teacher,draft,cd,dmd [all].")
@click.option("--stage-steps", default=None,
              help="fast-ardiff recipes: steps per stage, e.g. teacher=4000,draft=1000,cd=2000,dmd=1500.")
@click.option("--student-init", type=click.Choice(["teacher", "random"]), default=None,
              help="fast-ardiff recipes: the student head starts from the teacher [teacher] or from random weights "
                   "(the DMD-from-scratch ablation).")
@click.option("--train-blocks", type=click.IntRange(min=1), default=None,
              help="fast-ardiff recipes: trained last blocks of the target in the teacher stage [2].")
@click.option("--dmd-cd-anchor", type=click.FloatRange(min=0.0), default=None,
              help="fast-ardiff recipes: weight of the consistency anchor in the DMD stage (0: pure DMD) [5].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="fast-ardiff recipes: where the frozen target's outputs are cached [--out].")
def train_command(**options):
    """Train the target AR, the draft AR, the one-step decoder (and the digit classifier) into DIR.
    For a fast-ardiff recipe: the target AR + teacher head, the draft, and the head's CD -> DMD distillation
    (--init: a fast-ardiff checkpoint to start from instead of the teacher stage)."""
    from fastardiff.runtime.atomic import created_dirs_removed_on_failure
    from fastardiff.runtime.files import RunInputs, protected
    from fastardiff.runtime.images import check_destination

    from .config import CONFIGS

    if options["recipe"] not in CONFIGS:
        raise FastardiffError(f"unknown --recipe '{options['recipe']}'; known: {', '.join(sorted(CONFIGS))}")
    check_destination(options["out_dir"], "--out", is_dir=True)
    inputs = RunInputs()
    for option in ("init_ckpt", "init_decoder", "grow_target_from"):
        if options[option] is not None:
            what = f"--{option.replace('_ckpt', '').replace('_', '-')} checkpoint"
            inputs.add(options[option], what).add(Path(options[option]).with_suffix(".json"), f"the {what}'s JSON")
    inputs.refuse_output(options["out_dir"], "--out", is_dir=True)   # the outputs of a training go into --out
    with protected(inputs), created_dirs_removed_on_failure(options["out_dir"]):   # a refused run leaves no
        _train(**options)                                                            # empty --out behind


def _train(stage, init_ckpt, samples, lr, residual_contexts, recipe, out_dir, steps, target_fraction, classifier_steps,
           schedule, entropy_weight, init_decoder, grow_target_from, target_lr, seed, save_every, threads, resume,
           stop_after, calibration_images, no_progress, stages, stage_steps, student_init, train_blocks, dmd_cd_anchor,
           cache_dir):
    import torch

    from .config import CONFIGS
    from .train import TrainSettings, train

    torch.set_num_threads(threads)
    if CONFIGS[recipe].family == "fast-ardiff":
        path = _train_fast_ardiff(recipe, out_dir, init_ckpt, stages, stage_steps, student_init, train_blocks,
                                  dmd_cd_anchor, entropy_weight, seed, save_every, calibration_images, resume, stop_after,
                                  not no_progress, cache_dir)
        click.echo(f"wrote {path}")
        return
    if any(v is not None for v in (stages, stage_steps, student_init, train_blocks, dmd_cd_anchor, cache_dir)):
        raise FastardiffError("--stages, --stage-steps, --student-init, --train-blocks, --dmd-cd-anchor and --cache-dir "
                              "belong to the fast-ardiff recipes; drop them or pass --recipe tiny-mnist-fast-ardiff")
    if stage == "draft-onpolicy":
        from .distill_draft import DistillSettings, distill_draft

        options = {"samples": samples, "steps": steps, "lr": lr, "entropy_weight": entropy_weight,
                   "calibration_images": calibration_images, "residual_contexts": residual_contexts}
        given = {k: v for k, v in options.items() if v is not None}
        path = distill_draft(init_ckpt or _default_ckpt(), Path(out_dir) / f"{recipe}.pt",
                             DistillSettings(seed=seed, **given), progress=not no_progress)
        click.echo(f"wrote {path}")
        return
    if init_ckpt is not None or samples is not None or lr is not None or residual_contexts is not None:
        raise FastardiffError("--init, --samples, --lr and --residual-contexts belong to --stage draft-onpolicy; drop "
                              "them or add --stage draft-onpolicy")
    overrides = {"steps": steps, "target_fraction": target_fraction, "classifier_steps": classifier_steps,
                 "save_every": save_every, "calibration_images": calibration_images, "entropy_weight": entropy_weight,
                 "init_decoder": init_decoder, "grow_target_from": grow_target_from, "target_lr": target_lr}
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = TrainSettings(recipe=recipe, schedule=schedule, seed=seed, **given)
    # on --resume the saved settings hold, except the options given on this command line
    path = train(out_dir, settings, resume=resume, progress=not no_progress, stop_after=stop_after,
                 resume_overrides=tuple(given))
    click.echo(f"wrote {path}")


def _train_fast_ardiff(recipe, out_dir, init_ckpt, stages, stage_steps, student_init, train_blocks, dmd_cd_anchor,
                       entropy_weight, seed, save_every, calibration_images, resume, stop_after, progress, cache_dir):
    from .train_fast_ardiff import STAGES, FastARDiffTrainSettings, train_fast_ardiff

    given = {"init": init_ckpt, "student_init": student_init, "train_blocks": train_blocks, "dmd_cd_anchor": dmd_cd_anchor,
             "entropy_weight": entropy_weight, "save_every": save_every, "calibration_images": calibration_images}
    given = {k: v for k, v in given.items() if v is not None}
    if stages is not None:
        given["stages"] = tuple(x.strip() for x in stages.split(",") if x.strip())
    for item in (stage_steps.split(",") if stage_steps else []):
        name, _, value = item.partition("=")
        if name.strip() not in STAGES or not value.strip().isdigit():
            raise FastardiffError(f"--stage-steps item '{item}': use STAGE=STEPS with STAGE one of "
                                  f"{', '.join(STAGES)}")
        given[f"{name.strip()}_steps"] = int(value)
    settings = FastARDiffTrainSettings(recipe=recipe, seed=seed, **given)
    return train_fast_ardiff(out_dir, settings, resume=resume, progress=progress, stop_after=stop_after,
                             cache_dir=cache_dir)


@click.command("eval")
@click.option("--ckpt", type=click.Path(dir_okay=True), default=_default_ckpt, show_default="shipped tiny-mnist",
              help="Checkpoint to evaluate.")
@click.option("--classifier", "classifier_path", type=click.Path(), default=_default_classifier,
              show_default="shipped digit classifier")
@click.option("--n", type=Number(int, 2, 100000), default=500, show_default=True, help="Samples to generate, 2..100000.")
@click.option("--seed", type=Seed, default=0, show_default=True)
@click.option("--temperature", type=Number(float, 0.0, 10.0, low_open=True), default=None,
              help="Scales sigma(E), in (0, 10] [1.0].")
@click.option("--cfg-scale", type=Number(float, 0.0, 20.0), default=None,
              help="Classifier-free guidance scale in [0, 20] [1.0, as fastardiff run].")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Also write a PNG grid of samples.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads.")
@click.option("--head", type=click.Choice(["teacher", "student"]), default=None,
              help="fast-ardiff checkpoints: the diffusion head to sample with [student].")
def eval_command(ckpt, classifier_path, n, seed, temperature, cfg_scale, grid, as_json, threads, head):
    """Sample target-only and score the digits: class accuracy, Fréchet distance, classifier accuracy."""
    from fastardiff.runtime.images import check_destination

    if grid:
        check_destination(grid, "--grid")       # before minutes of sampling
        from fastardiff.runtime.files import RunInputs

        RunInputs().add(ckpt, "the checkpoint").add(classifier_path, "the digit classifier").refuse_output(grid,
                                                                                                         "--grid")
    if not Path(classifier_path).is_file():
        raise FastardiffError(f"digit classifier '{classifier_path}' does not exist; pass --classifier with the "
                              "digit-classifier.pt written by `fastardiff train`")
    import torch

    from .checkpoint import load_checkpoint
    from .classifier import load_classifier
    from .evaluate import DEFAULT_CFG_SCALE, DEFAULT_TEMPERATURE, evaluate, write_grid

    torch.set_num_threads(threads)
    model = load_checkpoint(ckpt)
    if model.config.dataset != "mnist":
        raise FastardiffError(f"'{ckpt}' is a '{model.config.name}' model; eval scores MNIST digits and needs "
                              "a tiny-mnist checkpoint")
    classifier = load_classifier(classifier_path)
    options = {"n": n, "seed": seed, "temperature": DEFAULT_TEMPERATURE if temperature is None else temperature,
               "cfg_scale": DEFAULT_CFG_SCALE if cfg_scale is None else cfg_scale}
    if getattr(model, "family", "drift-ar") == "fast-ardiff":
        from .evaluate import evaluate_fast_ardiff

        metrics, images = evaluate_fast_ardiff(model, classifier, head=head or "student", **options)
    elif head is not None:
        raise FastardiffError(f"--head applies to fast-ardiff checkpoints; '{ckpt}' is a drift-ar checkpoint")
    else:
        metrics, images = evaluate(model, classifier, **options)
    metrics["checkpoint"] = str(ckpt)
    if grid:
        labels = torch.arange(n) % model.config.num_classes  # the labels evaluate() sampled
        rows = [torch.nonzero(labels == c).flatten()[:10] for c in range(model.config.num_classes)]
        metrics["grid"] = str(write_grid(images[torch.cat(rows)], grid, nrow=min(10, n)))
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            click.echo(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")


@click.command("info")
@click.option("--ckpt", type=click.Path(dir_okay=True), default=_default_ckpt, show_default="shipped tiny-mnist")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info_command(ckpt, as_json):
    """Config, parameter counts, calibration and file hashes of a checkpoint."""
    from .checkpoint import file_sha256, load_checkpoint

    model = load_checkpoint(ckpt)
    path = Path(ckpt)
    side = path.with_suffix(".json")
    family = getattr(model, "family", "drift-ar")
    modules = (model.modules() if family == "fast-ardiff" else
               {"target": model.target, "draft": model.draft, "decoder": model.decoder})
    info = {
        "checkpoint": str(path),
        "family": family,
        "config": model.config.to_dict(),
        "config_hash": model.config.config_hash(),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()},
        "calibration": model.calibration.to_dict(),
        "files": {str(path): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}},
        "meta": model.meta,
    }
    if side.is_file():          # (stat: a FIFO beside it is not read)
        info["files"][str(side)] = {"bytes": side.stat().st_size, "sha256": file_sha256(side)}
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"checkpoint   {info['checkpoint']}  (family {family}, config hash {info['config_hash']})")
    cfg = info["config"]
    click.echo("config       " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "class_names"))
    click.echo("parameters   " + ", ".join(f"{k} {v:,}" for k, v in info["parameters"].items())
               + f"  (total {sum(info['parameters'].values()):,})")
    click.echo("calibration  " + ", ".join(f"{k}={v:.4f}" for k, v in info["calibration"].items()
                                           if isinstance(v, float)))
    for f, d in info["files"].items():
        click.echo(f"file         {f}  {d['bytes']:,} bytes  sha256 {d['sha256']}")
    if model.meta.get("train_seconds") is not None:
        click.echo(f"trained      {model.meta.get('train_seconds')} s, recipe {model.meta.get('recipe')}")

"""The tiny-mnist training recipe: classifier, target AR, then draft AR + one-step drifting decoder.

Stages (one global step counter, so a run resumes anywhere):
  1. digit classifier (quality metrics), trained once per output dir;
  2. target AR, steps [0, T_target): MSE of the predicted mean to the next token (feature regression), inputs
     noise-augmented (x + s*eps, s ~ U(0, sigma_max) per token) because sampled prefixes are noisy, and the
     class dropped to the null class 10% of the time (classifier-free guidance);
  3. calibration of the target's entropy (e_max = 99th percentile, mean, std), a frozen copy phi of the target;
  4. joint, steps [T_target, T): total = alpha(t) (L_reg + L_entropy) + (1 - alpha(t)) L_decoder
     - draft (initialised from the target's embeddings, first layers and head): L_reg = ||z_q - z_p||^2 /
       (sigma_p^2 + 0.01) (mean regression weighted by the target's precision, which is what the speculative
       acceptance ratio depends on) plus 0.1 ||z_q - x||^2 to the data; L_entropy = w_E (E_q - E_p)^2 on the
       causal-normalised entropy (drift-ar Eq. 4-5, aligned to the target rather than maximised; w_E = 10
       because sigma(E) mismatch dominates the Gaussian overlap in D = 16 dimensions);
     - decoder: x0 = z_p + sigma(E_p) eps from the teacher-forced target, x_hat = f(x0, c, E_p), drifting loss
       (drift-ar Eq. 8) on pixels and on phi's penultimate hidden states, plus a paired reconstruction
       term rec_weight * ||x_hat - x||^2 that speeds up convergence on a CPU budget;
     - alpha(t): linear 0.95 -> 0.05 (fast-ardiff Eq. 8) or two-phase (drift-ar Eq. 9, T_freeze = 0.8 T,
       the draft frozen afterwards).
  5. calibration of the draft's shallow-layer entropy; the checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastardiff.errors import FastardiffError
from fastardiff.runtime.distribution import SigmaParams, sigma_from_entropy

from .checkpoint import DriftARCheckpoint, atomic_torch_save, save_checkpoint
from .classifier import load_classifier, save_classifier, train_classifier
from .config import Calibration, DriftARConfig, get_config
from .data import BatchSampler, image_tokens, load_digit_split
from .drift_loss import grouped_drift_loss
from .models import build_models

log = logging.getLogger(__name__)

RESUME_FILE = "resume-state.pt"
RESUME_FORMAT = "fastardiff-train-state"


@dataclass
class TrainSettings:
    recipe: str = "tiny-mnist"
    steps: int = 4000
    target_fraction: float = 0.6  # share of the steps spent on the target AR alone
    batch_size: int = 64
    joint_batch_size: int = 80
    target_lr: float = 1e-3
    joint_lr: float = 5e-4
    class_dropout: float = 0.1
    schedule: str = "linear"  # or "two-phase"
    rec_weight: float = 2.0
    # sigma(E) mismatch costs D * (dlog sigma/dE)^2 * dE^2 of KL per token (~3 D dE^2 at typical E); the
    # precision-weighted mean term costs D/2 * reg, so the entropy term is weighted ~6x (rounded up)
    entropy_weight: float = 10.0
    e_max_percentile: float = 99.0
    calibration_images: int = 2000
    classifier_steps: int = 1500
    seed: int = 0
    save_every: int = 200
    # warm start of the one-step decoder from a checkpoint with the same decoder shape (it maps noisy tokens to
    # pixels, which does not depend on the target's depth); the joint stage then fine-tunes it
    init_decoder: str | None = None
    # function-preserving depth growth: the target starts as a shallower trained target (its blocks placed so that
    # the first, penultimate and last layers keep their roles, every other block an identity: zero output
    # projections), then the target stage fine-tunes all of it
    grow_target_from: str | None = None

    @property
    def target_steps(self) -> int:
        return max(1, int(round(self.steps * self.target_fraction)))


def alpha_at(progress: float, schedule: str) -> float:
    """AR-loss weight at joint-phase progress in [0, 1]."""
    if schedule == "linear":  # fast-ardiff Eq. 8
        return 0.95 - (0.95 - 0.05) * progress
    if schedule == "two-phase":  # drift-ar Eq. 9, T_freeze = 0.8 T
        return 0.95 * (1 - progress / 0.8) if progress <= 0.8 else 0.0
    raise FastardiffError(f"unknown schedule '{schedule}'; use linear or two-phase")


def noisy_inputs(tokens: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Noise augmentation of the teacher-forced prefix, per token s ~ U(0, sigma_max)."""
    s = torch.rand(tokens.shape[:-1] + (1,)) * sigma_max
    return tokens + s * torch.randn_like(tokens)


def drop_classes(labels: torch.Tensor, rate: float, null_class: int) -> torch.Tensor:
    return torch.where(torch.rand(labels.shape) < rate, torch.full_like(labels, null_class), labels)


def teacher_forced(model, inputs: torch.Tensor, cond: torch.Tensor, return_hidden: bool = False):
    """forward_sequence on the (noisy) tokens: predictions of the next token for every position."""
    return model.forward_sequence(inputs, cond, return_hidden)


def init_draft_from_target(draft, target) -> None:
    """Copy embeddings, the first draft_layers blocks, the final norm and the head of the target."""
    src = target.state_dict()
    dst = draft.state_dict()
    for name in dst:
        if name in src and src[name].shape == dst[name].shape:
            dst[name] = src[name].clone()
    draft.load_state_dict(dst)


@torch.no_grad()
def entropy_statistics(model, split, cfg: DriftARConfig, which: str, limit: int, batch: int = 250) -> torch.Tensor:
    """Entropies (positions with more than one key) over noisy teacher-forced training digits."""
    model.eval()
    values = []
    images, labels = split.train_images[:limit], split.train_labels[:limit]
    for i in range(0, len(images), batch):
        tokens = image_tokens(images[i:i + batch], cfg.patch)
        _, entropy, shallow = teacher_forced(model, noisy_inputs(tokens, cfg.sigma_max), labels[i:i + batch])
        values.append((entropy if which == "entropy" else shallow)[:, 1:].reshape(-1))
    return torch.cat(values)


def target_step(target, opt, tokens, labels, cfg, s: TrainSettings):
    target.train()
    cond = drop_classes(labels, s.class_dropout, cfg.num_classes)
    mean, _, _ = teacher_forced(target, noisy_inputs(tokens, cfg.sigma_max), cond)
    loss = (mean - tokens).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(target.parameters(), 1.0)
    opt.step()
    return {"mse": loss.item()}


def make_phi(target):
    """drift-ar's feature encoder: a frozen copy of the target up to its penultimate layer."""
    phi = copy.deepcopy(target).eval().requires_grad_(False)
    phi.blocks = phi.blocks[:phi.entropy_layer + 1]
    phi.num_layers = len(phi.blocks)
    phi.shallow_layer = min(phi.shallow_layer, phi.num_layers - 1)
    return phi


def phi_features(phi, tokens, labels):
    """Penultimate hidden states of the teacher-forced frozen target, flattened: [B, (n_cond+N-1) * W]."""
    return teacher_forced(phi, tokens, labels, True)[3][-1].flatten(1)


class RealFeatureCache:
    """phi features of the real training digits, computed once per digit on first use (phi is frozen)."""

    def __init__(self, phi, split, cfg):
        self.phi, self.split, self.cfg = phi, split, cfg
        self.features: torch.Tensor | None = None
        self.done = torch.zeros(len(split.train_images), dtype=torch.bool)

    @torch.no_grad()
    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        todo = idx[~self.done[idx]].unique()
        if len(todo):
            feats = phi_features(self.phi, image_tokens(self.split.train_images[todo], self.cfg.patch),
                                 self.split.train_labels[todo])
            if self.features is None:
                self.features = feats.new_zeros((len(self.done), feats.shape[1]))
            self.features[todo] = feats
            self.done[todo] = True
        return self.features[idx]


def joint_step(models: dict, opt, idx, split, cfg, s: TrainSettings, sigma: SigmaParams, alpha: float):
    draft, decoder, phi = models["draft"], models["decoder"], models["phi"]
    images, labels = split.train_images[idx], split.train_labels[idx]
    tokens = image_tokens(images, cfg.patch)
    cond = drop_classes(labels, s.class_dropout, cfg.num_classes)
    inputs = noisy_inputs(tokens, cfg.sigma_max)
    with torch.no_grad():
        z_p, e_p, _ = teacher_forced(models["target"], inputs, cond)
        sigma_p = sigma_from_entropy(e_p, sigma)
    stats = {"alpha": alpha}
    total = images.new_zeros(())
    if alpha > 0:
        draft.train()
        z_q, e_q, _ = teacher_forced(draft, inputs, cond)
        reg = ((z_q - z_p).pow(2).mean(-1) / (sigma_p.pow(2) + 0.01)).mean() + 0.1 * (z_q - tokens).pow(2).mean()
        ent = (e_q - e_p).pow(2).mean()
        total = total + alpha * (reg + s.entropy_weight * ent)
        stats.update(reg=reg.item(), ent=ent.item())
    # decoder: source x0 ~ N(z_p, sigma(E_p)^2) from the same teacher-forced target pass (rows whose class was
    # dropped carry the unconditional prediction; the decoder is always told the true class)
    decoder.train()
    x0 = z_p + sigma_p.unsqueeze(-1) * torch.randn_like(z_p)
    x_hat = decoder(x0, e_p, labels)
    gen = {"pixels": x_hat.flatten(1), "phi": phi_features(phi, image_tokens(x_hat, cfg.patch), labels)}
    real = {"pixels": images.flatten(1), "phi": models["real_phi"][idx]}
    drift = grouped_drift_loss(gen, real, labels, labels)
    rec = (x_hat - images).pow(2).mean()
    total = total + (1 - alpha) * (drift + s.rec_weight * rec)
    opt.zero_grad(set_to_none=True)
    total.backward()
    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    stats.update(drift=drift.item(), rec=rec.item())
    return stats


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    import math

    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def save_state(path: Path, step: int, models: dict, opts: dict, sampler, calibration, s: TrainSettings,
               elapsed: float) -> None:
    state = {"format": RESUME_FORMAT, "step": step, "settings": dataclasses.asdict(s),
             "models": {k: models[k].state_dict() for k in ("target", "draft", "decoder")},
             "opts": {k: o.state_dict() for k, o in opts.items()}, "sampler": sampler.state_dict(),
             "torch_rng": torch.get_rng_state(), "calibration": calibration.to_dict() if calibration else None,
             "elapsed_seconds": elapsed}
    atomic_torch_save(state, path)


def load_state(path: Path) -> dict:
    if not path.exists():
        raise FastardiffError(f"--resume given but '{path}' does not exist; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / foreign files
        raise FastardiffError(f"'{path}' is not a readable training state ({type(err).__name__}); delete it or "
                              "start without --resume") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise FastardiffError(f"'{path}' is not a fastardiff training state; delete it or start without --resume")
    return state


def train(out_dir: str | Path, s: TrainSettings, resume: bool = False, progress: bool = True,
          stop_after: int | None = None,
          resume_overrides: tuple = ("steps", "save_every", "calibration_images")) -> Path:
    """Run (or resume) the recipe; with stop_after, pause at that step (state saved) and write the checkpoint so far.
    On resume the settings come from the saved state except the fields named in resume_overrides, taken from s
    (e.g. more steps: the schedules are then functions of the new total)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FastardiffError(f"--out '{out_dir}' is a file; pass a directory for the training outputs")
    if not resume and (out_dir / RESUME_FILE).exists():
        raise FastardiffError(f"'{out_dir}' already holds a training run; pass --resume to continue it or "
                              "choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = get_config(s.recipe)
    if cfg.dataset != "mnist":
        raise FastardiffError(f"recipe '{s.recipe}' trains on '{cfg.dataset}', which does not ship here; only the "
                              "tiny-mnist recipes (MNIST) are trainable")
    alpha_at(0.0, s.schedule)  # validates the schedule name
    state_path = out_dir / RESUME_FILE
    state = load_state(state_path) if resume else None
    if state is not None:
        s = TrainSettings(**{**state["settings"], **{k: getattr(s, k) for k in resume_overrides}})
    torch.manual_seed(s.seed)
    start = time.time()
    split = load_digit_split()

    classifier_path = out_dir / "digit-classifier.pt"
    if s.classifier_steps > 0 and not (resume and classifier_path.exists()):
        classifier, meta = train_classifier(split, steps=s.classifier_steps, seed=s.seed, progress=progress)
        save_classifier(classifier_path, classifier, meta)
    if classifier_path.exists():
        log.info("classifier test accuracy %.4f", load_classifier(classifier_path).meta.get("test_accuracy", 0))

    torch.manual_seed(s.seed)  # the models do not depend on whether the classifier was trained in this run
    target, draft, decoder = build_models(cfg)
    if s.init_decoder and state is None:
        warm_start_decoder(decoder, s.init_decoder)
    if s.grow_target_from and state is None:
        grow_target(target, s.grow_target_from)
    models = {"target": target, "draft": draft, "decoder": decoder}
    opts = {"target": torch.optim.AdamW(target.parameters(), lr=s.target_lr, weight_decay=0.01),
            "joint": torch.optim.AdamW(list(draft.parameters()) + list(decoder.parameters()), lr=s.joint_lr,
                                       weight_decay=0.01)}
    sampler = BatchSampler(len(split.train_images), s.batch_size, s.seed)
    step, calibration = 0, None
    if state is not None:
        for k, m in models.items():
            m.load_state_dict(state["models"][k])
        for k, o in opts.items():
            o.load_state_dict(state["opts"][k])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        start -= state.get("elapsed_seconds", 0.0)  # wall time accumulates over resumes
        calibration = Calibration.from_dict(state["calibration"]) if state["calibration"] else None
        log.info("resumed from %s at step %d", state_path, step)

    bar = tqdm(total=s.steps, initial=step, desc="train", disable=not progress)
    end = s.steps if stop_after is None else min(s.steps, stop_after)
    while step < end:
        if step < s.target_steps:
            for g in opts["target"].param_groups:
                g["lr"] = cosine_lr(step, s.target_steps, s.target_lr)
            idx = sampler.next()
            stats = target_step(target, opts["target"], image_tokens(split.train_images[idx], cfg.patch),
                                split.train_labels[idx], cfg, s)
        else:
            if calibration is None:
                calibration = calibrate_target(target, split, cfg, s)
                init_draft_from_target(draft, target)
            if "phi" not in models:
                models["phi"] = make_phi(target)
                models["real_phi"] = RealFeatureCache(models["phi"], split, cfg)
            target.eval().requires_grad_(False)
            sigma = cfg.sigma_params(calibration.e_max)
            joint = step - s.target_steps
            joint_total = s.steps - s.target_steps
            for g in opts["joint"].param_groups:
                g["lr"] = cosine_lr(joint, joint_total, s.joint_lr)
            idx = torch.randint(0, len(split.train_images), (s.joint_batch_size,), generator=sampler.generator)
            alpha = alpha_at(joint / max(1, joint_total), s.schedule)
            stats = joint_step(models, opts["joint"], idx, split, cfg, s, sigma, alpha)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items()})
        if step % s.save_every == 0 or step == end:
            save_state(state_path, step, models, opts, sampler, calibration, s, time.time() - start)
    bar.close()
    if calibration is None:  # fewer steps than the target stage: still write a usable checkpoint
        calibration = calibrate_target(target, split, cfg, s)
        init_draft_from_target(draft, target)
    shallow = entropy_statistics(draft, split, cfg, "shallow", s.calibration_images)
    calibration.draft_shallow_mean = shallow.mean().item()
    calibration.draft_shallow_std = shallow.std().item()
    meta = {"recipe": s.recipe, "settings": dataclasses.asdict(s), "train_seconds": round(time.time() - start, 1),
            "torch": str(torch.__version__), "threads": torch.get_num_threads()}
    ckpt = DriftARCheckpoint(cfg, calibration, target, draft, decoder, meta).eval()
    path = save_checkpoint(out_dir / f"{cfg.name}.pt", ckpt)
    log.info("wrote %s", path)
    return path


def warm_start_decoder(decoder, path: str) -> None:
    from .checkpoint import load_checkpoint

    source = load_checkpoint(path).decoder.state_dict()
    mine = decoder.state_dict()
    if {k: v.shape for k, v in source.items()} != {k: v.shape for k, v in mine.items()}:
        raise FastardiffError(f"--init-decoder '{path}': its decoder has other shapes than recipe's; pass a "
                              "checkpoint with the same decoder_width/decoder_layers/token_dim")
    decoder.load_state_dict(source)
    log.info("decoder warm-started from %s", path)


def grown_positions(old_layers: int, new_layers: int) -> list[int]:
    """Where each of the old blocks goes: 0 -> 0, the last two -> the last two (the penultimate layer's entropy
    sets sigma), the ones between spread evenly."""
    if old_layers > new_layers:
        raise FastardiffError(f"cannot grow a {old_layers}-layer target into {new_layers} layers")
    if old_layers < 3:
        return list(range(old_layers - 1)) + [new_layers - 1]
    middle = [round(i * (new_layers - 2) / (old_layers - 2)) for i in range(1, old_layers - 2)]
    return [0] + middle + [new_layers - 2, new_layers - 1]


def grow_target(target, path: str) -> None:
    """Initialise `target` from the (shallower) target of checkpoint `path` so that it computes the same function."""
    from .checkpoint import load_checkpoint

    source = load_checkpoint(path).target
    positions = grown_positions(source.num_layers, target.num_layers)
    mine = target.state_dict()
    for name, value in source.state_dict().items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            name = f"blocks.{positions[int(index)]}.{rest}"
        if name not in mine or mine[name].shape != value.shape:
            raise FastardiffError(f"--grow-target-from '{path}': parameter '{name}' does not fit this recipe "
                                  "(same width, heads and token shape needed)")
        mine[name] = value.clone()
    target.load_state_dict(mine)
    with torch.no_grad():
        for i, block in enumerate(target.blocks):
            if i not in positions:  # identity block: its residual branches add zero
                for layer in (block.attn.proj, block.mlp[2]):
                    layer.weight.zero_()
                    layer.bias.zero_()
    log.info("target grown from %s: old blocks at %s of %d", path, positions, target.num_layers)


def calibrate_target(target, split, cfg: DriftARConfig, s: TrainSettings) -> Calibration:
    entropy = entropy_statistics(target, split, cfg, "entropy", s.calibration_images)
    e_max = torch.quantile(entropy, s.e_max_percentile / 100).item()
    cal = Calibration(e_max=max(e_max, 1e-3), target_mean=entropy.mean().item(), target_std=entropy.std().item(),
                      extra={"e_max_percentile": s.e_max_percentile,
                             "target_entropy_p01": torch.quantile(entropy, 0.01).item(),
                             "target_entropy_p50": torch.quantile(entropy, 0.5).item()})
    log.info("calibration: e_max %.4f mean %.4f std %.4f", cal.e_max, cal.target_mean, cal.target_std)
    return cal

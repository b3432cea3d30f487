"""On-policy draft distillation: fine-tune only the draft AR on token sequences sampled by the frozen target.

Why: in speculative decoding the draft always conditions on prefixes the target produced (accepted tokens are
distributed as target samples), so the draft should be fitted on that distribution rather than on noisy real
digits (EAGLE and Medusa train their drafts on the target's own generations for the same reason).

Stage `draft-onpolicy` (`fastardiff train --stage draft-onpolicy --init CKPT --samples 20000 ...`):
  1. sample `samples` token sequences from the frozen target with its KV cache (recipes/evaluate.py
     sample_target_only), half at guidance 1.0 and half at guidance 2.0 (the two scales `fastardiff run` is
     measured at), classes cycled, seeded;
  2. fine-tune the draft (initialised from the checkpoint's draft) teacher-forced on those sequences with
     L = L_reg + w_E L_entropy, where
       L_reg     = ||z_q - z_p||^2 / (sigma_p^2 + 0.01), averaged over positions and the D dimensions: the mean
                   term of KL(p || q) for Gaussians (||z_p - z_q||^2 / 2 sigma_q^2 with sigma_q ~ sigma_p);
       L_entropy = (E_q - E_p)^2 on the causal-normalised entropy, which sets sigma_q = sigma(E_q): the variance
                   term of the same KL (w_E = 10, as in the joint stage of recipes/train.py);
     the class is replaced by the null class with probability `class_dropout` so that the unconditional half
     of a guided draft call is fitted on-policy too. The joint stage's 0.1 ||z_q - x||^2 data term is dropped:
     here x is a target sample, whose expectation is z_p, so the term only adds noise.
     alpha(t) story: the recipe's total loss is alpha(t) (L_reg + L_entropy) + (1 - alpha(t)) L_decoder. This
     stage keeps the decoder frozen, i.e. it is the alpha = 1 end of that schedule applied to the draft alone
     (the drift-ar two-phase schedule freezes the draft and trains the decoder; this is the mirror image).
     With --residual-contexts f, f x samples more copies are added in which one token is replaced by a residual
     sample of max(0, p - q) (`residual_context_tokens`: the contexts a round starts from after a rejection,
     where the draft's first-position acceptance is lowest) and the position after it is weighted
     `after_weight`; benchmarks/residual_context_probe.py measured the loop's first-position acceptance
     0.46 -> 0.55 with it (docs/draft-acceptance.md).
  3. recompute the calibration statistics that depend on the draft (draft_shallow_mean/std, hence tau_static)
     exactly as recipes/train.py does (noisy teacher-forced training digits); e_max and the target's entropy
     statistics are copied, since the target is unchanged;
  4. save a new checkpoint: target and decoder weights bit-identical to the input checkpoint, meta extended
     with this stage's settings (the input checkpoint's meta is kept under `previous_stages`).
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
from fastardiff.runtime.distribution import sigma_from_entropy

from .checkpoint import DriftARCheckpoint, load_checkpoint, save_checkpoint
from .data import load_digit_split
from .evaluate import estimate_acceptance, sample_target_only, sigma_params
from .train import cosine_lr, drop_classes, entropy_statistics

log = logging.getLogger(__name__)


@dataclass
class DistillSettings:
    samples: int = 20000
    cfg_scales: tuple = (1.0, 2.0)  # the samples are split evenly over these guidance scales
    temperature: float = 1.0
    steps: int = 3000
    batch_size: int = 128
    lr: float = 3e-4
    warmup: int = 100
    entropy_weight: float = 10.0
    class_dropout: float = 0.2
    sample_batch: int = 500
    residual_contexts: float = 0.0   # extra copies (fraction of `samples`) with one token replaced by a residual
    after_weight: float = 4.0        # loss weight of the position right after that token
    calibration_images: int = 2000
    eval_samples: int = 200  # held-out target samples for the before/after acceptance estimate
    seed: int = 0


@torch.no_grad()
def sample_sequences(ckpt, n: int, cfg_scales, temperature: float, batch: int, generator, progress: bool):
    """n target-sampled token sequences [n, N, D] and their classes [n] (classes cycled, scales interleaved)."""
    from tqdm import tqdm

    tokens, labels = [], []
    per_scale = [n // len(cfg_scales) + (i < n % len(cfg_scales)) for i in range(len(cfg_scales))]
    bar = tqdm(total=n, desc="sample target", disable=not progress)
    for scale, count in zip(cfg_scales, per_scale):
        for i in range(0, count, batch):
            lab = torch.arange(i, min(count, i + batch)) % ckpt.config.num_classes
            t, _ = sample_target_only(ckpt, lab, temperature, scale, generator)
            tokens.append(t)
            labels.append(lab)
            bar.update(len(lab))
    bar.close()
    return torch.cat(tokens), torch.cat(labels)


def distill_loss(target, draft, tokens, cond, sp, entropy_weight: float, weight=None):
    """L_reg + w_E L_entropy of the draft against the frozen target on teacher-forced sequences (weight [B, N]:
    per-position weights of both terms; None: the plain mean)."""
    with torch.no_grad():
        z_p, e_p, _ = target.forward_sequence(tokens, cond)
        sigma_p = sigma_from_entropy(e_p, sp)
    z_q, e_q, _ = draft.forward_sequence(tokens, cond)
    reg_terms = (z_q - z_p).pow(2).mean(-1) / (sigma_p.pow(2) + 0.01)
    ent_terms = (e_q - e_p).pow(2)
    if weight is None:
        reg, ent = reg_terms.mean(), ent_terms.mean()
    else:
        reg, ent = (reg_terms * weight).sum() / weight.sum(), (ent_terms * weight).sum() / weight.sum()
    return reg + entropy_weight * ent, {"reg": reg.item(), "ent": ent.item()}


@torch.no_grad()
def residual_context_tokens(ckpt, tokens, labels, sp, rng, first: int = 3, batch: int = 500):
    """Copies of `tokens` [B, N, D] with one position t in [first, N - 2] per sequence replaced by a sample of the
    residual max(0, p_t - q_t) (target p, draft q, both teacher-forced on the original prefix): the contexts the
    loop's rounds start from after a rejection, where the draft is weakest (docs/draft-acceptance.md).
    Returns (tokens, t [B])."""
    from fastardiff.runtime.sampling import sample_residual

    B, N = tokens.shape[:2]
    first = min(first, max(N - 2, 0))
    t = torch.from_numpy(rng.integers(first, max(N - 1, first + 1), B))
    out = tokens.clone()
    for lo in range(0, B, batch):
        hi = min(B, lo + batch)
        z_p, e_p, _ = ckpt.target.forward_sequence(tokens[lo:hi], labels[lo:hi])
        z_q, e_q, _ = ckpt.draft.forward_sequence(tokens[lo:hi], labels[lo:hi])
        rows, at = torch.arange(hi - lo), t[lo:hi]
        sample = sample_residual(rng, z_p[rows, at].double().numpy(),
                                 sigma_from_entropy(e_p[rows, at], sp).double().numpy(),
                                 z_q[rows, at].double().numpy(), sigma_from_entropy(e_q[rows, at], sp).double().numpy())
        out[lo + rows, at] = torch.from_numpy(sample).to(out.dtype)
    return out, t


def with_residual_contexts(ckpt, tokens, labels, sp, s: "DistillSettings"):
    """(tokens, labels, weight [B', N] or None): the samples plus s.residual_contexts x as many copies with a
    residual token (residual_context_tokens), the position after it weighted s.after_weight."""
    if s.residual_contexts <= 0:
        return tokens, labels, None
    import numpy as np

    m = min(len(tokens), max(1, round(s.residual_contexts * len(tokens))))
    pick = torch.linspace(0, len(tokens) - 1, m).round().long()    # spread over classes and guidance scales
    modified, replaced = residual_context_tokens(ckpt, tokens[pick], labels[pick], sp, np.random.default_rng(s.seed))
    weight = torch.ones(len(tokens) + m, tokens.shape[1])
    weight[len(tokens) + torch.arange(m), (replaced + 1).clamp(max=tokens.shape[1] - 1)] = s.after_weight
    return torch.cat([tokens, modified]), torch.cat([labels, labels[pick]]), weight


def acceptance_estimate(ckpt, tokens, labels, scale: float, temperature: float, seed: int) -> dict:
    """recipes/evaluate.py's teacher-forced acceptance estimate (optimistic; the real loop is the judge)."""
    est = estimate_acceptance(ckpt, tokens, labels, temperature, scale, generator=torch.Generator().manual_seed(seed))
    return {k: round(v, 4) for k, v in est.items()}


def equivalent_command(init, out: Path, s: DistillSettings) -> str:
    """The `fastardiff train` line that runs this stage with these settings (recorded in the checkpoint's meta)."""
    line = (f"fastardiff train --stage draft-onpolicy --init {init} --out {out.parent} --samples {s.samples} "
            f"--steps {s.steps} --lr {s.lr:g} --entropy-weight {s.entropy_weight:g} --seed {s.seed}")
    if s.residual_contexts > 0:
        line += f" --residual-contexts {s.residual_contexts:g}"
    return line + f" --threads {torch.get_num_threads()}"


def distill_draft(init: str | Path, out: str | Path, s: DistillSettings, progress: bool = True) -> Path:
    """Fine-tune the draft of checkpoint `init` on-policy and write the new checkpoint to `out`."""
    from tqdm import tqdm

    if not 0.0 <= s.residual_contexts <= 1.0 or s.after_weight < 0:
        raise FastardiffError(f"--residual-contexts must be in [0, 1] (got {s.residual_contexts:g}) and the weight "
                              f"after a residual token >= 0 (got {s.after_weight:g})")
    if s.samples < 1 or s.steps < 0:
        raise FastardiffError("--samples must be >= 1 and --steps >= 0")
    out = Path(out)
    if out.is_dir():
        raise FastardiffError(f"--out '{out}' is a directory; pass the checkpoint file to write (e.g. {out}/model.pt)")
    start = time.time()
    ckpt = load_checkpoint(init)
    cfg = ckpt.config
    if getattr(ckpt, "family", "drift-ar") != "drift-ar":
        raise FastardiffError(f"'{init}' is a {ckpt.family} checkpoint; --stage draft-onpolicy fine-tunes the Gaussian "
                              "draft of a drift-ar checkpoint: pass one as --init (e.g. recipes/checkpoints/"
                              "tiny-mnist.pt), or train a fast-ardiff draft with --recipe tiny-mnist-fast-ardiff "
                              "--stages draft")
    if cfg.dataset != "mnist":
        raise FastardiffError(f"'{init}' is a '{cfg.name}' model ({cfg.dataset}); only the tiny-mnist recipes "
                              "are trainable here")
    target, decoder = ckpt.target.eval().requires_grad_(False), ckpt.decoder
    draft = copy.deepcopy(ckpt.draft)
    sp = sigma_params(ckpt)
    generator = torch.Generator().manual_seed(s.seed)
    tokens, labels = sample_sequences(ckpt, s.samples, s.cfg_scales, s.temperature, s.sample_batch, generator,
                                      progress)
    eval_gen = torch.Generator().manual_seed(s.seed + 1)
    eval_labels = torch.arange(s.eval_samples) % cfg.num_classes
    eval_tokens = {scale: sample_target_only(ckpt, eval_labels, s.temperature, scale, eval_gen)[0]
                   for scale in s.cfg_scales}
    tokens, labels, weight = with_residual_contexts(ckpt, tokens, labels, sp, s)
    sample_seconds = time.time() - start
    before = {f"cfg{sc:g}": acceptance_estimate(ckpt, eval_tokens[sc], eval_labels, sc, s.temperature, s.seed)
              for sc in s.cfg_scales}
    log.info("acceptance estimate before: %s", before)

    torch.manual_seed(s.seed)
    draft.train().requires_grad_(True)
    opt = torch.optim.AdamW(draft.parameters(), lr=s.lr, weight_decay=0.01)
    bar = tqdm(total=s.steps, desc="distill draft", disable=not progress)
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, s.steps, s.lr, warmup=min(s.warmup, max(1, s.steps // 10)))
        idx = torch.randint(0, len(tokens), (min(s.batch_size, len(tokens)),), generator=generator)
        cond = drop_classes(labels[idx], s.class_dropout, cfg.num_classes)
        loss, stats = distill_loss(target, draft, tokens[idx], cond, sp, s.entropy_weight,
                                   None if weight is None else weight[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items()})
    bar.close()
    draft.eval().requires_grad_(False)

    calibration = copy.deepcopy(ckpt.calibration)
    shallow = entropy_statistics(draft, load_digit_split(), cfg, "shallow", s.calibration_images)
    calibration.draft_shallow_mean = shallow.mean().item()
    calibration.draft_shallow_std = shallow.std().item()
    new = DriftARCheckpoint(cfg, calibration, target, draft, decoder).eval()
    after = {f"cfg{sc:g}": acceptance_estimate(new, eval_tokens[sc], eval_labels, sc, s.temperature, s.seed)
             for sc in s.cfg_scales}
    log.info("acceptance estimate after: %s", after)
    previous = dict(ckpt.meta)
    stages = previous.pop("previous_stages", [])
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}
    stage = {"command": equivalent_command(init, out, s), "settings": settings,
             "seconds": round(time.time() - start, 1), "sample_seconds": round(sample_seconds, 1),
             "threads": torch.get_num_threads(), "torch": str(torch.__version__),
             "acceptance_estimate_before": before, "acceptance_estimate_after": after}
    new.meta = {**previous, "previous_stages": stages + [previous], "stage": "draft-onpolicy", "init": str(init),
                "draft_onpolicy": stage}
    path = save_checkpoint(out, new)
    log.info("wrote %s", path)
    return path

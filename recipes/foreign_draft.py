"""A draft for a model trained elsewhere (the foreign-gaussian family), made from the model itself: the recipe that
distils the shipped model's draft (recipes/distill_draft.py), run on the foreign target.

    python -m fastardiff.recipes.foreign_draft --model fastardiff.recipes.xtransformers_mnist:digits \\
        --ckpt xt-digits.pt --out xt-draft.pt --samples 2000 --steps 1500
    fastardiff-export --model fastardiff.recipes.xtransformers_mnist:digits --ckpt xt-digits.pt \\
        --draft-ckpt xt-draft.pt --target onnx --out xt
    fastardiff-run --engine xt --prompt 3,7 --draft model --gamma 3

1. sample `samples` token sequences from the frozen target (its adapter, through the runtime's own target-only
   loop on the torch backend: the same diagonal-Gaussian sampler as the engines, variance floor included), classes
   cycled, seeded; and, teacher-forced on them, the target's Gaussian p at every position;
2. fit a small causal draft (exporter/foreign/draft.py: the project's AR with few layers and the target's KV
   heads, outputting [mean, log variance]) teacher-forced on those sequences with the KL-matching loss of
   recipes/distill_draft.py made exact for diagonal Gaussians: L = KL(p || q) per token, summed over the D
   dimensions (the mean term sum (mu_p - mu_q)^2 / 2 var_q and the variance term of the same KL: distill_draft's
   L_reg and L_entropy, which there share one isotropic sigma(E)), both variances clamped at the model's floor as
   the sampler clamps them. The draft's output starts at the target's average Gaussian;
3. calibrate the draft's shallow entropy (mean, std over the samples: the static early-stop threshold) and
   estimate the per-token acceptance E_q[min(1, p/q)] teacher-forced on held-out target samples, before and
   after (an indication: the real loop is the judge);
4. write the draft file (state dict + config + calibration + meta, plain data: torch.load(weights_only=True))
   atomically: an interrupted run leaves no half-written file.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastardiff.errors import FastardiffError

log = logging.getLogger("fastardiff.recipes")


@dataclass
class ForeignDraftSettings:
    samples: int = 2000
    steps: int = 1500
    layers: int = 1
    mlp_ratio: int = 2
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    sample_batch: int = 100
    eval_samples: int = 200
    log_every: int = 100
    seed: int = 0


@torch.no_grad()
def sample_target(ckpt, n: int, batch: int, seed: int, what: str = "sample target"):
    """n target-only token sequences [n, N, D] (float32) and their classes [n], classes cycled, seeded: the
    runtime's own loop on the torch backend over the adapter."""
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    engines = TorchEngines(ckpt, max_batch=batch)
    classes = np.arange(n) % ckpt.config.num_classes
    gen = GenerationConfig(mode="target", seed=seed, num_tokens=ckpt.config.num_tokens)
    started, parts = time.perf_counter(), []
    for lo in range(0, n, batch):          # one call per chunk: a log line each (the seed's stream per chunk)
        tokens, _ = generate(engines, classes[lo:lo + batch], GenerationConfig(**{**asdict(gen), "seed": seed + lo}))
        parts.append(tokens)
        log.info("%s: %d / %d sequences (%.0f s)", what, min(n, lo + batch), n, time.perf_counter() - started)
    return torch.from_numpy(np.concatenate(parts).astype(np.float32)), torch.from_numpy(classes)


@torch.no_grad()
def target_params(adapter, tokens, cond, batch: int = 256):
    """The target's [mean, log variance] [B, N, 2D] teacher-forced on sequences tokens [B, N, D]."""
    out = []
    for lo in range(0, len(tokens), batch):
        x, c = tokens[lo:lo + batch], cond[lo:lo + batch]
        inputs = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)     # position 0: the class's start token
        shape = (adapter.num_layers, len(x), adapter.kv_heads, 0, adapter.head_dim)
        out.append(adapter(inputs, torch.zeros(len(x), dtype=torch.long), torch.zeros(shape), torch.zeros(shape),
                           c)[0])
    return torch.cat(out)


def diagonal_kl(p_params, q_params, floor: float):
    """KL(p || q) [...] of N(mean, diag(max(var, floor))) from [mean, log variance] [..., 2D], summed over D."""
    d = p_params.shape[-1] // 2
    lo = math.log(floor)
    mp, lp = p_params[..., :d], p_params[..., d:].clamp(min=lo)
    mq, lq = q_params[..., :d], q_params[..., d:].clamp(min=lo)
    return 0.5 * (lq - lp + (lp.exp() + (mp - mq).pow(2)) / lq.exp() - 1).sum(-1)


@torch.no_grad()
def acceptance_estimate(p_params, q_params, floor: float, seed: int) -> float:
    """E_{x~q}[min(1, p(x)/q(x))] per token (= 1 - TV(p, q)), one draw per token, averaged."""
    from fastardiff.runtime.distribution import diagonal_gaussian
    from fastardiff.runtime.sampling import log_density_ratio

    p_mean, p_sigma = diagonal_gaussian(p_params.double().numpy(), floor)
    q_mean, q_sigma = diagonal_gaussian(q_params.double().numpy(), floor)
    x = q_mean + q_sigma * np.random.default_rng(seed).standard_normal(q_mean.shape)
    ratio = log_density_ratio(x, p_mean, p_sigma, q_mean, q_sigma)
    return float(np.exp(np.minimum(ratio, 0.0)).mean())


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def make_draft(model: str, weights, out, s: ForeignDraftSettings) -> Path:
    """Fit a draft to the foreign model `model` (factory) with weights `weights`; write it to `out`."""
    from fastardiff.exporter.foreign import load_foreign
    from fastardiff.exporter.foreign.draft import ForeignDraft, draft_config, draft_payload, sha256_of

    from .checkpoint import atomic_torch_save

    if s.samples < 2 or s.steps < 0 or s.layers < 1 or s.batch_size < 1:
        raise FastardiffError("--samples must be >= 2, --steps >= 0, --layers >= 1 and --batch >= 1")
    out = Path(out)
    if out.is_dir():
        raise FastardiffError(f"--out '{out}' is a directory; pass the draft file to write (e.g. {out}/draft.pt)")
    started = time.perf_counter()
    ckpt = load_foreign(model, weights)
    cfg, adapter = ckpt.config, ckpt.target
    floor = cfg.variance_floor
    tokens, labels = sample_target(ckpt, s.samples, s.sample_batch, s.seed)
    held, held_labels = sample_target(ckpt, s.eval_samples, s.sample_batch, s.seed + 10_000_019, "held-out samples")
    p_all, p_held = target_params(adapter, tokens, labels), target_params(adapter, held, held_labels)
    sample_seconds = time.perf_counter() - started

    torch.manual_seed(s.seed)
    dcfg = draft_config(cfg, s.layers, s.mlp_ratio)
    draft = ForeignDraft(dcfg)
    d = cfg.token_dim
    draft.init_output(p_all[..., :d].mean((0, 1)), p_all[..., d:].clamp(min=math.log(floor)).mean((0, 1)))

    def held_out(seed: int) -> dict:
        draft.eval()
        with torch.no_grad():
            q = draft.forward_sequence(held, held_labels)[0]
            kl = float(diagonal_kl(p_held, q, floor).mean())
        draft.train()
        return {"kl_per_token": round(kl, 4), "acceptance": round(acceptance_estimate(p_held, q, floor, seed), 4)}

    before = held_out(s.seed)
    log.info("draft: %d layer(s), width %d, %d parameters; held-out before: %s", s.layers, cfg.width,
             sum(p.numel() for p in draft.parameters()), before)
    generator = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(draft.parameters(), lr=s.lr, weight_decay=0.0)
    draft.train()
    loss = torch.tensor(float("nan"))
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.steps, s.lr, min(s.warmup, max(1, s.steps // 10)))
        idx = torch.randint(0, len(tokens), (min(s.batch_size, len(tokens)),), generator=generator)
        q = draft.forward_sequence(tokens[idx], labels[idx])[0]
        loss = diagonal_kl(p_all[idx], q, floor).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            log.info("step %d / %d: KL(p || q) per token %.4f (%.0f s)", step + 1, s.steps, loss.item(),
                     time.perf_counter() - started)
    draft.eval().requires_grad_(False)
    after = held_out(s.seed)
    with torch.no_grad():
        shallow = torch.cat([draft.forward_sequence(tokens[lo:lo + 256], labels[lo:lo + 256])[1]
                             for lo in range(0, len(tokens), 256)])
    meta = {"recipe": "fastardiff.recipes.foreign_draft", "model": model, "weights": str(weights),
            "weights_sha256": sha256_of(weights), "samples": s.samples, "steps": s.steps, "layers": s.layers,
            "mlp_ratio": s.mlp_ratio, "batch_size": s.batch_size, "lr": s.lr, "seed": s.seed,
            "eval_samples": s.eval_samples, "kl_before": before["kl_per_token"], "kl_after": after["kl_per_token"],
            "acceptance_estimate_before": before["acceptance"], "acceptance_estimate_after": after["acceptance"],
            "sample_seconds": round(sample_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__)}
    atomic_torch_save(draft_payload(draft, dcfg, shallow.mean().item(), shallow.std().item(), meta), out)
    log.info("held-out after: %s; wrote %s in %.0f s", after, out, time.perf_counter() - started)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model's factory, package.module:function")
    parser.add_argument("--ckpt", required=True, type=Path, help="the model's state dict (.pt / .safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="draft file to write (.pt)")
    defaults = ForeignDraftSettings()
    for name in ("samples", "steps", "layers", "mlp_ratio", "batch_size", "sample_batch", "eval_samples", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ForeignDraftSettings(**{k: getattr(args, k) for k in asdict(defaults) if hasattr(args, k)})
    try:
        make_draft(args.model, args.ckpt, args.out, settings)
    except FastardiffError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()

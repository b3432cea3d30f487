"""Target-only sampling (pure PyTorch, KV cache) and the quality metrics of `fastardiff eval`.

Sampling: for r = 0..N-1 the target sees [class, x_0 .. x_{r-1}] through its KV cache, and
x_r ~ N(z_r, (temperature * sigma(E_r))^2 I) with classifier-free guidance z = z_u + s (z_c - z_u) over a
[cond; null] batch (sigma from the conditional entropy), the same rule as fastardiff.runtime.sampling.
The decoder then maps the token grid (with its entropy map) to an image in one step.
Metrics: class accuracy of the generated digits by the shipped classifier, Fréchet distance in the classifier's
feature space against the held-out real test digits, the classifier's own accuracy on those real digits, and an
estimate of the draft's per-token acceptance probability E_q[min(1, p/q)] on the target's own samples.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastardiff.runtime.distribution import SigmaParams, sigma_from_entropy

DEFAULT_CFG_SCALE = 1.0  # same default as `fastardiff run`; 2.0 trades diversity (FD) for class accuracy
DEFAULT_TEMPERATURE = 1.0


def sigma_params(ckpt) -> SigmaParams:
    return ckpt.config.sigma_params(ckpt.calibration.e_max)


def guided(model, tokens, lengths, k_cache, v_cache, cond, cfg_scale: float):
    """One cached step of a [cond; null] batch; returns guided mean, conditional entropy, new k/v."""
    mean, entropy, _, new_k, new_v = model(tokens, lengths, k_cache, v_cache, cond)
    if cfg_scale == 1.0:
        return mean, entropy, new_k, new_v
    half = mean.shape[0] // 2
    return mean[half:] + cfg_scale * (mean[:half] - mean[half:]), entropy[:half], new_k, new_v


def target_cached_loop(ckpt, labels: torch.Tensor, cfg_scale: float, num_tokens: int, draw) -> None:
    """The target's own KV-cached AR loop (torch, its own cache handling), shared by the reference samplers:
    for r in 0..num_tokens-1, draw(r, guided mean [B, out] at the last position, conditional entropy [B]) returns
    token r [B, D], which is fed next."""
    cfg, target = ckpt.config, ckpt.target
    B, D = len(labels), cfg.token_dim
    cond = labels if cfg_scale == 1.0 else torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
    rows = len(cond)
    k_cache, v_cache = target.empty_cache(rows, cfg.seq_len)
    lengths = torch.zeros(rows, dtype=torch.long)
    step_input = torch.zeros(rows, cfg.n_cond, D)  # the class slots first (their token values are ignored)
    filled = 0
    for r in range(num_tokens):
        mean, entropy, new_k, new_v = guided(target, step_input, lengths, k_cache, v_cache, cond, cfg_scale)
        K = step_input.shape[1]
        k_cache[:, :, :, filled:filled + K] = new_k
        v_cache[:, :, :, filled:filled + K] = new_v
        filled += K
        lengths += K
        x = draw(r, mean[:, -1], entropy[:, -1])
        step_input = x.unsqueeze(1).repeat(rows // B, 1, 1)


@torch.no_grad()
def sample_target_only(ckpt, labels: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                       cfg_scale: float = DEFAULT_CFG_SCALE, generator: torch.Generator | None = None,
                       num_tokens: int | None = None):
    """Tokens [B, n, D] and their sigma-entropies [B, n] sampled by the target alone (n = num_tokens or all N).
    Written apart from the runtime's loop (torch, its own cache handling): the tests' independent reference."""
    cfg = ckpt.config
    B, N, D = len(labels), num_tokens or cfg.num_tokens, cfg.token_dim
    sp = sigma_params(ckpt)
    tokens = torch.zeros(B, N, D)
    entropies = torch.zeros(B, N)

    def draw(r, mean, entropy):
        sigma = sigma_from_entropy(entropy, sp) * temperature
        tokens[:, r] = mean + sigma.unsqueeze(-1) * torch.randn(B, D, generator=generator)
        entropies[:, r] = entropy
        return tokens[:, r]

    target_cached_loop(ckpt, labels, cfg_scale, N, draw)
    return tokens, entropies


@torch.no_grad()
def decode(ckpt, tokens, entropies, labels, batch: int = 250) -> torch.Tensor:
    return torch.cat([ckpt.decoder(tokens[i:i + batch], entropies[i:i + batch], labels[i:i + batch]).clamp(-1, 1)
                      for i in range(0, len(tokens), batch)])


@torch.no_grad()
def teacher_forced_guided(model, tokens, labels, cfg_scale: float, num_classes: int):
    if cfg_scale == 1.0:
        mean, entropy, _ = model.forward_sequence(tokens, labels)
        return mean, entropy
    mean, entropy, _ = model.forward_sequence(tokens.repeat(2, 1, 1),
                                              torch.cat([labels, torch.full_like(labels, num_classes)]))
    half = len(labels)
    return mean[half:] + cfg_scale * (mean[:half] - mean[half:]), entropy[:half]


@torch.no_grad()
def estimate_acceptance(ckpt, tokens, labels, temperature: float, cfg_scale: float, gamma: int = 4,
                        skip: int = 3, draws: int = 64, generator: torch.Generator | None = None) -> dict:
    """Per-token acceptance probability E_{x~q}[min(1, p(x)/q(x))] of the draft against the target on the
    target's own samples, and the tokens per target call it implies at draft length gamma (no early stop)."""
    cfg = ckpt.config
    z_p, e_p = teacher_forced_guided(ckpt.target, tokens, labels, cfg_scale, cfg.num_classes)
    z_q, e_q = teacher_forced_guided(ckpt.draft, tokens, labels, cfg_scale, cfg.num_classes)
    sp = sigma_params(ckpt)
    s_p = (sigma_from_entropy(e_p, sp) * temperature).double()[:, skip:]
    s_q = (sigma_from_entropy(e_q, sp) * temperature).double()[:, skip:]
    z_p, z_q = z_p.double()[:, skip:], z_q.double()[:, skip:]
    D = z_p.shape[-1]
    eps = torch.randn((draws,) + tuple(z_q.shape), generator=generator, dtype=torch.float64)
    x = z_q + s_q.unsqueeze(-1) * eps
    log_q = -0.5 * eps.pow(2).sum(-1) - D * s_q.log()
    log_p = -0.5 * ((x - z_p) / s_p.unsqueeze(-1)).pow(2).sum(-1) - D * s_p.log()
    accept = (log_p - log_q).clamp(max=0).exp().mean(0)  # [B, N - skip]
    # expected tokens per verify call starting at each position: 1 + a_r + a_r a_{r+1} + ... (gamma terms)
    run = torch.ones_like(accept)
    expected = torch.ones_like(accept)
    for j in range(gamma):
        shifted = torch.nn.functional.pad(accept[:, j:], (0, j), value=0.0)
        run = run * shifted
        expected = expected + run
    return {"acceptance_rate_estimate": accept.mean().item(),
            f"tokens_per_target_call_gamma{gamma}_estimate": expected[:, : accept.shape[1] - gamma].mean().item(),
            "draft_mean_rmse": (z_q - z_p).pow(2).mean().sqrt().item(),
            "entropy_abs_diff": (e_q - e_p).abs()[:, skip:].mean().item()}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [n, d]."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    # a tiny ridge keeps the product well conditioned (ReLU features have dead, constant dimensions)
    ridge = 1e-6 * np.eye(a.shape[1])
    s_a, s_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


@torch.no_grad()
def classifier_features(classifier, images: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    feats, preds = [], []
    for i in range(0, len(images), batch):
        f = classifier.features(images[i:i + batch])
        feats.append(f)
        preds.append(classifier.out(f).argmax(-1))
    return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()


def evaluate(ckpt, classifier, n: int = 500, seed: int = 0, temperature: float = DEFAULT_TEMPERATURE,
             cfg_scale: float = DEFAULT_CFG_SCALE, batch: int = 250, with_acceptance: bool = True):
    """Metrics dict and the generated images [n, C, H, W] in [-1, 1]."""
    from .data import load_digit_split

    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % ckpt.config.num_classes
    start = time.time()
    tokens, entropies = [], []
    for i in range(0, n, batch):
        t, e = sample_target_only(ckpt, labels[i:i + batch], temperature, cfg_scale, gen)
        tokens.append(t)
        entropies.append(e)
    tokens, entropies = torch.cat(tokens), torch.cat(entropies)
    images = decode(ckpt, tokens, entropies, labels)
    sample_seconds = time.time() - start
    split = load_digit_split()
    gen_feat, gen_pred = classifier_features(classifier, images)
    real_feat, real_pred = classifier_features(classifier, split.test_images)
    metrics = {
        "n": n, "seed": seed, "temperature": temperature, "cfg_scale": cfg_scale,
        "class_accuracy": float((gen_pred == labels.numpy()).mean()),
        "frechet_distance": frechet_distance(gen_feat, real_feat),
        "classifier_test_accuracy": float((real_pred == split.test_labels.numpy()).mean()),
        "real_test_digits": len(split.test_images),
        "sampling_seconds": round(sample_seconds, 2),
    }
    if with_acceptance:
        m = min(n, 200)
        metrics.update(estimate_acceptance(ckpt, tokens[:m], labels[:m], temperature, cfg_scale, generator=gen))
    return metrics, images


def write_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, scale: int = 2) -> Path:
    """Images [B, C, H, W] in [-1, 1] -> one PNG grid (written atomically)."""
    from PIL import Image

    path = Path(path)
    imgs = ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    B, C, H, W = imgs.shape
    rows = (B + nrow - 1) // nrow
    grid = np.zeros((rows * (H + 2), nrow * (W + 2), C), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = imgs[i].transpose(1, 2, 0)
    pil = Image.fromarray(grid[..., 0] if C == 1 else grid)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        pil.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def image_metrics(classifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Class accuracy and Fréchet distance of generated digits against the held-out real test digits."""
    from .data import load_digit_split

    split = load_digit_split()
    gen_feat, gen_pred = classifier_features(classifier, images)
    real_feat, real_pred = classifier_features(classifier, split.test_images)
    return {"class_accuracy": float((gen_pred == labels.numpy()).mean()),
            "frechet_distance": frechet_distance(gen_feat, real_feat),
            "classifier_test_accuracy": float((real_pred == split.test_labels.numpy()).mean()),
            "real_test_digits": len(split.test_images)}


@torch.no_grad()
def estimate_cspd_acceptance(ckpt, tokens, labels, head: str = "student", cfg_scale: float = 1.0,
                             temperature: float = 1.0, shared_noise: bool = True, skip: int = 3, draws: int = 4,
                             generator: torch.Generator | None = None) -> float:
    """fast-ardiff: E_{x~q}[min(1, p(x)/q(x))] per token with the CSpD ratio (final-step Gaussian densities times
    the per-step sigma ratios, recipes/diffusion_head.py final_step), draft and target teacher-forced on the
    target's own samples; shared_noise: draft and target run the head on the same trajectory noise (CSpD's
    trajectory alignment), else on independent noise."""
    from .diffusion_head import final_step
    from .fast_ardiff import head_timesteps

    cfg = ckpt.config
    timesteps, net, alpha_bar = head_timesteps(cfg, head), ckpt.head(head), ckpt.alpha_bar
    z_p, _ = teacher_forced_guided(ckpt.target, tokens, labels, cfg_scale, cfg.num_classes)
    z_q, _ = teacher_forced_guided(ckpt.draft, tokens, labels, cfg_scale, cfg.num_classes)
    z_p, z_q = z_p[:, skip:].reshape(-1, cfg.z_dim), z_q[:, skip:].reshape(-1, cfg.z_dim)
    M, S, D = z_p.shape[0], len(timesteps), cfg.token_dim
    total = 0.0
    for _ in range(draws):
        noise_q = torch.randn(M, S, D, generator=generator)
        noise_p = noise_q if shared_noise else torch.randn(M, S, D, generator=generator)
        mu_q, s_q, off_q = final_step(net, z_q, noise_q, timesteps, alpha_bar, temperature)
        mu_p, s_p, off_p = final_step(net, z_p, noise_p, timesteps, alpha_bar, temperature)
        x = mu_q + s_q.unsqueeze(-1) * torch.randn(M, D, generator=generator)
        log_q = -0.5 * ((x - mu_q) / s_q.unsqueeze(-1)).pow(2).sum(-1) - D * s_q.log()
        log_p = -0.5 * ((x - mu_p) / s_p.unsqueeze(-1)).pow(2).sum(-1) - D * s_p.log()
        total += (log_p + off_p - log_q - off_q).double().clamp(max=0).exp().mean().item()
    return total / draws


def evaluate_fast_ardiff(ckpt, classifier, n: int = 500, seed: int = 0, head: str = "student",
                         temperature: float = DEFAULT_TEMPERATURE, cfg_scale: float = DEFAULT_CFG_SCALE,
                         batch: int = 250, with_acceptance: bool = True):
    """`fastardiff eval` for a fast-ardiff checkpoint: target-only samples with one head; (metrics, images)."""
    from .fast_ardiff import decode_tokens, head_timesteps, sample_target_only as sample_fast_ardiff

    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % ckpt.config.num_classes
    start = time.time()
    tokens = torch.cat([sample_fast_ardiff(ckpt, labels[i:i + batch], head, cfg_scale, temperature, gen)
                        for i in range(0, n, batch)])
    images = decode_tokens(ckpt.config, tokens)
    metrics = {"family": "fast-ardiff", "head": head, "head_steps": len(head_timesteps(ckpt.config, head)), "n": n,
               "seed": seed, "temperature": temperature, "cfg_scale": cfg_scale,
               **image_metrics(classifier, images, labels), "sampling_seconds": round(time.time() - start, 2)}
    if with_acceptance:
        m = min(n, 200)
        for shared in (True, False):
            key = "acceptance_rate_estimate" + ("" if shared else "_independent_noise")
            metrics[key] = estimate_cspd_acceptance(ckpt, tokens[:m], labels[:m], "student", cfg_scale, temperature,
                                                    shared, generator=torch.Generator().manual_seed(seed + 1))
    return metrics, images

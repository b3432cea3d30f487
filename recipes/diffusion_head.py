"""fast-ardiff's per-token diffusion head (MAR's DiffLoss shape), its cosine schedule and its sampler.

DiffusionHead(cfg).forward(x_t [M, D], t [M] = timestep / T, z [M, z_dim]) -> (eps [M, D], v [M]):
  input projection of x_t; sinusoidal embedding of t -> MLP; linear embedding of z; c = time + z;
  head_depth residual blocks  x += gate * MLP(LN(x) * (1 + scale) + shift) with (shift, scale, gate) from c;
  a final AdaLN layer -> D noise-prediction channels and one learned-variance logit per token
  (v = sigmoid(logit) in [0, 1]: every step's Gaussian is isotropic, improved DDPM's interpolation
  log var = v log beta + (1 - v) log beta_tilde).

final_step(head, z, traj_noise, timesteps, alpha_bar, temperature) runs the head over a fixed, descending
timestep list (the teacher: all T steps; the student: step_schedule(T, student_steps)), each jump a -> b being
DDPM's posterior q(x_b | x_a, x0_hat) (eq. 7 of Ho et al. for an arbitrary jump), and stops before the last
draw: it returns that last Gaussian N(mean, sigma^2 I) and log_offset = -D sum_i log sigma_i over the earlier
jumps, so that the CSpD acceptance ratio of two models sharing traj_noise is
exp(log N_p(x) + log_offset_p - log N_q(x) - log_offset_q). Pure torch, no data-dependent control flow, no
in-place ops on inputs: traceable by torch.export / torch.onnx with the loop unrolled.
"""
from __future__ import annotations

import math

import torch
from torch import nn

COSINE_S = 0.008
MAX_BETA = 0.999


def cosine_alpha_bar(T: int) -> torch.Tensor:
    """alpha_bar[0..T] (float64) of Nichol & Dhariwal's cosine schedule: alpha_bar[0] = 1, betas clipped at 0.999."""
    f = [math.cos((t / T + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2 for t in range(T + 1)]
    alpha_bar = [1.0]
    for t in range(1, T + 1):
        beta = min(1.0 - f[t] / f[t - 1], MAX_BETA)
        alpha_bar.append(alpha_bar[-1] * (1.0 - beta))
    return torch.tensor(alpha_bar, dtype=torch.float64)


def step_schedule(T: int, steps: int) -> list[int]:
    """Descending timesteps starting at T, `steps` long: T, T-1, ..., 1 when steps == T, else evenly spaced
    (T = 100, steps = 3 -> [100, 67, 33])."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps {steps} must be in 1..{T}")
    return [int(round(T * (steps - i) / steps)) for i in range(steps)]


def variance_floor(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The teacher's posterior variance beta_tilde of its jump 2 -> 1: the lower clip of every log variance."""
    beta = 1 - alpha_bar[2] / alpha_bar[1]
    return beta * (1 - alpha_bar[1]) / (1 - alpha_bar[2])


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [M, dim] of timesteps t [M] (any real values; here timestep/T * 1000)."""
    half = dim // 2
    dtype = t.dtype if t.is_floating_point() else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype).unsqueeze(-1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, c):
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class FinalAdaLNLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """Per-token denoiser eps_theta(x_t, t, z) with a learned isotropic variance coefficient v."""

    FREQ_DIM = 256
    TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000 (the usual sinusoid frequencies)

    def __init__(self, cfg):
        super().__init__()
        w, D = cfg.head_width, cfg.token_dim
        self.token_dim = D
        self.x0_clip = float(cfg.x0_clip)
        self.input_proj = nn.Linear(D, w)
        self.time_embed = nn.Sequential(nn.Linear(self.FREQ_DIM, w), nn.SiLU(), nn.Linear(w, w))
        self.z_embed = nn.Linear(cfg.z_dim, w)
        self.blocks = nn.ModuleList(AdaLNResBlock(w) for _ in range(cfg.head_depth))
        self.final = FinalAdaLNLayer(w, D + 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR's init: xavier linears, N(0, 0.02) time MLP, zero AdaLN modulations and output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for mod in [b.modulation[1] for b in self.blocks] + [self.final.modulation[1], self.final.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor):
        c = self.time_embed(timestep_embedding(t * self.TIME_SCALE, self.FREQ_DIM)) + self.z_embed(z)
        h = self.input_proj(x_t)
        for block in self.blocks:
            h = block(h, c)
        out = self.final(h, c)
        return out[:, :self.token_dim], torch.sigmoid(out[:, self.token_dim])


def jump_coefficients(alpha_bar: torch.Tensor, a: int, b: int):
    """(ab_a, beta, beta_tilde, coef_x0, coef_x) of DDPM's posterior q(x_b | x_a, x0) for a jump a -> b < a:
    mean = coef_x0 x0 + coef_x x_a, variance beta_tilde, with beta = 1 - ab_a / ab_b."""
    ab_a, ab_b = alpha_bar[a], alpha_bar[b]
    beta = 1 - ab_a / ab_b
    beta_tilde = beta * (1 - ab_b) / (1 - ab_a)
    coef_x0 = ab_b.sqrt() * beta / (1 - ab_a)
    coef_x = (ab_a / ab_b).sqrt() * (1 - ab_b) / (1 - ab_a)
    return ab_a, beta, beta_tilde, coef_x0, coef_x


def predict_x0(x, eps, ab_a, x0_clip: float):
    return ((x - (1 - ab_a).sqrt() * eps) / ab_a.sqrt()).clamp(-x0_clip, x0_clip)


def head_jump(head, x, z, a: int, b: int, T: int, alpha_bar, x0_clip: float, floor):
    """One jump a -> b: (posterior mean, log variance [M], x0_hat) from the head's eps and v at (x, a)."""
    ab_a, beta, beta_tilde, coef_x0, coef_x = (c.to(x.dtype) for c in jump_coefficients(alpha_bar, a, b))
    t = torch.full((x.shape[0],), a / T, dtype=x.dtype, device=x.device)
    eps, v = head(x, t, z)
    x0 = predict_x0(x, eps, ab_a, x0_clip)
    mean = coef_x0 * x0 + coef_x * x
    log_var = v * beta.log() + (1 - v) * torch.maximum(beta_tilde, floor).log()
    return mean, log_var, x0


def final_step(head, z: torch.Tensor, traj_noise: torch.Tensor, timesteps: list[int], alpha_bar: torch.Tensor,
               temperature: float, x0_clip: float | None = None):
    """(mean [M, D], sigma [M], log_offset [M]) of the last jump's Gaussian after running the head over
    `timesteps` (descending, ending at b = 0) from x_T = traj_noise[:, 0]; traj_noise [M, len(timesteps), D]
    supplies the draws of every earlier jump. x0_clip defaults to head.x0_clip (the config's)."""
    x0_clip = head.x0_clip if x0_clip is None else x0_clip
    T = alpha_bar.shape[0] - 1
    D = traj_noise.shape[-1]
    floor = variance_floor(alpha_bar).to(traj_noise.dtype)
    x = traj_noise[:, 0]
    log_offset = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    S = len(timesteps)
    for i in range(S):
        a, b = timesteps[i], (timesteps[i + 1] if i + 1 < S else 0)
        mean, log_var, _ = head_jump(head, x, z, a, b, T, alpha_bar, x0_clip, floor)
        sigma = temperature * torch.exp(0.5 * log_var)
        if i + 1 == S:
            return mean, sigma, log_offset
        x = mean + sigma.unsqueeze(-1) * traj_noise[:, i + 1]
        log_offset = log_offset - D * torch.log(sigma)
    raise ValueError("final_step needs at least one timestep")


def sample_tokens(head, z, timesteps, alpha_bar, temperature: float, generator=None) -> torch.Tensor:
    """Tokens [M, D] drawn by the head: final_step with fresh trajectory noise, then the last Gaussian."""
    M, S, D = z.shape[0], len(timesteps), head.token_dim
    noise = torch.randn(M, S + 1, D, generator=generator, dtype=z.dtype)
    mean, sigma, _ = final_step(head, z, noise[:, :S], timesteps, alpha_bar, temperature)
    return mean + sigma.unsqueeze(-1) * noise[:, S]


def q_sample(x0, t: torch.Tensor, alpha_bar, noise):
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise for integer timesteps t [M]."""
    ab = alpha_bar.to(x0.dtype)[t].unsqueeze(-1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def gaussian_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^lv1) || N(mean2, e^lv2)) per element (log variances broadcast)."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2).pow(2) * torch.exp(-log_var2)
                  - 1.0)


def hybrid_loss(head, x0, z, alpha_bar, x0_clip: float, vlb_weight: float, generator=None):
    """Improved DDPM's hybrid loss on a batch of tokens x0 [M, D] with conditions z [M, z_dim], t ~ U{1..T}:
    eps MSE + vlb_weight * the VLB term of the learned variance (KL of q(x_{t-1} | x_t, x0) to the model's
    Gaussian, mean stop-gradient; t = 1: the Gaussian NLL of x0). Returns (loss, stats)."""
    T = alpha_bar.shape[0] - 1
    M = x0.shape[0]
    t = torch.randint(1, T + 1, (M,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = q_sample(x0, t, alpha_bar, noise)
    eps, v = head(x_t, t.to(x0.dtype) / T, z)
    mse = (eps - noise).pow(2).mean()
    ab = alpha_bar.to(x0.dtype)
    ab_a, ab_b = ab[t], ab[t - 1]
    beta = 1 - ab_a / ab_b
    beta_tilde = beta * (1 - ab_b) / (1 - ab_a)
    floor = variance_floor(ab)
    coef_x0 = (ab_b.sqrt() * beta / (1 - ab_a)).unsqueeze(-1)
    coef_x = ((ab_a / ab_b).sqrt() * (1 - ab_b) / (1 - ab_a)).unsqueeze(-1)
    x0_hat = predict_x0(x_t, eps.detach(), ab_a.unsqueeze(-1), x0_clip)
    model_mean = coef_x0 * x0_hat + coef_x * x_t
    true_mean = coef_x0 * x0 + coef_x * x_t
    model_lv = (v * beta.log() + (1 - v) * torch.maximum(beta_tilde, floor).log()).unsqueeze(-1)
    true_lv = torch.maximum(beta_tilde, floor).log().unsqueeze(-1)
    kl = gaussian_kl(true_mean, true_lv, model_mean, model_lv).mean(-1)
    nll = 0.5 * (math.log(2 * math.pi) + model_lv + (x0 - model_mean).pow(2) * torch.exp(-model_lv)).mean(-1)
    vlb = torch.where(t == 1, nll, kl).mean()
    return mse + vlb_weight * vlb, {"eps_mse": mse.item(), "vlb": vlb.item()}

"""Step distillation of the diffusion head (fast-ardiff §4.2): consistency distillation, then DMD.

Both losses act on batches of tokens with their conditions: x0 [M, D] (real tokens, CD only), z [M, z_dim]
(the frozen target's conditioning vectors at those positions), and `rows_per_image` groups of rows that
belong to one image (DMD normalises its gradient per image).

Consistency distillation (stage 1): t ~ U{1..T} (random interpolation points between x_0 and x_T, not the
student's fixed schedule points), x_t = q(x_t | x0); one DDIM (ODE) step of the frozen teacher from t to
t' = max(t - skip, 0); loss ||f_student(x_t, t) - sg(f_ema(x_t', t'))||^2 with the consistency function
f(x, t) = the clamped x0 prediction (f(x, 0) = x), f_ema an exponential moving average of the student. The
student's variance coefficient v is pulled to 0 (posterior variance beta_tilde: the consistency sampler's
re-noising), weight v_weight.

DMD (stage 2): the student draws x0 with final_step's recursion over its timesteps (reparameterised: the
gradient reaches every step's mean; the sigmas are detached); t ~ U{t_lo..t_hi}, x_t = q(x_t | sg(x0)); real x0-prediction from the
teacher, fake from the fake-score head; grad = (x0_fake - x0_real) / mean|x0 - x0_real| (per image, DMD's
normalisation); loss 0.5 ||x0 - sg(x0 - grad)||^2, whose gradient w.r.t. x0 is grad. The fake-score head is
trained online with the eps loss (recipes/diffusion_head.py hybrid_loss) on sg(x0). The DMD stage's L_dist
is L_DMD + cd_anchor * L_CD (the consistency loss against the frozen CD student as its target, the trajectory
term of the joint distillation): measured on our model, pure DMD from the CD student degraded it within 200
steps (class accuracy 0.81 -> 0.63 on 100 samples, speckled backgrounds).
"""
from __future__ import annotations

import torch

from .diffusion_head import final_step, head_jump, hybrid_loss, predict_x0, q_sample, variance_floor


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def consistency_x0(head, x, t: torch.Tensor, z, alpha_bar, x0_clip: float, T: int):
    """f(x, t): the head's clamped x0 prediction at integer timesteps t [M] (rows with t = 0 return x)."""
    ab = alpha_bar.to(x.dtype)[t].unsqueeze(-1)
    eps, v = head(x, t.to(x.dtype) / T, z)
    x0 = predict_x0(x, eps, ab, x0_clip)
    return torch.where((t == 0).unsqueeze(-1), x, x0), v


def consistency_loss(student, ema, teacher, x0, z, alpha_bar, skip: int, x0_clip: float, v_weight: float = 0.1,
                     generator=None):
    """Consistency distillation loss on tokens x0 [M, D] with conditions z; returns (loss, stats)."""
    T = alpha_bar.shape[0] - 1
    M = x0.shape[0]
    t = torch.randint(1, T + 1, (M,), generator=generator)
    t_prev = (t - skip).clamp(min=0)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = q_sample(x0, t, alpha_bar, noise)
    ab = alpha_bar.to(x0.dtype)
    with torch.no_grad():
        eps_teacher, _ = teacher(x_t, t.to(x0.dtype) / T, z)
        ab_t, ab_prev = ab[t].unsqueeze(-1), ab[t_prev].unsqueeze(-1)
        x0_teacher = predict_x0(x_t, eps_teacher, ab_t, x0_clip)
        eps_implied = (x_t - ab_t.sqrt() * x0_teacher) / (1 - ab_t).sqrt()
        x_prev = ab_prev.sqrt() * x0_teacher + (1 - ab_prev).sqrt() * eps_implied  # DDIM (eta = 0) step
        target, _ = consistency_x0(ema, x_prev, t_prev, z, alpha_bar, x0_clip, T)
    pred, v = consistency_x0(student, x_t, t, z, alpha_bar, x0_clip, T)
    cd = (pred - target).pow(2).mean()
    v_mean = v.mean()
    return cd + v_weight * v_mean, {"cd": cd.item(), "v": v_mean.item()}


def student_sample(student, z, timesteps, alpha_bar, temperature: float = 1.0, generator=None,
                   detach_sigma: bool = True):
    """Reparameterised tokens [M, D] of the student: final_step's recursion and the last draw. Gradients reach
    every step's mean; with detach_sigma not the sigmas (DMD then leaves the learned variance to the CD anchor:
    measured, the DMD gradient through sigma inflates the last step's noise)."""
    M, S, D = z.shape[0], len(timesteps), student.token_dim
    noise = torch.randn(M, S + 1, D, generator=generator, dtype=z.dtype)
    if not detach_sigma:
        mean, sigma, _ = final_step(student, z, noise[:, :S], timesteps, alpha_bar, temperature)
        return mean + sigma.unsqueeze(-1) * noise[:, S]
    T = alpha_bar.shape[0] - 1
    floor = variance_floor(alpha_bar).to(z.dtype)
    x = noise[:, 0]
    for i in range(S):
        b = timesteps[i + 1] if i + 1 < S else 0
        mean, log_var, _ = head_jump(student, x, z, timesteps[i], b, T, alpha_bar, student.x0_clip, floor)
        sigma = (temperature * torch.exp(0.5 * log_var)).detach().unsqueeze(-1)
        x = mean + sigma * noise[:, i + 1]
    return x


def dmd_loss(student, teacher, fake, z, timesteps, alpha_bar, rows_per_image: int, x0_clip: float,
             t_range: tuple = (0.02, 0.98), generator=None):
    """DMD generator loss on the student's samples for conditions z [M, z_dim]; returns (loss, x0 sample, stats)."""
    T = alpha_bar.shape[0] - 1
    x0 = student_sample(student, z, timesteps, alpha_bar, generator=generator)
    M, D = x0.shape
    lo, hi = max(1, int(t_range[0] * T)), max(1, int(t_range[1] * T))
    t = torch.randint(lo, hi + 1, (M,), generator=generator)
    with torch.no_grad():
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        x_t = q_sample(x0.detach(), t, alpha_bar, noise)
        ab = alpha_bar.to(x0.dtype)[t].unsqueeze(-1)
        tt = t.to(x0.dtype) / T
        x0_real = predict_x0(x_t, teacher(x_t, tt, z)[0], ab, x0_clip)
        x0_fake = predict_x0(x_t, fake(x_t, tt, z)[0], ab, x0_clip)
        per_image = (x0.detach() - x0_real).abs().view(-1, rows_per_image * D).mean(-1, keepdim=True)
        weight = 1.0 / per_image.clamp(min=1e-3)
        grad = ((x0_fake - x0_real).view(-1, rows_per_image * D) * weight).view(M, D)
        grad = torch.nan_to_num(grad)
    loss = 0.5 * (x0 - (x0 - grad).detach()).pow(2).mean()  # d loss / d x0 = grad / (M D), as DMD's mse
    return loss, x0.detach(), {"dmd": loss.item(), "grad_norm": grad.norm(dim=-1).mean().item()}


def fake_score_loss(fake, x0_student, z, alpha_bar, x0_clip: float, vlb_weight: float, generator=None):
    """The fake-score head's denoising loss on the student's (detached) samples."""
    loss, stats = hybrid_loss(fake, x0_student, z, alpha_bar, x0_clip, vlb_weight, generator)
    return loss, {"fake_" + k: v for k, v in stats.items()}

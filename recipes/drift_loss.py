"""The drifting loss of drift-ar Eq. 8 with an anti-symmetric kernel field V_{p,q} (Deng et al., drifting models).

For generated features x (one row per sample), real features y+ (p) and generated features y- (q):
    V_{p,q}(x) = sum_j w+_j (y+_j - x)  -  sum_j w-_j (y-_j - x)
with kernel weights from exp(-||x - y|| / tau), softmax-normalised over positives and negatives together
(rows and columns, geometric mean). Swapping p and q flips the sign (V_{p,q} = -V_{q,p}); when q = p the
attraction and repulsion cancel and V = 0. Each feature group is normalised so that its mean pairwise
distance is sqrt(dim) (scale-free temperatures), the field of each temperature in {0.02, 0.05, 0.2} is
normalised to unit mean square, and the loss is || phi(x) - stopgrad(phi(x) + V) ||^2 (Eq. 8).
"""
from __future__ import annotations

import torch

KERNEL_TEMPERATURES = (0.02, 0.05, 0.2)


def drifting_field(x: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float,
                   exclude_self: bool = True) -> torch.Tensor:
    """V_{p,q}(x) for x [G, C], positives [P, C] (samples of p), negatives [M, C] (samples of q).

    With exclude_self, negatives[i] is x[i] itself (the generated batch) and is left out of row i.
    """
    dim = x.shape[-1]
    d_pos = torch.cdist(x, positives)
    d_neg = torch.cdist(x, negatives)
    if exclude_self:
        d_neg = d_neg + torch.eye(x.shape[0], negatives.shape[0], dtype=x.dtype, device=x.device) * 1e6
    logits = -torch.cat([d_pos, d_neg], dim=1) / (temperature * dim**0.5)
    weights = (logits.softmax(dim=1) * logits.softmax(dim=0)).sqrt()
    w_pos, w_neg = weights[:, :positives.shape[0]], weights[:, positives.shape[0]:]
    # anti-symmetric combination: attraction weighted by total repulsion mass and vice versa
    w_pos_bal = w_pos * w_neg.sum(dim=1, keepdim=True)
    w_neg_bal = w_neg * w_pos.sum(dim=1, keepdim=True)
    attraction = w_pos_bal @ positives - w_pos_bal.sum(1, keepdim=True) * x
    repulsion = w_neg_bal @ negatives - w_neg_bal.sum(1, keepdim=True) * x
    return attraction - repulsion


def normalise_scale(generated: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale both feature sets (by one detached factor) so that their mean cross distance is sqrt(dim)."""
    with torch.no_grad():
        scale = torch.cdist(generated, real).mean() / generated.shape[-1] ** 0.5
    scale = scale.clamp(min=1e-6)
    return generated / scale, real / scale


def drift_loss(generated: torch.Tensor, real: torch.Tensor, temperatures=KERNEL_TEMPERATURES) -> torch.Tensor:
    """Eq. 8 for one feature group of one class: generated [G, C] (with grad), real [P, C] (no grad)."""
    gen, pos = normalise_scale(generated.float(), real.float().detach())
    with torch.no_grad():
        field = torch.zeros_like(gen)
        g = gen.detach()
        for t in temperatures:
            v = drifting_field(g, pos, g, t)
            field += v / v.pow(2).mean().sqrt().clamp(min=1e-8)
        target = g + field
    return (gen - target).pow(2).sum(-1).mean() / gen.shape[-1]


def grouped_drift_loss(generated: dict, real: dict, gen_labels: torch.Tensor,
                       real_labels: torch.Tensor) -> torch.Tensor:
    """Sum over feature groups (name -> [B, C]) of the class-conditional drift loss averaged over classes."""
    total = generated[next(iter(generated))].new_zeros(())
    classes = [c for c in gen_labels.unique().tolist() if (real_labels == c).sum() > 1 and (gen_labels == c).sum() > 1]
    for name in generated:
        for c in classes:
            total = total + drift_loss(generated[name][gen_labels == c], real[name][real_labels == c]) / len(classes)
    return total

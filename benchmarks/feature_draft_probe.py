"""Probe: does a one-layer draft fed the target's last hidden state (EAGLE-style) accept more often?

Teacher-forced, in torch, on the shipped drift-ar checkpoint (docs/draft-acceptance.md has the result):
target-sampled sequences, the shipped draft plus LayerNorm + Linear(f) of the target's final hidden state f at
position p - d and an embedding of the anchor distance d (0 = no anchor), trained with the on-policy
distillation loss (L_reg + 10 L_entropy, recipes/distill_draft.py) with a random d per position, then the
held-out acceptance E_q[min(1, p/q)] per fixed distance.

    python benchmarks/feature_draft_probe.py --train 3000 --steps 2500
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from fastardiff.recipes.checkpoint import default_checkpoint_path, load_checkpoint
from fastardiff.recipes.entropy_attention import get_entropy_attention
from fastardiff.recipes.evaluate import sample_target_only, sigma_params
from fastardiff.runtime.distribution import sigma_from_entropy

MAX_DISTANCE = 6


class FeatureDraft(nn.Module):
    """The draft AR with an anchor feature and its distance added to each input embedding."""

    def __init__(self, draft, width: int):
        super().__init__()
        self.draft = copy.deepcopy(draft)
        self.feature = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))
        nn.init.zeros_(self.feature[1].weight)
        nn.init.zeros_(self.feature[1].bias)
        self.distance = nn.Embedding(MAX_DISTANCE + 1, width)
        nn.init.zeros_(self.distance.weight)

    def forward(self, tokens, cond, hidden, distance):
        """Teacher-forced over whole sequences; position p reads hidden[p - distance[p]] (distance 0: none)."""
        m, cfg = self.draft, self.draft.cfg
        B, nc = tokens.shape[0], cfg.n_cond
        inputs = torch.cat([torch.zeros(B, nc, tokens.shape[-1]), tokens[:, :-1]], 1)
        P = inputs.shape[1]
        lengths = torch.zeros(B, dtype=torch.long)
        x = m.embed(inputs, lengths, cond)
        source = (torch.arange(P).view(1, P) - distance).clamp(min=0)
        f = torch.gather(hidden, 1, source.unsqueeze(-1).expand(B, P, hidden.shape[-1]))
        x = x + torch.where((distance > 0).unsqueeze(-1), self.feature(f), torch.zeros_like(f)) + self.distance(distance)
        k_cache, v_cache = m.empty_cache(B, 0)
        entropy = None
        for i, block in enumerate(m.blocks):
            impl = get_entropy_attention(m.attention_impl) if i == m.entropy_layer else None
            x, e, _, _ = block(x, k_cache[i], v_cache[i], lengths, impl)
            entropy = e if i == m.entropy_layer else entropy
        return m.head(m.norm(x))[:, nc - 1:], entropy[:, nc - 1:]


def acceptance(z_q, e_q, z_p, e_p, sp, generator, draws: int = 32) -> torch.Tensor:
    """E_{x~q}[min(1, p(x)/q(x))] per token (Monte Carlo)."""
    s_q, s_p = sigma_from_entropy(e_q, sp).double(), sigma_from_entropy(e_p, sp).double()
    z_q, z_p, D = z_q.double(), z_p.double(), z_p.shape[-1]
    eps = torch.randn((draws,) + tuple(z_q.shape), generator=generator, dtype=torch.float64)
    x = z_q + s_q.unsqueeze(-1) * eps
    log_q = -0.5 * eps.pow(2).sum(-1) - D * s_q.log()
    log_p = -0.5 * ((x - z_p) / s_p.unsqueeze(-1)).pow(2).sum(-1) - D * s_p.log()
    return (log_p - log_q).clamp(max=0).exp().mean(0)


def valid(distance: torch.Tensor) -> torch.Tensor:
    P = distance.shape[1]
    return torch.where(torch.arange(P).view(1, P) - distance >= 0, distance, torch.zeros_like(distance))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--eval", type=int, default=400)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.time()
    ckpt = load_checkpoint(default_checkpoint_path())
    cfg, sp = ckpt.config, sigma_params(ckpt)
    target = ckpt.target.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    total = args.train + args.eval
    labels = torch.arange(total) % cfg.num_classes
    tokens = torch.cat([sample_target_only(ckpt, labels[i:i + 500], 1.0, 1.0, gen)[0] for i in range(0, total, 500)])
    with torch.no_grad():
        outs = [target.forward_sequence(tokens[i:i + 500], labels[i:i + 500], return_hidden=True)
                for i in range(0, total, 500)]
    z_p, e_p = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    hidden = torch.cat([o[3][-1] for o in outs])              # the target's final hidden state, every position
    print(f"{total} target samples and features in {time.time() - started:.0f} s")
    held = slice(args.train, None)
    with torch.no_grad():
        z_q, e_q, _ = ckpt.draft.forward_sequence(tokens[held], labels[held])
    base = acceptance(z_q, e_q, z_p[held], e_p[held], sp, gen)[:, 3:].mean().item()
    model = FeatureDraft(ckpt.draft, cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    P = cfg.n_cond + cfg.num_tokens - 1
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        idx = torch.randint(0, args.train, (128,), generator=gen)
        distance = valid(torch.randint(1, MAX_DISTANCE + 1, (128, P), generator=gen))
        z, e = model(tokens[idx], labels[idx], hidden[idx], distance)
        s_p = sigma_from_entropy(e_p[idx], sp)
        loss = ((z - z_p[idx]).pow(2).mean(-1) / (s_p.pow(2) + 0.01)).mean() + 10 * (e - e_p[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 500 == 0:
            print(f"step {step} loss {loss.item():.4f}")
    print(f"shipped draft (tokens only): acceptance {base:.3f}")
    with torch.no_grad():
        for d in list(range(1, MAX_DISTANCE + 1)) + [0]:
            z, e = model(tokens[held], labels[held], hidden[held], valid(torch.full((args.eval, P), d)))
            a = acceptance(z, e, z_p[held], e_p[held], sp, gen)[:, 3:].mean().item()
            print(f"feature draft, {'no anchor' if d == 0 else f'anchor distance {d}'}: acceptance {a:.3f}")
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

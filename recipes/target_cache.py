"""The frozen target's outputs on the training digits, computed once and cached on disk (fast-ardiff recipe).

The fast-ardiff stages train only the last blocks of the target, then freeze it: its inputs to those blocks
(`hidden_cache`) and later its z / entropy on every digit (`target_outputs`, keyed by a hash of its weights)
are computed once, for the real and for the null class, and looked up per batch (`pick`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .checkpoint import atomic_torch_save


class PrecomputedTarget:
    """Stands in for the frozen target in distill_loss: returns its outputs cached for this batch."""

    def __init__(self, z, entropy):
        self.outputs = (z, entropy, None)

    def forward_sequence(self, tokens, cond):
        return self.outputs


def run_last_blocks(target, hidden_in, start: int):
    """The target from block `start` on, teacher-forced with an empty cache: (z [B, P, z_dim], entropy [B, P])."""
    from .entropy_attention import get_entropy_attention

    B = hidden_in.shape[0]
    k_cache, v_cache = target.empty_cache(B, 0)
    lengths = torch.zeros(B, dtype=torch.long)
    impl = get_entropy_attention(target.attention_impl)
    x, entropy = hidden_in, None
    for i in range(start, target.num_layers):
        x, e, _, _ = target.blocks[i](x, k_cache[i], v_cache[i], lengths, impl if i == target.entropy_layer else None)
        entropy = e if e is not None else entropy
    sl = slice(target.cfg.n_cond - 1, None)  # position n_cond-1+r conditions token r
    return target.head(target.norm(x))[:, sl], (entropy[:, sl] if entropy is not None else None)


@torch.no_grad()
def hidden_cache(target, tokens, labels, null_class: int, start: int, batch: int = 250) -> dict:
    """Inputs of block `start` on the teacher-forced digits, for the real classes and for the null class."""
    out = {}
    for key, lab in (("cond", labels), ("null", torch.full_like(labels, null_class))):
        parts = []
        for i in range(0, len(tokens), batch):
            hidden = target.forward_sequence(tokens[i:i + batch], lab[i:i + batch], return_hidden=True)[3]
            parts.append(hidden[start - 1] if start > 0 else embedded_inputs(target, tokens[i:i + batch], lab[i:i + batch]))
        out[key] = torch.cat(parts)
    return out


def embedded_inputs(target, tokens, labels):
    """The input of block 0 of the teacher-forced sequence [condition, x_0 .. x_{N-2}]."""
    pad = torch.zeros(tokens.shape[0], target.cfg.n_cond, tokens.shape[-1])
    return target.embed(torch.cat([pad, tokens[:, :-1]], dim=1), torch.zeros(tokens.shape[0], dtype=torch.long), labels)


def target_hash(target) -> str:
    h = hashlib.sha256()
    for k, v in sorted(target.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def target_outputs(target, tokens, labels, cfg, cache_dir: Path, batch: int = 250) -> dict:
    """The frozen target's z and entropy on the digits (real and null class), cached on disk by weights hash."""
    path = cache_dir / f"target-outputs-{target_hash(target)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    start = max(0, min(target.entropy_layer, target.num_layers - 2))
    hidden = hidden_cache(target, tokens, labels, cfg.num_classes, start, batch)
    out = {}
    for key in ("cond", "null"):
        zs, es = zip(*(run_last_blocks(target, hidden[key][i:i + batch], start) for i in range(0, len(tokens), batch)))
        out[f"z_{key}"], out[f"e_{key}"] = torch.cat(zs), torch.cat(es)
    atomic_torch_save(out, path)
    return out


def pick(cache: dict, kind: str, idx, use_null: torch.Tensor):
    """Rows idx of cache[kind_cond] / cache[kind_null] per image (use_null [B] bool)."""
    c, n = cache[f"{kind}_cond"][idx], cache[f"{kind}_null"][idx]
    return torch.where(use_null.view(-1, *([1] * (c.dim() - 1))), n, c)

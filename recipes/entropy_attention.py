"""Entropy attention: attention output plus the per-row entropy of the attention probabilities.

One op, one definition of its semantics (this reference; kernels are tested against it):

    entropy_attention(q, k, v, lengths, causal_offset, scale, normalize) -> (out [B,H,K,Dh], entropy [B,H,K])

q holds the K new tokens of each sample, at positions lengths[b] .. lengths[b]+K-1. k/v hold T keys: the
first `causal_offset` are the KV cache (only the first lengths[b] of them are valid for sample b), the last K
are the new tokens themselves. Query i sees cache keys j < lengths[b] and new keys causal_offset..causal_offset+i,
i.e. n_i = lengths[b] + i + 1 keys. causal_offset=None: k/v are a cache buffer that already holds the new tokens at
positions lengths[b] .. lengths[b]+K-1 (the in-place engines, models.py `in_buffer`), so query i sees keys
j <= lengths[b] + i: the same keys in buffer order. With normalize=True the entropy is divided by log(n_i) (0 when n_i = 1):
the causal-normalised entropy of drift-ar Eq. 4, in [0, 1].
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def visible_keys_mask(lengths: torch.Tensor, num_queries: int, num_keys: int, causal_offset: int | None) -> torch.Tensor:
    """Bool mask [B, 1, K, T]: True where query i of sample b may attend key j (causal_offset None: keys are
    the buffer's positions, j <= lengths[b] + i)."""
    j = torch.arange(num_keys, device=lengths.device).view(1, 1, 1, num_keys)
    i = torch.arange(num_queries, device=lengths.device).view(1, 1, num_queries, 1)
    if causal_offset is None:
        return j <= lengths.view(-1, 1, 1, 1) + i
    cached = j < lengths.view(-1, 1, 1, 1)
    new = (j >= causal_offset) & (j - causal_offset <= i)
    return cached & (j < causal_offset) | new


def visible_keys_bias(lengths: torch.Tensor, num_queries: int, num_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """The in-place buffer's mask (causal_offset None) as an additive bias [B, 1, K, T]: 0 where query i may attend
    key j (j <= lengths[b] + i), -inf elsewhere."""
    mask = visible_keys_mask(lengths, num_queries, num_keys, None)
    return torch.zeros(mask.shape, dtype=dtype, device=lengths.device).masked_fill(~mask, float("-inf"))


def attended_key_count(lengths: torch.Tensor, num_queries: int) -> torch.Tensor:
    """n_i = lengths[b] + i + 1, shape [B, 1, K]."""
    i = torch.arange(num_queries, device=lengths.device).view(1, 1, num_queries)
    return (lengths.view(-1, 1, 1) + i + 1).to(torch.float32)


def entropy_attention_reference(q, k, v, lengths, causal_offset: int, scale: float, normalize: bool = True):
    """Decomposed form: materialises the probabilities. Exported as standard ONNX ops by the `onnx` target."""
    num_q, num_k = q.shape[-2], k.shape[-2]
    mask = visible_keys_mask(lengths, num_q, num_k, causal_offset)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    log_norm = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - log_norm)
    out = torch.matmul(probs, v.float()).to(q.dtype)
    # H = log l + m - sum(p * s): masked entries have p = 0; their score is zeroed before the product so that
    # neither the forward nor the backward ever forms 0 * -inf (the draft's entropy loss backpropagates here)
    weighted = (probs * torch.where(mask, scores, torch.zeros_like(scores))).sum(-1)
    entropy = log_norm.squeeze(-1) - weighted
    if normalize:
        n = attended_key_count(lengths, num_q)
        log_n = torch.log(n)
        entropy = torch.where(n > 1, entropy / torch.clamp(log_n, min=1e-6), torch.zeros_like(entropy))
    return out, entropy.to(q.dtype)


# Implementations by name. Kernels register themselves here (e.g. "triton" from fastardiff.recipes.triton_attention,
# "plugin" by the TensorRT export pass); models pick one by name, never through a global switch.
ENTROPY_ATTENTION_IMPLS: dict[str, Callable] = {"reference": entropy_attention_reference}


def get_entropy_attention(name: str) -> Callable:
    if name not in ENTROPY_ATTENTION_IMPLS and name == "triton":
        from . import triton_attention  # noqa: F401  registers "triton"
    if name not in ENTROPY_ATTENTION_IMPLS:
        raise ValueError(f"unknown entropy attention implementation '{name}'; known: {sorted(ENTROPY_ATTENTION_IMPLS)}")
    return ENTROPY_ATTENTION_IMPLS[name]


def default_attention_impl(device) -> str:
    """The implementation a model on `device` should use: the fused Triton op on CUDA when triton is installed,
    the reference otherwise (callers pass it to ARTransformer(..., attention_impl=...); no global switch)."""
    if torch.device(device).type != "cuda":
        return "reference"
    from fastardiff.errors import MissingDependencyError

    try:
        get_entropy_attention("triton")
    except MissingDependencyError:
        return "reference"
    return "triton"


def native_attention(q, k, v, lengths, causal_offset: int, scale: float):
    """Layers whose entropy is unused: the backend's native attention (SDPA), same mask."""
    mask = visible_keys_mask(lengths, q.shape[-2], k.shape[-2], causal_offset)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def biased_attention(q, k, v, bias: torch.Tensor, scale: float):
    """softmax(q k^T * scale + bias) v with the additive mask of `visible_keys_bias`: the in-place engines' layers
    whose entropy is unused. The same values as native_attention; exported, it is five nodes a layer with the
    mask built once per call, where the exporter's SDPA form rebuilds the mask, transposes through reshapes and
    guards NaN in every layer (ONNX Runtime, 12-layer target, batch 1: a 1-token call 10-20 % faster, 17 tokens
    17 %)."""
    return torch.matmul(torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)) + bias, dim=-1), v)


def brute_force_row_entropy(probs_row: list[float]) -> float:
    """-sum p log p over one row (used by tests as an independent oracle)."""
    return -sum(p * math.log(p) for p in probs_row if p > 0)

"""Architecture adapter for Hugging Face causal backbones (`LlamaModel`, `Qwen2Model`) fed `inputs_embeds`, with the
user's token embedding (`embed`: token [..., D] -> hidden) and per-token head (`head`: hidden -> [mean, log variance]
[..., 2D], the two halves concatenated).

As for x-transformers (foreign/xtransformers.py), the library's own modules run wherever they act on one token at a
time (every RMSNorm, MLP with its activation and biases, the q/k/v/o projections with their biases), and only the
attention over the sequence is re-implemented with the caller's KV cache: rotary positions from the backbone's own
inverse frequencies and attention scaling (HF's split-half convention), grouped-query attention by repeating each
key-value head over its group. Refused in one line: other rope types than default / linear, sliding-window attention.
"""
from __future__ import annotations

import torch
from torch import nn

from fastardiff.errors import CheckpointError

from .xtransformers import gaussian_entropy

LIBRARY = "transformers"
SUPPORTED = ("LlamaModel", "Qwen2Model")


def is_hf_backbone(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def check_supported(backbone, head, embed) -> None:
    name = type(backbone).__name__
    if name not in SUPPORTED:
        raise CheckpointError(f"Hugging Face model {name} is not supported; fastardiff adapts the causal backbones "
                              f"{', '.join(SUPPORTED)} (fed inputs_embeds)")
    config = backbone.config
    if getattr(config, "is_decoder", True) is False or getattr(config, "use_bidirectional_attention", False):
        raise CheckpointError(f"the {name} is configured bidirectional (use_bidirectional_attention): it cannot be "
                              "verified causally, so speculative decoding cannot be exact")
    if head is None:
        raise CheckpointError(f"the {name} has no per-token head: pass ForeignModel(head=...) mapping a hidden state "
                              "to [mean, log variance] of the next token (2 x token_dim outputs)")
    if embed is None:
        raise CheckpointError(f"the {name} has no token embedding: pass ForeignModel(embed=...) mapping a token "
                              "[..., token_dim] to the backbone's hidden size (its inputs_embeds)")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in ("default", "linear"):
        raise CheckpointError(f"{name} option rope_parameters.rope_type='{rope}' is not supported (the adapter "
                              "reproduces default and linear rope); retrain without it")
    if any(getattr(layer.self_attn, "sliding_window", None) for layer in backbone.layers):
        raise CheckpointError(f"{name} option use_sliding_window is not supported (the adapter attends over the "
                              "whole prefix); retrain without it")


class HFCausalAR(nn.Module):
    """The engine contract over a Hugging Face backbone (see XTransformersAR for the outputs)."""

    def __init__(self, backbone, head, embed, start_tokens, variance_floor: float):
        super().__init__()
        check_supported(backbone, head, embed)
        self.backbone, self.head, self.embed = backbone, head, embed
        self.register_buffer("start_tokens", torch.as_tensor(start_tokens, dtype=torch.float32).clone())
        self.variance_floor = variance_floor
        config = backbone.config
        self.num_layers = len(backbone.layers)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = backbone.layers[0].self_attn.head_dim

    def architecture(self) -> dict:
        config = self.backbone.config
        return {"class": type(self.backbone).__name__, "layers": self.num_layers, "hidden": config.hidden_size,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "mlp": getattr(config, "hidden_act", "?"), "positions": "rotary (split-half)"}

    def _rotary(self, positions, dtype):
        rotary = self.backbone.rotary_emb
        freqs = positions.unsqueeze(-1).float() * rotary.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rotary.attention_scaling
        return (emb.cos() * scale).to(dtype).unsqueeze(1), (emb.sin() * scale).to(dtype).unsqueeze(1)

    @staticmethod
    def _rotate(t, cos, sin):
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

    def _attend(self, attn, x, cos, sin, k_cache, v_cache, lengths):
        B, K, _ = x.shape
        q = attn.q_proj(x).view(B, K, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, K, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, K, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        keys, values = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)
        if self.kv_heads != self.heads:     # HF's repeat_kv: each key-value head repeated over its group
            keys = keys.repeat_interleave(self.heads // self.kv_heads, 1)
            values = values.repeat_interleave(self.heads // self.kv_heads, 1)
        S = k_cache.shape[2]
        j = torch.arange(S + K, device=x.device).view(1, 1, S + K)
        i = torch.arange(K, device=x.device).view(1, K, 1)
        cached = j < S                                     # (no Where over booleans: ONNX Runtime has none)
        visible = (cached & (j < lengths.view(B, 1, 1))) | (~cached & (j - S <= i))
        scores = torch.matmul(q, keys.transpose(-1, -2)) * attn.scaling
        scores = scores.masked_fill(~visible.unsqueeze(1), torch.finfo(scores.dtype).min)
        out = torch.matmul(scores.softmax(-1), values).transpose(1, 2).reshape(B, K, -1)
        return attn.o_proj(out), k, v

    def forward(self, tokens, lengths, k_cache, v_cache, cond, shallow: bool = False):
        B, K, _ = tokens.shape
        positions = lengths.view(-1, 1) + torch.arange(K, device=tokens.device).view(1, K)
        start = self.start_tokens[cond.clamp(0, self.start_tokens.shape[0] - 1)].unsqueeze(1)
        x = self.embed(torch.where((positions < 1).unsqueeze(-1), start.to(tokens.dtype), tokens))
        cos, sin = self._rotary(positions, x.dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.backbone.layers):
            out, k, v = self._attend(layer.self_attn, layer.input_layernorm(x), cos, sin, k_cache[i], v_cache[i],
                                     lengths)
            x = x + out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_k.append(k)
            new_v.append(v)
        params = self.head(self.backbone.norm(x))
        log_var = params[..., params.shape[-1] // 2:]
        return params, gaussian_entropy(log_var, self.variance_floor), None, torch.stack(new_k), torch.stack(new_v)

    def library_forward(self, sequence: torch.Tensor) -> torch.Tensor:
        """The library's own forward (inputs_embeds, its causal mask and rotary) and the head: [B, T, 2D]."""
        hidden = self.backbone(inputs_embeds=self.embed(sequence), use_cache=False).last_hidden_state
        return self.head(hidden)

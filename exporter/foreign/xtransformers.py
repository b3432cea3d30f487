"""Architecture adapter for x-transformers' continuous AR (`ContinuousTransformerWrapper(probabilistic=True,
attn_layers=Decoder(...))`, trained with `ContinuousAutoregressiveWrapper`).

The adapter runs the library's own submodules wherever they act on one token at a time (project_in/out, the
positional embedding, every norm, every feed-forward and residual module: all their options come for free) and
re-implements only what the library does over the sequence: attention, with an explicit KV cache owned by the
caller (the engine contract) and rotary positions per row. The library options that change that part are checked
against the module's own attributes: supported (absolute or rotary positions, LayerNorm / RMSNorm / ScaleNorm,
GLU / SwiGLU feed-forward, grouped-query attention via kv_heads, sandwich norm) or refused in one line naming the
option. Parity with the library's own forward is checked before any engine is built (foreign/engines.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastardiff.errors import CheckpointError

LIBRARY = "x-transformers"

# (attribute on AttentionLayers / Attention / Attend, its value when the option is off, the option's name)
_LAYERS_OFF = [("cross_attend", False, "cross_attend"), ("num_residual_streams", 1, "num_residual_streams"),
               ("polar_pos_emb", None, "polar_pos_emb"), ("rel_pos", None, "rel_pos_bias / alibi_pos_bias / "
                                                                          "dynamic_pos_bias"),
               ("pre_norm", True, "pre_norm=False (post-norm)"), ("residual_attn", False, "residual_attn"),
               ("need_condition", False, "use_adaptive_layernorm / use_adaptive_rmsnorm / adaptive layerscale"),
               ("softclamp_output", False, "softclamp_output"), ("unet_skips", False, "unet_skips"),
               ("reinject_input", False, "reinject_input"), ("add_value_residual", False, "add_value_residual")]
_ATTENTION_OFF = [("max_attend_past", None, "attn_max_attend_past"), ("use_latent_q", False, "attn_use_latent_q"),
                  ("use_latent_kv", False, "attn_use_latent_kv"), ("laser", False, "attn_laser"),
                  ("to_v_gate", None, "attn_gate_values"), ("to_output_gate", None, "attn_output_gate"),
                  ("to_v_head_gate", None, "attn_gate_value_heads"), ("qk_norm", False, "attn_qk_norm"),
                  ("q_rmsnorm", None, "attn_qk_rmsnorm"), ("k_rmsnorm", None, "attn_k_rmsnorm"),
                  ("value_rmsnorm", None, "attn_value_rmsnorm"), ("data_dependent_alibi", None,
                                                                  "attn_data_dependent_alibi"),
                  ("rel_proj_pos_bias", None, "attn_use_rel_proj_pos_bias"), ("head_scale", False, "attn_head_scale"),
                  ("sparse_topk", None, "attn_sparse_topk"), ("num_mem_kv", 0, "attn_num_mem_kv"),
                  ("attn_on_attn", False, "attn_on_attn"), ("orthog_projected_values", False,
                                                            "attn_orthog_projected_values"),
                  ("hybrid_module", None, "attn_hybrid_module"), ("qkv_receive_diff_residuals", False,
                                                                  "qkv_receive_diff_residuals")]
_ATTEND_OFF = [("pre_softmax_talking_heads", None, "attn_pre_talking_heads"),
               ("post_softmax_talking_heads", None, "attn_post_talking_heads"),
               ("pre_scale_post_talking_heads", None, "attn_pre_scale_post_talking_heads"),
               ("selective", False, "attn_selective"), ("cog_signed", False, "attn_cog_signed"),
               ("l2_distance", False, "attn_l2_distance"), ("add_zero_kv", False, "attn_add_zero_kv"),
               ("head_learned_sink", False, "attn_head_learned_sink"), ("softclamp_logits", False,
                                                                        "attn_softclamp_logits"),
               ("cope", None, "attn_use_cope"), ("inverted_attention", False, "inverted_attention")]


def refuse(option: str, why: str = "the adapter does not reproduce it") -> CheckpointError:
    return CheckpointError(f"x-transformers option {option} is not supported ({why}); retrain without it or "
                           "export another architecture")


def _check_off(obj, table) -> None:
    for attr, off, option in table:
        value = getattr(obj, attr, off)
        if (value is not off and value != off) if not isinstance(off, bool) else bool(value) != off:
            raise refuse(option)


def unwrap(model):
    """The ContinuousTransformerWrapper inside `model` (itself, or the autoregressive wrapper's .net), or None."""
    from x_transformers import ContinuousAutoregressiveWrapper, ContinuousTransformerWrapper

    if isinstance(model, ContinuousAutoregressiveWrapper):
        model = model.net
    return model if isinstance(model, ContinuousTransformerWrapper) else None


def check_supported(net) -> None:
    """Raise CheckpointError (one line naming the option) unless the adapter reproduces `net` exactly."""
    from x_transformers.x_transformers import Attention, FeedForward, Residual, ShiftTokens

    layers = net.attn_layers
    if not layers.causal:
        raise CheckpointError("the x-transformers model is bidirectional (Encoder / causal=False, a MAR-style masked "
                              "model): it cannot be verified causally, so speculative decoding cannot be exact; "
                              "fastardiff exports causal models (Decoder)")
    if not net.probabilistic:
        raise CheckpointError("the x-transformers model has no per-token distribution (probabilistic=False: it "
                              "outputs a point estimate); retrain it with ContinuousTransformerWrapper("
                              "probabilistic=True) so each position outputs a Gaussian")
    if net.has_memory_tokens:
        raise refuse("num_memory_tokens")
    if net.average_pool_embed:
        raise refuse("average_pool_embed", "it outputs one vector per sequence, not per token")
    _check_off(layers, _LAYERS_OFF)
    if tuple(layers.layers_execute_order) != tuple(range(len(layers.layer_types))):
        raise refuse("layers_execute_order / weight_tie_layers")
    if any(m is not None for m in layers.layer_integrators):
        raise refuse("integrate_layers / attn_aggregated_residuals")
    if layers.rotary_pos_emb is not None and layers.rotary_pos_emb.scale is not None:
        raise refuse("rotary_xpos")
    for kind, (_, block, residual) in zip(layers.layer_types, layers.layers):
        if isinstance(block, ShiftTokens):
            raise refuse("shift_tokens")
        if type(residual) is not Residual:
            raise refuse(f"residual {type(residual).__name__} (gate_residual / orthog_residual / ...)")
        if kind == "a":
            if type(block) is not Attention:
                raise refuse("layerscale / scale on attention", f"block is {type(block).__name__}")
            _check_off(block, _ATTENTION_OFF)
            _check_off(block.attend, _ATTEND_OFF)
            if getattr(block.attend, "sigmoid", False) or getattr(block.attend, "hard", False):
                raise refuse("attn_sigmoid / attn_hard")
            if layers.rotary_pos_emb is not None and block.rotate_num_heads != block.heads:
                raise refuse("rotate_num_heads")
        elif kind != "f" or not isinstance(block, (FeedForward, nn.Module)):
            raise refuse(f"layer type '{kind}' (custom_layers with cross attention)")


class XTransformersAR(nn.Module):
    """The engine contract (tokens, lengths, k_cache, v_cache, cond) over the library's modules: returns
    ([mean, log variance] [B, K, 2D], entropy [B, K] (the Gaussian's differential entropy per dimension, nats),
    None, new_k, new_v [L, B, Hkv, K, Dh]). Position p < 1 is the condition slot: its input is start_tokens[cond]."""

    def __init__(self, net, start_tokens: torch.Tensor, variance_floor: float):
        super().__init__()
        check_supported(net)
        self.net = net
        self.register_buffer("start_tokens", torch.as_tensor(start_tokens, dtype=torch.float32).clone())
        self.variance_floor = variance_floor
        layers = net.attn_layers
        attention = [block for kind, (_, block, _) in zip(layers.layer_types, layers.layers) if kind == "a"]
        self.num_layers = len(attention)
        first = attention[0]
        self.heads, self.kv_heads = first.heads, first.kv_heads
        self.head_dim = first.to_k.out_features // first.kv_heads
        rotary = layers.rotary_pos_emb
        self.rotary_dim = 0 if rotary is None else rotary.inv_freq.shape[0] * 2

    def architecture(self) -> dict:
        layers = self.net.attn_layers
        norm = type(layers.layers[0][0][0]).__name__
        return {"layers": self.num_layers, "dim": layers.dim, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "norm": norm, "positions": "rotary" if self.rotary_dim else "absolute",
                "rotary_dim": self.rotary_dim}

    def _rotate(self, t, positions):
        """Rotary embedding of t [B, H, K, Dh] at positions [B, K] (the library's interleaved-pair convention)."""
        rotary = self.net.attn_layers.rotary_pos_emb
        freqs = positions.to(rotary.inv_freq.dtype).unsqueeze(-1) * rotary.inv_freq / rotary.interpolation_factor
        freqs = torch.stack((freqs, freqs), dim=-1).flatten(-2).unsqueeze(1)          # [B, 1, K, rot]
        rot, rest = t[..., :self.rotary_dim], t[..., self.rotary_dim:]
        pairs = rot.unflatten(-1, (-1, 2))
        half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return torch.cat((rot * freqs.cos() + half * freqs.sin(), rest), dim=-1)

    def _attend(self, block, x, positions, k_cache, v_cache, lengths):
        B, K, _ = x.shape
        q = block.to_q(x).view(B, K, self.heads, -1).transpose(1, 2)
        k = block.to_k(x).view(B, K, self.kv_heads, -1).transpose(1, 2)
        v = block.to_v(x).view(B, K, self.kv_heads, -1).transpose(1, 2)
        if self.rotary_dim:
            q, k = self._rotate(q, positions), self._rotate(k, positions)
        keys, values = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)
        if self.kv_heads != self.heads:     # grouped-query attention: the library tiles the kv heads ('(r kvh)')
            keys = keys.repeat(1, self.heads // self.kv_heads, 1, 1)
            values = values.repeat(1, self.heads // self.kv_heads, 1, 1)
        S = k_cache.shape[2]
        # key j is visible to new token i when it is a valid cached key (j < lengths) or a new key at or before i
        j = torch.arange(S + K, device=x.device).view(1, 1, S + K)
        i = torch.arange(K, device=x.device).view(1, K, 1)
        cached = j < S                                     # (no Where over booleans: ONNX Runtime has none)
        visible = (cached & (j < lengths.view(B, 1, 1))) | (~cached & (j - S <= i))         # [B, K, S + K]
        scores = torch.matmul(q, keys.transpose(-1, -2)) * block.scale
        scores = scores.masked_fill(~visible.unsqueeze(1), torch.finfo(scores.dtype).min)
        out = torch.matmul(scores.softmax(-1), values).transpose(1, 2).reshape(B, K, -1)
        return block.to_out(out), k, v

    def forward(self, tokens, lengths, k_cache, v_cache, cond, shallow: bool = False):
        net, layers = self.net, self.net.attn_layers
        B, K, _ = tokens.shape
        positions = lengths.view(-1, 1) + torch.arange(K, device=tokens.device).view(1, K)      # [B, K]
        start = self.start_tokens[cond.clamp(0, self.start_tokens.shape[0] - 1)].unsqueeze(1)
        x = torch.where((positions < 1).unsqueeze(-1), start.to(tokens.dtype), tokens)
        x = net.project_in(x)
        if isinstance(net.pos_emb, nn.Module) and not layers.disable_abs_pos_emb:   # else always(0): none
            # a feed padded past a row's end (ragged Jacobi rounds) reads junk positions, never used: clamped into
            # the table, as the library's own positions always are
            limit = getattr(net.pos_emb, "max_seq_len", None)
            x = x + net.pos_emb(x, pos=positions if limit is None else positions.clamp(max=limit - 1))
        x = net.post_emb_norm(x)
        new_k, new_v = [], []
        a = 0
        for kind, (norms, block, residual) in zip(layers.layer_types, layers.layers):
            pre, post_branch, post_main = norms
            inner = pre(x) if pre is not None else x
            if kind == "a":
                out, k, v = self._attend(block, inner, positions, k_cache[a], v_cache[a], lengths)
                new_k.append(k)
                new_v.append(v)
                a += 1
            else:
                out = block(inner)
            if post_branch is not None:
                out = post_branch(out)
            x = residual(out, x)
            if post_main is not None:
                x = post_main(x)
        x = layers.final_norm(x)
        out = net.project_out(x)
        mean, log_var = out[..., 0::2], out[..., 1::2]   # the library's '(d mean_log_var)' layout
        return (torch.cat([mean, log_var], -1), gaussian_entropy(log_var, self.variance_floor), None,
                torch.stack(new_k), torch.stack(new_v))

    def library_forward(self, sequence: torch.Tensor) -> torch.Tensor:
        """The library's own teacher-forced forward over inputs [B, T, D] -> [mean, log variance] [B, T, 2D]."""
        mean, var = self.net(sequence)
        return torch.cat([mean, var.log()], -1)


def gaussian_entropy(log_var, floor: float):
    """Differential entropy per dimension (nats) of N(mean, diag(max(var, floor)))."""
    log_var = torch.clamp(log_var, min=math.log(floor))
    # (a sum over D, not .mean(): the ONNX exporter names a mean node 'mean', the engine's output name)
    return 0.5 * (math.log(2 * math.pi * math.e) + log_var.float().sum(-1) / log_var.shape[-1])

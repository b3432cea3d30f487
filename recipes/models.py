"""drift-ar networks in PyTorch: the reference semantics every engine is checked against.

ARTransformer.forward(tokens, lengths, k_cache, v_cache, cond) is the engine contract (DESIGN.md):
  tokens  [B, K, D]   new inputs at positions lengths[b] .. lengths[b]+K-1; position p < n_cond is a
                      condition slot (its token value is ignored and the class embedding of cond is used)
  lengths [B] int64   valid cache length per sample (ragged)
  k_cache, v_cache [L, B, H, S, Dh]  caches owned by the caller; entries >= lengths[b] are ignored
  cond    [B] int64   class id (num_classes = null class for classifier-free guidance)
returns mean [B,K,D], entropy [B,K] (penultimate layer, normalised, head-averaged),
        shallow_entropy [B,K] (layer cfg.shallow_layer), new_k / new_v [L, B, H, K, Dh].
The training forward is the same call with an empty cache (S = 0) and lengths = 0.

in_buffer=True (the in-place engines of the onnx target, exporter/engine_modules.py): k_cache / v_cache are
sequences of L per-layer buffers [B, H, S, Dh] with room for the fed positions; each layer writes its new keys /
values into its buffer at each row's length (a functional scatter: the export binds its output to the input's
memory) and attends over that buffer with keys j <= lengths[b] + i, which are the same keys as the cache + new
concat in another order. The updated buffers are returned after the outputs above (all k, then all v).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import DriftARConfig
from .entropy_attention import biased_attention, get_entropy_attention, native_attention, visible_keys_bias


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, k_cache, v_cache, lengths, entropy_impl=None, in_buffer: bool = False, bias=None,
                rows_tokens=None):
        """Returns (out, entropy, k, v); in_buffer: k, v are the pairs (new keys, updated buffer), and `bias` (the
        buffer's additive mask, visible_keys_bias) serves a layer without entropy. x is [B, K, W], or [B*K, W] with
        rows_tokens = (B, K) (the in-place engines' flat token stream); out has x's layout."""
        B, K = x.shape[:2] if rows_tokens is None else rows_tokens
        W = x.shape[-1]
        q, k, v = self.qkv(x).view(B, K, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if in_buffer:      # write the new keys/values at each row's length, attend over the whole buffer
            at = (lengths.view(B, 1, 1, 1) + torch.arange(K, device=x.device).view(1, 1, K, 1)).expand_as(k)
            keys, values = k_cache.scatter(2, at, k), v_cache.scatter(2, at, v)
            offset = None
        else:
            keys = torch.cat([k_cache, k], dim=2)
            values = torch.cat([v_cache, v], dim=2)
            offset = k_cache.shape[2]
        scale = q.shape[-1] ** -0.5
        if entropy_impl is None and bias is not None:
            out, entropy = biased_attention(q, keys, values, bias, scale), None
        elif entropy_impl is None:
            out, entropy = native_attention(q, keys, values, lengths, offset, scale), None
        else:
            out, entropy = entropy_impl(q, keys, values, lengths, offset, scale, True)
            entropy = entropy.float().mean(dim=1)  # head-averaged [B, K]
        out = out.transpose(1, 2).reshape(x.shape)
        if in_buffer:
            return self.proj(out), entropy, (k, keys), (v, values)
        return self.proj(out), entropy, k, v


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x, k_cache, v_cache, lengths, entropy_impl=None, in_buffer: bool = False, bias=None,
                rows_tokens=None):
        a, entropy, k, v = self.attn(self.norm1(x), k_cache, v_cache, lengths, entropy_impl, in_buffer, bias,
                                     rows_tokens)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, entropy, k, v


class ARTransformer(nn.Module):
    """Causal transformer over [condition, x_0 .. x_{N-2}] predicting the mean of the next token."""

    def __init__(self, cfg: DriftARConfig, num_layers: int, attention_impl: str = "reference"):
        super().__init__()
        self.cfg = cfg
        self.num_layers = num_layers
        self.entropy_layer = cfg.entropy_layer(num_layers)
        self.shallow_layer = min(cfg.shallow_layer, num_layers - 1)
        self.attention_impl = attention_impl
        self.token_in = nn.Linear(cfg.token_dim, cfg.width)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.width)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.seq_len, cfg.width))
        nn.init.normal_(self.pos_emb, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.ar_out_dim)

    def empty_cache(self, batch: int, capacity: int = 0, dtype=torch.float32, device=None):
        shape = (self.num_layers, batch, self.cfg.heads, capacity, self.cfg.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def embed(self, tokens, lengths, cond):
        K = tokens.shape[1]
        positions = lengths.view(-1, 1) + torch.arange(K, device=tokens.device).view(1, K)  # [B, K]
        is_cond = (positions < self.cfg.n_cond).unsqueeze(-1)
        x = torch.where(is_cond, self.class_emb(cond).unsqueeze(1), self.token_in(tokens))
        return x + self.pos_emb[positions.clamp(max=self.cfg.seq_len - 1)]

    def forward(self, tokens, lengths, k_cache, v_cache, cond, return_hidden: bool = False, in_buffer: bool = False,
                shallow: bool = True):
        """shallow=False: the shallow layer's entropy is not computed (returned as None) unless it is the entropy
        layer's: the target engines, whose contract has no shallow entropy, attend there like any other layer."""
        entropy_impl = get_entropy_attention(self.attention_impl)
        if in_buffer and self.attention_impl not in ("reference", "plugin"):
            raise ValueError("in_buffer attention is the reference implementation's or the TensorRT plugin's (the "
                             f"in-place engines); this model uses '{self.attention_impl}'")
        x = self.embed(tokens, lengths, cond)
        entropy_layers = self.entropy_layers(shallow)
        # the in-place buffer's mask, built once for every layer without entropy
        bias = visible_keys_bias(lengths, x.shape[1], k_cache[0].shape[-2], x.dtype) if in_buffer else None
        # the in-place engines carry the token stream flat, [B*K, W]: every linear layer is then one matrix product
        # with its bias (ONNX Gemm; a 3-D MatMul exports with a separate Add, which ONNX Runtime does not fuse)
        rows_tokens = None
        if in_buffer:
            rows_tokens = tuple(x.shape[:2])
            x = x.reshape(-1, x.shape[-1])
        new_k, new_v, hidden, k_buffers, v_buffers = [], [], [], [], []
        entropy = shallow_entropy = None
        for i, block in enumerate(self.blocks):
            wants_entropy = i in entropy_layers
            x, e, k, v = block(x, k_cache[i], v_cache[i], lengths, entropy_impl if wants_entropy else None, in_buffer,
                               bias, rows_tokens)
            if in_buffer:
                (k, k_buffer), (v, v_buffer) = k, v
                k_buffers.append(k_buffer)
                v_buffers.append(v_buffer)
            if i == self.entropy_layer:
                entropy = e
            if i == self.shallow_layer and wants_entropy:
                shallow_entropy = e
            new_k.append(k)
            new_v.append(v)
            hidden.append(x if rows_tokens is None else x.view(*rows_tokens, -1))
        mean = self.head(self.norm(x))
        if rows_tokens is not None:
            mean = mean.view(*rows_tokens, -1)
        outputs = (mean, entropy, shallow_entropy, torch.stack(new_k), torch.stack(new_v))
        if in_buffer:
            outputs = outputs + tuple(k_buffers) + tuple(v_buffers)
        return outputs + (hidden,) if return_hidden else outputs

    def entropy_layers(self, shallow: bool = True) -> set[int]:
        """The layers whose attention entropy a forward computes (with shallow=False: the entropy layer only)."""
        return {self.entropy_layer, self.shallow_layer} if shallow else {self.entropy_layer}

    def forward_sequence(self, tokens, cond, return_hidden: bool = False):
        """Teacher-forced training forward over a full image: tokens [B, N, D] -> predictions for all N tokens."""
        B = tokens.shape[0]
        n_cond = self.cfg.n_cond
        pad = torch.zeros(B, n_cond, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
        inputs = torch.cat([pad, tokens[:, :-1]], dim=1)  # [B, n_cond + N - 1, D]
        lengths = torch.zeros(B, dtype=torch.long, device=tokens.device)
        k_cache, v_cache = self.empty_cache(B, 0, tokens.dtype, tokens.device)
        out = self.forward(inputs, lengths, k_cache, v_cache, cond, return_hidden)
        # position n_cond-1+r predicts token r
        sl = slice(n_cond - 1, None)
        mean, entropy, shallow = out[0][:, sl], out[1][:, sl], out[2][:, sl]
        return (mean, entropy, shallow) + ((out[5],) if return_hidden else ())


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C*patch*patch] in raster order."""
    B, C, H, W = images.shape
    x = images.view(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    B, N, _ = tokens.shape
    g = int(round(N**0.5))
    x = tokens.view(B, g, g, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, g * patch, g * patch)


class EntropyAdaLNBlock(nn.Module):
    """Bidirectional transformer block whose LayerNorms are modulated per token by (class, entropy)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x, c):
        s1, b1, g1, s2, b2, g2 = self.modulation(c).chunk(6, dim=-1)
        B, N, W = x.shape
        h = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W)
        x = x + g1 * self.proj(a)
        h = self.norm2(x) * (1 + s2) + b2
        return x + g2 * self.mlp(h)


class DriftDecoder(nn.Module):
    """One-step (1-NFE) decoder f(x, cond, E) -> image, with Entropy-AdaLN (drift-ar Sec. 4.2)."""

    def __init__(self, cfg: DriftARConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.decoder_width
        self.token_in = nn.Linear(cfg.token_dim, w)
        self.pos_emb = nn.Parameter(torch.randn(cfg.num_tokens, w) * 0.02)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, w)
        self.entropy_emb = nn.Sequential(nn.Linear(1, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(EntropyAdaLNBlock(w, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, cfg.pixels_per_token)
        # the decoder predicts a residual on top of its input when tokens are pixel patches
        self.residual = cfg.token_dim == cfg.pixels_per_token

    def forward(self, tokens, entropy, cond):
        x = self.token_in(tokens) + self.pos_emb
        c = nn.functional.silu(self.class_emb(cond).unsqueeze(1) + self.entropy_emb(entropy.unsqueeze(-1)))
        for block in self.blocks:
            x = block(x, c)
        patches = self.out(self.norm(x))
        if self.residual:
            patches = patches + tokens
        return unpatchify(patches, self.cfg.patch, self.cfg.channels)


def build_models(cfg: DriftARConfig, attention_impl: str = "reference"):
    """(target, draft, decoder) with fresh weights."""
    return (ARTransformer(cfg, cfg.target_layers, attention_impl), ARTransformer(cfg, cfg.draft_layers, attention_impl),
            DriftDecoder(cfg))

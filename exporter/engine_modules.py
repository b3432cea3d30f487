"""The three engines as torch modules with the engine-contract signature (DESIGN.md "Engines").

Every target (onnx, aoti, trt) and the `torch` reference backend trace or call exactly these modules, so the
contract lives in one place: names, shapes, dynamic axes and seeded example inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastardiff.recipes.config import DriftARConfig
from fastardiff.recipes.models import ARTransformer, DriftDecoder

AR_INPUTS = ["tokens", "lengths", "k_cache", "v_cache", "cond"]
ENGINE_IO = {
    "draft_step": (AR_INPUTS, ["mean", "entropy", "shallow_entropy", "new_k", "new_v"]),
    "target_verify": (AR_INPUTS, ["mean", "entropy", "new_k", "new_v"]),
    "decoder": (["tokens", "entropy", "cond"], ["image"]),
}


class DraftStep(nn.Module):
    def __init__(self, draft: ARTransformer):
        super().__init__()
        self.model = draft

    def forward(self, tokens, lengths, k_cache, v_cache, cond):
        mean, entropy, shallow, new_k, new_v = self.model(tokens, lengths, k_cache, v_cache, cond)
        return mean, entropy, shallow, new_k, new_v


class TargetVerify(nn.Module):
    def __init__(self, target: ARTransformer):
        super().__init__()
        self.model = target

    def forward(self, tokens, lengths, k_cache, v_cache, cond):
        mean, entropy, _shallow, new_k, new_v = self.model(tokens, lengths, k_cache, v_cache, cond)
        return mean, entropy, new_k, new_v


class Decoder(nn.Module):
    def __init__(self, decoder: DriftDecoder):
        super().__init__()
        self.model = decoder

    def forward(self, tokens, entropy, cond):
        return self.model(tokens, entropy, cond)


def make_engine_modules(target: ARTransformer, draft: ARTransformer, decoder: DriftDecoder) -> dict[str, nn.Module]:
    return {"draft_step": DraftStep(draft).eval(), "target_verify": TargetVerify(target).eval(),
            "decoder": Decoder(decoder).eval()}


@dataclass(frozen=True)
class ShapeProfile:
    """min / opt / max for each dynamic axis (TensorRT optimisation profile; ONNX/AOTI dynamic ranges)."""

    batch: tuple[int, int, int]
    new_tokens: tuple[int, int, int]   # K
    cache: tuple[int, int, int]        # S (cache length passed in)


def shape_profiles(cfg: DriftARConfig, max_batch: int, gamma: int) -> dict[str, ShapeProfile]:
    cap = cfg.seq_len
    opt_b = max(1, max_batch // 2)
    return {
        "draft_step": ShapeProfile((1, opt_b, max_batch), (1, 1, cap), (0, cap // 2, cap)),
        "target_verify": ShapeProfile((1, opt_b, max_batch), (1, gamma + 1, cap), (0, cap // 2, cap)),
        "decoder": ShapeProfile((1, opt_b, max_batch), (cfg.num_tokens,) * 3, (0, 0, 0)),
    }


def example_inputs(cfg: DriftARConfig, name: str, model_layers: int, batch: int, new_tokens: int, cache: int,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded inputs that respect the contract (lengths <= cache, lengths + K <= seq_len, some ragged)."""
    g = torch.Generator().manual_seed(seed)
    if name == "decoder":
        return (torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=g),
                torch.rand(batch, cfg.num_tokens, generator=g),
                torch.randint(0, cfg.num_classes + 1, (batch,), generator=g))
    max_len = min(cache, cfg.seq_len - new_tokens)
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len
    shape = (model_layers, batch, cfg.heads, cache, cfg.head_dim)
    return (torch.randn(batch, new_tokens, cfg.token_dim, generator=g), lengths.long(),
            torch.randn(shape, generator=g), torch.randn(shape, generator=g),
            torch.randint(0, cfg.num_classes + 1, (batch,), generator=g))

"""The `foreign-gaussian` family's engines and its checkpoint: a foreign model, loaded and adapted, checked against
the library's own forward before any engine is built.

Engines: `target_verify` (the adapter under the contract: mean = [token mean, log variance] [B, K, 2D], entropy =
the Gaussian's differential entropy per dimension) and `decoder` (the patch-to-image map: tokens are pixel
patches); `draft_step` when a draft made for the model is given (foreign/draft.py). No draft_rollout and no
in-graph Jacobi engine: the runtime samples, verifies and runs Jacobi rounds on the
host with the diagonal-Gaussian rule (runtime/token_rules.py DiagonalGaussianTokens).

Library parity: the adapter is run (a) teacher-forced over whole sequences in one call with an empty cache and
(b) token by token through its KV cache, both against the library's own forward on the same inputs, in fp32;
either beyond `atol` / `rtol` is a CheckpointError naming the worst output (an option the adapter does not
reproduce). The errors go into the manifest (export.library_parity).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastardiff.errors import CheckpointError
from fastardiff.recipes.config import Calibration
from fastardiff.recipes.models import unpatchify

from .spec import ForeignGaussianConfig, build_foreign, foreign_config, load_state, read_state_dict

log = logging.getLogger("fastardiff.export")


class PatchDecoder(nn.Module):
    """decoder engine of pixel-patch tokens: tokens [B, N, D] -> image [B, C, H, W] clamped to [-1, 1]."""

    def __init__(self, cfg: ForeignGaussianConfig):
        super().__init__()
        self.patch, self.channels = cfg.patch, cfg.channels

    def forward(self, tokens, entropy, cond):
        return unpatchify(tokens, self.patch, self.channels).clamp(-1.0, 1.0)


class ForeignVerify(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, lengths, k_cache, v_cache, cond):
        params, entropy, _, new_k, new_v = self.model(tokens, lengths, k_cache, v_cache, cond)
        return params, entropy, new_k, new_v


@dataclass
class ForeignCheckpoint:
    """What the export targets read of a checkpoint (config, calibration, target, draft, decoder), for a foreign
    model: `target` is the adapter (its num_layers: attention layers); `draft` a ForeignDraft or None."""

    config: ForeignGaussianConfig
    target: nn.Module
    decoder: nn.Module
    calibration: Calibration = field(default_factory=Calibration)
    draft: nn.Module | None = None
    meta: dict = field(default_factory=dict)
    path: Path | None = None


def adapt(spec, ref: str):
    """(library name, adapter module) for the module a factory returned; CheckpointError for anything else."""
    model = spec.model
    try:
        from .xtransformers import LIBRARY as XT, XTransformersAR, unwrap
        net = unwrap(model)
    except ImportError:
        net = None
    if net is not None:
        return XT, XTransformersAR(net, spec.start_tokens, spec.variance_floor)
    try:
        from .hf import LIBRARY as HF, HFCausalAR, is_hf_backbone
        if is_hf_backbone(model):
            return HF, HFCausalAR(model, spec.head, spec.embed, spec.start_tokens, spec.variance_floor)
    except ImportError:
        pass
    raise CheckpointError(f"--model '{ref}' returned a {type(model).__name__}, which no fastardiff adapter knows; "
                          "supported: x-transformers ContinuousTransformerWrapper / ContinuousAutoregressiveWrapper, "
                          "Hugging Face LlamaModel / Qwen2Model with a per-token head")


def load_foreign(ref: str, weights, atol: float = 1e-4, rtol: float = 1e-3) -> ForeignCheckpoint:
    """Build the user's model with its factory, load its weights (tensors only), adapt it and check the adapter
    against the library's own forward."""
    spec = build_foreign(ref)
    library, adapter = adapt(spec, ref)          # refuses what it cannot reproduce before any weights are read
    state = read_state_dict(weights)
    load_state(spec.model if library != "transformers" else _with_head(spec), state, weights)
    adapter = adapter.eval().requires_grad_(False)
    arch = adapter.architecture()
    cfg = foreign_config(spec, library, ref, adapter.num_layers, adapter.kv_heads, adapter.head_dim, arch)
    parity = library_parity(adapter, cfg, atol, rtol)
    log.info("%s model (%s): the adapter matches the library's forward (max abs %.2e teacher-forced, %.2e cached)",
             library, ", ".join(f"{k} {v}" for k, v in arch.items()), parity["sequence_max_abs"],
             parity["cached_max_abs"])
    return ForeignCheckpoint(cfg, adapter, PatchDecoder(cfg).eval(), meta={"library_parity": parity},
                             path=Path(weights))


def _with_head(spec) -> nn.Module:
    """Backbone, embedding and head as one module for loading: keys 'model.*', 'embed.*' and 'head.*'."""
    holder = nn.Module()
    holder.model, holder.embed, holder.head = spec.model, spec.embed, spec.head
    return holder


def _compare(what: str, ref: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> float:
    diff = (got - ref).abs()
    bad = diff > atol + rtol * ref.abs()
    if bool(bad.any()):
        raise CheckpointError(f"the adapter does not reproduce the library's forward ({what}: max abs error "
                              f"{float(diff.max()):.3e} beyond --atol {atol:g} / --rtol {rtol:g}): the model uses an "
                              "option the adapter does not know; report it with the model's config")
    return float(diff.max())


@torch.no_grad()
def library_parity(adapter: nn.Module, cfg: ForeignGaussianConfig, atol: float, rtol: float, batch: int = 3,
                   seed: int = 0) -> dict:
    """The adapter against the library's own forward, teacher-forced and token by token through the KV cache."""
    g = torch.Generator().manual_seed(seed)
    T = cfg.seq_len
    cond = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    tokens = torch.randn(batch, T, cfg.token_dim, generator=g).clamp(-1.5, 1.5)
    sequence = tokens.clone()
    sequence[:, 0] = adapter.start_tokens[cond]
    ref = adapter.library_forward(sequence)
    shape = (adapter.num_layers, batch, adapter.kv_heads, 0, adapter.head_dim)
    empty = torch.zeros(shape), torch.zeros(shape)
    lengths = torch.zeros(batch, dtype=torch.long)
    whole = adapter(tokens, lengths, *empty, cond)[0]
    sequence_err = _compare("teacher-forced", ref, whole, atol, rtol)
    k_cache, v_cache = empty
    steps = []
    for p in range(T):
        out, _, _, k, v = adapter(tokens[:, p:p + 1], torch.full((batch,), p), k_cache, v_cache, cond)
        k_cache, v_cache = torch.cat([k_cache, k], 3), torch.cat([v_cache, v], 3)
        steps.append(out)
    cached_err = _compare("token by token through the KV cache", ref, torch.cat(steps, 1), atol, rtol)
    return {"sequence_max_abs": sequence_err, "cached_max_abs": cached_err, "atol": atol, "rtol": rtol,
            "batch": batch, "positions": T}


def foreign_modules(ckpt: ForeignCheckpoint, gammas=()) -> dict[str, nn.Module]:
    """The family's export adapter (exporter/targets.py FAMILY_ADAPTERS): target_verify and the decoder, and
    draft_step where the checkpoint has a draft (`--draft-ckpt`, foreign/draft.py); no draft_rollout (the runtime
    drafts with draft_step calls), no in-graph Jacobi."""
    modules = {"target_verify": ForeignVerify(ckpt.target).eval(), "decoder": ckpt.decoder}
    if ckpt.draft is not None:
        modules = {"draft_step": ckpt.draft.eval(), **modules}
    return modules


JACOBI_WINDOWS = (2, 4, 8, 12, 16)
CALIBRATION_IMAGES = 50


def calibrate_jacobi(ckpt: ForeignCheckpoint, images: int | None = None, seed: int = 0) -> dict:
    """`--gamma auto`'s Jacobi figures for a foreign model, measured at export (its weights file is the user's and
    is never rewritten): tokens per target call of the real Jacobi loop (torch backend, coupled) per window,
    written into the manifest's calibration.extra like `fastardiff calibrate` does for fastardiff's own models."""
    from fastardiff.exporter.calibrate import measure_jacobi_tokens

    images = images or CALIBRATION_IMAGES
    windows = tuple(w for w in JACOBI_WINDOWS if w + 1 <= ckpt.config.num_tokens)
    per_call = measure_jacobi_tokens(ckpt, windows, images, scales=(1.0,), seed=seed)
    ckpt.calibration.extra = {**ckpt.calibration.extra, "jacobi_tokens_per_call": per_call,
                              "jacobi_calibration": {"windows": list(windows), "images": images, "seed": seed,
                                                     "coupling": True, "eta": 0.0,
                                                     "loop": "runtime (torch backend), at export"}}
    return per_call


def calibrate_draft(ckpt: ForeignCheckpoint, gamma: int, images: int | None = None, seed: int = 0) -> list:
    """The draft's per-position acceptance a_1 .. a_gamma of the real loop (torch backend, early stopping off),
    written into calibration.extra.acceptance_by_position like `fastardiff calibrate` does (for --gamma auto)."""
    from fastardiff.exporter.calibrate import measure_position_acceptance

    images = images or CALIBRATION_IMAGES
    curves = measure_position_acceptance(ckpt, gamma, images, scales=(1.0,), seed=seed,
                                         batch=min(images, 50))
    ckpt.calibration.extra = {**ckpt.calibration.extra, "acceptance_by_position": curves,
                              "acceptance_calibration": {"gamma": gamma, "images": images, "seed": seed,
                                                         "early_stop": "off",
                                                         "loop": "runtime (torch backend), at export"}}
    return curves["1"]

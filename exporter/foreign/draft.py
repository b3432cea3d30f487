"""A draft for a model trained elsewhere: the project's own causal AR (recipes/models.py ARTransformer: few layers,
the target's KV-cache heads and head dim, so the runtime's draft cache has the manifest's shape) whose per-position
output is a diagonal Gaussian, [mean, log variance] [..., 2D], like the foreign target's. It is made by
recipes/foreign_draft.py (fitted to the frozen target's own samples) and exported with
`fastardiff-export --model ... --ckpt ... --draft-ckpt draft.pt` as the `draft_step` engine of the contract:
(tokens, lengths, k_cache, v_cache, cond) -> mean [B, K, 2D] (mean, log variance), entropy [B, K] (the Gaussian's
differential entropy per dimension, as the target's), shallow_entropy [B, K] (its first layer's attention entropy:
early stopping), new_k, new_v.

The draft file is one torch file of plain data (loadable with torch.load(weights_only=True)): format, version,
config (token_dim, num_classes, positions, heads, head_dim, layers, mlp_ratio), state_dict, calibration (the
shallow entropy's mean and std over target samples: the static early-stop threshold) and meta (how it was made).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from torch import nn

from fastardiff.errors import CheckpointError
from fastardiff.recipes.models import ARTransformer

from .spec import ForeignGaussianConfig
from .xtransformers import gaussian_entropy

FORMAT = "fastardiff-foreign-draft"
VERSION = 1
# the fields a draft must share with its target: token_dim, classes, positions and the KV cache's heads x head dim
FITS = (("token_dim", "token dim"), ("num_classes", "classes"), ("positions", "positions (1 + tokens - 1)"),
        ("heads", "KV heads"), ("head_dim", "KV head dim"))


def make_hint(cfg: ForeignGaussianConfig) -> str:
    return ("make a draft for this model with `python -m fastardiff.recipes.foreign_draft --model "
            f"{cfg.factory or 'REF'} --ckpt WEIGHTS --out draft.pt`")


def draft_config(cfg: ForeignGaussianConfig, layers: int, mlp_ratio: int = 2) -> ForeignGaussianConfig:
    """The target's config with the draft's depth and feed-forward ratio (the manifest's config describes both)."""
    if layers < 1 or mlp_ratio < 1:
        raise CheckpointError(f"a draft needs >= 1 layer and an mlp ratio >= 1 (got {layers}, {mlp_ratio})")
    return dataclasses.replace(cfg, draft_layers=layers, mlp_ratio=mlp_ratio, shallow_layer=0)


class ForeignDraft(nn.Module):
    """The draft_step engine module (see the module docstring); `num_layers`: its attention layers."""

    def __init__(self, cfg: ForeignGaussianConfig):
        super().__init__()
        self.model = ARTransformer(cfg, cfg.draft_layers)
        self.num_layers, self.token_dim, self.variance_floor = cfg.draft_layers, cfg.token_dim, cfg.variance_floor

    def forward(self, tokens, lengths, k_cache, v_cache, cond):
        params, _, shallow, new_k, new_v = self.model(tokens, lengths, k_cache, v_cache, cond)
        return params, gaussian_entropy(params[..., self.token_dim:], self.variance_floor), shallow, new_k, new_v

    def forward_sequence(self, tokens, cond):
        """Teacher-forced over sequences [B, N, D] -> ([mean, log variance] [B, N, 2D], shallow entropy [B, N])."""
        params, _, shallow = self.model.forward_sequence(tokens, cond)
        return params, shallow

    def init_output(self, mean: torch.Tensor, log_var: torch.Tensor) -> None:
        """Start at the target's average Gaussian (mean, log variance [D]): zero output weights, that bias."""
        head = self.model.head
        nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.copy_(torch.cat([mean, log_var]))


def fit_fields(cfg: ForeignGaussianConfig) -> dict:
    return {"token_dim": cfg.token_dim, "num_classes": cfg.num_classes, "positions": cfg.seq_len,
            "heads": cfg.heads, "head_dim": cfg.head_dim}


def draft_payload(draft: ForeignDraft, cfg: ForeignGaussianConfig, shallow_mean: float, shallow_std: float,
                  meta: dict) -> dict:
    return {"format": FORMAT, "version": VERSION,
            "config": {**fit_fields(cfg), "layers": cfg.draft_layers, "mlp_ratio": cfg.mlp_ratio},
            "state_dict": {k: v.detach().cpu().clone() for k, v in draft.state_dict().items()},
            "calibration": {"draft_shallow_mean": float(shallow_mean), "draft_shallow_std": float(shallow_std)},
            "meta": meta}


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_draft(path, cfg: ForeignGaussianConfig) -> tuple[ForeignDraft, ForeignGaussianConfig, dict]:
    """(draft module, the target's config with the draft's depth, the file's payload) for target config `cfg`;
    one CheckpointError naming the problem and the fix for a file that is not a draft or does not fit."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--draft-ckpt '{path}' does not exist; {make_hint(cfg)}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        first = (str(err).splitlines() or [""])[0][:160]
        raise CheckpointError(f"--draft-ckpt '{path}' is not a readable draft file ({type(err).__name__}: {first}); "
                              f"{make_hint(cfg)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"--draft-ckpt '{path}' is not a fastardiff foreign draft (no format "
                              f"'{FORMAT}'); {make_hint(cfg)}")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"--draft-ckpt '{path}' is draft format version {payload.get('version')}, this "
                              f"fastardiff reads version {VERSION}; {make_hint(cfg)}")
    conf, want = payload.get("config") or {}, fit_fields(cfg)
    for key, what in FITS:
        if conf.get(key) != want[key]:
            raise CheckpointError(f"--draft-ckpt '{path}' does not fit the model: its {what} is {conf.get(key)}, the "
                                  f"model's is {want[key]}; {make_hint(cfg)}")
    try:
        dcfg = draft_config(cfg, int(conf["layers"]), int(conf["mlp_ratio"]))
        draft = ForeignDraft(dcfg)
        state = payload["state_dict"]
        own = draft.state_dict()
        bad = next((k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)), None)
        if bad is not None or set(state) != set(own):
            bad = bad or sorted(set(state) ^ set(own))[0]
            raise CheckpointError(f"--draft-ckpt '{path}': its weights do not match its config (key '{bad}'); "
                                  f"{make_hint(cfg)}")
        draft.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"--draft-ckpt '{path}' is incomplete ({type(err).__name__}: {err}); "
                              f"{make_hint(cfg)}") from None
    return draft.eval().requires_grad_(False), dcfg, payload


def attach_draft(ckpt, path) -> str:
    """Put the draft of file `path` into foreign checkpoint `ckpt` (config.draft_layers, calibration's shallow
    entropy statistics, ckpt.draft); returns the file's sha256 (part of the engine cache key)."""
    draft, dcfg, payload = read_draft(path, ckpt.config)
    ckpt.config, ckpt.draft = dcfg, draft
    calibration = payload.get("calibration") or {}
    for key in ("draft_shallow_mean", "draft_shallow_std"):
        if key in calibration:
            setattr(ckpt.calibration, key, float(calibration[key]))
    ckpt.meta = {**ckpt.meta, "draft": {k: v for k, v in (payload.get("meta") or {}).items()
                                        if isinstance(v, (str, int, float, bool))}}
    return sha256_of(path)

"""The fast-ardiff model family: config, models, checkpoint schema and target-only sampling.

A fast-ardiff model is the drift-ar AR pair (recipes/models.py ARTransformer, unchanged engine contract) whose
per-position output `mean` is a conditioning vector z [B, K, z_dim], plus two per-token diffusion heads
(recipes/diffusion_head.py): the T-step DDPM teacher and the distilled student_steps-step student. Tokens are
the identity patch tokenizer's pixel patches; the decoder is `unpatchify` (no weights).
Sampling a token at a position: z from the AR (guidance z = z_u + s (z_c - z_u) over a [cond; null] batch),
then final_step over the head's timesteps and one draw of the last Gaussian.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastardiff.errors import CheckpointError

from .checkpoint import check_expected_config, load_weights, write_checkpoint
from .config import Calibration, FastARDiffConfig
from .diffusion_head import DiffusionHead, cosine_alpha_bar, final_step, step_schedule
from .evaluate import target_cached_loop
from .models import ARTransformer, unpatchify

FAMILY = "fast-ardiff"
MODULES = ("target", "draft", "teacher_head", "student_head")

__all__ = ["FAMILY", "FastARDiffConfig", "FastARDiffCheckpoint", "DiffusionHead", "build_fast_ardiff_models",
           "cosine_alpha_bar", "step_schedule", "final_step", "save_checkpoint", "load_fast_ardiff",
           "sample_target_only", "head_timesteps", "decode_tokens"]


def build_fast_ardiff_models(cfg: FastARDiffConfig, attention_impl: str = "reference"):
    """(target, draft, teacher_head, student_head) with fresh weights."""
    if not isinstance(cfg, FastARDiffConfig):
        raise CheckpointError(f"config '{cfg.name}' is of family '{cfg.family}', not fast-ardiff")
    return (ARTransformer(cfg, cfg.target_layers, attention_impl), ARTransformer(cfg, cfg.draft_layers, attention_impl),
            DiffusionHead(cfg), DiffusionHead(cfg))


def head_timesteps(cfg: FastARDiffConfig, head: str) -> list[int]:
    """The timestep list a head samples with: the teacher all T steps, the student step_schedule(T, S)."""
    if head == "teacher":
        return step_schedule(cfg.teacher_steps, cfg.teacher_steps)
    if head == "student":
        return step_schedule(cfg.teacher_steps, cfg.student_steps)
    raise CheckpointError(f"unknown head '{head}'; use teacher or student")


@dataclass
class FastARDiffCheckpoint:
    config: FastARDiffConfig
    calibration: Calibration
    target: ARTransformer
    draft: ARTransformer
    teacher_head: DiffusionHead
    student_head: DiffusionHead
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def family(self) -> str:
        return FAMILY

    @property
    def alpha_bar(self) -> torch.Tensor:
        return cosine_alpha_bar(self.config.teacher_steps)

    def head(self, which: str) -> DiffusionHead:
        head_timesteps(self.config, which)  # validates the name
        return self.teacher_head if which == "teacher" else self.student_head

    def modules(self) -> dict:
        return {name: getattr(self, name) for name in MODULES}

    def eval(self) -> "FastARDiffCheckpoint":
        for m in self.modules().values():
            m.eval().requires_grad_(False)
        return self


def save_checkpoint(path: str | Path, ckpt: FastARDiffCheckpoint) -> Path:
    """Same format as drift-ar's (weights_only-loadable torch file, JSON beside it), family 'fast-ardiff'."""
    return write_checkpoint(path, FAMILY, ckpt.config, ckpt.calibration, ckpt.meta, ckpt.modules(),
                            json_default=str)


def load_fast_ardiff(payload: dict, path, attention_impl: str = "reference",
                     expected_config: FastARDiffConfig | None = None) -> FastARDiffCheckpoint:
    """A FastARDiffCheckpoint from a payload read by recipes.checkpoint.read_payload (family already checked)."""
    config_family = payload.get("config", {}).get("family")
    if config_family != FAMILY:
        raise CheckpointError(f"'{path}' says model family '{FAMILY}' but holds a config of family "
                              f"'{config_family}'; the file is inconsistent, re-save it")
    config = FastARDiffConfig.from_dict(payload["config"])
    check_expected_config(path, config, expected_config)
    modules = dict(zip(MODULES, build_fast_ardiff_models(config, attention_impl)))
    load_weights(path, payload, modules)
    return FastARDiffCheckpoint(config, Calibration.from_dict(payload["calibration"]), **modules,
                                meta=payload.get("meta", {}), path=Path(path)).eval()


def decode_tokens(cfg: FastARDiffConfig, tokens: torch.Tensor) -> torch.Tensor:
    """The family's decoder: tokens [B, N, D] -> images [B, C, H, W] clamped to [-1, 1] (unpatchify)."""
    return unpatchify(tokens, cfg.patch, cfg.channels).clamp(-1, 1)


@torch.no_grad()
def sample_target_only(ckpt: FastARDiffCheckpoint, labels: torch.Tensor, head: str = "student",
                       cfg_scale: float = 1.0, temperature: float = 1.0, generator: torch.Generator | None = None,
                       return_z: bool = False):
    """Tokens [B, N, D] sampled by the target AR (KV cache) and one head, in torch (the evaluation reference).
    With return_z also the guided z [B, N, z_dim] each token was drawn from."""
    cfg = ckpt.config
    timesteps = head_timesteps(cfg, head)
    net = ckpt.head(head)
    alpha_bar = cosine_alpha_bar(cfg.teacher_steps)
    B, N, D = len(labels), cfg.num_tokens, cfg.token_dim
    tokens = torch.zeros(B, N, D)
    zs = torch.zeros(B, N, cfg.z_dim)
    S = len(timesteps)

    def draw(r, z, _entropy):
        noise = torch.randn(B, S + 1, D, generator=generator)
        mean, sigma, _ = final_step(net, z, noise[:, :S], timesteps, alpha_bar, temperature)
        tokens[:, r], zs[:, r] = mean + sigma.unsqueeze(-1) * noise[:, S], z
        return tokens[:, r]

    target_cached_loop(ckpt, labels, cfg_scale, N, draw)
    return (tokens, zs) if return_z else tokens

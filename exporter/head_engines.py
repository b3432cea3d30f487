"""The fast-ardiff family's export adapter: its engines as torch modules with the engine contract.

Engines: `draft_step`, `target_verify` (the AR contract of engine_modules.py; their `mean` output is the
conditioning vector z [B, K, z_dim]), `head_teacher` (the 100-step DDPM head: MAR's many-step pipeline) and
`head_student` (the distilled few-step head), and `decoder` (the identity patch tokenizer's decoder: tokens are
pixel patches). A head engine takes
  z [M, z_dim]             guided AR outputs, one row per token (any mix of samples and positions)
  traj_noise [M, S, D]     the start x_T and the noise of every jump but the last (S = the head's steps)
  temperature [1]
and returns mean [M, D], sigma [M] (the last jump's Gaussian: the runtime draws the token from it) and
log_offset [M] = -D sum log sigma_t of the earlier jumps (CSpD's variance-ratio factor; runtime/token_rules.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .engine_modules import DraftStep, ShapeProfile, TargetVerify

HEAD_ENGINES = ("head_teacher", "head_student")   # their inputs/outputs: engine_modules.ENGINE_IO


class HeadEngine(nn.Module):
    """Every denoising jump of a diffusion head but the last, unrolled over its fixed timesteps."""

    def __init__(self, head: nn.Module, timesteps: list[int], alpha_bar: torch.Tensor):
        super().__init__()
        self.head = head
        self.timesteps = [int(t) for t in timesteps]
        self.register_buffer("alpha_bar", alpha_bar.detach().clone().float(), persistent=False)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def forward(self, z, traj_noise, temperature):
        from fastardiff.recipes.diffusion_head import final_step

        return final_step(self.head, z, traj_noise, self.timesteps, self.alpha_bar, temperature)


class PatchDecoder(nn.Module):
    """tokens [B, N, D] (pixel patches) -> image [B, C, H, W] in [-1, 1]; entropy and cond are part of the
    decoder contract and unused here."""

    def __init__(self, patch: int, channels: int):
        super().__init__()
        self.patch, self.channels = patch, channels

    def forward(self, tokens, entropy, cond):
        from fastardiff.recipes.models import unpatchify

        return unpatchify(tokens, self.patch, self.channels).clamp(-1.0, 1.0)


def fast_ardiff_modules(ckpt, gammas=()) -> dict[str, nn.Module]:
    """The family's engines for a FastARDiffCheckpoint (draft rollouts are not part of this family's export)."""
    from fastardiff.recipes.diffusion_head import cosine_alpha_bar, step_schedule

    cfg = ckpt.config
    alpha_bar = cosine_alpha_bar(cfg.teacher_steps)
    return {"draft_step": DraftStep(ckpt.draft).eval(), "target_verify": TargetVerify(ckpt.target).eval(),
            "head_teacher": HeadEngine(ckpt.teacher_head, step_schedule(cfg.teacher_steps, cfg.teacher_steps),
                                       alpha_bar).eval(),
            "head_student": HeadEngine(ckpt.student_head, step_schedule(cfg.teacher_steps, cfg.student_steps),
                                       alpha_bar).eval(),
            "decoder": PatchDecoder(cfg.patch, cfg.channels).eval()}


def head_steps(cfg, name: str) -> int:
    return cfg.teacher_steps if name == "head_teacher" else cfg.student_steps


def head_profile(cfg, name: str, max_batch: int, gamma: int) -> ShapeProfile:
    """Tokens per call: up to a verify's (gamma + 1) slots for every row of the largest batch."""
    most = max_batch * (gamma + 1)
    steps = head_steps(cfg, name)
    return ShapeProfile((1, max(1, most // 2), most), (steps,) * 3, (0, 0, 0))


def head_example_inputs(cfg, name: str, tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, cfg.ar_out_dim, generator=g),
            torch.randn(tokens, head_steps(cfg, name), cfg.token_dim, generator=g), torch.tensor([0.9]))


def head_dynamic_shapes(profile: ShapeProfile) -> dict:
    tokens = torch.export.Dim("tokens", min=profile.batch[0], max=profile.batch[2]) if profile.batch[2] > 1 else None
    return {"z": {0: tokens}, "traj_noise": {0: tokens}, "temperature": None}


"""The `torch` reference backend: the Engines protocol around the PyTorch engine modules, numpy in and out.

It runs a checkpoint directly (no export, no manifest file): the manifest is synthesised in memory from the
checkpoint's config and calibration. It lives in `exporter` because it needs `recipes`; the runtime CLI
imports it lazily, only for `--ckpt`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastardiff.recipes.checkpoint import FAMILY, DriftARCheckpoint, load_checkpoint
from fastardiff.runtime.engine import DraftOutput, JacobiOutput, RolloutOutput, VerifyOutput
from fastardiff.runtime.manifest import ENGINE_NAMES, EngineEntry, Manifest

from .engine_modules import (ENGINE_IO, ROLLOUT_INPUTS, ROLLOUT_OUTPUTS, make_engine_modules, rollout_capacity,
                             rollout_name)

DEFAULT_MAX_GAMMA = 8


def checkpoint_manifest(ckpt: DriftARCheckpoint, device: str, max_batch: int, gamma: int = DEFAULT_MAX_GAMMA) -> Manifest:
    """In-memory manifest; the rollout entries carry only what the loop reads (kind, gamma, cache capacity)."""
    capacity = rollout_capacity(ckpt.config, gamma)
    engines = {rollout_name(g): EngineEntry(file="", sha256="", inputs=list(ROLLOUT_INPUTS),
                                            outputs=list(ROLLOUT_OUTPUTS), profile={"cache": [capacity] * 3},
                                            kind="draft_rollout", gamma=g) for g in range(1, gamma + 1)}
    engines.update({name: EngineEntry(file="", sha256="", inputs=list(ENGINE_IO[name][0]),
                                      outputs=list(ENGINE_IO[name][1]), kind=name)
                    for name in ENGINE_NAMES + ("target_jacobi",)})
    return Manifest(backend="torch", family=FAMILY, config=ckpt.config.to_dict(),
                    calibration=ckpt.calibration.to_dict(), engines=engines, device=device, max_batch=max_batch,
                    gamma=gamma,
                    config_hash=ckpt.config.config_hash(), library_versions={"torch": torch.__version__},
                    export={"checkpoint": str(ckpt.path) if ckpt.path else None})


class TorchEngines:
    """Engines backed by the reference torch modules on `device` (float32)."""

    def __init__(self, ckpt: DriftARCheckpoint, device: str = "cpu", max_batch: int = 256,
                 max_gamma: int = DEFAULT_MAX_GAMMA):
        self.device = torch.device(device)
        sigma = ckpt.config.sigma_params(ckpt.calibration.e_max)
        self.modules = {k: m.to(self.device) for k, m in
                        make_engine_modules(ckpt.target, ckpt.draft, ckpt.decoder, sigma,
                                            range(1, max_gamma + 1)).items()}
        self.manifest = checkpoint_manifest(ckpt, str(self.device), max_batch, max_gamma)
        self.rollouts = {g: self._rollout_caller(rollout_name(g)) for g in range(1, max_gamma + 1)}

    def _rollout_caller(self, name: str):
        module = self.modules[name]

        @torch.inference_mode()
        def run(tokens, lengths, k_cache, v_cache, cond, noise, threshold, max_drafts, temperature, cfg_scale):
            out = module(*self._ar_inputs(tokens, lengths, k_cache, v_cache, cond), self._tensor(noise),
                         self._tensor(threshold), self._tensor(max_drafts, torch.long), self._tensor(temperature),
                         self._tensor(cfg_scale))
            return RolloutOutput(*(t.cpu().numpy() for t in out))

        return run

    @torch.inference_mode()
    def target_jacobi(self, *arrays) -> JacobiOutput:
        longs = {1, 4, 7}                          # lengths, cond, num_guesses
        out = self.modules["target_jacobi"](*(self._tensor(a, torch.long if i in longs else torch.float32)
                                              for i, a in enumerate(arrays)))
        return JacobiOutput(*(t.cpu().numpy() for t in out))

    def _tensor(self, a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

    def _ar_inputs(self, tokens, lengths, k_cache, v_cache, cond):
        return (self._tensor(tokens), self._tensor(lengths, torch.long), self._tensor(k_cache),
                self._tensor(v_cache), self._tensor(cond, torch.long))

    @torch.inference_mode()
    def draft_step(self, tokens, lengths, k_cache, v_cache, cond) -> DraftOutput:
        out = self.modules["draft_step"](*self._ar_inputs(tokens, lengths, k_cache, v_cache, cond))
        return DraftOutput(*(t.float().cpu().numpy() for t in out))

    @torch.inference_mode()
    def target_verify(self, tokens, lengths, k_cache, v_cache, cond) -> VerifyOutput:
        out = self.modules["target_verify"](*self._ar_inputs(tokens, lengths, k_cache, v_cache, cond))
        return VerifyOutput(*(t.float().cpu().numpy() for t in out))

    @torch.inference_mode()
    def decoder(self, tokens, entropy, cond) -> np.ndarray:
        image = self.modules["decoder"](self._tensor(tokens), self._tensor(entropy), self._tensor(cond, torch.long))
        return image.float().cpu().numpy()


def load_torch_engines(source: DriftARCheckpoint | str | Path, device: str = "cpu", max_batch: int = 256,
                       attention_impl: str = "reference") -> TorchEngines:
    ckpt = source if isinstance(source, DriftARCheckpoint) else load_checkpoint(source, attention_impl)
    return TorchEngines(ckpt, device, max_batch)

"""The `torch` reference backend: the Engines protocol around the PyTorch engine modules, numpy in and out.

It runs a checkpoint directly (no export, no manifest file): the manifest is synthesised in memory from the
checkpoint's config and calibration. It lives in `exporter` because it needs `recipes`; the runtime CLI
imports it lazily, only for `--ckpt`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastardiff.errors import FastardiffError
from fastardiff.recipes.checkpoint import load_checkpoint
from fastardiff.runtime.capabilities import EngineCapabilities, accelerator_for
from fastardiff.runtime.engine import DraftOutput, JacobiOutput, RolloutOutput, VerifyOutput
from fastardiff.runtime.kv_cache import cache_device_for, loop_device_for, loop_noise_for
from fastardiff.runtime.manifest import EngineEntry, Manifest

from .engine_modules import ENGINE_IO, ROLLOUT_GAMMA, rollout_capacity
from .head_engines import HEAD_ENGINES

DEFAULT_MAX_GAMMA = 8


def checkpoint_manifest(ckpt, modules: dict, device: str, max_batch: int, gamma: int = DEFAULT_MAX_GAMMA) -> Manifest:
    """In-memory manifest of `modules` (the family's engines); rollout and head entries carry only what the loop
    reads (kind, gamma or steps, the rollouts' cache capacity)."""
    capacity = rollout_capacity(ckpt.config, gamma)
    engines = {}
    for name in modules:
        entry = EngineEntry(file="", sha256="", inputs=list(ENGINE_IO[name][0]), outputs=list(ENGINE_IO[name][1]),
                            kind=name, residual=getattr(modules[name], "residual", ""))
        if name in ROLLOUT_GAMMA:
            entry.kind, entry.gamma, entry.profile = "draft_rollout", ROLLOUT_GAMMA[name], {"cache": [capacity] * 3}
        elif name in HEAD_ENGINES:
            entry.kind, entry.steps = "head", modules[name].steps
        engines[name] = entry
    return Manifest(backend="torch", family=ckpt.config.family, config=ckpt.config.to_dict(),
                    calibration=ckpt.calibration.to_dict(), engines=engines, device=device, max_batch=max_batch,
                    gamma=gamma,
                    config_hash=ckpt.config.config_hash(), library_versions={"torch": torch.__version__},
                    export={"checkpoint": str(ckpt.path) if ckpt.path else None})


class TorchEngines:
    """Engines backed by the reference torch modules on `device` (float32). On CPU the numpy inputs are wrapped,
    not copied (torch takes strided arrays), so the loop passes cache prefixes as views (`cache_views`).
    device_cache (None: on for CUDA): the loop keeps its KV caches on `device` (`cache_device`,
    runtime/kv_cache.py) and the AR engines return their new keys/values there, so no call copies a cache."""

    def __init__(self, ckpt, device: str = "cpu", max_batch: int = 256, max_gamma: int = DEFAULT_MAX_GAMMA,
                 device_cache: bool | None = None, cuda_graphs: bool = False, graph_capture=None,
                 device_loop: bool | None = None, loop_noise: str | None = None):
        from .targets import FAMILY_ADAPTERS

        self.device = torch.device(device)
        # device_loop (None: on for CUDA; True needs the device caches and turns them on): the loop keeps its token
        # buffer on the device too and every engine output stays there (runtime/arrays.py)
        cache_device = cache_device_for(self.device, True if device_loop else device_cache)
        # cuda_graphs: the AR engines' calls replay one captured CUDA graph per shape bucket (runtime/cuda_graphs.py);
        # they need the caches on the device, passed whole (a static shape: no prefix views). graph_capture: the
        # capture function (the tests' stand-in; CUDA's by default)
        self.graphs = None
        if cuda_graphs:
            if graph_capture is None and self.device.type != "cuda":
                raise FastardiffError(f"CUDA graphs need a CUDA device (the torch engines run on {self.device}); "
                                      "drop cuda_graphs or run on cuda")
            from fastardiff.runtime.cuda_graphs import GraphedCalls, cuda_capture

            cache_device = self.device
            self.graphs = GraphedCalls(lambda name, *a: self.modules[name](*a), graph_capture or cuda_capture)
        modules = FAMILY_ADAPTERS[ckpt.config.family](ckpt, range(1, max_gamma + 1))
        self.modules = {k: m.to(self.device) for k, m in modules.items()}
        self.manifest = checkpoint_manifest(ckpt, modules, str(self.device), max_batch, max_gamma)
        self.rollouts = {ROLLOUT_GAMMA[n]: self._rollout_caller(n) for n in modules if n in ROLLOUT_GAMMA}
        loop_device = loop_device_for(cache_device, device_loop)
        self.capabilities = EngineCapabilities(
            cache_views=self.graphs is None, cache_limit=None, kv_in_place=frozenset(), needs_cache_room=False,
            cache_device=cache_device, cache_pool=None, loop_device=loop_device,
            loop_noise=loop_noise_for(loop_device, loop_noise),   # runtime/arrays.py
            rollout_gammas=frozenset(self.rollouts), target_jacobi="target_jacobi" in self.modules,
            accelerator=accelerator_for("torch", device=self.device, cache_device=cache_device))

    def _ar_call(self, name: str, *inputs: torch.Tensor):
        """An AR engine module's call, through its CUDA graph bucket when graphs are on."""
        return self.modules[name](*inputs) if self.graphs is None else self.graphs(name, *inputs)

    def head(self, name: str):
        module = self.modules[name]

        @torch.inference_mode()
        def run(z, traj_noise, temperature):
            out = module(self._tensor(z), self._tensor(traj_noise), self._tensor(temperature))
            return tuple(t.float().cpu().numpy() for t in out)

        return run

    def _rollout_caller(self, name: str):
        @torch.inference_mode()
        def run(tokens, lengths, k_cache, v_cache, cond, noise, threshold, max_drafts, temperature, cfg_scale):
            out = self._ar_call(name, *self._ar_inputs(tokens, lengths, k_cache, v_cache, cond), self._tensor(noise),
                                self._tensor(threshold), self._tensor(max_drafts, torch.long),
                                self._tensor(temperature), self._tensor(cfg_scale))
            return RolloutOutput(*self._ar_outputs(out, tokens))

        return run

    @property
    def target_jacobi(self):
        return self._target_jacobi if "target_jacobi" in self.modules else None

    @torch.inference_mode()
    def _target_jacobi(self, *arrays) -> JacobiOutput:
        longs = {1, 4, 7}                          # lengths, cond, num_guesses
        out = self._ar_call("target_jacobi", *(self._tensor(a, torch.long if i in longs else torch.float32)
                                               for i, a in enumerate(arrays)))
        return JacobiOutput(*self._ar_outputs(out, arrays[0]))

    def _ar_outputs(self, out, tokens=None) -> list:
        """An AR engine's outputs as numpy, but its new keys/values (the last two) as device tensors when the
        loop's caches live on the device, and every output when the loop does (its tokens come as tensors)."""
        if isinstance(tokens, torch.Tensor):
            return [t.float() if t.is_floating_point() else t for t in out]
        keep = 2 if self.capabilities.cache_device is not None else 0
        host = [t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for t in out[:len(out) - keep]]
        return host + [t.float() for t in out[len(out) - keep:]]

    def _tensor(self, a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
        """A torch view of `a` (strided numpy arrays too; negative strides and unaligned arrays are copied);
        a tensor (a device cache) is used as it is."""
        if isinstance(a, torch.Tensor):
            return a.to(self.device, dtype)
        try:
            t = torch.from_numpy(a)
        except (ValueError, TypeError):
            t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.device, dtype)

    def _ar_inputs(self, tokens, lengths, k_cache, v_cache, cond):
        return (self._tensor(tokens), self._tensor(lengths, torch.long), self._tensor(k_cache),
                self._tensor(v_cache), self._tensor(cond, torch.long))

    @torch.inference_mode()
    def draft_step(self, tokens, lengths, k_cache, v_cache, cond) -> DraftOutput:
        out = self._ar_call("draft_step", *self._ar_inputs(tokens, lengths, k_cache, v_cache, cond))
        return DraftOutput(*self._ar_outputs(out, tokens))

    @torch.inference_mode()
    def target_verify(self, tokens, lengths, k_cache, v_cache, cond) -> VerifyOutput:
        out = self._ar_call("target_verify", *self._ar_inputs(tokens, lengths, k_cache, v_cache, cond))
        return VerifyOutput(*self._ar_outputs(out, tokens))

    @torch.inference_mode()
    def decoder(self, tokens, entropy, cond) -> np.ndarray:
        image = self.modules["decoder"](self._tensor(tokens), self._tensor(entropy), self._tensor(cond, torch.long))
        return image.float().cpu().numpy()


def load_torch_engines(source, device: str = "cpu", max_batch: int = 256, attention_impl: str = "reference",
                       device_cache: bool | None = None, cuda_graphs: bool = False,
                       device_loop: bool | None = None) -> TorchEngines:
    """source: a loaded checkpoint (either family) or the path of one."""
    ckpt = load_checkpoint(source, attention_impl) if isinstance(source, (str, Path)) else source
    return TorchEngines(ckpt, device, max_batch, device_cache=device_cache, cuda_graphs=cuda_graphs,
                        device_loop=device_loop)

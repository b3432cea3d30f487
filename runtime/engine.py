"""The engine interface every backend implements, and the backend registry.

All arrays are numpy (the runtime owns host buffers; a GPU backend may keep device copies internally).
  draft_step(tokens[B,K,D] f32, lengths[B] i64, k_cache[L,B,H,S,Dh], v_cache, cond[B] i64)
      -> mean[B,K,D], entropy[B,K], shallow_entropy[B,K], new_k[L,B,H,K,Dh], new_v
  target_verify(same inputs with the target's cache) -> mean[B,K,D], entropy[B,K], new_k, new_v
  decoder(tokens[B,N,D], entropy[B,N], cond[B]) -> image[B,C,H,W] in [-1, 1]
Engines exported with `--kv-update in-place` also write new_k / new_v into the k_cache / v_cache they are given
(at each row's length); such a backend lists them in its capabilities' `kv_in_place` and sets `needs_cache_room`
(caches passed to them must hold the fed positions: the loop passes its whole buffer and then skips its own write).
What a backend offers the loop is declared once, in `engines.capabilities` (runtime/capabilities.py).
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Protocol

import numpy as np

from fastardiff.errors import EngineError

from .capabilities import EngineCapabilities
from .manifest import JACOBI_RESIDUAL, Manifest, load_manifest

log = logging.getLogger(__name__)

IN_PLACE_ENGINES = ("draft_step", "target_verify", "target_jacobi")


def per_layer_cache_inputs(layers: int) -> list[str]:
    return [f"{c}_{layer}" for c in ("k_cache", "v_cache") for layer in range(layers)]


def per_layer_aliases(layers: int) -> dict[str, str]:
    """The per-layer engines' updated buffers and the inputs they update: k_cache_out_<l> -> k_cache_<l>, ..."""
    return {name.replace("_cache_", "_cache_out_"): name for name in per_layer_cache_inputs(layers)}


def per_layer_io(inputs, outputs, layers: int) -> tuple[list[str], list[str]]:
    """The I/O names of an engine whose caches are one buffer per layer (the onnx target's in-place engines,
    manifest `cache_layers`): k_cache / v_cache become k_cache_0 .. k_cache_{L-1}, v_cache_0 .. (where k_cache
    was), and the updated buffers k_cache_out_0 .., v_cache_out_0 .. follow the contract outputs. Each
    [R, H, S, Dh] buffer is a layer of the runtime's contiguous [L, R, H, S, Dh] cache, bound in place."""
    per_layer = per_layer_cache_inputs(layers)
    at = list(inputs).index("k_cache")
    ins = list(inputs[:at]) + per_layer + [n for n in inputs[at:] if n not in ("k_cache", "v_cache")]
    outs = list(outputs) + list(per_layer_aliases(layers))
    return ins, outs


def check_cache_room(name: str, tokens, lengths, k_cache) -> None:
    """An engine that writes its fed positions into the cache it is given needs room for them (EngineError)."""
    fed = tokens.shape[1]
    need = int(np.max(lengths, initial=0)) + fed
    if k_cache.shape[3] < need:
        raise EngineError(f"engine '{name}' writes its new keys/values into the cache it is given: a cache of "
                          f"{k_cache.shape[3]} positions has no room for {fed} tokens fed at length {need - fed}; "
                          "pass the whole cache buffer")


class DraftOutput(NamedTuple):
    mean: np.ndarray
    entropy: np.ndarray
    shallow_entropy: np.ndarray
    new_k: np.ndarray
    new_v: np.ndarray


class VerifyOutput(NamedTuple):
    mean: np.ndarray
    entropy: np.ndarray
    new_k: np.ndarray
    new_v: np.ndarray


class RolloutOutput(NamedTuple):
    drafts: np.ndarray           # [B, g, D]
    draft_mean: np.ndarray       # [B, g, D] guided draft means
    draft_sigma: np.ndarray      # [B, g] temperature-scaled sigma
    num_drafts: np.ndarray       # [B] drafts kept (early stop / max_drafts)
    shallow_entropy: np.ndarray  # [B, g]
    new_k: np.ndarray            # [L, R, H, K0 + g - 1, Dh]
    new_v: np.ndarray


class JacobiOutput(NamedTuple):
    accepted: np.ndarray         # [B] guesses accepted
    tokens_out: np.ndarray       # [B, W, D] the emitted token, then the next window's guesses
    slot_mean: np.ndarray        # [B, W, D] p at those slots (the guesses' recorded q)
    slot_sigma: np.ndarray       # [B, W]
    slot_entropy: np.ndarray     # [B, G + 1] the target's entropy at the verified slots
    residual_miss: np.ndarray    # [B, W] 1 where the runtime must finish a residual sample
    new_k: np.ndarray
    new_v: np.ndarray


class Engines(Protocol):
    manifest: Manifest
    capabilities: EngineCapabilities     # what the loop may rely on (runtime/capabilities.py), filled once

    def draft_step(self, tokens, lengths, k_cache, v_cache, cond) -> DraftOutput: ...

    def target_verify(self, tokens, lengths, k_cache, v_cache, cond) -> VerifyOutput: ...

    def decoder(self, tokens, entropy, cond) -> np.ndarray: ...

    # rollouts[g] for every g in capabilities.rollout_gammas: draft_rollout(tokens, lengths, k_cache, v_cache, cond,
    # noise, threshold, max_drafts, temperature[1], cfg_scale[1]) -> RolloutOutput; for other gammas the loop
    # drafts with draft_step calls
    # target_jacobi where capabilities.target_jacobi: (tokens, lengths, k_cache, v_cache, cond, guess_mean,
    # guess_sigma, num_guesses, coins, noise, residual_noise, residual_coins, temperature[1], cfg_scale[1],
    # coupling[1]) -> JacobiOutput (one whole Jacobi round in-graph); else the loop resolves rounds on the host


# backend name (as written in manifest.backend) -> "module:factory"; factory(engine_dir, manifest) -> Engines.
# Modules are imported only when their backend is used, so ONNX engines never import torch.
BACKENDS: dict[str, str] = {
    "onnxruntime": "fastardiff.runtime.backend_onnxruntime:load_onnxruntime_engines",
    "aoti": "fastardiff.runtime.backend_aoti:load_aoti_engines",
    "tensorrt": "fastardiff.runtime.backend_tensorrt:load_tensorrt_engines",
    # `--target trt --onnx-only`: plugin-bearing ONNX graphs that still need a TensorRT build (clear error)
    "tensorrt-onnx": "fastardiff.runtime.backend_tensorrt:refuse_unbuilt_engines",
}


def register_backend(name: str, spec: str) -> None:
    BACKENDS[name] = spec


def _factory(name: str) -> Callable:
    import importlib

    if name not in BACKENDS:
        raise EngineError(f"manifest asks for backend '{name}', which this fastardiff does not know; "
                          f"known: {', '.join(sorted(BACKENDS))}")
    module_name, attr = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def load_engines(engine_dir, **options) -> Engines:
    """Read the manifest, pick its backend, verify hashes (inside the backend) and return loaded engines."""
    manifest = drop_stale_engines(load_manifest(engine_dir), engine_dir)
    return _factory(manifest.backend)(engine_dir, manifest, **options)


def drop_stale_engines(manifest: Manifest, engine_dir) -> Manifest:
    """Leave out a target_jacobi whose in-graph residual rule is not the one this runtime continues on the host
    (exports before the reflected residual): a round would mix two samplers. Its rounds then run target_verify and
    the host's rule (exact, one call a round all the same); a warning says how to get the engine back."""
    entry = manifest.engines.get("target_jacobi")
    if entry is not None and entry.residual != JACOBI_RESIDUAL:
        log.warning("%s: its target_jacobi engine samples the residual by an older rule (%r, this runtime continues "
                    "%r); Jacobi rounds use target_verify and the host's sampling instead. Re-export with "
                    "`fastardiff-export --force` for the one-call round", engine_dir, entry.residual or "proposals "
                    "from p", JACOBI_RESIDUAL)
        manifest.engines = {k: v for k, v in manifest.engines.items() if k != "target_jacobi"}
    return manifest


class EngineCalls:
    """The three contract methods over a backend's single `_run(name, arrays) -> list of outputs`, so every
    backend maps names to engines once and the argument order lives here only."""

    def _run(self, name: str, arrays: tuple) -> list:
        raise NotImplementedError

    def draft_step(self, tokens, lengths, k_cache, v_cache, cond) -> DraftOutput:
        return DraftOutput(*self._run("draft_step", (tokens, lengths, k_cache, v_cache, cond)))

    def target_verify(self, tokens, lengths, k_cache, v_cache, cond) -> VerifyOutput:
        return VerifyOutput(*self._run("target_verify", (tokens, lengths, k_cache, v_cache, cond)))

    def decoder(self, tokens, entropy, cond) -> np.ndarray:
        return self._run("decoder", (tokens, entropy, cond))[0]

    def head(self, name: str):
        """Callable running diffusion-head engine `name`: (z [M,Z], traj_noise [M,S,D], temperature [1]) ->
        (mean [M,D], sigma [M], log_offset [M]) of each token's final denoising step (runtime/token_rules.py)."""
        return lambda z, traj_noise, temperature: tuple(self._run(name, (z, traj_noise, temperature)))

    @property
    def target_jacobi(self):
        """Callable running the target_jacobi engine, or None when the manifest has none (older exports)."""
        if "target_jacobi" not in self.manifest.engines:
            return None
        return lambda *arrays: JacobiOutput(*self._run("target_jacobi", arrays))

    @property
    def rollouts(self) -> dict:
        """gamma -> callable running that draft_rollout engine (every one the manifest lists)."""
        def caller(name):
            return lambda *arrays: RolloutOutput(*self._run(name, arrays))

        return {g: caller(name) for g, name in self.manifest.rollout_engines().items()}

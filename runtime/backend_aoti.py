"""AOTInductor backend: one `.pt2` package per engine, loaded with torch._inductor.aoti_load_package.
The engine interface stays numpy (zero-copy torch.from_numpy on CPU); torch is imported only here."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fastardiff.errors import EngineError, MissingDependencyError

from .capabilities import EngineCapabilities, accelerator_for
from .engine import IN_PLACE_ENGINES, EngineCalls, check_cache_room
from .kv_cache import cache_device_for, loop_device_for, loop_noise_for
from .manifest import Manifest, verify_engine_files

log = logging.getLogger("fastardiff.runtime")


class AotiEngines(EngineCalls):
    """The Engines interface over three AOTInductor packages (numpy in, numpy out)."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest, device: str | None = None, verify: bool = True,
                 in_place: bool = True, device_cache: bool | None = None, device_loop: bool | None = None,
                 cuda_graphs: bool = False, graph_capture=None, loop_noise: str | None = None, **other):
        try:
            import torch
            import torch._inductor
        except ImportError:
            raise MissingDependencyError("torch", "export", "running AOTInductor engines") from None
        if other:
            log.debug("aoti backend ignores options %s", sorted(other))
        self.torch = torch
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.device = device or manifest.device
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"--device {self.device}: torch sees no CUDA device here (engines in '{engine_dir}' "
                              f"were compiled for {manifest.device}); use --device cpu with CPU engines")
        if self.device.split(":")[0] != manifest.device.split(":")[0]:
            raise EngineError(f"--device {self.device}: the AOTInductor engines in '{engine_dir}' were compiled for "
                              f"{manifest.device}; re-export with `fastardiff-export --target aoti --device "
                              f"{self.device.split(':')[0]}` or run with --device {manifest.device}")
        if verify:
            verify_engine_files(self.engine_dir, manifest)
        # device_cache (None: on for CUDA): the loop keeps its KV caches on this device as torch tensors
        # (runtime/kv_cache.py), passed here as they are, and the AR engines' new keys/values stay there: a call
        # moves its tokens and small outputs, never a cache
        # cuda_graphs: every call replays one captured CUDA graph per (engine, input shapes) bucket
        # (runtime/cuda_graphs.py) on static buffers: the caches live on the device and are passed whole, and the
        # loop writes the new keys/values itself (a replay's in-place scatter lands in the bucket's copy).
        # graph_capture: the capture function (the tests' stand-in; CUDA's by default)
        self.graphs = None
        if cuda_graphs:
            if graph_capture is None and not self.device.startswith("cuda"):
                raise EngineError(f"CUDA graphs need a CUDA device (these AOTInductor engines run on {self.device}); "
                                  "drop cuda_graphs or run on cuda")
            from .cuda_graphs import GraphedCalls, cuda_capture

            self.graphs = GraphedCalls(lambda name, *a: self.runners[name](*a), graph_capture or cuda_capture)
            device_cache = True
        cache_device = cache_device_for(self.device, True if device_loop else device_cache)
        # device_loop (None: on for CUDA): the loop's token buffer and every engine output stay on the device too
        # (runtime/arrays.py); a round reads back only its bookkeeping
        loop_device = loop_device_for(cache_device, device_loop)
        # `--kv-update in-place` engines write the fed positions into the caches they are given: the loop's own
        # buffers when they are shared (numpy on the CPU: torch.from_numpy shares it) or on the device; a CUDA run
        # without the device cache updates a transient device copy, so the caller writes the cache all the same
        # (as with in_place=False)
        scatters = manifest.export.get("kv_update") == "in-place"
        writes_shared = self.graphs is None and (self.device == "cpu" or cache_device is not None)
        self.capabilities = EngineCapabilities(
            cache_views=False, cache_limit=None,
            kv_in_place=frozenset(n for n in IN_PLACE_ENGINES if n in manifest.engines)
            if scatters and in_place and writes_shared else frozenset(),
            needs_cache_room=scatters, cache_device=cache_device, cache_pool=None, loop_device=loop_device,
            loop_noise=loop_noise_for(loop_device, loop_noise),   # runtime/arrays.py
            rollout_gammas=frozenset(manifest.rollout_engines()), target_jacobi="target_jacobi" in manifest.engines,
            accelerator=accelerator_for("aoti", device=self.device, cache_device=cache_device))
        self.runners = {}
        for name in manifest.engines:
            path = self.engine_dir / manifest.engines[name].file
            try:
                self.runners[name] = torch._inductor.aoti_load_package(str(path))
            except Exception as err:  # the loader raises RuntimeError/zipfile errors for foreign files
                raise EngineError(f"cannot load AOTInductor package '{path}' ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:160] if str(err) else ''}); re-export it") from None

    def _tensor(self, a):
        if isinstance(a, self.torch.Tensor):      # a device cache: used where it lies (in-place engines update it)
            return a.to(self.device).contiguous()
        a = np.asarray(a)
        a = np.ascontiguousarray(a, dtype=np.int64 if a.dtype.kind in "iu" else np.float32)
        return self.torch.from_numpy(a).to(self.device)

    def _run(self, name: str, arrays) -> list[np.ndarray]:
        if self.capabilities.needs_cache_room and name in IN_PLACE_ENGINES:
            check_cache_room(name, arrays[0], arrays[1], arrays[2])
        with self.torch.no_grad():
            inputs = [self._tensor(a) for a in arrays]
            out = self.runners[name](*inputs) if self.graphs is None else self.graphs(name, *inputs)
        out = out if isinstance(out, (list, tuple)) else (out,)
        # an AR engine's new keys/values (its last two outputs) stay on the device with a device cache
        if isinstance(arrays[0], self.torch.Tensor) and name != "decoder":   # the device loop's call: all stay
            return [o.detach() for o in out]
        device_cache = self.capabilities.cache_device is not None
        keep = 2 if device_cache and self.manifest.engines[name].outputs[-1] == "new_v" else 0
        return [o.detach().cpu().numpy() for o in out[:len(out) - keep]] + [o.detach() for o in out[len(out) - keep:]]


def load_aoti_engines(engine_dir, manifest: Manifest, **options) -> AotiEngines:
    return AotiEngines(engine_dir, manifest, **options)

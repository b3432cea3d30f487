"""What a backend's engines offer the speculative loop, declared once (DESIGN.md "The runtime loop").

Every backend fills one `EngineCapabilities` when it loads its engines (`engines.capabilities`); the loop, the
`--gamma auto` planner and the serving merger read it and never probe the engines object for optional attributes.
Every field is required, so a backend that forgets one fails at construction, not deep in a run; stand-ins and
wrappers start from `EngineCapabilities.host()` (plain host engines) and `dataclasses.replace` what differs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class EngineCapabilities:
    # --- the KV cache (runtime/kv_cache.py, runtime/ar_engine.py) ---
    # the engines take strided cache views (torch does; ONNX Runtime would copy them): a call is passed the cached
    # prefix it reads, so attention scales with the tokens so far, not with the buffer's capacity
    cache_views: bool
    # the longest cache axis the target engines accept: None the sequence length (the exported profile's), inf any
    # (ONNX Runtime's CPU provider); a buffer is passed whole only up to it
    cache_limit: float | None
    # engines that write their new keys/values into the cache buffers they are given (the loop then skips its own
    # write when it passes the whole buffer)
    kv_in_place: frozenset
    # caches passed to the in-place engines must hold the fed positions (never a prefix view)
    needs_cache_room: bool
    # the torch device the loop keeps its KV caches on (None: host numpy buffers)
    cache_device: object
    # host cache buffers reused run after run (kv_cache.HostBufferPool; None: fresh buffers each run)
    cache_pool: object
    # --- where the loop keeps its token buffer and engine outputs (runtime/arrays.py) ---
    loop_device: object          # a torch device (None: the host)
    loop_noise: str              # "host": the run's numpy Generator draws; "device": a torch generator there
    # --- what proposes and accepts in-graph ---
    rollout_gammas: frozenset    # gammas with a draft_rollout engine (engines.rollouts[g] runs it)
    target_jacobi: bool          # a target_jacobi engine: a Jacobi round / model-draft acceptance in one call
    accelerator: bool            # the engines compute on a GPU (sizes the in-graph residual proposals)

    @classmethod
    def host(cls, **changes) -> "EngineCapabilities":
        """Plain host engines: numpy caches passed as prefixes, the host writes every cache, no rollout or
        target_jacobi engine, no accelerator; `changes` override fields."""
        base = dict(cache_views=False, cache_limit=None, kv_in_place=frozenset(), needs_cache_room=False,
                    cache_device=None, cache_pool=None, loop_device=None, loop_noise="host",
                    rollout_gammas=frozenset(), target_jacobi=False, accelerator=False)
        return cls(**{**base, **changes})

    def __post_init__(self):
        problems = []
        if self.loop_noise not in ("host", "device"):
            problems.append(f"loop_noise {self.loop_noise!r} (host or device)")
        if self.loop_device is not None and self.cache_device is None:
            problems.append("a loop_device without a cache_device (the device loop keeps its caches there)")
        if self.cache_pool is not None and self.cache_device is not None:
            problems.append("a host cache_pool with device caches")
        if self.cache_limit is not None and not (self.cache_limit >= 0 or math.isinf(self.cache_limit)):
            problems.append(f"cache_limit {self.cache_limit!r}")
        if any(not isinstance(g, int) or g < 1 for g in self.rollout_gammas):
            problems.append(f"rollout_gammas {sorted(self.rollout_gammas)} (positive ints)")
        if problems:
            raise ValueError("inconsistent engine capabilities: " + "; ".join(problems))

    def summary(self) -> dict:
        """The capabilities as plain values (logs, `fastardiff info`)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = (sorted(v) if isinstance(v, frozenset) else type(v).__name__ if f.name == "cache_pool" and v is not None
                           else str(v) if f.name in ("cache_device", "loop_device") and v is not None else v)
        return out


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def accelerator_for(backend: str, providers=(), device=None, cache_device=None) -> bool:
    """Whether engines compute on a GPU: TensorRT, ONNX Runtime's CUDA / TensorRT providers, a CUDA device or
    device caches on one."""
    if backend == "tensorrt" or any(p in GPU_PROVIDERS for p in providers):
        return True
    return device_type(cache_device or device) == "cuda"


def device_type(device) -> str:
    """'cpu', 'cuda', ... of a torch device or a device string ('cpu' for None)."""
    return str(getattr(device, "type", device) or "cpu").split(":")[0]

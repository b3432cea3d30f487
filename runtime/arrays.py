"""Where the speculative loop's large arrays live (issue 13 item 2): one loop, two array backends.

`HostArrays` (numpy) serves engines that take host buffers (ONNX Runtime on the CPU). `DeviceArrays` (torch)
keeps the token buffer, the Jacobi guesses, the noise and every engine output on the engines' device (a
backend's `loop_device`), so a round moves no token or distribution across the bus: the loop's bookkeeping
(lengths, accepted counts, draft counts, the target entropies the early stop and the decoder read) comes back in
one transfer per round (`readback`), the one host sync of a round.

Noise: `HostArrays` draws from the run's numpy Generator. `DeviceArrays(noise="host")` draws the very same numbers
there and copies them over (so a device run equals a host run for the same seed: the tests' mode);
`noise="device"` draws on the device from a torch generator seeded once from the run's Generator (no copy per
round; other numbers, the same distribution).
"""
from __future__ import annotations

import math

import numpy as np

from .kv_cache import windows


class HostArrays:
    """numpy arrays. `kept(name, shape, dtype)` gives an array that is the same object every time it is asked for
    with that name and shape: the loop fills its per-round engine inputs there (normal / uniform with `out`, or a
    copy), so an ONNX Runtime binding that already points at one is kept (backend_onnxruntime skips an input bound
    to the same array: ~3 us an input, a dozen inputs a Jacobi round). Only for values a round consumes itself."""
    on_device = False

    def __init__(self):
        self._kept: dict = {}

    def kept(self, name: str, shape: tuple, dtype=np.float32):
        key = (name, tuple(shape), np.dtype(dtype))
        a = self._kept.get(key)
        if a is None:
            a = self._kept[key] = np.empty(shape, dtype)
        return a

    def kept_copy(self, name: str, values) -> np.ndarray:
        """values copied into kept(name, its shape, its dtype)."""
        out = self.kept(name, values.shape, values.dtype)
        np.copyto(out, values)
        return out

    def zeros(self, shape, dtype=np.float32) -> np.ndarray:
        return np.zeros(shape, dtype)

    def ones(self, shape, dtype=np.float32) -> np.ndarray:
        return np.ones(shape, dtype)

    def normal(self, rng: np.random.Generator, shape, dtype=np.float32, kept: str | None = None) -> np.ndarray:
        """Standard normals of `shape` (into kept(kept, ...) when named: the same numbers either way)."""
        out = None if kept is None else self.kept(kept, shape, dtype)
        return rng.standard_normal(shape, dtype=dtype, out=out)

    def uniform(self, rng: np.random.Generator, shape, kept: str | None = None) -> np.ndarray:
        out = None if kept is None else self.kept(kept, shape, np.float32)
        return rng.random(shape, np.float32, out=out)

    def concat(self, arrays) -> np.ndarray:
        return np.concatenate(arrays)

    def windows(self, buffer, size: int, axis: int = 1):
        return windows(buffer, size, axis)

    def to_device(self, a):
        return a

    def readback(self, *arrays) -> list:
        """The round's small results on the host (here: as they are)."""
        return [None if a is None else np.asarray(a) for a in arrays]

    def all_finite(self, *arrays) -> bool:
        """float64 sums of float32 outputs cannot overflow: finite iff every element is finite."""
        total = 0.0
        for a in arrays:
            total += float(np.add.reduce(a, None, np.float64))
        return math.isfinite(total)


class DeviceArrays:
    on_device = True

    def __init__(self, device, rng: np.random.Generator | None = None, noise: str = "host"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        if noise not in ("host", "device"):
            raise ValueError(f"noise must be 'host' or 'device' (got {noise!r})")
        self.generator = None
        if noise == "device":
            self.generator = torch.Generator(self.device)
            self.generator.manual_seed(int((rng or np.random.default_rng()).integers(1 << 62)))

    def _dtype(self, dtype):
        return {np.dtype(np.float32): self.torch.float32, np.dtype(np.float64): self.torch.float64,
                np.dtype(np.int64): self.torch.int64, np.dtype(bool): self.torch.bool}[np.dtype(dtype)]

    def zeros(self, shape, dtype=np.float32):
        return self.torch.zeros(shape, dtype=self._dtype(dtype), device=self.device)

    def ones(self, shape, dtype=np.float32):
        return self.torch.ones(shape, dtype=self._dtype(dtype), device=self.device)

    def kept_copy(self, name: str, values):
        return values

    def normal(self, rng: np.random.Generator, shape, dtype=np.float32, kept: str | None = None):
        if self.generator is not None:
            return self.torch.randn(shape, generator=self.generator, dtype=self._dtype(dtype), device=self.device)
        return self.to_device(rng.standard_normal(shape, dtype=dtype))

    def uniform(self, rng: np.random.Generator, shape, kept: str | None = None):
        if self.generator is not None:
            return self.torch.rand(shape, generator=self.generator, device=self.device)
        return self.to_device(rng.random(shape, np.float32))

    def concat(self, arrays):
        return self.torch.cat(list(arrays))

    def windows(self, buffer, size: int, axis: int = 1):
        """A writable strided view like kv_cache.windows (strides in elements here)."""
        shape, strides = tuple(buffer.shape), buffer.stride()
        return buffer.as_strided(shape[:axis] + (shape[axis] - size + 1, size) + shape[axis + 1:],
                                 strides[:axis + 1] + strides[axis:])

    def to_device(self, a):
        if isinstance(a, self.torch.Tensor):
            return a.to(self.device)
        return self.torch.as_tensor(np.ascontiguousarray(a), device=self.device)

    def readback(self, *arrays) -> list:
        """Every array (None passes) on the host in one transfer: flattened into one float64 buffer (exact for
        the float32 / int / bool values here), copied once, split and cast back."""
        torch = self.torch
        tensors = [a for a in arrays if a is not None]
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).cpu().numpy() if tensors else None
        out, at = [], 0
        for a in arrays:
            if a is None:
                out.append(None)
                continue
            n = a.numel()
            part = flat[at:at + n].reshape(tuple(a.shape))
            at += n
            dtype = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: bool}.get(a.dtype, np.float64)
            out.append(part.astype(dtype))
        return out

    def all_finite(self, *arrays):
        """A device bool (read back with the round's results, not here)."""
        return self.torch.isfinite(sum(a.double().sum() for a in arrays))

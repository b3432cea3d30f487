"""The KV cache the runtime owns: preallocated host buffers [L, B, H, S, Dh] and a valid length per row.

Engines receive a slice of the buffers up to the longest length they need plus the per-row lengths, and return
the keys/values of the tokens they were fed; `write` stores those in place at each row's own offset (rows
advance raggedly). Rejecting tokens is `lengths[rows] = ...`: entries past a row's length are ignored by the
engines and overwritten later, nothing is copied back.

Hot path (one view and one write per engine call): `rows=None` means every row in order, which needs no index
array at all; a write whose rows all start at the same offset is a single slice assignment, and a ragged one a
single assignment through strided windows of the buffers (one window per row).

On a device (`device`: a torch device, from a backend's `cache_device`) the buffers are torch tensors there and
stay there: engines get views of them and return their new keys/values as device tensors (or write them in
place), so a call moves only its tokens and small outputs across the bus, never the cache. The lengths stay on
the host (the loop's bookkeeping); the same methods serve both.
"""
from __future__ import annotations

import numpy as np

from fastardiff.errors import EngineError


class HostBufferPool:
    """Host KV buffer pairs kept between runs (a backend's `cache_pool`): a run takes a zeroed pair of its shape and
    gives it back when it is done, so the next run of that shape writes memory already mapped (no page faults) at
    the same address, where an ONNX Runtime IOBinding already points (the 4L cache bindings are kept: ~0.3 ms a
    run per engine at batch 1). A pair is never shared: a run that finds none free allocates its own."""

    def __init__(self, keep: int = 4):
        self.keep = keep              # free pairs kept per shape
        self._free: dict[tuple, list] = {}

    def take(self, shape: tuple, dtype) -> tuple[np.ndarray, np.ndarray]:
        try:
            k, v = self._free[(shape, np.dtype(dtype))].pop()
        except (KeyError, IndexError):            # none of this shape free (or another thread took the last)
            return np.zeros(shape, dtype), np.zeros(shape, dtype)
        k.fill(0)
        v.fill(0)
        return k, v

    def give(self, k: np.ndarray, v: np.ndarray) -> None:
        free = self._free.setdefault((k.shape, k.dtype), [])
        if len(free) < self.keep:
            free.append((k, v))


class KVCache:
    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int, dtype=np.float32,
                 device=None, pool: HostBufferPool | None = None):
        shape = (layers, batch, heads, capacity, head_dim)
        self.device = device
        self.pool = pool if device is None else None
        if device is None:
            self.k, self.v = pool.take(shape, dtype) if pool is not None else (np.zeros(shape, dtype),
                                                                               np.zeros(shape, dtype))
        else:
            import torch

            self.torch = torch
            self.k = torch.zeros(shape, dtype=torch.float32, device=device)
            self.v = torch.zeros(shape, dtype=torch.float32, device=device)
        self.lengths = np.zeros(batch, np.int64)
        self.capacity = capacity
        self.batch = batch
        self.all_rows = np.arange(batch)
        self._window_views: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def release(self) -> None:
        """Give the buffers back to the pool they came from (the cache is not used after this)."""
        if self.pool is not None:
            self.pool.give(self.k, self.v)
            self.pool = None
            self.k = self.v = None
            self._window_views.clear()

    def view(self, rows: np.ndarray | None, upto: int) -> tuple[np.ndarray, np.ndarray]:
        """Cache of `rows` up to position `upto`: a view when rows is None or all rows in order, else a gathered
        copy."""
        if rows is None or (rows.size == self.batch and np.array_equal(rows, self.all_rows)):
            return self.k[:, :, :, :upto], self.v[:, :, :, :upto]
        if self.device is None:                  # C-contiguous (numpy's k[:, rows, :, :upto] is not)
            return np.take(self.k[:, :, :, :upto], rows, axis=1), np.take(self.v[:, :, :, :upto], rows, axis=1)
        rows = self._index(rows)
        return self.k[:, rows, :, :upto], self.v[:, rows, :, :upto]

    def rows(self, rows: np.ndarray):
        """The whole buffers of `rows` (a gathered copy, C-contiguous: numpy's k[:, rows] is not, and a backend
        would copy it once more)."""
        if self.device is None:
            return np.take(self.k, rows, axis=1), np.take(self.v, rows, axis=1)
        rows = self._index(rows)
        return self.k[:, rows], self.v[:, rows]

    def _index(self, idx: np.ndarray):
        return idx if self.device is None else self.torch.as_tensor(idx, device=self.device)

    def _on_device(self, a):
        """An engine's output as a tensor on the cache's device (a no-op for the tensors device engines return)."""
        return self.torch.as_tensor(a, device=self.device)

    def write(self, rows: np.ndarray | None, starts: np.ndarray, new_k: np.ndarray, new_v: np.ndarray) -> None:
        """Store new_k/new_v [L, R, H, K, Dh] at positions starts[r] .. starts[r]+K-1 of row rows[r]
        (rows=None: every row in order)."""
        num_new = new_k.shape[3]
        lo, hi = int(starts.min()), int(starts.max())
        if lo < 0 or hi + num_new > self.capacity:
            raise EngineError(f"KV cache overflow: writing {num_new} positions at offsets {starts.tolist()} into a "
                              f"cache of {self.capacity} positions (the token count N is exceeded)")
        if self.device is not None:
            new_k, new_v = self._on_device(new_k), self._on_device(new_v)
        if lo == hi:  # every row at the same offset: one slice (rows on their own axis keep their place)
            span = slice(lo, lo + num_new)
            if rows is None:
                self.k[:, :, :, span] = new_k
                self.v[:, :, :, span] = new_v
            else:
                rows = self._index(rows)
                self.k[:, rows, :, span] = new_k
                self.v[:, rows, :, span] = new_v
            return
        if rows is None:
            rows = self.all_rows
        if self.device is not None:   # ragged on a device: one indexed assignment (torch has no overlapping windows)
            at = self._index(starts[:, None] + np.arange(num_new)[None, :])   # [R, K]
            r = self._index(rows)[:, None]
            self.k[:, r, :, at] = new_k.permute(1, 3, 0, 2, 4)       # advanced axes first: [R, K, L, H, Dh]
            self.v[:, r, :, at] = new_v.permute(1, 3, 0, 2, 4)
            return
        # ragged offsets: index windows of num_new positions, (row, offset) -> k[:, row, :, offset:offset+num_new]
        # (advanced indices on axes 1 and 3 move to the front: the target is [R, L, H, K, Dh])
        k_windows, v_windows = self._windows(num_new)
        k_windows[:, rows, :, starts] = new_k.transpose(1, 0, 2, 3, 4)
        v_windows[:, rows, :, starts] = new_v.transpose(1, 0, 2, 3, 4)

    def _windows(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Writable strided views [L, B, H, S - size + 1, size, Dh] of the buffers: window s of a row is its
        positions s .. s+size-1 (windows overlap in memory; a write touches one window per row)."""
        if size not in self._window_views:
            self._window_views[size] = windows(self.k, size, axis=3), windows(self.v, size, axis=3)
        return self._window_views[size]


def cache_device_for(device, device_cache: bool | None):
    """A backend's `cache_device`: its torch `device` when the loop should keep the KV caches there (device_cache;
    None: on for every device but the CPU), else None (host caches)."""
    import torch

    device = torch.device(device)
    return device if (device.type != "cpu" if device_cache is None else device_cache) else None


def loop_device_for(cache_device, device_loop: bool | None):
    """A backend's `loop_device` (runtime/arrays.py: the loop's token buffer and the engines' outputs stay there):
    its cache device where device_loop asks for it (None: on for every device but the CPU), else None. The device
    loop needs the device caches (EngineError-free: the caller passes device_cache=True with device_loop=True)."""
    if cache_device is None:
        return None
    return cache_device if (cache_device.type != "cpu" if device_loop is None else device_loop) else None



def loop_noise_for(loop_device, loop_noise: str | None) -> str:
    """Where the device loop draws its noise (runtime/arrays.py): loop_noise, else on the device on a GPU (no copy
    per round) and from the run's numpy Generator elsewhere (a CPU device loop then equals the host loop)."""
    return loop_noise or ("device" if loop_device is not None and loop_device.type == "cuda" else "host")

def windows(buffer: np.ndarray, size: int, axis: int = 1) -> np.ndarray:
    """Writable strided view of `buffer` with its axis `axis` (P positions) replaced by (P - size + 1, size):
    window s holds positions s .. s+size-1, so one fancy index per row reads or writes a window per row
    (windows overlap in memory)."""
    shape, strides = buffer.shape, buffer.strides
    return np.lib.stride_tricks.as_strided(
        buffer, shape[:axis] + (shape[axis] - size + 1, size) + shape[axis + 1:],
        strides[:axis + 1] + strides[axis:], writeable=True)

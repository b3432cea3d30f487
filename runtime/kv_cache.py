"""The KV cache the runtime owns: preallocated host buffers [L, B, H, S, Dh] and a valid length per row.

Engines receive a slice of the buffers up to the longest length they need plus the per-row lengths, and return
the keys/values of the tokens they were fed; `write` stores those in place at each row's own offset (rows
advance raggedly). Rejecting tokens is `lengths[rows] = ...`: entries past a row's length are ignored by the
engines and overwritten later, nothing is copied back.
"""
from __future__ import annotations

import numpy as np

from fastardiff.errors import EngineError


class KVCache:
    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int, dtype=np.float32):
        shape = (layers, batch, heads, capacity, head_dim)
        self.k = np.zeros(shape, dtype)
        self.v = np.zeros(shape, dtype)
        self.lengths = np.zeros(batch, np.int64)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def view(self, rows: np.ndarray, upto: int) -> tuple[np.ndarray, np.ndarray]:
        """Cache of `rows` up to position `upto` (a view when rows are all rows in order, else a gathered copy)."""
        if rows.size == self.batch and np.array_equal(rows, np.arange(self.batch)):
            return self.k[:, :, :, :upto], self.v[:, :, :, :upto]
        return self.k[:, rows, :, :upto], self.v[:, rows, :, :upto]

    def write(self, rows: np.ndarray, starts: np.ndarray, new_k: np.ndarray, new_v: np.ndarray) -> None:
        """Store new_k/new_v [L, R, H, K, Dh] at positions starts[r] .. starts[r]+K-1 of row rows[r]."""
        num_new = new_k.shape[3]
        if (starts < 0).any() or (starts + num_new > self.capacity).any():
            raise EngineError(f"KV cache overflow: writing {num_new} positions at offsets {starts.tolist()} into a "
                              f"cache of {self.capacity} positions (the token count N is exceeded)")
        positions = starts[:, None] + np.arange(num_new)[None, :]             # [R, K]
        row_index = rows[:, None]
        # advanced indices on axes 1 and 3 broadcast to [R, K] and move to the front: target is [R, K, L, H, Dh]
        self.k[:, row_index, :, positions] = new_k.transpose(1, 3, 0, 2, 4)
        self.v[:, row_index, :, positions] = new_v.transpose(1, 3, 0, 2, 4)

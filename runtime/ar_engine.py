"""One AR engine of the speculative loop (draft_step, target_verify and the engines built on them: draft_rollout,
target_jacobi) with its KV cache, its guidance rows and its finiteness checks, fed from the loop's token buffer
(runtime/speculative.py). Rejection is `rollback`: resetting lengths.
"""
from __future__ import annotations

import time

import numpy as np

from fastardiff.errors import EngineError

from .arrays import HostArrays
from .generation import GenerationConfig, ModelShape
from .kv_cache import KVCache
from .sampling import guide
from .stats import RunStats


class AREngine:
    """One AR engine (draft_step or target_verify) with its KV cache and guidance, fed from a token buffer.

    `samples` passed to predict/rollback are strictly increasing sample indices; all B of them (the common case)
    needs no index arrays on the cache at all."""

    def __init__(self, name, fn, layers, shape: ModelShape, classes, gen: GenerationConfig, rule,
                 stats: RunStats, stage: str, capacity: int | None = None, cache_views: bool = False,
                 cache_limit: float | None = None, in_place=frozenset(), needs_room: bool = False, device=None,
                 arrays=None, pool=None):
        self.name, self.fn, self.gen, self.rule, self.stats, self.stage = name, fn, gen, rule, stats, stage
        # where the token buffer and the engine outputs live (runtime/arrays.py); on a device the finiteness
        # check of each call is read back with the round's results (`pending`, round_results)
        self.arrays = arrays or HostArrays()
        self.pending: list = []
        # engines that write their new keys/values into the cache buffers they are passed (ONNX Runtime with the
        # onnx target's in-place engines): a call given the whole buffer needs no host write after it
        self.in_place = in_place
        # needs_room: the engines' caches must hold the fed positions too (the in-place engines scatter them there;
        # backend_onnxruntime checks it): never a prefix view, the whole buffer or its rows at full capacity
        self.needs_room = needs_room
        # cache_views: the backend takes strided cache views (torch does; ONNX Runtime would copy them), so a call
        # gets the cached prefix it needs, not the whole buffer: the engine's attention and concat then scale
        # with the tokens so far, not with the capacity
        self.cache_views = cache_views
        # the longest cache axis the engine accepts (None: the sequence length, the exported profile's; inf: any,
        # e.g. ONNX Runtime's CPU provider): a buffer is passed whole only up to it, else as the prefix a call reads
        self.cache_limit = shape.seq_len if cache_limit is None else cache_limit
        self.n_cond = shape.n_cond
        self.batch = len(classes)
        self.guided = gen.cfg_scale != 1.0
        self.cond = np.concatenate([classes, np.full_like(classes, shape.num_classes)]) if self.guided else classes
        # device: the backend's `cache_device` (a torch device: the cache lives there, kv_cache.py), or None
        self.cache = KVCache(layers, len(self.cond), shape.heads, capacity or shape.seq_len, shape.head_dim,
                             device=device, pool=pool)
        self.scalars = (np.array([gen.temperature], np.float32), np.array([gen.cfg_scale], np.float32))
        self.seq_len = shape.seq_len
        self.reps = len(self.cond) // self.batch      # 2 with classifier-free guidance: [cond; uncond] rows

    def rows(self, samples: np.ndarray) -> np.ndarray:
        return np.concatenate([samples, samples + self.batch]) if self.guided else samples

    def predict(self, seq: np.ndarray, samples: np.ndarray, first: np.ndarray, end: np.ndarray, slots: int):
        """Feed positions up to end[r] (exclusive) of `samples`; return the token distributions output at
        positions first[r] .. first[r]+slots-1 (slots past a row's own end are junk) and the shallow entropy."""
        out, start, width = self._fed_call(self.fn, self.name, seq, samples, end, lambda start: (),
                                           lambda o: (o.mean, o.entropy))
        mean, entropy = guide(out.mean, out.entropy, self.gen.cfg_scale)
        shallow = getattr(out, "shallow_entropy", None)
        if shallow is not None:
            shallow = shallow[: len(samples)]
        if width == 1 and slots == 1:               # the only output of every row
            span = slice(0, 1)
        else:
            offset = first - start
            lo = int(offset.min())
            span = slice(lo, lo + slots) if 0 <= lo == int(offset.max()) and lo + slots <= width else None
        if span is not None:                          # the same slots of every row: a slice, no gather
            take = lambda a: a[:, span]  # noqa: E731
        else:                                         # ragged: gather slot idx[r, j] of row r
            idx = np.minimum(np.maximum((first - start)[:, None] + np.arange(slots)[None, :], 0), width - 1)
            row = np.arange(len(samples))[:, None]
            take = lambda a: a[row, idx]  # noqa: E731
        dist = self.rule.distribution(take(mean), take(entropy), samples, first - (self.n_cond - 1))
        return dist, (take(shallow) if shallow is not None else None)

    def jacobi(self, fn, seq: np.ndarray, samples: np.ndarray, end: np.ndarray, sampling: tuple,
               coupling: np.ndarray):
        """One target_jacobi call over [last accepted token, guesses]: positions end[r] - kmax - 1 .. end[r] - 1
        (every row's feed starts at its cache length: runtime/jacobi.py keeps the window inside the cache), with
        the round's sampling inputs (guess_mean .. residual_coins)."""
        out, _, _ = self._fed_call(fn, "target_jacobi", seq, samples, end,
                                   lambda start: sampling + self.scalars + (coupling,),
                                   lambda o: (o.tokens_out, o.slot_sigma))
        return out

    def _fed_call(self, fn, engine: str, seq, samples, end, extra, finite):
        """Feed positions up to end[r] (exclusive) of `samples` through `fn` (engine `engine`, with the inputs
        extra(start) after the AR ones), check the outputs finite(out), write the new keys/values (unless the
        engine wrote them into the buffer itself) and the lengths; returns (out, start, width)."""
        cache, batch = self.cache, self.batch
        full = len(samples) == batch                  # every sample in order
        lengths = cache.lengths[:batch] if full else cache.lengths[samples]
        width = int((end - lengths).max())
        # rows needing fewer than `width` positions recompute cached ones (same inputs, same keys) or feed junk
        # past their end (ignored: the length marks it invalid); no feed may pass the cache capacity
        start = np.minimum(lengths, cache.capacity - width)
        rows, tokens, starts, cond = self._feed(seq, samples, start, width)
        ends = np.concatenate([end, end]) if self.guided else end
        whole = rows is None and not self.cache_views and (cache.capacity <= self.cache_limit or self.needs_room)
        if whole:
            k, v = cache.k, cache.v                   # the whole buffer: no copy (positions >= lengths are masked)
        elif self.needs_room:
            k, v = cache.rows(rows) if rows is not None else (cache.k, cache.v)
        else:
            k, v = cache.view(rows, int(start.max()))
        out = self._timed(fn, tokens, starts, k, v, cond, *extra(start))
        if self.stage == "draft":
            self.stats.draft_calls += 1
        else:
            self.stats.target_calls += 1
            self.stats.target_rows += len(samples)
        self.check_finite(self.name, *finite(out))
        if not (whole and engine in self.in_place):
            cache.write(rows, starts, out.new_k, out.new_v)
        if full:
            cache.lengths[:] = ends
        else:
            cache.lengths[rows] = ends
        return out, start, width

    def rollout(self, fn, gamma: int, seq: np.ndarray, samples: np.ndarray, end: np.ndarray, noise: np.ndarray,
                threshold: np.ndarray, max_drafts: np.ndarray):
        """One draft_rollout call: feed positions up to end[r] (exclusive; the last one holds the last accepted
        token), then `gamma` drafts in-graph. The whole cache buffer is passed (static shape, no copy), or with
        cache_views the prefix the call reads."""
        cache, batch = self.cache, self.batch
        full = len(samples) == batch
        lengths = cache.lengths[:batch] if full else cache.lengths[samples]
        width = int((end - lengths).max())
        start = end - width                              # rows with a valid cache recompute cached positions
        rows, tokens, starts, cond = self._feed(seq, samples, start, width)
        if self.cache_views:                             # the cached prefix it needs (a view for every row)
            k, v = cache.view(rows, int(starts.max()))
        else:                                            # static cache shape: the whole buffer of those rows
            k, v = (cache.k, cache.v) if rows is None else cache.rows(rows)
        out = self._timed(fn, tokens, starts, k, v, cond, noise, threshold, max_drafts, *self.scalars)
        self.stats.draft_calls += 1
        self.check_finite(f"draft_rollout_{gamma}", out.draft_mean, out.draft_sigma)
        cache.write(rows, starts, out.new_k, out.new_v)
        fed = starts + (width + gamma - 1)
        if full:
            cache.lengths[:] = fed
        else:
            cache.lengths[rows] = fed
        return out

    def _feed(self, seq: np.ndarray, samples: np.ndarray, start: np.ndarray, width: int):
        """The engine rows of `samples` (None: every row in order), their input window seq[start : start+width]
        ([cond; uncond] copies with guidance), per-row start positions and class ids."""
        full = len(samples) == self.batch
        if width == 1:
            tokens = seq[samples, start][:, None]
        else:
            tokens = seq[samples[:, None], start[:, None] + np.arange(width)[None, :]]
        if self.guided:
            rows = None if full else np.concatenate([samples, samples + self.batch])
            tokens, start = self.arrays.concat([tokens, tokens]), np.concatenate([start, start])
        else:
            rows = None if full else samples
        return rows, tokens, start, (self.cond if full else self.cond[rows])

    def check_finite(self, name: str, a, b) -> None:
        """Raise now on the host; on a device, read the check back with the round's results (round_results)."""
        finite = self.arrays.all_finite(a, b)
        if self.arrays.on_device:
            self.pending.append((name, finite))
        elif not finite:
            raise_not_finite(name)

    def _timed(self, fn, *arrays):
        began = time.perf_counter()
        out = fn(*arrays)
        seconds = self.stats.seconds
        seconds[self.stage] = seconds.get(self.stage, 0.0) + time.perf_counter() - began
        return out

    def rollback(self, samples: np.ndarray, length: np.ndarray) -> None:
        lengths = self.cache.lengths.reshape(self.reps, self.batch)      # a view: [cond; uncond] rows
        if len(samples) == self.batch:
            np.minimum(lengths, length, out=lengths)
        else:
            lengths[:, samples] = np.minimum(lengths[:, samples], length)


def raise_not_finite(name: str):
    raise EngineError(f"engine '{name}' returned NaN or inf; the engine or its inputs are broken "
                      "(re-export it, or try a lower --cfg / --temperature)")


def round_results(arrays, engines, *values) -> list:
    """`values` on the host, with the engines' pending finiteness checks, in one transfer (the round's one
    host sync on a device; runtime/arrays.py). EngineError naming the engine when a check failed."""
    checks = [check for engine in engines if engine is not None for check in engine.pending]
    for engine in engines:
        if engine is not None:
            engine.pending = []
    got = arrays.readback(*values, *(flag for _, flag in checks))
    for (name, _), ok in zip(checks, got[len(values):]):
        if not ok:
            raise_not_finite(name)
    return got[:len(values)]

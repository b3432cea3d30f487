"""Cross-request batching of engine calls: each request runs its own `generate`, their engine calls run together.

Why not one `generate` over every request of a batch: the loop sizes each engine call from the whole batch (the
widest row's token count, the longest row's cache view) and ONNX Runtime's CPU kernels round differently by
shape (measured: a 1-token call differs from a 2-token one, a 30-position key axis from the full one, and a call
whose rows x tokens is not a multiple of 4 from one that is, in the last bits), and one random stream serves
the whole batch. A request's images would then depend on what it was batched with.

Here every request keeps its own loop, its own `default_rng(seed)` and so its own shapes, exactly as if it ran
alone (the random numbers of `fastardiff-run` with the same settings and seed; pixels may differ from the CLI's
in the last bits because of the padding below). Its engine calls go through an `EngineCallMerger` that requests
join when they start and leave when they end (continuous batching: a request need not wait for a batch to
finish): once every request in it has submitted its next call, calls with the same shape (engine, tokens per
row, cache length; for a rollout also temperature and guidance scale) run as one engine call over all their
rows, and each request gets its rows back. Every engine call, alone or merged, is padded with copies of a row
to a multiple of 4 in rows x tokens, where neither the batch size nor a row's place in it changes a row's bits
(tests/test_serve.py checks the images bit for bit); a call over more rows than its engine's profile takes (the
top of its batch axis in the manifest: `engine_row_limits`) is split, and where not even the fewest rows that
make a multiple of 4 fit (engines exported for a batch below 4), its calls hold one row each: a request's row
alone, as when it runs alone.
A guided rollout or Jacobi round pairs a sample's cond and uncond rows inside one call: where the engine takes
fewer than 2 rows, a guided request's view has no such engine and its loop drafts step by step instead.

Planning (`--gamma auto`) times the engines: it joins with `exclusive=True`, and while it is in, its calls run
alone, at once, and every other request's calls wait (the engines are never called by two threads at a time and
the timing is not another request's).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from fastardiff.runtime.capabilities import EngineCapabilities
from fastardiff.runtime.engine import DraftOutput, JacobiOutput, RolloutOutput, VerifyOutput

ALIGN = 4          # rows x tokens of every engine call is a multiple of this


def engine_row_limits(manifest) -> dict[str, int]:
    """Rows each engine takes in one call: the top of its profile's batch axis (tokens for a diffusion head), else
    the manifest's max_batch (times gamma + 1 tokens for a head: every row of a full batch's verify). (Serve's own reading of the profile; runtime/manifest.py may grow one accessor.)"""
    limits = {}
    for name, entry in manifest.engines.items():
        batch = (getattr(entry, "profile", None) or {}).get("batch")
        tokens = int(getattr(manifest, "gamma", 0) or 0) + 1 if getattr(entry, "kind", "") == "head" else 1
        limits[name] = max(1, int(batch[-1]) if batch else int(manifest.max_batch) * tokens)
    return limits


@dataclass
class _Call:
    key: tuple
    arrays: tuple
    owner: object = None
    done: bool = False
    result: object = None
    error: BaseException | None = None
    extra: dict = field(default_factory=dict)


class EngineCallMerger:
    """Engines shared by the threads of concurrent `generate` calls: each thread runs its `generate` on the
    engines `join()` returns, used as a context manager (leaving is what lets the others go on without it)."""

    def __init__(self, engines, max_rows: int | None = None):
        """max_rows: at most this many rows per engine call (never more than the engines' profiles allow)."""
        self.engines = engines
        self.manifest = engines.manifest
        self.limits = {name: min(rows, max_rows or rows) for name, rows in engine_row_limits(self.manifest).items()}
        self.engine_calls = 0                     # engine invocations made (merged calls count once)
        self.submitted = 0                        # calls the generate loops made
        self._live = 0
        self._pending: list[_Call] = []
        self._cv = threading.Condition()
        self._exclusive = None                    # the view that plans: its calls run alone, the others wait
        caps = engines.capabilities          # what the engines offer (runtime/capabilities.py)
        self._rollouts = engines.rollouts if caps.rollout_gammas else {}
        self._jacobi = engines.target_jacobi if caps.target_jacobi else None

    def rows(self, name: str) -> int:
        return self.limits.get(name, self.manifest.max_batch)

    def join(self, guided: bool = False, exclusive: bool = False) -> "MergedEngines":
        """A request's view of the engines (guided: its rows come in cond/uncond pairs). exclusive: a planner's
        view; it waits for any other planner to leave."""
        view = MergedEngines(self, guided)
        with self._cv:
            if exclusive:
                self._cv.wait_for(lambda: self._exclusive is None)
                self._exclusive = view
            self._live += 1
        return view

    def _leave(self, view) -> None:
        with self._cv:
            self._live -= 1
            if self._exclusive is view:
                self._exclusive = None
                self._cv.notify_all()
            self._dispatch_if_ready()

    def submit(self, key: tuple, arrays: tuple, owner=None) -> tuple:
        """(result, number of calls merged into its engine call)."""
        call = _Call(key, arrays, owner)
        with self._cv:
            self._pending.append(call)
            self.submitted += 1
            self._dispatch_if_ready()
            self._cv.wait_for(lambda: call.done)
        if call.error is not None:
            raise call.error
        return call.result, call.extra["merged"]

    def _dispatch_if_ready(self) -> None:
        if self._exclusive is not None:
            pending = [c for c in self._pending if c.owner is self._exclusive]
            self._pending = [c for c in self._pending if c.owner is not self._exclusive]
            if not pending:
                return
        elif not self._pending or len(self._pending) < self._live:
            return
        else:
            pending, self._pending = self._pending, []
        groups: dict[tuple, list[_Call]] = {}
        for call in pending:
            groups.setdefault(call.key, []).append(call)
        for key, calls in groups.items():
            try:
                if key[0] in ("rollout", "jacobi"):
                    results = self._run_sampling(key, calls)
                elif key[0] == "head":
                    results = self._run_head(key, calls)
                else:
                    results = self._run_rows(key, calls)
                for call, result in zip(calls, results):
                    call.result = result
                    call.extra["merged"] = len(calls)
            except BaseException as err:  # noqa: BLE001 - every caller of the merged call gets the error
                for call in calls:
                    call.error = err
            for call in calls:
                call.done = True
        self._cv.notify_all()

    # -- row-wise engines: draft_step, target_verify, decoder (every input and output has the row axis first,
    #    except the caches [L, B, ...], whose row axis is 1)
    def _run_rows(self, key: tuple, calls: list[_Call]) -> list:
        name = key[0]
        fn = getattr(self.engines, name)
        axes = _ROW_AXES[name]
        sizes = [len(c.arrays[0]) for c in calls]
        merged = [np.concatenate([c.arrays[i] for c in calls], axis=ax) for i, ax in enumerate(axes)]
        width, most = merged[0].shape[1], self.rows(name)
        total, outs = sum(sizes), []
        for lo in range(0, total, _step(most, width)):
            hi = min(total, lo + _step(most, width))
            take = _aligned_rows(lo, hi, width, most)
            part = [np.take(a, take, axis=ax) for a, ax in zip(merged, axes)]
            out = fn(*part)
            self.engine_calls += 1
            out = (out,) if isinstance(out, np.ndarray) else tuple(out)
            outs.append([o[:, : hi - lo] if o.ndim == 5 else o[: hi - lo] for o in out])
        joined = [np.concatenate(parts, axis=1 if parts[0].ndim == 5 else 0) for parts in zip(*outs)]
        wrap = _WRAP[name]
        results, lo = [], 0
        for n in sizes:
            piece = [o[:, lo: lo + n] if o.ndim == 5 else o[lo: lo + n] for o in joined]
            results.append(wrap(piece))
            lo += n
        return results

    # -- diffusion heads (fast-ardiff): z [M, Z] and traj_noise [M, S, D] per token, temperature [1] shared (in the
    #    key); up to the head profile's most tokens per call (every row of a full batch's verify)
    def _run_head(self, key: tuple, calls: list[_Call]) -> list:
        fn = self.engines.head(key[1])
        temperature = calls[0].arrays[2]
        sizes = [len(c.arrays[0]) for c in calls]
        z = np.concatenate([c.arrays[0] for c in calls])
        traj = np.concatenate([c.arrays[1] for c in calls])
        most = self.rows(key[1])
        outs = []
        for lo in range(0, len(z), most):
            outs.append(fn(z[lo: lo + most], traj[lo: lo + most], temperature))
            self.engine_calls += 1
        joined = [np.concatenate(parts) for parts in zip(*outs)]
        results, lo = [], 0
        for n in sizes:
            results.append(tuple(o[lo: lo + n] for o in joined))
            lo += n
        return results

    # -- draft_rollout and target_jacobi: the AR inputs per row, then inputs per sample (the rollout's noise,
    #    thresholds and draft limits; Jacobi's guesses, their q, coins and normals), then scalars (temperature,
    #    guidance, coupling). With guidance the rows are [cond; uncond] (the engine pairs row r with row
    #    r + samples), so the merged rows are every call's cond rows, then every call's uncond rows.
    def _run_sampling(self, key: tuple, calls: list[_Call]) -> list:
        kind, reps, n_sample = key[0], 2 if key[4] else 1, len(key[5])
        fn, wrap = (self._rollouts[key[1]], RolloutOutput) if kind == "rollout" else (self._jacobi, JacobiOutput)
        most = self.rows(self.manifest.rollout_engines()[key[1]] if kind == "rollout" else "target_jacobi") // reps
        axes = _ROW_AXES["target_verify"]
        samples = [len(c.arrays[5]) for c in calls]
        total = sum(samples)
        # merged row index of (half h, sample s) = h * total + s
        order = [np.arange(b) + h * b for h in range(reps) for b in samples]
        starts = np.cumsum([0] + [reps * b for b in samples])[:-1]
        pick = np.concatenate([o + starts[i % len(samples)] for i, o in enumerate(order)])
        rows_in = [np.take(np.concatenate([c.arrays[i] for c in calls], axis=ax), pick, axis=ax)
                   for i, ax in enumerate(axes)]
        sample_in = [np.concatenate([c.arrays[i] for c in calls]) for i in range(5, 5 + n_sample)]
        scalars = calls[0].arrays[5 + n_sample:]
        if most < 1:
            raise RuntimeError(f"engine {kind} takes fewer rows than one guided sample's two")   # join() hides it
        step = _step(most, reps)
        per_sample, halves = None, [[[] for _ in range(reps)] for _ in range(2)]
        for lo in range(0, total, step):
            hi = min(total, lo + step)
            take = _aligned_rows(lo, hi, reps, most)    # samples; rows = reps * samples, a multiple of ALIGN
            rows = np.concatenate([take + h * total for h in range(reps)])
            out = fn(*[np.take(a, rows, axis=ax) for a, ax in zip(rows_in, axes)], *[a[take] for a in sample_in],
                     *scalars)
            self.engine_calls += 1
            n, padded = hi - lo, len(take)
            per_sample = per_sample or [[] for _ in out[:-2]]
            for i, o in enumerate(out[:-2]):
                per_sample[i].append(o[:n])
            for i, o in enumerate(out[-2:]):
                for h in range(reps):
                    halves[i][h].append(o[:, h * padded: h * padded + n])
        per_sample = [np.concatenate(parts) for parts in per_sample]
        caches = [[np.concatenate(parts, axis=1) for parts in cache] for cache in halves]   # [i][h]: [L, total, ...]
        results, lo = [], 0
        for b in samples:
            new = [np.concatenate([cache[h][:, lo: lo + b] for h in range(reps)], axis=1) for cache in caches]
            results.append(wrap(*[o[lo: lo + b] for o in per_sample], *new))
            lo += b
        return results


def _unit(width: int) -> int:
    """The fewest rows whose rows x width is a multiple of ALIGN."""
    return ALIGN // math.gcd(width, ALIGN)


def _step(most: int, width: int) -> int:
    """Rows per piece of a split call: a multiple of _unit(width) up to `most`; 1 where not even one fits (each
    such call then holds one request's row alone, as it would alone)."""
    unit = _unit(width)
    return most // unit * unit if unit <= most else 1


def _aligned_rows(lo: int, hi: int, width: int, most: int) -> np.ndarray:
    """Indices lo..hi-1, then copies of lo until rows x width is a multiple of ALIGN (where that fits in `most`)."""
    n, unit = hi - lo, _unit(width)
    if unit <= most:
        n = -(-n // unit) * unit
    return np.concatenate([np.arange(lo, hi), np.full(n - (hi - lo), lo)])


_ROW_AXES = {"draft_step": (0, 0, 1, 1, 0), "target_verify": (0, 0, 1, 1, 0), "decoder": (0, 0, 0)}
_WRAP = {"draft_step": lambda p: DraftOutput(*p), "target_verify": lambda p: VerifyOutput(*p),
         "decoder": lambda p: p[0]}


class MergedEngines:
    """The `Engines` interface of one request over an EngineCallMerger; `calls` and `merged` count its engine
    calls and the requests' calls they ran with (itself included)."""

    def __init__(self, merger: EngineCallMerger, guided: bool = False):
        self._m = merger
        self.manifest = merger.manifest
        self.guided = guided
        # what plan_cache keys a plan on: the engines' execution providers and threads
        self.providers = getattr(merger.engines, "providers", [])
        self.threads = getattr(merger.engines, "threads", None)
        # every request shapes its calls as the engines alone would (the same cache_limit and needs_cache_room:
        # runtime/ar_engine.py), so requests of any batch size still merge; on host buffers of its own (a merged
        # call's cache is a concatenated copy: the cache write stays the request's, never in place)
        inner = merger.engines.capabilities
        self.capabilities = EngineCapabilities.host(
            cache_limit=inner.cache_limit, needs_cache_room=inner.needs_cache_room,
            rollout_gammas=frozenset(merger._rollouts), target_jacobi=merger._jacobi is not None,
            accelerator=inner.accelerator)
        self.calls = 0
        self.merged = 0

    def __enter__(self) -> "MergedEngines":
        return self

    def __exit__(self, *exc) -> None:
        self._m._leave(self)

    def _fits_pairs(self, name: str) -> bool:
        """Whether engine `name` takes this request's rows of one sample (2 with guidance) in one call."""
        return self._m.rows(name) >= (2 if self.guided else 1)

    def _submit(self, key: tuple, arrays: tuple):
        result, merged = self._m.submit(key, arrays, self)
        self.calls += 1
        self.merged += merged
        return result

    def draft_step(self, tokens, lengths, k_cache, v_cache, cond) -> DraftOutput:
        return self._submit(("draft_step", tokens.shape[1], k_cache.shape[3]),
                            (tokens, lengths, k_cache, v_cache, cond))

    def target_verify(self, tokens, lengths, k_cache, v_cache, cond) -> VerifyOutput:
        return self._submit(("target_verify", tokens.shape[1], k_cache.shape[3]),
                            (tokens, lengths, k_cache, v_cache, cond))

    def decoder(self, tokens, entropy, cond) -> np.ndarray:
        return self._submit(("decoder", tokens.shape[1]), (tokens, entropy, cond))

    def _sampling_key(self, kind: str, name, arrays: tuple, n_sample: int) -> tuple:
        tokens, _, k_cache, _, cond = arrays[:5]
        per_sample = tuple(a.shape[1:] for a in arrays[5:5 + n_sample])
        scalars = tuple(float(a[0]) for a in arrays[5 + n_sample:])
        return (kind, name, tokens.shape[1], k_cache.shape[3], len(cond) == 2 * len(arrays[5]), per_sample, scalars)

    @property
    def rollouts(self) -> dict:
        """gamma -> draft_rollout(tokens, lengths, k_cache, v_cache, cond, noise, threshold, max_drafts,
        temperature, cfg_scale), merged with the same rollouts of other requests."""
        def caller(g):
            def call(*arrays):
                return self._submit(self._sampling_key("rollout", g, arrays, 3), arrays)
            return call

        names = self.manifest.rollout_engines()
        return {g: caller(g) for g in self._m._rollouts if self._fits_pairs(names.get(g, ""))}

    def head(self, name: str):
        """Diffusion-head engine `name` (z, traj_noise, temperature) merged with other requests' calls of it."""
        return lambda z, traj_noise, temperature: self._submit(
            ("head", name, traj_noise.shape[1], float(temperature[0])), (z, traj_noise, temperature))

    @property
    def target_jacobi(self):
        """target_jacobi(tokens, lengths, k_cache, v_cache, cond, 7 per-sample inputs, temperature, cfg_scale,
        coupling) merged with other requests' rounds of the same shape, or None where the engines have none."""
        if self._m._jacobi is None or not self._fits_pairs("target_jacobi"):
            return None
        return lambda *arrays: self._submit(self._sampling_key("jacobi", None, arrays, 7), arrays)

"""The generator replica of `fastardiff serve`: engines loaded once, requests batched by `serve.batch`.

A replica loads the engines as `fastardiff-run` does (manifest read and every engine file's sha256 verified by
the backend) and times `--gamma auto` once for the default guidance scale (again, once, for each other scale
asked for), so every request on a replica gets the same choice. `serve.batch` hands it the requests that arrive
within `batch_wait_s` of each other, up to `max_batch` at a time; each request runs its own `generate` (its own
seed, its own settings) in a thread of the replica, and the engine calls of every request running on the replica
run together through one EngineCallMerger (merge.py), so a request's images do not depend on what it ran with.
Batches do not wait for each other (Ray Serve forms the next batch while one runs, so one batch at a time would
make a busy replica run many small batches in turn): a new batch's requests join those already running.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastardiff.errors import EngineError, FastardiffError

log = logging.getLogger("fastardiff.serve")

DEFAULT_DRAFTS = ("model", "jacobi")      # what `--gamma auto` weighs for a request with draft 'auto'


def png_base64(image_uint8: np.ndarray) -> str:
    """[H, W, C] uint8 -> base64 of its PNG file."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def internal_error(err: BaseException) -> dict:
    """The answer to a request that failed inside the server (its traceback is in this replica's log): 503."""
    message = " ".join(str(err).split())[:300] or "(no message)"
    return {"error": f"internal error: {type(err).__name__}: {message} (logged on the server); retry later",
            "status": 503}


class Generator:
    """One replica (a Ray Serve deployment class; see app.py for its options)."""

    def __init__(self, engine_dir: str, max_batch: int, batch_wait_s: float, max_ongoing: int,
                 threads: int | None = None, adapt: bool = False):
        from ray import serve

        from fastardiff.runtime.engine import load_engines

        from .merge import EngineCallMerger

        started = time.perf_counter()
        # host caches: the merger concatenates the requests' caches into one call (no device-resident cache)
        self.engines = load_engines(engine_dir, threads=threads, device_cache=False)
        manifest = self.engines.manifest
        # every engine call within its engine's profile (merge.engine_row_limits): a batch-1 export gets 1-row calls
        self.merger = EngineCallMerger(self.engines)
        self.max_batch = max_batch
        self._choices: dict = {}
        self._plan_keys: dict = {}                # (cfg, drafts) -> the plan cache key its choice came from / goes to
        self._choice_lock = threading.Lock()
        self.plans = 0                            # --gamma auto plans made (timed or read from the plan cache)
        # adapt: requests planned by --gamma auto switch proposal kinds as measured (runtime/adaptive.py), each kind
        # keeping its switching state across requests (a race between concurrent requests only moves a probe). Off
        # by default: a switch point depends on timing, and a replica promises the same images for the same
        # request alone or batched with others; every request's stats carry its mode_rates either way
        self.adapt = adapt
        self._adapters: dict = {}
        self._choice(1.0, DEFAULT_DRAFTS)
        # every request held runs at once: a request waiting for a thread would hold up the merged calls
        self._pool = ThreadPoolExecutor(max_ongoing, thread_name_prefix="fastardiff-generate")
        self._batched = serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s,
                                    max_concurrent_batches=max_ongoing)(self._run_batch)
        self.batches = 0
        log.info("replica %d: engines from %s (%s) loaded and verified in %.1f s", os.getpid(), engine_dir,
                 manifest.backend, time.perf_counter() - started)

    async def __call__(self, job: dict) -> dict:
        return await self._batched({**job, "arrived": time.perf_counter()})

    def health(self) -> dict:
        return {"pid": os.getpid(), "backend": self.engines.manifest.backend, "batches": self.batches,
                "plans": self.plans, "engine_calls": self.merger.engine_calls,
                "gamma_auto": {str(k[0]): c.to_dict()["gamma"] for k, c in self._choices.items()}}

    async def _run_batch(self, jobs: list[dict]) -> list[dict]:
        return await asyncio.get_running_loop().run_in_executor(None, self.run_jobs, jobs)

    def run_jobs(self, jobs: list[dict]) -> list[dict]:
        """Results in the order of `jobs`: {"images", "classes", "stats"} or {"error", "status"}."""
        self.batches += 1
        began = time.perf_counter()
        results: list = [None] * len(jobs)
        planned = []
        for i, job in enumerate(jobs):
            try:
                planned.append((i, job["classes"], *self._plan(job)))
            except FastardiffError as err:                   # a setting these engines cannot run
                results[i] = {"error": str(err), "status": 422}
            except Exception as err:  # noqa: BLE001 - this request fails in one line, the batch goes on
                log.exception("planning a request failed")
                results[i] = internal_error(err)
        futures = [(i, self._pool.submit(self._generate, classes, gen, choice)) for i, classes, gen, choice in planned]
        for i, future in futures:
            results[i] = future.result()
        for job, result in zip(jobs, results):
            if "stats" in result:
                result["stats"]["batch"].update(requests=len(jobs), queued_seconds=round(began - job["arrived"], 4))
        return results

    def _plan(self, job: dict):
        from fastardiff.runtime.cli import plan_generation

        return plan_generation(self.engines, len(job["classes"]), job["gamma"], job["draft"], job["coupling"] == "on",
                               job["early_stop"], job["mode"], job["temperature"], job["cfg_scale"], job["eta"],
                               job["seed"], lambda batch, cfg, drafts, options: self._choice(cfg, drafts),
                               adapt=self.adapt)

    def _choice(self, cfg_scale: float, drafts: tuple):
        """`--gamma auto` for this replica: once per guidance scale and draft set, measured at the batch of a busy
        replica's merged engine calls (max_batch one-image requests, within the engines' profile), so speculation
        is off in serving where that merged batch is past the point where it pays; from the user's plan cache when
        it matches (runtime/plan_cache.py: a restarted or added replica does not time the engines again). The
        timing runs through the merger as its exclusive member: the other requests' engine calls wait meanwhile
        (never two threads on the engines, never another request's work in the timing). A request's choice does
        not depend on what it runs with, so its images do not either."""
        key = (float(cfg_scale), tuple(drafts))
        with self._choice_lock:
            if key not in self._choices:
                from fastardiff.runtime.gamma_auto import choose_gamma
                from fastardiff.runtime.plan_cache import cached_choice

                batch = self.planning_batch(cfg_scale)
                from fastardiff.runtime.plan_cache import plan_key

                with self.merger.join(guided=cfg_scale != 1.0, exclusive=True) as alone:
                    self._choices[key], source = cached_choice(
                        alone, batch, cfg_scale, drafts, None,
                        lambda: choose_gamma(alone, batch, cfg_scale, drafts=drafts))
                    self._plan_keys[key] = plan_key(alone, batch, cfg_scale, drafts, None)
                self.plans += 1
                log.info("replica %d: gamma auto for cfg %g: %s (%s)", os.getpid(), cfg_scale,
                         self._choices[key].reason, source)
            return self._choices[key]

    def planning_batch(self, cfg_scale: float) -> int:
        """Samples in a busy replica's merged engine call: max_batch requests, within the verify engine's rows."""
        rows = self.merger.rows("target_verify") // (2 if cfg_scale != 1.0 else 1)
        return max(1, min(self.max_batch, rows))

    def _adapter(self, gen):
        if gen.alternative is None:
            return None
        from fastardiff.runtime.adaptive import Adapter

        key = (gen.mode, gen.draft, gen.gamma, gen.alternative, gen.cfg_scale)
        with self._choice_lock:
            return self._adapters.setdefault(key, Adapter(plan_rates=gen.plan_rates))

    def _generate(self, classes, gen, choice) -> dict:
        from fastardiff.runtime.images import to_uint8
        from fastardiff.runtime.speculative import generate

        try:
            with self.merger.join(guided=gen.cfg_scale != 1.0) as engines:
                images, stats = generate(engines, classes, gen, adapter=self._adapter(gen))
        except FastardiffError as err:
            if isinstance(err, EngineError):
                log.exception("generation failed")
                return internal_error(err)
            return {"error": str(err), "status": 422}
        except Exception as err:  # noqa: BLE001 - one line to the client, the traceback to the replica's log
            log.exception("generation failed")
            return internal_error(err)
        if choice is not None:
            stats.gamma_choice = choice.to_dict()
        summary = stats.summary()
        if choice is not None:
            self._follow_run(choice, summary)
        # the engine calls of this request's loop, and how many requests' calls each ran with on average
        summary["batch"] = {"engine_calls": engines.calls,
                            "requests_per_engine_call": round(engines.merged / max(1, engines.calls), 3)}
        return {"images": [png_base64(im) for im in to_uint8(images)], "classes": list(map(int, classes)),
                "stats": summary}

    def _follow_run(self, choice, summary) -> None:
        """What a request's loop measured corrects its plan (runtime/plan_cache.py update_from_run, as `fastardiff
        run` does): in the user's plan cache, and for this replica's later requests when the plan changed."""
        from fastardiff.runtime.plan_cache import update_from_run

        with self._choice_lock:
            key = next((k for k, c in self._choices.items() if c is choice), None)
            if key is None:
                return
            now = update_from_run(self._plan_keys.get(key), choice, summary)
            if now is not None and now.to_dict() != choice.to_dict():
                log.info("replica %d: gamma auto for cfg %g now %s", os.getpid(), key[0], now.reason)
                self._choices[key] = now


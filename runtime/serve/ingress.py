"""The HTTP front of `fastardiff serve`: routes, request checking, retries and the error statuses.

  POST /generate  body checked here (request.py; 400 {"error"} with the CLI's message), then handed to a generator
                  replica; 200 {"images", "classes", "stats"}
  GET  /health    200 once a generator replica answers (engines loaded), else 503
  anything else   404 / 405 with {"error"}

Reliability: a generator replica that dies while it holds a request (process killed, node lost) makes the call
fail with a Ray actor error; the request is sent again (a request's images depend only on it, so a retry
returns the same images) until `timeout_s` has passed, while Serve replaces the replica. Past the generators'
`max_ongoing_requests` + `max_queued_requests` a request is refused at once with 503 (back-pressure), and one
that gets no answer within `timeout_s` gets 504: a client never waits unboundedly.
"""
from __future__ import annotations

import asyncio
import logging
import time

from fastardiff.errors import FastardiffError

log = logging.getLogger("fastardiff.serve")

RETRY_PAUSE_S = 0.5


def _json(payload: dict, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status)


class Ingress:
    """The ingress deployment (one replica is plenty: it only parses JSON and awaits the generators)."""

    def __init__(self, generator, class_names: list, timeout_s: float):
        from .request import run_params

        self.generator = generator
        self.class_names = list(class_names)
        self.timeout_s = float(timeout_s)
        self.params = run_params()

    async def __call__(self, request):
        path = request.url.path.rstrip("/") or "/"
        if path == "/generate":
            if request.method != "POST":
                return _json({"error": f"use POST /generate with a JSON body (got {request.method})"}, 405)
            return await self.generate(await request.body())
        if path == "/health":
            if request.method not in ("GET", "HEAD"):
                return _json({"error": f"use GET /health (got {request.method})"}, 405)
            return await self.health()
        return _json({"error": f"no route {path}; use POST /generate or GET /health"}, 404)

    async def generate(self, body: bytes):
        from .request import parse_body

        try:
            job = parse_body(body, self.class_names, self.params)
        except FastardiffError as err:
            return _json({"error": str(err)}, 400)
        result, status = await self._call(job)
        return _json(result, status)

    async def health(self):
        try:
            info = await asyncio.wait_for(self._ask_health(), timeout=min(10.0, self.timeout_s))
        except Exception as err:  # noqa: BLE001 - any failure to answer is "not ready"
            return _json({"status": "unavailable", "error": f"no generator replica answered ({_short(err)}); "
                                                            "the engines may still be loading, retry shortly"}, 503)
        return _json({"status": "ok", "replica": info})

    async def _ask_health(self):
        return await self.generator.health.remote()

    async def _call(self, job: dict) -> tuple[dict, int]:
        """(payload, HTTP status) of one job, retried on a replica's death until the deadline."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        deadline = time.monotonic() + self.timeout_s
        attempt, failure = 0, None
        while True:
            attempt += 1
            response = self.generator.remote(job)
            try:
                result = await asyncio.wait_for(response, timeout=max(0.0, deadline - time.monotonic()))
            except BackPressureError:
                return {"error": "server busy: every generator replica has its queue full; retry later (or serve "
                                 "with more --replicas / a larger --max-queued)"}, 503
            except asyncio.TimeoutError:
                response.cancel()
                if failure is not None:
                    return self._gave_up(failure), 503
                return {"error": f"no answer within {self.timeout_s:g} s; the server is overloaded or its replicas "
                                 "are restarting, retry later"}, 504
            except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError) as err:
                failure = err
                if time.monotonic() + RETRY_PAUSE_S >= deadline:
                    return self._gave_up(failure), 503
                log.warning("generator replica failed (%s); sending the request again (attempt %d)", _short(err),
                            attempt + 1)
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            except Exception as err:  # noqa: BLE001 - one line to the client, never a traceback
                log.exception("request failed")
                cause = getattr(err, "cause", None) or err       # a RayTaskError carries the replica's exception
                return {"error": f"internal error: {type(cause).__name__}: {_short(cause)}"}, 500
            status = result.pop("status", 200)
            if attempt > 1 and "stats" in result:
                result["stats"]["attempts"] = attempt
            return result, status

    def _gave_up(self, failure: BaseException) -> dict:
        return {"error": f"the generator replica failed ({_short(failure)}) and none answered within "
                         f"{self.timeout_s:g} s; retry later"}


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."

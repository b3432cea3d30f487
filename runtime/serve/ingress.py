"""The HTTP front of `fastardiff serve`: routes, request checking, retries and the error statuses.

  POST /generate  body checked here (request.py: 413 / 415 / 400 / 422 {"error"}, with the CLI's message for a bad
                  value), then handed to a generator replica; 200 {"images", "classes", "stats"}
  GET  /health    200 once a generator replica answers (engines loaded), else 503
  anything else   404 / 405 with {"error"}
Every answer is JSON: a failure inside the server (an engine error, a bug) is logged here or in the replica with
its traceback and answered 503 {"error": "internal error ..."}, never a bare 500.

Stopping (app.py): `drain` makes every new request 503 at once and waits for those in flight, up to its bound;
the ones still running then are answered 503 too, so no client is left without an answer.

Reliability: a generator replica that dies while it holds a request (process killed, node lost) makes the call
fail with a Ray actor error; the request is sent again (a request's images depend only on it, so a retry
returns the same images) until `timeout_s` has passed, while Serve replaces the replica. Past the generators'
`max_ongoing_requests` + `max_queued_requests` a request is refused at once with 503 (back-pressure), and one
that gets no answer within `timeout_s` gets 504: a client never waits unboundedly.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from fastardiff.errors import FastardiffError

log = logging.getLogger("fastardiff.serve")

RETRY_PAUSE_S = 0.5


MAX_MESSAGE = 500     # characters of an error message (a hostile request's values are never echoed at length)
STOPPING = ("the server is stopping and takes no new requests; retry in a moment (another instance, or this one "
            "once it is back)")


def _json(payload: dict, status: int = 200):
    """A JSON response that always encodes: strings that are not valid Unicode are escaped, errors are cut short."""
    from starlette.responses import Response

    if isinstance(payload.get("error"), str) and len(payload["error"]) > MAX_MESSAGE:
        payload = {**payload, "error": payload["error"][: MAX_MESSAGE - 3] + "..."}
    body = json.dumps(payload, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return Response(body.encode("ascii"), status_code=status, media_type="application/json")


class Ingress:
    """The ingress deployment (one replica is plenty: it only parses JSON and awaits the generators)."""

    def __init__(self, generator, class_names: list, timeout_s: float):
        from .request import run_params

        self.generator = generator
        self.class_names = list(class_names)
        self.timeout_s = float(timeout_s)
        self.params = run_params()
        self.in_flight = 0
        self.stopping = False
        self._abort: asyncio.Event | None = None       # set when the drain's time is up

    async def __call__(self, request):
        try:
            return await self.route(request)
        except Exception as err:  # noqa: BLE001 - the last resort: logged with its traceback, JSON to the client
            log.exception("request %s %s failed", request.method, request.url.path)
            return _json({"error": f"internal error ({type(err).__name__}, logged on the server); retry later"}, 503)

    async def route(self, request):
        from .request import RequestError, check_content_type, check_size

        path = request.url.path.rstrip("/") or "/"
        if path == "/generate":
            if request.method != "POST":
                return _json({"error": f"use POST /generate with a JSON body (got {request.method})"}, 405)
            if self.stopping:
                return _json({"error": STOPPING}, 503)
            try:
                check_content_type(request.headers.get("content-type"))
                length = request.headers.get("content-length")
                if length is not None and not length.strip().isdigit():
                    raise RequestError("malformed Content-Length header; send the body's size in bytes", 400)
                check_size(length)
                body = await self._read(request)
            except RequestError as err:
                return _json({"error": str(err)}, err.status)
            return await self.generate(body)
        if path == "/health":
            if request.method not in ("GET", "HEAD"):
                return _json({"error": f"use GET /health (got {request.method})"}, 405)
            if self.stopping:
                return _json({"status": "stopping", "error": STOPPING}, 503)
            return await self.health()
        return _json({"error": f"no route {path[:100]}; use POST /generate or GET /health"}, 404)

    @staticmethod
    async def _read(request) -> bytes:
        """The body, read up to MAX_BODY_BYTES (a body without a Content-Length is cut off there: 413)."""
        from .request import MAX_BODY_BYTES, check_size

        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            check_size(size if size > MAX_BODY_BYTES else None)
            chunks.append(chunk)
        return b"".join(chunks)

    async def generate(self, body: bytes):
        from .request import RequestError, parse_body

        try:
            job = parse_body(body, self.class_names, self.params)
        except RequestError as err:
            return _json({"error": str(err)}, err.status)
        except FastardiffError as err:           # the CLI's checks of a value (prompt, classes): 422
            return _json({"error": str(err)}, 422)
        self.in_flight += 1
        try:
            result, status = await self._call(job)
        finally:
            self.in_flight -= 1
        return _json(result, status)

    async def drain(self, timeout_s: float) -> dict:
        """Stop taking requests; wait up to timeout_s for those in flight, then answer the rest 503. Returns
        {"finished": n, "aborted": m}."""
        self.stopping = True
        self._abort = self._abort or asyncio.Event()
        began, deadline = self.in_flight, time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        aborted = self.in_flight
        if aborted:
            self._abort.set()
            settle = time.monotonic() + 2.0
            while self.in_flight and time.monotonic() < settle:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)           # the proxy sends the last answers before the application goes
        return {"finished": began - aborted, "aborted": aborted}

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
                result = await self._answer(response, max(0.0, deadline - time.monotonic()))
            except _Stopped:
                response.cancel()
                return {"error": "the server stopped before this request finished; send it again (another instance, "
                                 "or this one once it is back)"}, 503
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
                return {"error": f"internal error: {type(cause).__name__}: {_short(cause)} (logged on the server); "
                                 "retry later"}, 503
            status = result.pop("status", 200)
            if attempt > 1 and "stats" in result:
                result["stats"]["attempts"] = attempt
            return result, status

    async def _answer(self, response, timeout_s: float):
        """The response's result within timeout_s (asyncio.TimeoutError), or _Stopped once the drain gives up."""
        if self._abort is None:
            self._abort = asyncio.Event()

        async def result():
            return await response

        answer = asyncio.ensure_future(result())
        stop = asyncio.ensure_future(self._abort.wait())
        try:
            done, _ = await asyncio.wait({answer, stop}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if answer in done:
            return answer.result()
        answer.cancel()
        if stop in done:
            raise _Stopped
        raise asyncio.TimeoutError

    def _gave_up(self, failure: BaseException) -> dict:
        return {"error": f"the generator replica failed ({_short(failure)}) and none answered within "
                         f"{self.timeout_s:g} s; retry later"}


class _Stopped(Exception):
    """The drain's time is up: the request is answered 503."""


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."

"""The HTTP front of `fastardiff serve` (runtime/serve/ingress.py, request.py) in this process, no Ray instance:
hostile bodies and headers, a property-based fuzzer over request bodies, and the statuses of the generator's
failures. Every answer must be JSON with a 2xx/4xx/503/504 status, never a 500 or a traceback.
"""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("ray.serve", reason="fastardiff serve needs the 'serve' extra: pip install 'fastardiff[serve]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OK = {"images": ["x"], "classes": [7], "stats": {"images": 1}}
ALLOWED = {200, 400, 404, 405, 413, 415, 422, 503, 504}


class FakeGenerator:
    """`remote(job)` answers with the next of `outcomes` (an exception to raise, a delay, or a payload); with
    `forever`, the last outcome again and again."""

    def __init__(self, *outcomes, forever: bool = False):
        self.outcomes, self.jobs, self.forever = list(outcomes), [], forever

    def remote(self, job):
        self.jobs.append(job)
        return _Response(self.outcomes[0] if self.forever else self.outcomes.pop(0))


class _Response:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        async def answer():
            if isinstance(self.outcome, float):
                await asyncio.sleep(self.outcome)
                return dict(OK)
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return dict(self.outcome)
        return answer().__await__()

    def cancel(self):
        self.cancelled = True


def _ingress(generator, timeout_s=5.0):
    from fastardiff.runtime.serve.ingress import Ingress

    return Ingress(generator, [str(i) for i in range(10)], timeout_s)


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None, chunk: int = 65536):
    """A Starlette request as Serve's proxy hands it to the ingress (the body streamed in chunks)."""
    from starlette.requests import Request

    pieces = [body[i: i + chunk] for i in range(0, len(body), chunk)] or [b""]

    async def receive():
        piece = pieces.pop(0) if pieces else b""
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "headers": raw,
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000)}
    return Request(scope, receive)


def answer(ingress, req) -> tuple[int, dict]:
    """(status, JSON payload); asserts the answer is strict, ASCII JSON with a one-line error."""
    response = asyncio.run(ingress(req))
    assert response.status_code in ALLOWED, (response.status_code, response.body[:300])
    assert response.headers["content-type"] == "application/json"
    payload = json.loads(response.body.decode("ascii"), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    if response.status_code != 200:
        assert set(payload) <= {"error", "status"} and isinstance(payload["error"], str)
        assert "\n" not in payload["error"] and "Traceback" not in payload["error"] and len(payload["error"]) <= 500
    return response.status_code, payload


def post(ingress, body: bytes, content_type: str | None = "application/json", chunk: int = 65536, **headers):
    if content_type is not None:
        headers["Content-Type"] = content_type
    return answer(ingress, request("POST", "/generate", body, headers, chunk))


HUGE = "9" * 400
# (body, content type, HTTP status, a fragment of the message)
HOSTILE = [
    (b'{"prompt": "7", "seed": ' + HUGE.encode() + b"}", "application/json", 422,
     "Invalid value for '--seed': an integer of 400 digits is out of range: must be an integer in [0, 4294967295]"),
    (b'{"prompt": "7", "cfg_scale": ' + HUGE.encode() + b"}", "application/json", 422,
     "'--cfg': an integer of 400 digits is out of range"),
    (b'{"prompt": "7", "num_images": -' + HUGE.encode() + b"}", "application/json", 422,
     "'--num-images': an integer of 400 digits is out of range: must be an integer in [1, 64]"),
    (b'{"prompt": "7", "gamma": ' + b"9" * 5000 + b"}", "application/json", 422, "an integer of 5000 digits"),
    (b'{"prompt": "\\ud800"}', "application/json", 400, "field 'prompt' holds a lone UTF-16 surrogate"),
    (b'{"prompt": ["7", "\\udfff"]}', "application/json", 400, "lone UTF-16 surrogate"),
    (b'{"\\ud83d": 1}', "application/json", 400, "a field name holds a lone UTF-16 surrogate"),
    (b'{"prompt": "\xed\xa0\x80"}', "application/json", 400, "lone UTF-16 surrogate"),   # one, UTF-8 encoded
    (b'{"prompt": "\xff"}', "application/json", 400, "not UTF-8 text"),
    (b"[" * 100000, "application/json", 413, "over the limit of 65536"),
    (b"[" * 5000 + b"]" * 5000, "application/json", 400, "nested 5000 levels deep (at most 8)"),
    (b'{"prompt": ' + b"[" * 9 + b"]" * 9 + b"}", "application/json", 400, "nested 10 levels deep"),
    (b'{"prompt": "7", "prompt": "8"}', "application/json", 400, "field 'prompt' is given twice"),
    (b'{"prompt": "7", "temperature": Infinity}', "application/json", 400, "Infinity is not a JSON number"),
    (b'{"prompt": "7", "temperature": 1e999}', "application/json", 422, "'inf' must be a finite number"),
    (b'{"prompt": "7", "cfg_scale": {"a": 1}}', "application/json", 422, "Invalid value for '--cfg'"),
    (b'{"prompt": "' + b"x" * 60000 + b'"}', "application/json", 422, "unknown class 'xxxxxxx"),
    (b'{"prompt": ' + json.dumps(["7"] * 65).encode() + b"}", "application/json", 422, "asks for 65 images"),
    (b'{"prompt": "7"}', "text/plain", 415, "Content-Type 'text/plain' is not JSON"),
    (b"prompt=7", "application/x-www-form-urlencoded", 415, "send the body as application/json"),
    (b'{"prompt": "7"}', "application/json; charset=latin-1", 415, "charset 'latin-1' is not supported"),
    (b"null", "application/json", 400, "the JSON body must be an object"),
    (b"", "application/json", 400, "malformed JSON body (line 1 column 1)"),
    (b'{"prompt": "7", "' + b"k" * 500 + b'": 1}', "application/json", 422, "unknown field 'kkkk"),
]


@pytest.mark.parametrize("body, content_type, status, fragment", HOSTILE,
                         ids=[f"{i}-{c[2]}" for i, c in enumerate(HOSTILE)])
def test_hostile_bodies_get_a_json_status_naming_the_problem(body, content_type, status, fragment):
    generator = FakeGenerator(OK, forever=True)
    got, payload = post(_ingress(generator), body, content_type)
    assert (got, fragment in payload["error"]) == (status, True), payload
    assert generator.jobs == []                               # refused before any generator work


def test_size_limits_before_and_while_reading():
    ingress = _ingress(FakeGenerator(OK, forever=True))
    status, payload = post(ingress, b"{}", **{"Content-Length": str(10**12)})    # refused on the header alone
    assert status == 413 and "1000000000000 bytes is over the limit" in payload["error"]
    status, payload = post(ingress, b" " * 70000 + b"{}", chunk=1000)              # no usable length: while reading
    assert status == 413
    status, payload = post(ingress, b"{}", **{"Content-Length": "-5"})
    assert status == 400 and "Content-Length" in payload["error"]
    status, payload = post(ingress, b'{"prompt": "7"}', content_type=None)           # no Content-Type: taken as JSON
    assert status == 200


def test_an_unexpected_failure_is_a_logged_json_503(monkeypatch, caplog):
    import fastardiff.runtime.serve.request as request_module

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(request_module, "parse_body", broken)
    status, payload = post(_ingress(FakeGenerator(OK)), b'{"prompt": "7"}')
    assert status == 503 and payload["error"].startswith("internal error (KeyError, logged on the server)")
    assert "a bug" in caplog.text and "Traceback" in caplog.text


def test_ingress_retries_a_dead_replica_and_maps_overload_to_503_and_504(monkeypatch):
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    import fastardiff.runtime.serve.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "RETRY_PAUSE_S", 0.01)
    body = b'{"prompt": "7", "seed": 3}'

    def status_of(generator, timeout_s=5.0):
        return post(_ingress(generator, timeout_s), body)

    dead_then_ok = FakeGenerator(ActorDiedError(), OK)
    status, payload = status_of(dead_then_ok)
    assert status == 200 and payload["stats"]["attempts"] == 2
    assert dead_then_ok.jobs[0] == dead_then_ok.jobs[1] and dead_then_ok.jobs[0]["seed"] == 3   # the same job again
    status, payload = status_of(FakeGenerator(BackPressureError(65, 64)))
    assert status == 503 and "server busy" in payload["error"] and "--max-queued" in payload["error"]
    status, payload = status_of(FakeGenerator(5.0), timeout_s=0.2)
    assert status == 504 and "no answer within 0.2 s" in payload["error"]
    always_dead = FakeGenerator(ActorDiedError(), forever=True)
    status, payload = status_of(always_dead, timeout_s=0.3)
    assert status == 503 and "none answered within 0.3 s" in payload["error"] and len(always_dead.jobs) > 2
    status, payload = status_of(FakeGenerator(RuntimeError("boom\nline two")))
    assert status == 503 and payload["error"].startswith("internal error: RuntimeError: boom line two")
    remote = RayTaskError("f", "Traceback (most recent call last):\n  File 'x'\nValueError: bad", ValueError("bad"))
    status, payload = status_of(FakeGenerator(remote))
    assert status == 503 and payload["error"].startswith("internal error: ValueError: bad")   # the cause only
    refused = {"error": "--gamma 99 needs 100 tokens per target call", "status": 422}
    status, payload = status_of(FakeGenerator(refused))
    assert status == 422 and payload == {"error": refused["error"]}


def test_drain_finishes_requests_in_flight_then_answers_the_rest_503():
    async def scenario():
        ingress = _ingress(FakeGenerator(0.05, 30.0))             # one request finishes in time, one does not
        body = b'{"prompt": "7"}'
        quick = asyncio.ensure_future(ingress(request("POST", "/generate", body)))
        slow = asyncio.ensure_future(ingress(request("POST", "/generate", body)))
        await asyncio.sleep(0.01)
        outcome = await ingress.drain(0.3)
        late = await ingress(request("POST", "/generate", body))
        health = await ingress(request("GET", "/health"))
        return outcome, await quick, await slow, late, health

    outcome, quick, slow, late, health = asyncio.run(scenario())
    assert outcome == {"finished": 1, "aborted": 1}
    assert quick.status_code == 200
    assert slow.status_code == 503 and b"stopped before this request finished" in slow.body
    assert late.status_code == 503 and b"is stopping and takes no new requests" in late.body
    assert health.status_code == 503


# -- property-based fuzzing of the request body -----------------------------------------------------------------

FIELDS = ["prompt", "num_images", "seed", "mode", "gamma", "cfg_scale", "temperature"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**500), max_value=10**500),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.sampled_from(["7", "seven", "auto", "target", "speculative", "\ud800", "0 1 2", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), values, max_size=6)


def encode(value, ascii_only: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")         # a lone surrogate becomes invalid UTF-8 bytes


bodies = st.one_of(
    st.builds(encode, objects, st.booleans()),
    st.builds(encode, values, st.booleans()),
    st.binary(max_size=200),
    st.builds(lambda n, open_: (open_ * n).encode(), st.integers(0, 3000), st.sampled_from(["[", "{", '{"a":'])),
    st.builds(lambda body, cut: body[:cut], st.builds(encode, objects, st.booleans()), st.integers(0, 60)),
)
content_types = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain",
                                 "application/problem+json", "multipart/form-data; boundary=x", "", "ü/ä"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, content_type=content_types)
def test_fuzzed_bodies_are_answered_json_and_only_valid_jobs_pass(body, content_type):
    generator = FakeGenerator(OK, forever=True)
    try:
        status, payload = post(_ingress(generator), body, content_type)
    except UnicodeEncodeError:                    # a header value Starlette cannot carry: not a request at all
        return
    assert status in {200, 400, 413, 415, 422}, payload
    if status == 200:
        job = generator.jobs[-1]
        assert 1 <= len(job["classes"]) <= 64 and all(0 <= c < 10 for c in job["classes"])
        assert isinstance(job["seed"], int) and 0 <= job["seed"] < 2**32
        assert job["mode"] in ("speculative", "target") and 0 < job["temperature"] <= 10
    else:
        assert generator.jobs == []

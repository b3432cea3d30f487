"""`fastardiff serve` on Ray Serve: one real server per module (a local Ray instance started by the CLI in a
subprocess) over ONNX engines exported from the shipped checkpoint, spoken to over HTTP on 127.0.0.1.

The engines are the run's shared ONNX export (tests/conftest.py `shared_onnx_export`: built once, by whichever
xdist worker needs it first; draft_rollout_1..2). The CLI's checks run without a server. The last test stops the
server with SIGTERM while requests are in flight and checks it shut down cleanly; keep it last.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import urllib.error
import urllib.request

import pytest

from cli_runner import run_cli
from serve_server import http, kill_server, start_server, stop_and_check

pytest.importorskip("ray.serve", reason="fastardiff serve needs the 'serve' extra: pip install 'fastardiff[serve]'")
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def engine_dir(shared_onnx_export):
    """The run's shared ONNX export of the shipped model (tests/conftest.py: built once for every worker;
    draft_rollout_1..2)."""
    return shared_onnx_export[0]


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    running = start_server(engine_dir, tmp_path_factory.mktemp("serve-log") / "serve.log", "--max-batch", "8",
                           "--batch-wait-ms", "300")
    try:
        yield running
    finally:
        if running["proc"].poll() is None:           # the stop test did not run (or failed): do not leak it
            kill_server(running["proc"])


# -- the HTTP API ------------------------------------------------------------------------------------------------

def test_health_and_routes(server):
    status, health = http(server["url"] + "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["replica"]["backend"] == "onnxruntime" and health["replica"]["pid"] > 0
    assert http(server["url"] + "/health", {}, method="POST")[0] == 405
    status, payload = http(server["url"] + "/generate")
    assert status == 405 and "POST /generate" in payload["error"]
    status, payload = http(server["url"] + "/nowhere")
    assert status == 404 and "/generate" in payload["error"]


def test_generate_returns_pngs_classes_and_run_stats(server):
    import base64
    import io

    from PIL import Image

    status, out = http(server["url"] + "/generate", {"prompt": ["0", "nine"], "num_images": 3, "seed": 4})
    assert status == 200, out
    assert out["classes"] == [0, 9, 0] and len(out["images"]) == 3
    image = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
    assert image.format == "PNG" and image.size == (32, 32) and image.mode == "L"
    stats = out["stats"]
    assert stats["images"] == 3 and stats["tokens"] == 3 * 64            # the `--stats-json` fields
    assert stats["gamma_choice"]["reason"] and stats["mode"] in ("speculative", "target")


# (JSON body, the same request as `fastardiff run` flags, or None where only JSON can be wrong, and then a
# fragment of the message)
BAD = [
    ({"prompt": "eleven"}, ["--prompt", "eleven"]),
    ({"prompt": "12"}, ["--prompt", "12"]),
    ({"prompt": ""}, ["--prompt", ""]),
    ({"prompt": 7}, None, "--prompt must be text"),
    ({"prompt": ["7", 3]}, None, "--prompt must be text or a list of texts"),
    ({"prompt": [None]}, None, "--prompt must be text or a list of texts (got NoneType in the list)"),   # fuzzer's find
    ({"seed": 1}, [], "Missing option '--prompt'."),
    ({"prompt": "7", "seed": -1}, ["--prompt", "7", "--seed", "-1"]),
    ({"prompt": "7", "seed": "abc"}, ["--prompt", "7", "--seed", "abc"]),
    ({"prompt": "7", "seed": 2.5}, ["--prompt", "7", "--seed", "2.5"]),
    ({"prompt": "7", "mode": "fast"}, ["--prompt", "7", "--mode", "fast"]),
    ({"prompt": "7", "gamma": 0}, ["--prompt", "7", "--gamma", "0"]),
    ({"prompt": "7", "gamma": "many"}, ["--prompt", "7", "--gamma", "many"]),
    ({"prompt": "7", "gamma": 99}, ["--prompt", "7", "--gamma", "99"]),        # refused by the replica
    ({"prompt": "7", "cfg_scale": 99}, ["--prompt", "7", "--cfg", "99"]),
    ({"prompt": "7", "temperature": 0}, ["--prompt", "7", "--temperature", "0"]),
    ({"prompt": "7", "temperature": "hot"}, ["--prompt", "7", "--temperature", "hot"]),
    ({"prompt": "7", "num_images": 65}, None, "'--num-images': 65 is out of range: must be an integer in [1, 64]"),
    ({"prompt": "0 " * 65}, None, "--prompt asks for 65 images; a request makes 1..64"),
    ({"prompt": "7", "colour": "red"}, None, "unknown field 'colour'"),
    (b'{"prompt": ', None, "malformed JSON body (line 1 column 12)"),
    (b'["7"]', None, "the JSON body must be an object"),
    (b'{"prompt": "7", "temperature": NaN}', None, "NaN is not a JSON number"),
]


def _cli_message(engine_dir, flags, capsys) -> str:
    code, _, err = run_cli(["run", "--engine", str(engine_dir), *flags], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    message = lines[0][len("error: "):]
    hint = " (see `fastardiff run --help`)"
    return message[: -len(hint)] if message.endswith(hint) else message


@pytest.mark.parametrize("case", BAD, ids=lambda c: json.dumps(c[0]) if isinstance(c[0], dict) else c[0].decode())
def test_bad_request_is_4xx_with_the_cli_message(server, engine_dir, case, capsys):
    body, flags = case[0], case[1]
    status, payload = http(server["url"] + "/generate", body)
    assert status == (400 if isinstance(body, bytes) else 422), payload     # not a JSON object / a bad field
    assert set(payload) == {"error"} and "\n" not in payload["error"] and "Traceback" not in payload["error"]
    if flags is not None:
        expected = _cli_message(engine_dir, flags, capsys)
        if len(case) > 2:                            # the JSON message says a little more than the CLI's
            assert payload["error"].startswith(expected) and expected == case[2]
        else:
            assert payload["error"] == expected
    else:
        assert case[2] in payload["error"]


def _post_all(url: str, bodies: list) -> list:
    """Every body POSTed at once (one thread each); the responses in order."""
    results: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(i):
        start.wait()
        results[i] = http(url + "/generate", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


PROBES = [
    {"prompt": "3", "seed": 11, "num_images": 2},                                   # gamma auto: the replica's choice
    {"prompt": "seven", "seed": 5, "gamma": 1},                                     # model draft: draft_rollout_1
    {"prompt": ["0", "nine"], "seed": 8, "mode": "target", "cfg_scale": 2.0},       # target-only, guided
]


def test_same_seed_same_images_alone_or_batched(server):
    url = server["url"]
    alone = [http(url + "/generate", p) for p in PROBES]           # one at a time: nothing to run with
    for status, out in alone:
        assert status == 200, out
        assert out["stats"]["batch"]["requests"] == 1 and out["stats"]["batch"]["requests_per_engine_call"] == 1.0
    # each probe again, at once with a twin of the same settings and another seed, and with each other
    twins = [{**p, "seed": p["seed"] + 1000} for p in PROBES]
    together = _post_all(url, PROBES + twins)
    for probe, (_, before), (status, now), (twin_status, twin) in zip(PROBES, alone, together, together[3:]):
        assert status == 200 and twin_status == 200, (now, twin)
        assert now["stats"]["batch"]["requests_per_engine_call"] > 1.0, now["stats"]["batch"]  # it did run with others
        assert now["images"] == before["images"], probe                                      # the same PNG bytes
        assert twin["images"] != now["images"], probe                                        # seeds matter
        assert now["classes"] == before["classes"] and now["stats"]["mode"] == before["stats"]["mode"]
    assert together[2][1]["stats"]["mode"] == "target" and together[1][1]["stats"]["draft"] == "model"


# -- the CLI's own checks (before Ray starts) -----------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragment", [
    (["--port", "0"], "Invalid value for '--port': 0 is out of range: must be an integer in [1, 65535]"),
    (["--replicas", "0"], "Invalid value for '--replicas': 0 is out of range"),
    (["--max-batch", "1000"], "Invalid value for '--max-batch': 1000 is out of range: must be an integer in [1, 256]"),
    (["--batch-wait-ms", "-1"], "Invalid value for '--batch-wait-ms': -1 is out of range"),
    (["--num-cpus", "nan"], "Invalid value for '--num-cpus': 'nan' must be a finite number"),
    (["--num-gpus", "-1"], "Invalid value for '--num-gpus'"),
    (["--timeout", "0"], "Invalid value for '--timeout': 0 is out of range: must be a finite number in (0, 3600]"),
    (["--host", " "], "--host is empty"),
    (["--address", "nonsense"], "--address 'nonsense' is not host:port"),
])
def test_serve_cli_refuses_bad_options_in_one_line(engine_dir, flags, fragment, capsys):
    code, _, err = run_cli(["serve", "--engine", str(engine_dir), *flags], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]


def test_serve_cli_refuses_missing_tampered_engines_and_a_busy_port(engine_dir, tmp_path, capsys):
    code, _, err = run_cli(["serve", "--engine", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("error: engine directory") and "does not exist" in err
    tampered = tmp_path / "tampered"
    shutil.copytree(engine_dir, tampered)
    with open(tampered / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    code, _, err = run_cli(["serve", "--engine", str(tampered)], capsys)
    assert code == 2 and "does not match the sha256 in the manifest" in err and len(err.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(["serve", "--engine", str(engine_dir), "--port", str(port)], capsys)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "pass a free --port" in err
    code, _, err = run_cli(["serve", "--engine", str(engine_dir), "--address", f"127.0.0.1:{port}"], capsys)
    assert code == 2 and f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in err


def test_serve_without_ray_names_the_extra(engine_dir, monkeypatch, capsys):
    import fastardiff.errors as errors

    real = errors.is_installed
    monkeypatch.setattr(errors, "is_installed", lambda package: package != "ray" and real(package))
    code, _, err = run_cli(["serve", "--engine", str(engine_dir)], capsys)
    assert code == 2 and err.strip() == ("error: python package 'ray' is not installed (needed for "
                                         "`fastardiff serve`); install it with `pip install 'fastardiff[serve]'`")


# -- hostile HTTP, through Serve's proxy ---------------------------------------------------------------------------

def raw_http(port: int, head: bytes, body_parts=(), timeout: float = 60.0) -> tuple[int, dict]:
    """(status, JSON payload) of a hand-written HTTP/1.1 request (headers a urllib client would not send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        try:
            for part in body_parts:
                s.sendall(part)
        except OSError:                       # the server answered (and closed) before the whole body was sent
            pass
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head_text, _, payload = data.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(payload)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def test_hostile_http_requests_get_json_statuses(server):
    port, url = server["port"], server["url"]
    post = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, payload = raw_http(port, post + b"Content-Length: 1000000000000\r\n\r\n")   # refused on the header
    assert status == 413 and "over the limit" in payload["error"]
    chunks = [b"10000\r\n" + b" " * 0x10000 + b"\r\n"] * 3 + [b"0\r\n\r\n"]              # no length: counted
    status, payload = raw_http(port, post + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert status == 413
    for body, expected, fragment in [
            (b"[" * 20000 + b"]" * 20000, 400, "levels deep"),
            (b'{"prompt": "\\ud800"}', 400, "lone UTF-16 surrogate"),
            (b'{"prompt": "7", "seed": ' + b"7" * 300 + b"}", 422, "'--seed': an integer of 300 digits"),
            (b'{"prompt": "7", "prompt": "7"}', 400, "given twice")]:
        status, payload = http(url + "/generate", body)
        assert (status, fragment in payload.get("error", "")) == (expected, True), payload
    req = urllib.request.Request(url + "/generate", b'{"prompt": "7"}', {"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    assert refused.value.code == 415 and "is not JSON" in json.loads(refused.value.read())["error"]


def test_fuzzed_requests_through_the_server_are_all_answered_json(server):
    """A short property-based run over the live HTTP API (tests/test_serve_inputs.py fuzzes longer in-process)."""
    from hypothesis import HealthCheck, given, settings
    from test_serve_inputs import bodies

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies)
    def check(body):
        status, payload = http(server["url"] + "/generate", body)
        assert status in (200, 400, 413, 422), (status, payload)
        assert "not json" not in payload and ("error" in payload) == (status != 200)

    check()


# -- many clients with different settings at once -----------------------------------------------------------------

CONCURRENT = [                         # gamma auto where no gamma is given: a new cfg_scale is planned meanwhile
    {"prompt": "3", "seed": 21},
    {"prompt": "4", "seed": 22, "cfg_scale": 2.25},
    {"prompt": ["5", "6"], "seed": 23, "cfg_scale": 1.25, "gamma": 1},
    {"prompt": "7", "seed": 24, "cfg_scale": 3.0, "gamma": 2, "temperature": 0.8},
    {"prompt": "8", "seed": 25, "gamma": 3, "temperature": 0.9},
    {"prompt": "9", "seed": 26, "mode": "target", "cfg_scale": 1.5},
    {"prompt": "0 1 2", "seed": 27, "gamma": 2, "cfg_scale": 2.5},
    {"prompt": "1", "seed": 28, "gamma": 4, "cfg_scale": 1.5},
    {"prompt": "2", "seed": 29, "mode": "target", "temperature": 0.7},
    {"prompt": "6", "seed": 30, "num_images": 2, "cfg_scale": 4.0},
    {"prompt": "5", "seed": 31, "gamma": 1, "temperature": 1.2},
    {"prompt": "4", "seed": 32, "cfg_scale": 1.75, "gamma": 2},
    {"prompt": "3 3", "seed": 33, "gamma": 4},
    {"prompt": "8", "seed": 34, "cfg_scale": 2.0, "mode": "target"},
]


def test_concurrent_clients_with_different_settings_get_their_solo_images(server):
    url = server["url"]
    together = _post_all(url, CONCURRENT)                 # first: the new guidance scales are planned under load
    for body, (status, out) in zip(CONCURRENT, together):
        assert status == 200, (body, out)
    assert max(out["stats"]["batch"]["requests_per_engine_call"] for _, out in together) > 1.0    # they merged
    for body, (_, out) in zip(CONCURRENT, together):
        status, solo = http(url + "/generate", body)
        assert status == 200 and solo["stats"]["batch"]["requests_per_engine_call"] == 1.0, solo
        assert solo["images"] == out["images"], body                                     # the same PNG bytes
        assert solo["stats"]["mode"] == out["stats"]["mode"] and solo["classes"] == out["classes"]


# -- shutdown (keep last: it stops the module's server) -------------------------------------------------------------

def test_sigterm_with_requests_in_flight_stops_cleanly(server):
    outcome = stop_and_check(server, load=8)
    log = server["log"].read_text()
    assert outcome["code"] == 0, log[-2000:]
    assert "stopped" in log.splitlines()[-3:] and "drained in" in log
    assert "Controller failed to shut down" not in log and "did not stop within" not in log
    assert outcome["seconds"] < 30, outcome["seconds"]          # issue 40: 35 s; a bound, not a speed claim
    statuses = [status for status, _ in outcome["answers"]]
    assert 200 in statuses
    for status, payload in outcome["answers"]:                  # in flight: finished, or a JSON 503
        assert status == 200 or (status == 503 and "stop" in payload["error"]), (status, payload)
    with socket.socket() as s:                                   # and the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server["port"]))

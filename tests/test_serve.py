"""`fastardiff serve` on Ray Serve: one real server per module (a local Ray instance started by the CLI in a
subprocess) over ONNX engines exported from the shipped checkpoint, spoken to over HTTP on 127.0.0.1.

The engines are the run's shared ONNX export (tests/conftest.py `shared_onnx_export`: built once, by whichever
xdist worker needs it first; draft_rollout_1..2). Tests that need no
server (the engine-call merger, the ingress's error mapping, the CLI's checks) run without one. The last test
stops the server with SIGTERM and checks it shut down cleanly; keep it last.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_cli

pytest.importorskip("ray.serve", reason="fastardiff serve needs the 'serve' extra: pip install 'fastardiff[serve]'")
pytestmark = pytest.mark.slow

SERVER_START_S = 240.0


@pytest.fixture(scope="module")
def engine_dir(shared_onnx_export):
    """The run's shared ONNX export of the shipped model (tests/conftest.py: built once for every worker;
    draft_rollout_1..2)."""
    return shared_onnx_export[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body=None, method: str | None = None, timeout: float = 120.0):
    """(status, payload) of one request: the JSON answer, or {"not json": text} (e.g. before the app is up)."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"not json": raw.decode(errors="replace")}


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "fastardiff", "serve", "--engine", str(engine_dir), "--port",
                                 str(port), "--max-batch", "8", "--batch-wait-ms", "300"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    try:
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}"
            assert time.monotonic() - began < SERVER_START_S, f"not healthy: {log_path.read_text()[-3000:]}"
            try:
                if http(url + "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield {"url": url, "proc": proc, "log": log_path, "port": port}
    finally:
        if proc.poll() is None:                       # the SIGTERM test did not run (or failed): do not leak it
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


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
def test_bad_request_is_400_with_the_cli_message(server, engine_dir, case, capsys):
    body, flags = case[0], case[1]
    status, payload = http(server["url"] + "/generate", body)
    assert status == 400, payload
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


# -- the engine-call merger, in this process (no server) ----------------------------------------------------------

@pytest.mark.parametrize("settings", [
    {"mode": "speculative", "draft": "model", "gamma": 1, "cfg_scale": 2.0},      # merged rollouts, [cond; uncond]
    {"mode": "speculative", "draft": "model", "gamma": 3, "early_stop": "context"},  # draft_step calls (no rollout)
    {"mode": "speculative", "draft": "jacobi", "gamma": 4, "temperature": 0.8},   # merged target_jacobi rounds
    {"mode": "speculative", "draft": "jacobi", "gamma": 2, "cfg_scale": 3.0},
    {"mode": "target", "gamma": 1, "cfg_scale": 1.5},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_merged_engine_calls_give_each_request_its_alone_bits(engine_dir, settings):
    from concurrent.futures import ThreadPoolExecutor

    from fastardiff.runtime.engine import load_engines
    from fastardiff.runtime.serve.merge import EngineCallMerger
    from fastardiff.runtime.speculative import GenerationConfig, generate

    engines = load_engines(engine_dir)
    rng = np.random.default_rng(7)
    requests = [(list(rng.integers(0, 10, n)), GenerationConfig(**settings, seed=int(s)))
                for n, s in zip([1, 3, 2, 1, 2], rng.integers(0, 2**32, 5))]

    def run(batch, stagger: float):
        merger = EngineCallMerger(engines, max_rows=64)

        def one(i):
            time.sleep(stagger * i)                      # requests join while others run
            with merger.join() as merged:
                return generate(merged, *batch[i])[0]

        with ThreadPoolExecutor(len(batch)) as pool:
            return list(pool.map(one, range(len(batch)))), merger

    together, merger = run(requests, 0.01)
    assert merger.engine_calls < 0.8 * merger.submitted          # the calls did run together
    for request, images in zip(requests, together):
        alone, single = run([request], 0.0)
        assert single.engine_calls == single.submitted
        np.testing.assert_array_equal(alone[0], images)          # bit for bit
    other = run([(requests[0][0], GenerationConfig(**settings, seed=requests[0][1].seed + 1))], 0.0)[0][0]
    assert not np.array_equal(other, together[0])
    # the random numbers of `fastardiff-run`: the same sample, up to the last bits the padding changes
    np.testing.assert_allclose(generate(engines, *requests[1])[0], together[1], rtol=0, atol=1e-4)


# -- the ingress's statuses, with a stand-in for the generator deployment -------------------------------------------

class FakeGenerator:
    """`remote(job)` answers with the next of `outcomes` (an exception to raise, or a payload)."""

    def __init__(self, *outcomes):
        self.outcomes, self.jobs = list(outcomes), []

    def remote(self, job):
        self.jobs.append(job)
        outcome = self.outcomes.pop(0)
        return _Response(outcome)


class _Response:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        async def answer():
            if isinstance(self.outcome, float):
                await asyncio.sleep(self.outcome)
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return dict(self.outcome)
        return answer().__await__()

    def cancel(self):
        self.cancelled = True


def _ingress(generator, timeout_s=5.0):
    from fastardiff.runtime.serve.ingress import Ingress

    return Ingress(generator, [str(i) for i in range(10)], timeout_s)


def _answer(response):
    return response.status_code, json.loads(response.body)


def test_ingress_retries_a_dead_replica_and_maps_overload_to_503_and_504(monkeypatch):
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    import fastardiff.runtime.serve.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "RETRY_PAUSE_S", 0.01)
    ok = {"images": ["x"], "classes": [7], "stats": {"images": 1}}
    body = b'{"prompt": "7", "seed": 3}'
    dead_then_ok = FakeGenerator(ActorDiedError(), ok)
    status, payload = _answer(asyncio.run(_ingress(dead_then_ok).generate(body)))
    assert status == 200 and payload["stats"]["attempts"] == 2
    assert dead_then_ok.jobs[0] == dead_then_ok.jobs[1] and dead_then_ok.jobs[0]["seed"] == 3   # the same job again

    status, payload = _answer(asyncio.run(_ingress(FakeGenerator(BackPressureError(65, 64))).generate(body)))
    assert status == 503 and "server busy" in payload["error"] and "--max-queued" in payload["error"]

    status, payload = _answer(asyncio.run(_ingress(FakeGenerator(5.0), timeout_s=0.2).generate(body)))
    assert status == 504 and "no answer within 0.2 s" in payload["error"]

    always_dead = FakeGenerator(*[ActorDiedError() for _ in range(100)])
    status, payload = _answer(asyncio.run(_ingress(always_dead, timeout_s=0.3).generate(body)))
    assert status == 503 and "none answered within 0.3 s" in payload["error"] and len(always_dead.jobs) > 2

    status, payload = _answer(asyncio.run(_ingress(FakeGenerator(RuntimeError("boom\nline two"))).generate(body)))
    assert status == 500 and payload["error"] == "internal error: RuntimeError: boom line two"
    remote = RayTaskError("f", "Traceback (most recent call last):\n  File 'x'\nValueError: bad", ValueError("bad"))
    status, payload = _answer(asyncio.run(_ingress(FakeGenerator(remote)).generate(body)))
    assert status == 500 and payload["error"] == "internal error: ValueError: bad"      # the cause, no traceback

    refused = {"error": "--gamma 99 needs 100 tokens per target call", "status": 400}
    status, payload = _answer(asyncio.run(_ingress(FakeGenerator(refused)).generate(body)))
    assert status == 400 and payload == {"error": refused["error"]}


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


# -- shutdown (keep last: it stops the module's server) -------------------------------------------------------------

def _session_processes(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":           # field 6 of stat: session id
            pids.append(int(stat.parent.name))
    return pids


def test_sigterm_stops_the_server_cleanly(server):
    proc = server["proc"]
    assert len(_session_processes(proc.pid)) > 3                 # the driver, Ray's processes, the replicas
    # started, not only healthy: /health answers before serve.run returns, and a signal before that aborts the
    # start (exit 130, run_until_signalled); run alone (or first on a worker) this test could land there
    deadline = time.monotonic() + 60
    while "serving " not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, server["log"].read_text()[-2000:]
    assert "stopped" in server["log"].read_text().splitlines()[-3:]
    deadline = time.monotonic() + 20
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _session_processes(proc.pid) == []                    # no Ray process left behind
    with socket.socket() as s:                                    # and the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # (closed connections may linger in TIME_WAIT)
        s.bind(("127.0.0.1", server["port"]))

"""How `fastardiff serve` stops (issue 40), timed: SIGTERM / SIGINT sent to the server's whole process group (as
`timeout`, a service manager or a terminal's Ctrl-C does) with one and with two replicas, idle and with requests in
flight, and a second signal during the drain. Each case starts its own server (a local Ray instance: heavy on a
2-core machine, so few cases); tests/test_serve.py stops its module server with requests in flight too.

A stop must end in a bounded time with nothing left behind: no process of the server's tree or of any session
in it within a second of its exit. The bound is loose (a loaded CI machine); benchmarks/serve_stop.py measures.
"""
from __future__ import annotations

import signal

import pytest

from serve_server import kill_server, start_server, stop_and_check

pytest.importorskip("ray.serve", reason="fastardiff serve needs the 'serve' extra: pip install 'fastardiff[serve]'")
pytestmark = pytest.mark.slow

STOP_BOUND_S = 30.0       # issue 40 measured 35 s (Serve's controller waiting out its 30 s timeout)


@pytest.fixture(scope="module")
def engine_dir(shared_onnx_export):
    return shared_onnx_export[0]


@pytest.mark.parametrize("replicas, load, signum", [
    (1, 0, signal.SIGINT),
    (2, 0, signal.SIGTERM),
    (2, 6, signal.SIGTERM),
], ids=["1-replica-idle-SIGINT", "2-replicas-idle", "2-replicas-in-flight"])
def test_a_signal_to_the_group_stops_the_server_in_order(engine_dir, tmp_path, replicas, load, signum):
    running = start_server(engine_dir, tmp_path / "serve.log", "--replicas", str(replicas), "--num-cpus", "0.5")
    try:
        outcome = stop_and_check(running, load=load, signum=signum)
    finally:
        kill_server(running["proc"])
    log = running["log"].read_text()
    assert outcome["code"] == 0, log[-2000:]
    assert "drained in" in log and log.splitlines()[-1] == "stopped", log[-2000:]
    assert "Controller failed to shut down" not in log and "did not stop within" not in log
    assert outcome["seconds"] < STOP_BOUND_S, outcome["seconds"]
    for status, payload in outcome["answers"]:              # every request in flight answered: 200 or a JSON 503
        assert status == 200 or (status == 503 and "stop" in payload["error"]), (status, payload)


def test_a_second_signal_during_the_drain_stops_at_once(engine_dir, tmp_path):
    running = start_server(engine_dir, tmp_path / "serve.log", "--drain-timeout", "120")
    try:
        outcome = stop_and_check(running, load=4, second_after=0.5, images=16)   # still draining then
    finally:
        kill_server(running["proc"])
    log = running["log"].read_text()
    assert outcome["code"] == 128 + signal.SIGTERM, log[-2000:]
    assert "stopped at once" in log
    assert outcome["seconds"] < 10.0, outcome["seconds"]    # not the 120 s drain

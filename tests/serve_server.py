"""Starting, stopping and checking a real `fastardiff serve` in tests (tests/test_serve.py, test_serve_stop.py):
a server on a free loopback port in a session of its own, and a stop by a signal to its process group with
clients in flight, checked for processes left behind."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVER_START_S = 240.0


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


def start_server(engine_dir, log_path: Path, *flags) -> dict:
    """`fastardiff serve` on a free loopback port in a session of its own, once it is healthy and serving:
    {"url", "proc", "log", "port"}."""
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "fastardiff", "serve", "--engine", str(engine_dir), "--port",
                                 str(port), *flags], stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    try:
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}"
            assert time.monotonic() - began < SERVER_START_S, f"not healthy: {log_path.read_text()[-3000:]}"
            try:
                # started, not only healthy: /health answers before the start is over, and a signal before that
                # aborts the start (exit 130)
                if http(url + "/health", timeout=5)[0] == 200 and "serving " in log_path.read_text():
                    break
            except OSError:
                pass
            time.sleep(0.5)
    except BaseException:
        kill_server(proc)
        raise
    return {"url": url, "proc": proc, "log": log_path, "port": port}


def kill_server(proc) -> None:
    """Whatever is left of a server a test did not stop (its process tree, every session in it)."""
    for pid in descendants(proc.pid) + [proc.pid]:
        for target in session_processes(pid) + [pid]:
            try:
                os.kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def session_processes(sid: int) -> list[int]:
    from fastardiff.runtime.serve.supervise import session_processes as live

    return live(sid)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def stop_and_check(running: dict, load: int = 0, signum=signal.SIGTERM, second_after: float | None = None,
                   images: int = 1) -> dict:
    """Signal the server's process group (as a service manager or `timeout` does) while `load` clients send
    requests; returns {"seconds", "code", "answers"} once it exited, after checking that nothing of it is left."""
    proc, url = running["proc"], running["url"]
    tree = descendants(proc.pid)
    sessions = {proc.pid} | set(tree)
    assert len(tree) > 3, tree                                  # the driver, Ray's processes, the replicas
    signalled, answers, lock = threading.Event(), [], threading.Lock()
    started = threading.Barrier(load + 1) if load else None

    def client(i):
        started.wait()
        n = 0
        while not signalled.is_set():              # a client sends nothing new once the server is told to stop
            try:
                status, payload = http(url + "/generate", {"prompt": str(i % 10), "seed": 1000 * i + n,
                                                           "num_images": images}, timeout=90)
            except OSError as err:
                status, payload = type(err).__name__, {}
            with lock:
                answers.append((status, payload))
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(load)]
    for t in threads:
        t.start()
    if load:
        started.wait()
        deadline = time.monotonic() + 60
        while not answers and time.monotonic() < deadline:    # the load is on: requests are in flight
            time.sleep(0.05)
        time.sleep(0.3)
    began = time.monotonic()
    os.killpg(proc.pid, signum)
    signalled.set()
    if second_after is not None:
        time.sleep(second_after)
        os.killpg(proc.pid, signum)
    code = proc.wait(60)
    seconds = time.monotonic() - began
    for t in threads:
        t.join(100)
    assert not any(t.is_alive() for t in threads), "a request hung"
    time.sleep(1.0)                                              # within a second of the exit: nothing left
    left = sorted({p for sid in sessions for p in session_processes(sid)} | {p for p in tree if alive(p)})
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left if alive(p)]
    return {"seconds": seconds, "code": code, "answers": answers}

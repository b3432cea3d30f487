"""How long `fastardiff serve` takes to stop (SIGTERM to its process group -> exit), loopback only; writes
docs/serve-stop.json.

    .venv/bin/python benchmarks/serve_stop.py --engine DIR [--repeats 1 --clients 16 --out docs/serve-stop.json]

For 1 and 2 replicas, idle and while `--clients` clients send requests (one image each, one request at a time
per client), a server is started, signalled as `timeout` or a service manager does (SIGTERM to the whole
process group) and timed until its process exits. Recorded per stop: the seconds, the exit status, what every
request in flight at the signal got (200 / JSON 503 / anything else: none should), whether any hung, and the
processes of the server's tree and sessions still alive one second after the exit (none should). The machine's
load average is recorded beside each figure (the issue's bounds: 10 s quiet, 20 s with both cores busy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

CLIENT_TIMEOUT_S = 120.0


def http(url: str, body: dict, timeout: float = CLIENT_TIMEOUT_S):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"not json": raw[:200].decode(errors="replace")}


def proc_stat(pid: int):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree_and_sessions(pid: int) -> tuple[set, set]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = proc_stat(int(stat.parent.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(children.get(p, []))
    return tree, {int(proc_stat(p)[3]) for p in tree if proc_stat(p)}


def alive_of(tree: set, sessions: set) -> list[int]:
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat.parent.name)
        fields = proc_stat(pid)
        if fields and fields[0] not in ("Z", "X") and (pid in tree or int(fields[3]) in sessions):
            left.append(pid)
    return left


def one_stop(engine: str, replicas: int, clients: int, log_dir: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"serve-{replicas}-{clients}-{time.time():.0f}.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastardiff", "serve", "--engine", engine, "--port", str(port),
                             "--replicas", str(replicas), "--num-cpus", str(1.0 if replicas == 1 else 0.5)],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while "serving " not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.5)
    http(url + "/generate", {"prompt": "0", "seed": 0})                 # warm: every engine has run once
    tree, sessions = tree_and_sessions(proc.pid)
    signalled, answers, lock = threading.Event(), [], threading.Lock()

    def client(i):
        n = 0
        while not signalled.is_set():          # a client sends nothing new once the server is told to stop
            try:
                status, payload = http(url + "/generate", {"prompt": str(i % 10), "seed": 1000 * i + n})
                outcome = "200" if status == 200 else f"{status} json" if "not json" not in payload else f"{status}"
            except OSError as err:
                outcome = type(err).__name__
            with lock:
                answers.append((time.monotonic(), outcome))
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    if clients:
        time.sleep(3.0)                        # the load is on
    load = os.getloadavg()[0]
    began = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    signalled.set()
    code = proc.wait(120)
    seconds = time.monotonic() - began
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 10)
    time.sleep(1.0)
    left = alive_of(tree, sessions)
    for pid in left:                           # never leave anything behind, even when measuring it
        os.kill(pid, signal.SIGKILL)
    in_flight = Counter(outcome for at, outcome in answers if at >= began)
    log_lines = log_path.read_text().splitlines()
    return {"replicas": replicas, "clients": clients, "seconds": round(seconds, 2), "exit_status": code,
            "in_flight_answers": dict(in_flight), "hung": sum(t.is_alive() for t in threads),
            "left_after_1s": len(left), "load_average_1m": round(load, 2),
            "log_tail": [line for line in log_lines if "drained" in line or "shut down" in line][-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", default="docs/serve-stop.json")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="serve-stop-"))
    stops = []
    for _ in range(args.repeats):
        for replicas in (1, 2):
            for clients in (0, args.clients):
                stop = one_stop(args.engine, replicas, clients, log_dir)
                print(json.dumps(stop), flush=True)
                stops.append(stop)
    clean = all(s["exit_status"] == 0 and s["hung"] == 0 and s["left_after_1s"] == 0 and
                all(k in ("200", "503 json") for k in s["in_flight_answers"]) for s in stops)
    record = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "command": " ".join(sys.argv), "all_clean": clean, "max_seconds": max(s["seconds"] for s in stops),
              "stops": stops}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"max {record['max_seconds']} s; all clean: {clean}; written {args.out}")
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()

"""Load and fault test of `fastardiff serve` on this machine, loopback only, bounded; writes docs/serve-load.json.

    .venv/bin/python benchmarks/serve_load.py --engine DIR [--requests 200 --clients 16 --out docs/serve-load.json]

Each phase starts a real `fastardiff serve` (a local Ray instance) as a subprocess, talks HTTP to 127.0.0.1 and
stops it with SIGTERM (its exit status is recorded):
  1. throughput: the same requests (one image each, `prompt` cycling 0..9, seed = request number) sent by one
     client one at a time, then by `--clients` concurrent clients, to the same server: images/s, p50/p99 latency,
     every status; with the cores as one replica each and as one replica using all of them;
  2. replica death: two replicas, the concurrent load again, one generator replica's process SIGKILLed once a
     quarter of the requests are answered: failed requests, retried ones, the slowest answer, how long Serve
     took to replace the replica, and whether any request hung (no answer within the client timeout);
  3. back-pressure: a server that holds few requests (--max-batch 1 --max-queued 2) and a burst of concurrent
     requests: 200s and 503s (JSON error bodies), none hung;
  4. bad requests: each answered 4xx (400 a body that is not a JSON object, 422 a bad field) with its message
     (benchmarks/bad_inputs_http.py sends the hostile ones).
Every figure comes from this run; nothing is estimated.
"""
from __future__ import annotations

import argparse
import json
import logging
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
from pathlib import Path

log = logging.getLogger("serve_load")
CLIENT_TIMEOUT_S = 180.0

BAD_REQUESTS = [
    ("unknown class", {"prompt": "eleven"}),
    ("class id out of range", {"prompt": "12"}),
    ("empty prompt", {"prompt": ""}),
    ("prompt of the wrong type", {"prompt": 7}),
    ("missing prompt", {"seed": 1}),
    ("unknown field", {"prompt": "7", "colour": "red"}),
    ("num_images out of range", {"prompt": "7", "num_images": 65}),
    ("num_images not an integer", {"prompt": "7", "num_images": 2.5}),
    ("seed negative", {"prompt": "7", "seed": -1}),
    ("seed not a number", {"prompt": "7", "seed": "abc"}),
    ("mode unknown", {"prompt": "7", "mode": "fast"}),
    ("gamma zero", {"prompt": "7", "gamma": 0}),
    ("gamma not a number", {"prompt": "7", "gamma": "many"}),
    ("gamma too large for the engines", {"prompt": "7", "gamma": 99}),
    ("cfg_scale out of range", {"prompt": "7", "cfg_scale": 99}),
    ("temperature zero", {"prompt": "7", "temperature": 0}),
    ("temperature not a number", {"prompt": "7", "temperature": "hot"}),
    ("malformed JSON", b'{"prompt": '),
    ("JSON not an object", b'["7"]'),
    ("NaN", b'{"prompt": "7", "temperature": NaN}'),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fastardiff serve` as a subprocess in its own session; `stop()` sends SIGTERM and waits."""

    def __init__(self, engine_dir: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "fastardiff", "serve", "--engine", engine_dir, "--port", str(self.port), *args]
        log.info("starting %s", " ".join(cmd[2:]))
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.ready_s = self._wait_healthy(240.0)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, limit: float) -> float:
        while time.perf_counter() - self.started < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            status, _ = get(self.url + "/health", timeout=5)
            if status == 200:
                return time.perf_counter() - self.started
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {limit:.0f} s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        return Path(self.log_file.name).read_text()[-n:]

    def stop(self) -> dict:
        began = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = "killed after 90 s"
        return {"exit_status": code, "stop_seconds": round(time.perf_counter() - began, 2),
                "logged_stopped": "stopped" in self.tail(400)}


def _payload(raw: bytes) -> dict:
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        return {"error": f"(not JSON) {raw[:200]!r}"}
    return data if isinstance(data, dict) else {"error": f"(not an object) {data!r:.200}"}


def get(url: str, timeout: float = 10.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, _payload(r.read())
    except urllib.error.HTTPError as err:
        return err.code, _payload(err.read())
    except OSError:
        return None, None


def post(url: str, body, timeout: float = CLIENT_TIMEOUT_S) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    began = time.perf_counter()
    request = urllib.request.Request(url + "/generate", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, payload = r.status, _payload(r.read())
    except urllib.error.HTTPError as err:
        status, payload = err.code, _payload(err.read())
    except (TimeoutError, socket.timeout):
        status, payload = "hung", {}
    except OSError as err:
        status, payload = "connection error", {"error": str(err)}
    stats = payload.get("stats", {})
    batch = stats.get("batch", {})
    return {"status": status, "seconds": time.perf_counter() - began, "images": len(payload.get("images", [])),
            "attempts": stats.get("attempts", 1), "batch": batch.get("requests"),
            "merged": batch.get("requests_per_engine_call"), "queued": batch.get("queued_seconds"),
            "error": payload.get("error")}


def requests_of(n: int) -> list[dict]:
    return [{"prompt": str(i % 10), "seed": i} for i in range(n)]


def run_load(url: str, bodies: list, clients: int, on_progress=None) -> tuple[list, float]:
    """`clients` threads take the bodies in order from a shared queue; results in body order."""
    results: list = [None] * len(bodies)
    lock, next_index = threading.Lock(), [0]

    def client():
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(bodies):
                return
            results[i] = post(url, bodies[i])
            if on_progress:
                on_progress(sum(r is not None for r in results))

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - began


def summary(results: list, seconds: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["seconds"] for r in results)
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)  # noqa: E731
    statuses: dict = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    batches = [r["batch"] for r in ok if r["batch"]]
    merged = [r["merged"] for r in ok if r["merged"]]
    queued = sorted(r["queued"] for r in ok if r["queued"] is not None)
    return {"requests": len(results), "statuses": statuses, "images": sum(r["images"] for r in ok),
            "seconds": round(seconds, 2), "images_per_second": round(sum(r["images"] for r in ok) / seconds, 2),
            "latency_p50_s": pick(0.50), "latency_p99_s": pick(0.99), "latency_max_s": round(latencies[-1], 3),
            "mean_batch_requests": round(sum(batches) / len(batches), 2) if batches else None,
            "mean_requests_per_engine_call": round(sum(merged) / len(merged), 2) if merged else None,
            "queued_p50_s": round(queued[len(queued) // 2], 3) if queued else None}


def throughput(engine: str, n: int, clients: int, server_args: list) -> dict:
    server = Server(engine, *server_args)
    try:
        for body in requests_of(4):                      # warm-up: first calls of each engine shape
            post(server.url, body)
        bodies = requests_of(n)
        log.info("sequential: %d requests, one client", n)
        seq, seq_s = run_load(server.url, bodies, 1)
        log.info("concurrent: %d requests, %d clients", n, clients)
        con, con_s = run_load(server.url, bodies, clients)
    finally:
        stopped = server.stop()
    one, many = summary(seq, seq_s), summary(con, con_s)
    return {"server_args": server_args, "ready_seconds": round(server.ready_s, 1), "sequential_1_client": one,
            f"concurrent_{clients}_clients": many,
            "batching_speedup": round(many["images_per_second"] / one["images_per_second"], 2), "shutdown": stopped}


def replica_kill(engine: str, n: int, clients: int, server_args: list) -> dict:
    server = Server(engine, *server_args)
    killed: dict = {}
    kill_lock = threading.Lock()

    def generator_pids() -> list[int]:
        out = subprocess.run(["pgrep", "-s", str(server.proc.pid), "-f", "ServeReplica:fastardiff:Generator"],
                             capture_output=True, text=True).stdout.split()
        return [int(p) for p in out]

    def on_progress(done: int):
        with kill_lock:
            if done < n // 4 or killed:
                return
            pid = generator_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, at_answered=done, at=time.perf_counter())
            log.info("SIGKILLed generator replica %d after %d answers", pid, done)
            threading.Thread(target=watch_replacement, args=(pid,), daemon=True).start()

    def watch_replacement(dead: int):
        while time.perf_counter() - killed["at"] < 120:
            pids = generator_pids()
            if len(pids) >= 2 and dead not in pids and get(server.url + "/health")[0] == 200:
                killed["replaced_after_s"] = round(time.perf_counter() - killed["at"], 1)
                return
            time.sleep(0.25)

    try:
        for body in requests_of(4):
            post(server.url, body)
        results, seconds = run_load(server.url, requests_of(n), clients, on_progress)
        time.sleep(1.0)
        after = post(server.url, {"prompt": "3", "seed": 99})
    finally:
        stopped = server.stop()
    failed = [r for r in results if r["status"] != 200]
    return {"server_args": server_args, "load": summary(results, seconds), "killed_replica_pid": killed.get("pid"),
            "killed_after_answers": killed.get("at_answered"), "replaced_after_s": killed.get("replaced_after_s"),
            "failed_requests": len(failed), "failures": [r["error"] for r in failed][:10],
            "retried_requests": sum(1 for r in results if r["attempts"] > 1),
            "hung_requests": sum(1 for r in results if r["status"] == "hung"),
            "client_timeout_s": CLIENT_TIMEOUT_S, "request_after_recovery": after["status"], "shutdown": stopped}


def back_pressure(engine: str, burst: int, server_args: list) -> dict:
    server = Server(engine, *server_args)
    try:
        post(server.url, {"prompt": "1"})
        results, seconds = run_load(server.url, [{"prompt": str(i % 10), "seed": i, "num_images": 4}
                                                 for i in range(burst)], burst)
    finally:
        stopped = server.stop()
    busy = [r for r in results if r["status"] == 503]
    return {"server_args": server_args, "burst": burst, "load": summary(results, seconds),
            "busy_503": len(busy), "503_error": busy[0]["error"] if busy else None,
            "every_503_a_json_error": all(r["error"] and not r["error"].startswith("(not JSON)") for r in busy),
            "hung_requests": sum(1 for r in results if r["status"] == "hung"), "shutdown": stopped}


def bad_requests(engine: str) -> dict:
    server = Server(engine, "--batch-wait-ms", "0")
    try:
        answers = {what: post(server.url, body) for what, body in BAD_REQUESTS}
    finally:
        stopped = server.stop()
    return {"all_4xx": all(a["status"] in (400, 422) and a["error"] for a in answers.values()),
            "answers": {what: {"status": a["status"], "error": a["error"]} for what, a in answers.items()},
            "shutdown": stopped}


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numpy
    import onnxruntime
    import ray

    info.update(ray=ray.__version__, onnxruntime=onnxruntime.__version__, numpy=numpy.__version__)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, help="ONNX engine directory (fastardiff-export --target onnx)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--out", default="docs/serve-load.json")
    parser.add_argument("--phases", default="throughput,kill,backpressure,bad")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    phases = set(args.phases.split(","))
    batching = ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    report = {"what": "fastardiff serve on this machine, loopback HTTP only (benchmarks/serve_load.py)",
              "engine_dir": args.engine, "machine": machine(), "load_average_before": os.getloadavg(),
              "requests": "one image each, prompt i % 10, seed i (gamma auto, the API defaults otherwise)"}
    if "throughput" in phases:      # the machine's cores as one replica per core, and as one replica on all of them
        cores = str(os.cpu_count() or 1)
        report["throughput"] = {
            f"{cores} replicas x 1 CPU": throughput(args.engine, args.requests, args.clients,
                                                    batching + ["--replicas", cores, "--num-cpus", "1"]),
            f"1 replica x {cores} CPUs": throughput(args.engine, args.requests, args.clients,
                                                    batching + ["--replicas", "1", "--num-cpus", cores])}
    if "kill" in phases:
        report["replica_kill"] = replica_kill(args.engine, args.requests, args.clients,
                                              batching + ["--replicas", "2", "--num-cpus", "1"])
    if "backpressure" in phases:
        report["back_pressure"] = back_pressure(args.engine, 24, ["--max-batch", "1", "--max-queued", "2",
                                                                  "--num-cpus", "2"])
    if "bad" in phases:
        report["bad_requests"] = bad_requests(args.engine)
    report["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Starting and stopping a `fastardiff serve` application: Ray (local or an existing cluster), Serve, signals.

Two deployments: `Generator` replicas (replica.py: engines, batching; `--num-cpus/--num-gpus` each, spread
over the cluster's nodes by Ray) behind one `Ingress` (ingress.py: HTTP, checks, retries; no CPU reserved).
A generator replica holds `2 x max_batch` requests at a time (all of them running: see replica.py); `max_queued`
more may wait at the ingress; past that a request gets 503 at once.

Without `address` a local Ray instance is started and shut down with the server; with it, the application is
deployed on that cluster and removed from it on exit (the cluster keeps running). This runs in the driver process
(supervise.py: a session of its own, so that a signal to the server's process group reaches this process only).

Stopping (SIGTERM or SIGINT): the ingress stops taking requests (503 JSON at once, /health 503), the requests in
flight get up to `drain_s` to finish (then each is answered 503 JSON), and the local Ray instance is shut down
with the application in it (with `address`: only the application is deleted, the cluster keeps running). Every node that runs a
replica must see the engine directory at the same path (a shared file system), as with any Ray working data.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastardiff.errors import FastardiffError

log = logging.getLogger("fastardiff.serve")

APP_NAME = "fastardiff"


@dataclass(frozen=True)
class ServeOptions:
    engine_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    address: str | None = None
    max_queued: int = 64
    timeout_s: float = 120.0
    drain_s: float = 3.0

    @property
    def max_ongoing(self) -> int:
        return 2 * self.max_batch

    @property
    def engine_threads(self) -> int:
        return max(1, int(self.num_cpus))


def build_app(opts: ServeOptions, class_names):
    from ray import serve

    from .ingress import Ingress
    from .replica import Generator

    generator = serve.deployment(
        Generator, name="Generator", num_replicas=opts.replicas,
        ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        max_ongoing_requests=opts.max_ongoing, max_queued_requests=opts.max_queued,
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        # the ingress drains the requests before the application is deleted (stop): a replica has nothing left to
        # wait for then, so it need not poll for work for Serve's default 2 s
        graceful_shutdown_wait_loop_s=0.2, graceful_shutdown_timeout_s=2.0)
    # the ingress only awaits: it takes far more requests than the generators, so that it is their full queues
    # that refuse a request (a JSON 503 from the ingress), not the HTTP proxy's (a plain-text one)
    admitted = opts.replicas * opts.max_ongoing + opts.max_queued
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=4 * admitted + 64, max_queued_requests=admitted,
                               graceful_shutdown_wait_loop_s=0.2, graceful_shutdown_timeout_s=2.0)
    engine_dir = str(Path(opts.engine_dir).resolve())
    replica = generator.bind(engine_dir, opts.max_batch, opts.batch_wait_ms / 1000.0, opts.max_ongoing,
                             opts.engine_threads)
    return ingress.bind(replica, list(class_names), opts.timeout_s)


def check_port_free(host: str, port: int) -> None:
    """Refuse a host/port this machine cannot listen on, before Ray starts."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as err:
        raise FastardiffError(f"cannot listen on {host}:{port} ({err.strerror or err}); pass a free --port, or a "
                              "--host address of this machine") from None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port (or ray://host:port) address must accept a TCP connection: Ray itself would wait minutes."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        if address != "auto":
            raise FastardiffError(f"--address {address!r} is not host:port or ray://host:port (or 'auto' for the "
                                  "cluster this machine belongs to)")
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise FastardiffError(f"cannot reach the Ray cluster at {address!r} ({err.strerror or err}); check "
                              "--address (host:6379 of the head node, or ray://host:10001) and that the cluster "
                              "is up") from None


def connect(opts: ServeOptions) -> None:
    """ray.init: a new local instance, or the cluster at opts.address; then check it can hold the replicas."""
    import ray

    if opts.address is not None:
        check_reachable(opts.address)
    try:
        ray.init(address=opts.address or "local", include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {opts.address!r}" if opts.address else "a local Ray instance"
        raise FastardiffError(f"cannot start or join {where} ({_line(err)}); check --address (host:6379 of the "
                              "head node, or ray://host:10001) and that the cluster is up") from None
    have = ray.cluster_resources()
    for what, each, unit in (("CPU", opts.num_cpus, "--num-cpus"), ("GPU", opts.num_gpus, "--num-gpus")):
        need = each * opts.replicas
        if need > have.get(what, 0.0) + 1e-9:
            ray.shutdown()
            raise FastardiffError(f"--replicas {opts.replicas} x {unit} {each:g} needs {need:g} {what}(s) but the "
                                  f"Ray cluster has {have.get(what, 0.0):g}; lower --replicas or {unit}, or add "
                                  "nodes")


def start(opts: ServeOptions, class_names) -> str:
    """Deploy the application (returns its URL once every replica has loaded its engines)."""
    from ray import serve

    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        serve.run(build_app(opts, class_names), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as err:  # noqa: BLE001 - a replica that cannot start: its reason, one line
        raise FastardiffError(f"the server did not start: {_line(err)}") from None
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return f"http://{host}:{opts.port}"


def drain(opts: ServeOptions) -> None:
    """Stop taking requests and give those in flight up to opts.drain_s (then the ingress answers them 503)."""
    from ray import serve

    began = time.monotonic()
    try:
        handle = serve.get_app_handle(APP_NAME)
        outcome = handle.drain.remote(opts.drain_s).result(timeout_s=opts.drain_s + 5.0)
    except Exception as err:  # noqa: BLE001 - no application (a failed start) or no ingress: nothing to drain
        log.info("no requests drained (%s)", _line(err))
        return
    log.info("drained in %.1f s: %d request(s) finished, %d answered 503", time.monotonic() - began,
             outcome["finished"], outcome["aborted"])


def stop(opts: ServeOptions, deadline_s: float = 10.0) -> None:
    """After the drain: on a cluster (`address`), delete the application (bounded by `deadline_s`) and disconnect;
    a local instance is shut down whole, application included: deleting the application first would leave Serve's
    proxy up without it for a moment, answering plain-text 404s instead of the ingress's JSON 503s. The supervisor
    kills whatever of the driver's session is left once this process exits."""
    import ray
    from ray import serve

    began = time.monotonic()
    if opts.address is not None and ray.is_initialized():
        step = threading.Thread(target=serve.delete, args=(APP_NAME,), name="serve-delete", daemon=True)
        step.start()
        step.join(deadline_s)
        if step.is_alive():
            log.warning("Serve did not delete the application within %g s; disconnecting regardless", deadline_s)
        log.info("application deleted from the cluster in %.1f s", time.monotonic() - began)
    ray.shutdown()
    log.info("Ray %s in %.1f s", "disconnected" if opts.address is not None else "shut down",
             time.monotonic() - began)


def run_until_signalled(opts: ServeOptions, class_names, stopping: threading.Event | None = None) -> None:
    """Serve until SIGINT or SIGTERM (or `stopping` is set), then shut down cleanly. A signal while the replicas
    are still starting aborts the start (KeyboardInterrupt) and shuts down all the same."""
    stopping = stopping or threading.Event()
    starting = [True]

    def on_signal(signum, frame):
        stopping.set()
        if starting[0]:
            starting[0] = False
            raise KeyboardInterrupt

    if opts.address is None:
        check_port_free(opts.host, opts.port)
    connect(opts)        # first: ray.init installs Ray's own SIGTERM handler, which these replace
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = start(opts, class_names)
        starting[0] = False
        log.info("serving %s: POST %s/generate, GET %s/health (%d replica(s), batches of up to %d, %g ms wait); "
                 "Ctrl-C or SIGTERM stops", opts.engine_dir, url, url, opts.replicas, opts.max_batch,
                 opts.batch_wait_ms)
        while not stopping.wait(0.5):
            pass
        log.info("stopping")
        drain(opts)
    finally:
        starting[0] = False
        try:
            stop(opts)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    log.info("stopped")


def _line(err: BaseException) -> str:
    """The most telling line of an error (Serve's deployment failures carry a whole traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))]
    text = (useful[-1] if useful else type(err).__name__)
    return text if len(text) <= 300 else text[:297] + "..."

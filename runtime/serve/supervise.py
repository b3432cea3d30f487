"""The process layout of `fastardiff serve`: a small supervisor (the command's own process) and the driver (Ray,
Serve, the signal-driven stop: app.py) in a child process of a session of its own.

Why two processes: a service manager or `timeout` sends SIGTERM to the server's whole process group. Ray starts
its own processes (GCS server, raylet, Serve's controller, proxy and replicas) in the group of the process that
calls ray.init; they would each get that SIGTERM and stop on their own, in no order: the GCS server first, after
which Serve's controller cannot delete anything and `serve.shutdown()` waits out its 30 s timeout, while replica
processes linger (what issue 40 measured: 35 s to exit, a replica still running after). Ray shields its processes
from SIGINT (it blocks it in them) but not from SIGTERM. Here the driver and every Ray process live in the
child's session, which no signal to the server's group reaches: only the driver is told (SIGTERM, forwarded), and
it stops in order (app.py `stop`). When the driver has exited, whatever of its session is still alive is killed
(SIGKILL), so no Ray process outlives the server. A second SIGTERM or SIGINT, or a stop that takes longer than
the drain plus `STOP_GRACE_S`, kills the session at once (exit status 128 + signal). The driver dies with the
supervisor (PR_SET_PDEATHSIG), and Ray's processes with the driver (Ray's own fate sharing).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

log = logging.getLogger("fastardiff.serve")

STOP_GRACE_S = 15.0     # past drain_s + this after the first signal, the driver's session is killed


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid` (Linux /proc; empty elsewhere)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int, wait_s: float = 2.0) -> int:
    """SIGKILL every process of session `sid`; wait (bounded) until they are gone. Returns how many there were."""
    pids = session_processes(sid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(pids)


def supervise(opts, class_names, verbose: int = 0) -> int:
    """Run the driver in its own session until it exits; forward the first SIGTERM / SIGINT to it, kill it (and its
    session) on the second or past the stop's bound. Returns the exit status for the command."""
    spec = json.dumps({"options": asdict(opts), "class_names": list(class_names), "verbose": verbose})
    child = subprocess.Popen([sys.executable, "-m", "fastardiff.runtime.serve.supervise", spec],
                             start_new_session=True)
    signals: list[int] = []

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) == 1:
            log.info("stopping (drain up to %g s; a second Ctrl-C or SIGTERM stops at once)", opts.drain_s)
            _send(child, signal.SIGTERM)
        else:
            _send_session(child.pid, signal.SIGKILL)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    first_signal_at = None
    try:
        while child.poll() is None:
            if signals and first_signal_at is None:
                first_signal_at = time.monotonic()
            if first_signal_at is not None and time.monotonic() - first_signal_at > opts.drain_s + STOP_GRACE_S:
                log.warning("the server did not stop within %g s; killing it", opts.drain_s + STOP_GRACE_S)
                _send_session(child.pid, signal.SIGKILL)
                signals.append(signal.SIGKILL)
            try:
                child.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
    finally:
        left = kill_session(child.pid)
        if left:
            log.warning("killed %d process(es) of the server's Ray instance that outlived it", left)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if len(signals) > 1:
        log.info("stopped at once")
        return 128 + signals[0]
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def _send(child: subprocess.Popen, signum: int) -> None:
    try:
        child.send_signal(signum)
    except ProcessLookupError:
        pass


def _send_session(sid: int, signum: int) -> None:
    for pid in session_processes(sid):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _die_with_parent() -> None:
    """SIGTERM to this process when the supervisor dies (Linux); exit at once if it is gone already."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)       # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        sys.exit(1)


@click.command("serve-driver", hidden=True)
@click.argument("spec")
def driver_command(spec: str) -> None:
    """The driver process (started by `supervise`, never by hand)."""
    from fastardiff.cli import setup_logging

    from .app import ServeOptions, run_until_signalled

    data = json.loads(spec)
    setup_logging(int(data.get("verbose", 0)))
    _die_with_parent()
    run_until_signalled(ServeOptions(**data["options"]), data["class_names"])


if __name__ == "__main__":
    from fastardiff.cli import _invoke

    _invoke(driver_command, sys.argv[1:], "fastardiff serve")

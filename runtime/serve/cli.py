"""`fastardiff serve`: the engines behind an HTTP endpoint on Ray Serve (see README "Serving on Ray Serve").

Everything that can be checked before Ray starts is: the option values (finite, in range), the engine directory
(manifest and every engine file's sha256, as `fastardiff-run` does), and, for a local server, that the port is
free; a bad one is one `error:` line and exit status 2. Ray is imported only in the driver process the command
starts (supervise.py), which serves until SIGTERM / SIGINT.
"""
from __future__ import annotations

import logging
import sys

import click

from fastardiff.cli import verbose_option
from fastardiff.params import Number


@click.command("serve")
@click.option("--engine", "engine_dir", required=True, type=click.Path(),
              help="Engine directory written by fastardiff-export (every replica must see it at this path).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP server listens on.")
@click.option("--port", type=Number(int, 1, 65535), default=8000, show_default=True, help="HTTP port, 1..65535.")
@click.option("--replicas", type=Number(int, 1, 1024), default=1, show_default=True,
              help="Generator replicas, each with its own copy of the engines (spread over the cluster's nodes).")
@click.option("--max-batch", type=Number(int, 1, 256), default=8, show_default=True,
              help="Requests a replica takes in one batch, 1..256 (it runs up to twice as many at once).")
@click.option("--batch-wait-ms", type=Number(float, 0.0, 60000.0), default=10.0, show_default=True,
              help="How long a replica waits for a batch to fill before it starts, in [0, 60000] ms.")
@click.option("--num-cpus", type=Number(float, 0.0, 1024.0), default=1.0, show_default=True,
              help="CPUs Ray reserves per replica (also its engine threads).")
@click.option("--num-gpus", type=Number(float, 0.0, 64.0), default=0.0, show_default=True,
              help="GPUs Ray reserves per replica (TensorRT / CUDA engines).")
@click.option("--address", default=None,
              help="Join this Ray cluster (host:6379 of its head, or ray://host:10001) instead of starting Ray here.")
@click.option("--max-queued", type=Number(int, 0, 100000), default=64, show_default=True,
              help="Requests that may wait beyond those the replicas hold (2 x --max-batch each); more get 503.")
@click.option("--timeout", "timeout_s", type=Number(float, 0.0, 3600.0, low_open=True), default=120.0,
              show_default=True, help="Seconds a request may take (retries after a replica's death included); "
                                      "then 504.")
@click.option("--drain-timeout", "drain_s", type=Number(float, 0.0, 600.0), default=3.0, show_default=True,
              help="On SIGTERM / SIGINT: seconds the requests in flight get to finish (then 503) before the server "
                   "stops; a second signal stops at once.")
@verbose_option()
def serve_command(engine_dir, host, port, replicas, max_batch, batch_wait_ms, num_cpus, num_gpus, address, max_queued,
                  timeout_s, drain_s):
    """Serve the engines over HTTP on Ray Serve: POST /generate, GET /health."""
    from fastardiff.errors import FastardiffError
    from fastardiff.runtime.manifest import load_manifest, verify_engine_files

    from .app import ServeOptions
    from .supervise import supervise

    if not str(host).strip():
        raise FastardiffError("--host is empty; give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0")
    if address is not None and not str(address).strip():
        raise FastardiffError("--address is empty; give the Ray cluster's address (host:6379 or ray://host:10001) "
                              "or leave it out to start Ray here")
    manifest = load_manifest(engine_dir)
    verify_engine_files(engine_dir, manifest)
    opts = ServeOptions(engine_dir=str(engine_dir), host=host, port=port, replicas=replicas, max_batch=max_batch,
                        batch_wait_ms=batch_wait_ms, num_cpus=num_cpus, num_gpus=num_gpus, address=address,
                        max_queued=max_queued, timeout_s=timeout_s, drain_s=drain_s)
    from .app import check_port_free, check_reachable

    if address is None:
        check_port_free(host, port)
    else:
        check_reachable(address)
    level = logging.getLogger().getEffectiveLevel()
    code = supervise(opts, manifest.config["class_names"], 1 if level <= logging.DEBUG else 0)
    if code:
        sys.exit(code)

"""A cache of `--gamma auto` choices, so that a short run does not spend longer planning than generating.

`choose_gamma` times the engines and the host loop and confirms its best candidates with whole images (about 1 s
at batch 1 and 4-5 s at batch 8 for the shipped model on a 2-core CPU, against ~40 ms for one image). Like TensorRT's timing cache, its result is kept per machine and per engine build: a JSON
file under the user's cache directory (`$FASTARDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/fastardiff`, else
`~/.cache/fastardiff`; the engine directory itself is never written), named by a hash of everything the choice
depends on: the engine files' sha256, the calibration, the backend and its execution providers and threads,
the runtime library and the runtime's own code (a changed loop changes the host's share of a round), the CPU, and
the request (batch, guidance, proposal kinds, head options). A plan older
than `MAX_AGE_S` is timed again; `fastardiff-run --replan` forces it. Backends without engine hashes (the torch
reference backend of `--ckpt`) are not cached. An unreadable, malformed or unwritable cache only costs the
timing again (logged), never the run.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from .gamma_auto import GammaChoice

log = logging.getLogger("fastardiff.runtime")

FORMAT = "fastardiff-gamma-auto-plan-2"   # 2: choices confirmed by whole-image runs
MAX_AGE_S = 7 * 24 * 3600
RUNTIME_LIBRARIES = {"onnxruntime": "onnxruntime", "aoti": "torch", "tensorrt": "tensorrt"}


def cache_dir() -> Path:
    if os.environ.get("FASTARDIFF_CACHE_DIR"):
        return Path(os.environ["FASTARDIFF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastardiff"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def runtime_code_hash() -> str:
    """sha256 (16 hex) of this runtime's Python sources: a plan timed with another loop is timed again."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def plan_key(engines, batch: int, cfg_scale: float, drafts, options: dict | None) -> dict | None:
    """What the choice depends on, or None when these engines cannot be identified (no engine hashes)."""
    m = engines.manifest
    hashes = {name: entry.sha256 for name, entry in m.engines.items()}
    if not hashes or not all(hashes.values()):
        return None
    library = RUNTIME_LIBRARIES.get(m.backend, m.backend)
    module = sys.modules.get(library)
    from fastardiff import __version__

    return {"format": FORMAT, "fastardiff": __version__, "backend": m.backend, "device": m.device,
            "engines": dict(sorted(hashes.items())),
            "calibration": hashlib.sha256(json.dumps(m.calibration, sort_keys=True, default=str).encode()).hexdigest(),
            "providers": list(getattr(engines, "providers", []) or []), "threads": getattr(engines, "threads", None),
            "runtime_library": f"{library} {getattr(module, '__version__', '?')}",
            "runtime_code": runtime_code_hash(),
            "cpu": _cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "batch": int(batch), "cfg_scale": float(cfg_scale), "drafts": list(drafts),
            "options": {k: options[k] for k in sorted(options or {})}}


def plan_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "plans" / f"gamma-auto-{digest}.json"


def _choice_from(record: dict) -> GammaChoice:
    """The cached GammaChoice; ValueError for anything that is not one."""
    c = record["choice"]
    gamma = c["gamma"]
    if gamma is not None and (not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1):
        raise ValueError(f"gamma {gamma!r}")
    if c["draft"] not in ("model", "jacobi") or not isinstance(c["reason"], str):
        raise ValueError("draft / reason")
    if not isinstance(c["candidates"], list) or not all(isinstance(x, dict) for x in c["candidates"]):
        raise ValueError("candidates")
    return GammaChoice(gamma, c["reason"], float(c["target_step_ms"]), c["candidates"], c["draft"])


def load_plan(key: dict | None, now: float | None = None) -> GammaChoice | None:
    """The cached choice for `key`, or None (no key, no file, stale, other key, malformed)."""
    if key is None:
        return None
    path = plan_path(key)
    try:
        if path.exists() and not path.is_file():      # stat only: a FIFO or a device there would block the read
            raise ValueError("not a regular file")
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not a plan record")
        if record.get("key") != key:
            return None
        if (now or time.time()) - float(record["written"]) > MAX_AGE_S:
            log.info("the cached --gamma auto plan %s is older than %d days; timing again", path, MAX_AGE_S // 86400)
            return None
        return _choice_from(record)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the cached --gamma auto plan %s (%s: %s); timing again", path, type(err).__name__, err)
        return None


def store_plan(key: dict | None, choice: GammaChoice) -> Path | None:
    """Write the choice for `key` (atomically: a temporary file renamed into place); None when not written."""
    if key is None:
        return None
    path = plan_path(key)
    record = {"key": key, "written": time.time(), "choice": choice.to_dict()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plan-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, TypeError, ValueError) as err:
        log.warning("could not cache the --gamma auto plan in %s (%s); the next run times the engines again",
                    path.parent, err)
        return None
    return path


def cached_choice(engines, batch: int, cfg_scale: float, drafts, options: dict | None, choose, replan: bool = False):
    """(choice, where it came from): the cached plan for this request, else choose() and store its result."""
    key = plan_key(engines, batch, cfg_scale, drafts, options)
    choice = None if replan else load_plan(key)
    if choice is not None:
        return choice, f"cached plan {plan_path(key)} (--replan times the engines again)"
    choice = choose()
    path = store_plan(key, choice)
    return choice, (f"timed now; cached in {path}" if path else "timed now")

"""A cache of `--gamma auto` plans, so that a short run does not spend longer planning than generating, and
which later runs correct.

`choose_gamma` times the engines and the host loop and confirms its best candidates with paired whole-image runs
(about 1-2 s at batch 1 and 4-5 s at batch 8 for the shipped model on a 2-core CPU, against ~40 ms for one image).
Like TensorRT's timing cache, its result is kept per machine and per engine build: a JSON file under the user's
cache directory (`$FASTARDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/fastardiff`, else `~/.cache/fastardiff`; the
engine directory itself is never written), named by a hash of everything the choice depends on: the engine files'
sha256, the calibration, the backend and its execution providers and threads, the runtime library and the
runtime's own code (a changed loop changes the host's share of a round), the CPU, and the request (batch,
guidance, proposal kinds, head options). The plan keeps what it measured and how sure it was (GammaChoice
.measured / .confidence) and what later runs measured (`observed`, folded in by `update_from_run`). A plan that
later runs contradict is changed or marked stale (timed again on the next run); a plan older than `MAX_AGE_S` is
timed again; `fastardiff-run --replan` forces it. Backends without engine hashes (the torch reference backend of
`--ckpt`) are not cached. A cache that is unreadable, malformed, not a regular file, or names a choice these
engines cannot run only costs the timing again (one log line), never the run and never a hang.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import stat
import sys
import tempfile
import time
from pathlib import Path

from .gamma_auto import GammaChoice, mode_label

log = logging.getLogger("fastardiff.runtime")

FORMAT = "fastardiff-gamma-auto-plan-3"   # 2: choices confirmed by whole-image runs; 3: with their confidence
MAX_AGE_S = 7 * 24 * 3600
MAX_PLAN_BYTES = 1 << 20     # a plan is a few kB: anything larger is not one
MIN_EVIDENCE_TOKENS = 32     # update_from_run: tokens (summed over samples) a run must have spent in a mode
DRIFT = 1.5                  # update_from_run: the planned mode ran this much slower / faster than planned: stale
MEMORY_TOKENS = 4096         # update_from_run: the observed rates weigh the past as at most this many tokens
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


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} {value!r} is not a finite number")
    return float(value)


def _gamma(value, what: str = "gamma") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} {value!r} is not a positive integer")
    return value


def _choice_from(c) -> GammaChoice:
    """The GammaChoice of a stored choice dict; ValueError for anything that is not one (types and ranges: what
    the table prints and the run reads)."""
    if not isinstance(c, dict):
        raise ValueError("the choice is not an object")
    gamma = None if c["gamma"] is None else _gamma(c["gamma"])
    if c["draft"] not in ("model", "jacobi") or not isinstance(c["reason"], str):
        raise ValueError("draft / reason")
    if not isinstance(c["candidates"], list) or not all(isinstance(x, dict) for x in c["candidates"]):
        raise ValueError("candidates")
    for x in c["candidates"]:
        if x.get("draft", "model") not in ("model", "jacobi"):
            raise ValueError(f"candidate draft {x.get('draft')!r}")
        _gamma(x["gamma"], "candidate gamma")
        for name in ("tokens_per_round", "rollout_ms", "verify_ms", "speedup"):
            _number(x[name], f"candidate {name}")
        for name in ("host_ms", "measured_speedup"):
            if name in x:
                _number(x[name], f"candidate {name}")
    measured, confidence = c.get("measured", {}), c.get("confidence", {})
    if not isinstance(measured, dict) or not all(isinstance(m, dict) for m in measured.values()):
        raise ValueError("measured")
    for m in measured.values():
        _number(m["ms_per_token"], "measured ms_per_token")
    if not isinstance(confidence, dict):
        raise ValueError("confidence")
    if confidence:
        _number(confidence["level"], "confidence level")
        _gamma(confidence["pairs"], "confidence pairs")
        if not isinstance(confidence["stopped"], str) or not isinstance(confidence["finalists"], dict):
            raise ValueError("confidence stopped / finalists")
        for v in confidence["finalists"].values():
            for name in ("speedup", "low", "high"):
                _number(v[name], f"confidence {name}")
            if not isinstance(v["verdict"], str):
                raise ValueError("confidence verdict")
    return GammaChoice(gamma, c["reason"], _number(c["target_step_ms"], "target_step_ms"), c["candidates"],
                       c["draft"], measured, confidence)


def check_choice(engines, choice: GammaChoice, drafts) -> None:
    """GenerationError where these engines cannot run `choice` as it stands (a proposal kind not asked for or
    not in the engines, a gamma or window out of their range): the request checks every run makes."""
    from .generation import (GenerationConfig, GenerationError, ModelShape, check_draft_supported, check_request,
                             verify_limit)

    if choice.gamma is None:
        return
    manifest = engines.manifest
    if choice.draft not in drafts:
        raise GenerationError(f"a {choice.draft} draft, where the request asks for {' or '.join(drafts)}")
    check_draft_supported(manifest, "speculative", choice.draft)
    check_request(GenerationConfig(gamma=choice.gamma, draft=choice.draft), ModelShape.from_config(manifest.config),
                  verify_limit(engines))
    lengths = set(engines.capabilities.rollout_gammas) or set(range(1, int(getattr(manifest, "gamma", 0)) + 1))
    if choice.draft == "model" and choice.gamma not in lengths:
        raise GenerationError(f"model gamma {choice.gamma}, where these engines draft {sorted(lengths)}")


def _read_record(path: Path) -> dict:
    """The JSON object at `path`: stat first and read only a regular file of plan size, opened without blocking
    (a FIFO or a device where the plan should be must not hang the run). OSError / ValueError otherwise."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    if info.st_size > MAX_PLAN_BYTES:
        raise ValueError(f"{info.st_size} bytes, more than a plan's {MAX_PLAN_BYTES}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):        # replaced between the stat and the open
            raise ValueError("not a regular file")
        record = json.loads(f.read(MAX_PLAN_BYTES + 1).decode())
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not a plan record")
    return record


def _ignore(path: Path, err: Exception) -> None:
    log.warning("ignoring the cached --gamma auto plan %s (%s: %s); timing again", path, type(err).__name__, err)


def load_plan(key: dict | None, now: float | None = None) -> GammaChoice | None:
    """The cached choice for `key`, or None (no key, no file, stale, other key, malformed: one log line)."""
    if key is None:
        return None
    path = plan_path(key)
    try:
        record = _read_record(path)
        if record.get("key") != key:
            return None
        if (now or time.time()) - _number(record["written"], "written") > MAX_AGE_S:
            log.info("the cached --gamma auto plan %s is older than %d days; timing again", path, MAX_AGE_S // 86400)
            return None
        if record.get("stale"):
            log.info("the cached --gamma auto plan %s was contradicted by a later run (%s); timing again", path,
                     record["stale"])
            return None
        return _choice_from(record["choice"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        _ignore(path, err)
        return None


def _write_record(path: Path, record: dict) -> Path | None:
    """Write `record` at `path` atomically (a temporary file renamed into place); None (logged) when not written."""
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


def store_plan(key: dict | None, choice: GammaChoice) -> Path | None:
    """Write the choice for `key`; None when not written (no key, or logged)."""
    if key is None:
        return None
    return _write_record(plan_path(key), {"key": key, "written": time.time(), "choice": choice.to_dict()})


def cached_choice(engines, batch: int, cfg_scale: float, drafts, options: dict | None, choose, replan: bool = False):
    """(choice, where it came from): the cached plan for this request where these engines can run it, else
    choose() and store its result."""
    from .generation import GenerationError

    key = plan_key(engines, batch, cfg_scale, drafts, options)
    choice = None if replan else load_plan(key)
    if choice is not None:
        try:
            check_choice(engines, choice, drafts)
            return choice, f"cached plan {plan_path(key)} (--replan times the engines again)"
        except (GenerationError, ValueError, TypeError, KeyError) as err:
            _ignore(plan_path(key), ValueError(f"a choice these engines cannot run: {err}"))
    choice = choose()
    path = store_plan(key, choice)
    return choice, (f"timed now; cached in {path}" if path else "timed now")


def run_rates(summary) -> dict:
    """{mode label: (tokens, seconds)} from a run's stats summary "mode_rates" {label: {tokens, seconds}} (the
    loop's labels; "rollout:<g>" is the model draft's "model:<g>"), keeping only well-formed positive entries."""
    rates = summary.get("mode_rates") if isinstance(summary, dict) else None
    out = {}
    for label, rate in (rates.items() if isinstance(rates, dict) else ()):
        try:
            tokens, seconds = int(rate["tokens"]), float(rate["seconds"])
        except (KeyError, TypeError, ValueError, OverflowError):
            continue
        name = str(label).replace("rollout:", "model:", 1)
        if re.fullmatch(r"target|(model|jacobi):[1-9][0-9]{0,5}", name) and tokens > 0 and math.isfinite(seconds) \
                and seconds > 0:
            had = out.get(name, (0, 0.0))
            out[name] = (had[0] + tokens, had[1] + seconds)
    return out


def _choice_of_label(label: str, old: GammaChoice, reason: str) -> GammaChoice:
    draft, _, gamma = label.partition(":")
    if label == "target":
        return GammaChoice(None, reason, old.target_step_ms, old.candidates, old.draft, old.measured, old.confidence)
    return GammaChoice(int(gamma), reason, old.target_step_ms, old.candidates, draft, old.measured, old.confidence)


def _switches(summary) -> set:
    """{(from label, to label)} of the loop's mode switches in a run's stats summary ("switches")."""
    moves = summary.get("switches") if isinstance(summary, dict) else None
    return {tuple(str(m[k]).replace("rollout:", "model:", 1) for k in ("from", "to"))
            for m in (moves if isinstance(moves, list) else ()) if isinstance(m, dict) and "from" in m and "to" in m}


def _verdict(choice: GammaChoice, rates: dict, switches: set, margin: float, batch: int = 1):
    """(new choice or None, stale reason or None) from one run's own rates {label: (tokens, seconds)}: rates of
    two modes measured in the same run (the same machine state), each over MIN_EVIDENCE_TOKENS, decide between
    them (target-only -> a speculative mode: at least `margin` faster; speculative -> target-only or another:
    faster at all). The loop's own switch is not evidence enough to rewrite a plan (its probes are short: at 16
    images one judged Jacobi L8 1.43x faster where the whole run measured 1.07x and whole runs 0.92x): a run that
    switched away from the planned mode, without whole-run rates that clear the bar, marks the plan stale (the
    next run times the engines again), as does a run of the planned mode alone that ran more than DRIFT times
    slower or faster than planned (the machine changed since)."""
    ms = {label: 1000 * s / t for label, (t, s) in rates.items() if t >= MIN_EVIDENCE_TOKENS}
    current = choice.label
    switched = [t for f, t in switches if f == current]
    if current in ms and len(ms) >= 2:
        # over several images a mode's rate mid-run does not see the ragged end of a speculative batch
        # (adaptive.probes_pay): there the rates only ever move a plan to target-only
        best = min((label for label in ms if batch == 1 or label == "target" or label == current), key=ms.get)
        needed = margin if current == "target" or best != "target" else 1.0
        if best != current and ms[current] / ms[best] >= needed:
            name = "target-only" if best == "target" else best.replace(":", " gamma ")
            return _choice_of_label(best, choice, f"{name} (updated by a later run: ran "
                                                  f"{ms[current] / ms[best]:.2f}x faster than the planned {current} "
                                                  f"in the same run; planned: {choice.reason})"), None
    if switched and not (current in ms and len(ms) >= 2):
        return None, f"the run switched from the planned {current} to {switched[-1]}"
    planned = (choice.measured.get(current) or {}).get("ms_per_token")
    if current in ms and planned and len(ms) == 1:
        drift = ms[current] / float(planned)
        if drift > DRIFT or drift < 1 / DRIFT:
            return None, f"{current} ran at {ms[current]:.3f} ms/token where the plan measured {planned:.3f}"
    return None, None


def update_from_run(key: dict | None, choice: GammaChoice | None, summary) -> GammaChoice | None:
    """Fold a finished run's measured rates (its stats summary's "mode_rates"; summaries without them change
    nothing) into the cached plan for `key` and correct the plan where they contradict it (_verdict): the stored
    choice changes, or the plan is marked stale and the next run times the engines again. Returns the plan's
    choice as it now stands (None where there is no plan for `key` and `choice` is None). Never raises for a bad
    cache or summary (logged). Call it after every successful run that used a `--gamma auto` plan: the run CLI
    does; a serving replica should after each generation, with its plan's key and choice."""
    drafts = key.get("drafts", ()) if isinstance(key, dict) else ()
    rates = {label: r for label, r in run_rates(summary).items() if label.partition(":")[0] in ("target", *drafts)}
    if key is None or not rates:
        return choice
    path = plan_path(key)
    try:
        record = _read_record(path)
        if record.get("key") != key:
            raise ValueError("another plan's key")
        stored = _choice_from(record["choice"])
    except FileNotFoundError:
        record, stored = None, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        _ignore(path, err)
        record, stored = None, None
    if stored is None:
        if choice is None:
            return None
        record, stored = {"key": key, "written": time.time(), "choice": choice.to_dict()}, choice
    observed = record.get("observed") if isinstance(record.get("observed"), dict) else {}
    for label, (tokens, seconds) in rates.items():
        old = observed.get(label) if isinstance(observed.get(label), dict) else {}
        try:
            weight, old_ms, runs = min(int(old["tokens"]), MEMORY_TOKENS), float(old["ms_per_token"]), int(old["runs"])
        except (KeyError, TypeError, ValueError):
            weight, old_ms, runs = 0, 0.0, 0
        ms = 1000 * seconds / tokens
        observed[label] = {"ms_per_token": round((weight * old_ms + tokens * ms) / (weight + tokens), 6),
                           "tokens": weight + tokens, "runs": runs + 1, "last_ms_per_token": round(ms, 6)}
    record["observed"] = observed
    margin = float(stored.confidence.get("margin", 1.10)) if stored.confidence else 1.10
    try:
        batch = int(key.get("batch", 1))
    except (TypeError, ValueError):
        batch = 1
    new, stale = _verdict(stored, rates, _switches(summary), margin, batch)
    if new is not None:
        log.info("updated the cached --gamma auto plan %s: %s", path, new.reason)
        record.update(choice=new.to_dict(), written=time.time(), stale=None)
        stored = new
    elif stale:
        log.info("the cached --gamma auto plan %s is stale (%s): the next run times the engines again", path, stale)
        record["stale"] = stale
    _write_record(path, record)
    return stored

"""The pipeline benchmark's record: one JSON line per run in one history file, and the plot of the newest run.

`fastardiff bench pipeline --record` appends a run (date, commit, machine, CPU model, library versions, settings,
rows) to the history (default `docs/bench-history.jsonl`) and redraws the current plot beside it
(`bench-pipeline.png`). The file is rewritten whole through a temp file and a rename, so an interrupted run leaves
the history as it was; a history that does not parse is refused, never overwritten.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from fastardiff.errors import FastardiffError

SCHEMA = 1
DEFAULT_HISTORY = Path("docs") / "bench-history.jsonl"
PLOT_NAME = "bench-pipeline.png"
LIBRARIES = ("fastardiff", "numpy", "torch", "onnxruntime", "onnx", "tensorrt", "triton")
RUN_FIELDS = ("schema", "date", "commit", "machine", "versions", "settings", "rows")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what `platform` reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict:
    """Installed versions of the libraries a figure depends on (None where absent); imports none of them."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_commit(tree: Path | None = None) -> dict:
    """The git commit of the fastardiff source tree that ran (`dirty`: tracked files changed), or None outside git."""
    tree = tree or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(device: str, where: str, gpu: str | None = None) -> dict:
    return {"where": where, "cpu_model": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "device": device, "gpu": gpu}


def make_run(rows: list[dict], settings: dict, machine: dict, label: str | None = None,
             gamma_auto=(), skipped=()) -> dict:
    """One history entry for a run measured now by this source tree."""
    code = source_commit()
    return {"schema": SCHEMA, "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "label": label, "commit": code["commit"], "dirty": code["dirty"], "machine": machine,
            "versions": library_versions(), "settings": settings, "rows": rows,
            "gamma_auto": list(gamma_auto), "skipped": list(skipped)}


def record_run(history: Path, rows: list[dict], settings: dict, label: str | None = None, gamma_auto=(),
               skipped=()) -> str:
    """Append a run measured now (`settings` holds the bench's `device` and `where`) to `history`; returns the
    line to print."""
    device, where = settings.get("device", "cpu"), settings.get("where", "")
    machine = machine_info(device, where, gpu=where if device == "cuda" else None)
    count = append_run(history, make_run(rows, settings, machine, label, gamma_auto, skipped))
    return f"recorded run {count} in {history}"


def load_history(path: Path) -> list[dict]:
    """Every run in the history file (oldest first); [] for a missing file; an error naming the bad line."""
    path = Path(path)
    if not path.exists():
        return []
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
        except json.JSONDecodeError as err:
            raise FastardiffError(f"benchmark history '{path}' line {number} is not JSON ({err.msg}); "
                                  "repair or move the file, then record again") from None
        missing = [f for f in RUN_FIELDS if not isinstance(run, dict) or f not in run]
        if missing:
            raise FastardiffError(f"benchmark history '{path}' line {number} lacks {', '.join(missing)}; "
                                  "repair or move the file, then record again")
        if run["schema"] != SCHEMA:
            raise FastardiffError(f"benchmark history '{path}' line {number} has schema {run['schema']}, this "
                                  f"fastardiff writes {SCHEMA}; record into another --history file")
        runs.append(run)
    return runs


def append_run(path: Path, run: dict) -> int:
    """Append `run` to the history (validated first, rewritten atomically); returns the number of runs in it."""
    from fastardiff.runtime.stats import write_text_atomic

    path = Path(path)
    runs = load_history(path)
    missing = [f for f in RUN_FIELDS if f not in run]
    if missing:
        raise FastardiffError(f"a benchmark run lacks {', '.join(missing)}; nothing was recorded")
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text_atomic(path, old + json.dumps(run, default=str, separators=(",", ":")) + "\n")
    return len(runs) + 1


def plot_rows(run: dict) -> list[dict]:
    """The rows of a run that the speedup plot draws (the AR families' rows; head-family rows have no gamma axis)."""
    rows = [r for r in run["rows"] if "head" not in r]
    return rows if any(r.get("mode") != "target" for r in rows) else []


def plot_latest(history: Path, png: Path | None = None) -> Path | None:
    """Redraw the current plot from the newest run of the history that has AR rows; None when none has."""
    history = Path(history)
    png = Path(png) if png else history.with_name(PLOT_NAME)
    for run in reversed(load_history(history)):
        rows = plot_rows(run)
        if rows:
            day = run["date"][:10]
            commit = (run.get("commit") or "?")[:7]
            where = run["machine"].get("cpu_model") or run["machine"].get("where") or "?"
            return write_plot(rows, png, title=f"{day}, commit {commit}, {where}")
    return None


def write_plot(rows: list[dict], path: Path, title: str | None = None) -> Path:
    """Speedup against gamma / Jacobi window, one panel per batch, one line per backend and mode (measured: solid,
    cost model: dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.4), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches):
        series = sorted({(r["backend"], r["mode"]) for r in rows if r["mode"] != "target" and r["batch"] == batch})
        for backend, mode in series:
            pts = sorted((r["gamma"], r["speedup"], r["model speedup"]) for r in rows
                         if r["mode"] == mode and r["backend"] == backend and r["batch"] == batch)
            name = f"{backend}, {'model draft' if mode == 'speculative' else mode}"
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "x:", color=line.get_color(), alpha=0.6)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"batch {batch}  (solid: measured, dotted: cost model)", fontsize=9)
        ax.set_xlabel("gamma (model draft) / window L (Jacobi)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("speedup vs target-only")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path

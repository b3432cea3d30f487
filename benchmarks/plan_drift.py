"""Does a `--gamma auto` plan follow the machine? (issue: plans that follow the machine)

For each case (`fastardiff-run` at 1 and at 16 images, and `bash scripts/demo.sh`'s 40-image run):
  busy -> quiet: plan with both cores busy (LOAD_PROCS processes spinning `while 1: pass`), remove the load, run
                 with that cached plan (the run whose loop/plan update should bring speculation back), then time
                 `pairs` alternating pairs of (stale-cache run, fresh-cache run): median ratio, must be >= 0.90;
  quiet -> busy: plan on the quiet machine, then load it and time alternating pairs of (that cached plan's run,
                 `--mode target`): median ratio, must be >= 0.95.
Each run's statistics JSON says the mode it ran, its switches and its plan's reason; the table prints them.
Run it on a quiet machine (nothing else running), from the repository root:
    python benchmarks/plan_drift.py --engine engines/tiny-mnist-onnx --pairs 5 --json docs/plan-drift.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

LOAD_PROCS = 2
CASES = {"run-1": ["--prompt", "7", "--num-images", "1"],
         "run-16": ["--prompt", "0,1,2,3,4,5,6,7,8,9", "--num-images", "16"],
         "demo-40": ["--prompt", "0 1 2 3 4 5 6 7 8 9", "--num-images", "40", "--early-stop", "static"]}


@contextmanager
def loaded(procs: int):
    """Both cores busy with another process while inside."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(procs)]
    try:
        time.sleep(1.0)
        yield
    finally:
        for p in spinners:
            p.terminate()
        for p in spinners:
            p.wait()
        time.sleep(1.0)


def run(engine: str, args: list, cache: Path, out: Path, extra=()) -> dict:
    """One `fastardiff-run` with its own plan cache; its stats summary plus the wall time of the process."""
    env = {**os.environ, "FASTARDIFF_CACHE_DIR": str(cache)}
    stats = out / "stats.json"
    cmd = [shutil.which("fastardiff-run") or str(Path(sys.executable).parent / "fastardiff-run"), "--engine", engine,
           *args, "--seed", "0", "--out", str(out / "grid.png"), "--stats-json", str(stats), *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    summary = json.loads(stats.read_text())
    summary["wall_seconds"] = wall
    summary["plan_source"] = "cached" if "cached plan" in done.stderr else "timed"
    return summary


def alternating(pairs: int, first, second):
    """`pairs` pairs (first(), second()), run AB BA AB ...: a drift of the machine during them falls on both."""
    for i in range(pairs):
        if i % 2 == 0:
            a = first()
            yield a, second()
        else:
            b = second()
            yield first(), b


def describe(s: dict) -> str:
    switches = s.get("switches") or []
    mode = s["mode"] if s["mode"] == "target" else f"{s['draft']}:{s['gamma']}"
    return f"{mode}, {len(switches)} switch(es), plan {s['plan_source']}"


def case(engine: str, name: str, args: list, pairs: int, work: Path) -> list[dict]:
    rows = []
    stale, fresh = work / f"{name}-stale", work / f"{name}-fresh"
    with loaded(LOAD_PROCS):                         # busy -> quiet
        planned = run(engine, args, stale, work, ["--replan"])
    first = run(engine, args, stale, work)           # quiet, the busy plan: corrected in this run?
    ratios = []
    def fresh_run():
        shutil.rmtree(fresh, ignore_errors=True)      # a fresh cache: plans on the quiet machine
        return run(engine, args, fresh, work)

    for a, b in alternating(pairs, lambda: run(engine, args, stale, work), fresh_run):
        ratios.append(b["total_seconds"] / a["total_seconds"])
    rows.append({"case": name, "direction": "busy plan -> quiet run", "planned": describe(planned),
                 "first run": describe(first), "later runs": describe(a), "median ratio": statistics.median(ratios),
                 "against": "fresh-cache run", "needed": 0.90, "ratios": ratios})
    quiet = work / f"{name}-quiet"
    planned = run(engine, args, quiet, work, ["--replan"])          # quiet -> busy
    ratios = []
    with loaded(LOAD_PROCS):
        for a, b in alternating(pairs, lambda: run(engine, args, quiet, work),
                                lambda: run(engine, args, quiet, work, ["--mode", "target"])):
            ratios.append(b["total_seconds"] / a["total_seconds"])
    rows.append({"case": name, "direction": "quiet plan -> busy run", "planned": describe(planned),
                 "first run": "-", "later runs": describe(a), "median ratio": statistics.median(ratios),
                 "against": "--mode target, loaded", "needed": 0.95, "ratios": ratios})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="engines/tiny-mnist-onnx", help="engine directory (fastardiff-export)")
    parser.add_argument("--pairs", type=int, default=5, help="alternating timed pairs per comparison")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--json", default=None, help="also write the rows here")
    opts = parser.parse_args()
    if not Path(opts.engine, "manifest.json").is_file():
        raise SystemExit(f"error: no engines at {opts.engine}; export them with `fastardiff-export --target onnx "
                         f"--out {opts.engine}`")
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-drift-") as tmp:
        for name in opts.cases.split(","):
            print(f"[plan_drift] {name} ...", file=sys.stderr, flush=True)
            rows += case(opts.engine, name, CASES[name], opts.pairs, Path(tmp))
    head = f"{'case':<8} {'direction':<24} {'planned':<34} {'first run':<34} {'ratio':>6} {'needed':>6}  ok"
    print(head)
    for r in rows:
        ok = "yes" if r["median ratio"] >= r["needed"] else "NO"
        print(f"{r['case']:<8} {r['direction']:<24} {r['planned']:<34} {r['first run']:<34} "
              f"{r['median ratio']:>6.3f} {r['needed']:>6.2f}  {ok}")
    print("ratio: (fresh-cache run or --mode target) time / (cached-plan run) time, median over the pairs; "
          "'first run' shows whether the stale plan's first quiet run ended speculating")
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

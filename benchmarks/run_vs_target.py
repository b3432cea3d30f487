"""Never slower: `fastardiff-run` with default settings against `--mode target`, quiet and loaded.

For `fastardiff-run` at 1 and at 16 images: a plan made under the condition (its own fresh plan cache), then `pairs`
alternating pairs (default run, `--mode target` run) on the same engines and seed; the ratio is target-only seconds
over default seconds per pair (the statistics' `total_seconds`: generation, not process start-up, nor the
warm-up before it), its median quoted; beside it the same with each run's warm-up counted, and the processes'
wall times (start-up, engine loading and plan lookup included). The pairs alternate their order (AB BA AB ...),
so a drift of the machine during a row falls on both sides. Loaded: both cores busy with another process (`while 1: pass` twice) for the planning and the pairs.
Run it on an otherwise quiet machine, from the repository root:
    python benchmarks/run_vs_target.py --engine engines/tiny-mnist-onnx --pairs 5 --json docs/run-vs-target.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from plan_drift import CASES, LOAD_PROCS, alternating, describe, loaded, run  # noqa: E402  (the same runner)

NEEDED = {("run-1", "quiet"): 1.8}      # the bar at batch 1 on a quiet machine; 0.95 everywhere else


def measure(engine: str, name: str, condition: str, pairs: int, work: Path) -> dict:
    args, cache = CASES[name], work / f"{name}-{condition}"
    with loaded(LOAD_PROCS) if condition == "loaded" else nullcontext():
        planned = run(engine, args, cache, work, ["--replan"])
        ratios, warmed, wall, last = [], [], [], None
        for last, target in alternating(pairs, lambda: run(engine, args, cache, work),
                                        lambda: run(engine, args, cache, work, ["--mode", "target"])):
            ratios.append(target["total_seconds"] / last["total_seconds"])
            warmed.append(with_warm_up(target) / with_warm_up(last))
            wall.append(target["wall_seconds"] / last["wall_seconds"])
    return {"case": name, "condition": condition, "planned": describe(planned), "ran": describe(last),
            "median ratio": statistics.median(ratios), "needed": NEEDED.get((name, condition), 0.95),
            "ratios": ratios, "median ratio with warm-up": statistics.median(warmed),
            "median wall ratio": statistics.median(wall)}


def with_warm_up(summary: dict) -> float:
    return summary["total_seconds"] + (summary.get("warm_up") or {}).get("seconds", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="engines/tiny-mnist-onnx", help="engine directory (fastardiff-export)")
    parser.add_argument("--pairs", type=int, default=5, help="alternating timed pairs per row")
    parser.add_argument("--cases", default="run-1,run-16", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--conditions", default="quiet,loaded", help="comma-separated, of quiet, loaded")
    parser.add_argument("--json", default=None, help="also write the rows here")
    a = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastardiff-run-vs-target-") as tmp:
        for name in a.cases.split(","):
            for condition in a.conditions.split(","):
                rows.append(measure(a.engine, name, condition, a.pairs, Path(tmp)))
                r = rows[-1]
                print(f"{r['case']:<8} {r['condition']:<7} planned {r['planned']:<40} ran {r['ran']:<40} "
                      f"median {r['median ratio']:.2f}x (needs >= {r['needed']:.2f}; with warm-up "
                      f"{r['median ratio with warm-up']:.2f}x, wall {r['median wall ratio']:.2f}x) "
                      f"pairs {', '.join(f'{x:.2f}' for x in r['ratios'])}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Where a Jacobi round's time goes (ONNX Runtime, CPU): target_jacobi against target_verify on the same feeds.

Records the feeds of real `--draft jacobi` runs, then times each recorded target_jacobi feed through
target_jacobi and through target_verify (its leading AR inputs, as many as the manifest gives target_verify:
the same network, no in-graph sampling),
interleaved, so the difference is the in-graph sampling's cost at that (rows, K). Also prints the median
per-call time by (engine, K, rows) seen in the runs and the raw ONNX node counts.

    .venv/bin/python benchmarks/jacobi_call_probe.py ENGINE_DIR [--windows 8,16] [--repeats 200]
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np


def main() -> None:
    import onnx

    from fastardiff.exporter.engine_modules import AR_INPUTS
    from fastardiff.runtime.engine import load_engines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--windows", default="8,16")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    engines = load_engines(args.engine_dir)
    run_engine = engines._run
    seen, feeds = collections.defaultdict(list), {}

    def recording_run(name, arrays):
        started = time.perf_counter()
        out = run_engine(name, arrays)
        key = (name, arrays[0].shape[1], arrays[0].shape[0])        # (engine, K fed, cache rows)
        seen[key].append(time.perf_counter() - started)
        feeds.setdefault(key, arrays)
        return out

    engines._run = recording_run
    verify_inputs = len(AR_INPUTS)       # the AR inputs (the contract's) target_jacobi starts with
    for cfg_scale, classes in ((1.0, np.arange(5)), (2.0, np.arange(2))):
        for window in windows:
            generate(engines, classes, GenerationConfig(mode="speculative", draft="jacobi", gamma=window,
                                                        cfg_scale=cfg_scale, seed=2))
        generate(engines, classes, GenerationConfig(mode="target", cfg_scale=cfg_scale, seed=2))
    print("median per call in the runs (engine, K, rows): ms")
    for key, times in sorted(seen.items()):
        if len(times) >= 5:
            print(f"  {key}: {1e3 * np.median(times):.3f} ({len(times)} calls)")
    print("same feed, interleaved: target_jacobi vs target_verify ms (the difference is in-graph sampling)")
    for key in sorted(k for k in feeds if k[0] == "target_jacobi"):
        arrays, times = feeds[key], collections.defaultdict(list)
        for _ in range(args.repeats):
            for name, feed in (("target_jacobi", arrays), ("target_verify", arrays[:verify_inputs])):
                started = time.perf_counter()
                run_engine(name, feed)
                times[name].append(time.perf_counter() - started)
        jac, ver = (1e3 * np.median(times[n]) for n in ("target_jacobi", "target_verify"))
        print(f"  K={key[1]:2d} rows={key[2]}: jacobi {jac:.3f}  verify {ver:.3f}  sampling {jac - ver:.3f}")
    for name in ("target_verify", "target_jacobi", "draft_step", "decoder"):
        if name in engines.manifest.engines:
            model = onnx.load(f"{args.engine_dir}/{engines.manifest.engines[name].file}")
            print(f"{name}: {len(model.graph.node)} ONNX nodes")


if __name__ == "__main__":
    main()

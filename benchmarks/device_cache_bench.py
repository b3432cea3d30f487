"""Whole-image time with the KV caches on the engines' device (`device_cache`, runtime/kv_cache.py) against host
(numpy) caches copied to the device every call, interleaved, same engines and seeds; torch reference backend on
the shipped checkpoint (`--engine DIR`: AOTInductor engines instead); `--cuda-graphs` adds the torch engines
replaying captured CUDA graphs (runtime/cuda_graphs.py; the warm-up round captures, the timed rounds replay);
"device loop" keeps the loop's token buffer, noise and engine outputs on the device as well (runtime/arrays.py).

    .venv/bin/python benchmarks/device_cache_bench.py --device cuda --batch 1,8 --json OUT/device-cache.json

On the CPU both storages are host memory (the comparison then measures the bookkeeping only); on CUDA the host
caches cross the bus twice per call. benchmarks/gpu_check.sh runs it.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
    from fastardiff.runtime.speculative import GenerationConfig, generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", default=None, help="an AOTInductor engine dir (default: torch on --ckpt)")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time the engines replaying CUDA graphs (runtime/cuda_graphs.py; CUDA only)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated subset of the modes (default: all; the CPU test times one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.engine:
        from fastardiff.runtime.engine import load_engines

        load = lambda on, graphs=False, loop=False: load_engines(args.engine, device=args.device,  # noqa: E731
                                                                 device_cache=on, device_loop=loop,
                                                                 cuda_graphs=graphs)
    else:
        from fastardiff.exporter.torch_backend import load_torch_engines
        from fastardiff.recipes.checkpoint import default_checkpoint_path

        ckpt = args.ckpt or str(default_checkpoint_path())
        load = lambda on, graphs=False, loop=False: load_torch_engines(  # noqa: E731
            ckpt, device=args.device, device_cache=on, cuda_graphs=graphs, device_loop=loop)
    # "device cache": the KV caches on the device, the loop's buffers on the host; "device loop": those too
    # (runtime/arrays.py, one readback per round)
    engines = {"device cache": load(True, loop=False), "host cache": load(False), "device loop": load(True, loop=True)}
    if args.cuda_graphs:
        engines["CUDA graphs"] = load(True, True)
    # "model gamma 4": with device caches each round is accepted in the target_jacobi engine (the default there);
    # "... host acceptance": target_verify + the host's numpy acceptance, as on host caches
    modes = {"target": GenerationConfig(mode="target"), "model gamma 4": GenerationConfig(gamma=4),
             "model gamma 4 host acceptance": GenerationConfig(gamma=4, engine_acceptance=False),
             "jacobi 8": GenerationConfig(draft="jacobi", gamma=8)}
    if args.modes:
        unknown = sorted(set(args.modes.split(",")) - set(modes))
        if unknown:
            parser.error(f"unknown --modes {unknown}; choose from {sorted(modes)}")
        modes = {name: gen for name, gen in modes.items() if name in args.modes.split(",")}
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        classes = np.arange(batch) % 10
        times = {}
        for repeat in range(args.repeats + 1):          # the first round warms up, untimed
            for mode, gen in modes.items():
                for where, eng in engines.items():
                    began = time.perf_counter()
                    generate(eng, classes, gen)
                    if repeat:
                        times.setdefault((mode, where), []).append(time.perf_counter() - began)
        for mode in modes:
            host, device = (float(np.median(times[(mode, w)])) for w in ("host cache", "device cache"))
            loop = float(np.median(times[(mode, "device loop")]))
            rows.append({"batch": batch, "mode": mode, "host cache ms/image": 1000 * host / batch,
                         "device cache ms/image": 1000 * device / batch, "speedup": host / device,
                         "device loop ms/image": 1000 * loop / batch, "loop speedup": host / loop})
            if "CUDA graphs" in engines:     # after the warm-up round: captures done, replays timed
                graphs = float(np.median(times[(mode, "CUDA graphs")]))
                rows[-1].update({"CUDA graphs ms/image": 1000 * graphs / batch, "graphs speedup": host / graphs})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "backend": "aoti" if args.engine else "torch", "rows": rows}, f,
                      indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

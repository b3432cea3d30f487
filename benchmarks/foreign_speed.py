"""Speed of a model trained elsewhere, side by side in one run: the library's own sampler, fastardiff's exported
target-only engines, and speculative decoding as `--gamma auto` picks it (target-only where nothing pays).
Repeats are interleaved (library, engines A target, engines A auto, engines B target, ...), so a machine that
slows down slows every contender alike; the table gives the median images/s and the ratio to the library.

    python benchmarks/foreign_speed.py --model fastardiff.recipes.xtransformers_mnist:digits --ckpt xt.pt \
        --engines xt-onnx xt-aoti --batch 8 --repeats 5 --threads 1 --json foreign-speed.json

Every contender gets the same CPU threads (--threads: torch's for the library's sampler, OpenMP's for AOTInductor,
ONNX Runtime's intra-op threads). Measure on a quiet machine only (no other heavy process): OpenMP threads that
spin-wait on a loaded machine slow a call 50x, and the numbers are ratios of wall-clock times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":   # OpenMP reads its thread count once, at the first import of torch
    _threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "1"
    os.environ["OMP_NUM_THREADS"] = _threads

import numpy as np  # noqa: E402
import torch  # noqa: E402


def library_sampler(ref: str, weights: str):
    """(name, fn(classes) -> tokens [B, N, D]): the library's own sampling loop over the user's model."""
    from fastardiff.exporter.foreign.engines import load_foreign

    ckpt = load_foreign(ref, weights)          # the factory's modules, weights loaded, adapter parity checked
    adapter, cfg = ckpt.target, ckpt.config
    start = adapter.start_tokens
    n = cfg.num_tokens
    if cfg.library == "x-transformers":
        from x_transformers import ContinuousAutoregressiveWrapper

        wrapper = ContinuousAutoregressiveWrapper(adapter.net).eval()
        return "x-transformers generate()", lambda classes: wrapper.generate(start[classes].unsqueeze(1), n)

    from transformers import DynamicCache

    from fastardiff.recipes.hf_llama_mnist import cache_argument as kwargs

    backbone, embed, head = adapter.backbone, adapter.embed, adapter.head

    @torch.no_grad()
    def sample(classes):
        cache, x, out = DynamicCache(), start[classes].unsqueeze(1), []
        for _ in range(n):
            hidden = backbone(inputs_embeds=embed(x), use_cache=True, **kwargs(backbone, cache)).last_hidden_state
            mean, log_var = head(hidden[:, -1:]).chunk(2, dim=-1)
            x = mean + log_var.exp().clamp(min=cfg.variance_floor).sqrt() * torch.randn_like(mean)
            out.append(x)
        return torch.cat(out, 1)

    return "transformers forward + DynamicCache", sample


def engine_runs(engine_dir: str, batch: int, seed: int, threads: int):
    """[(name, fn(classes) -> images)]: target-only, and what --gamma auto picks on these engines."""
    from fastardiff.runtime.engine import load_engines
    from fastardiff.runtime.gamma_auto import choose_gamma
    from fastardiff.runtime.speculative import GenerationConfig, generate

    from fastardiff.runtime.manifest import load_manifest

    backend = load_manifest(engine_dir).backend
    engines = load_engines(engine_dir, **({"threads": threads} if backend == "onnxruntime" else {}))
    label = f"{Path(engine_dir).name} ({engines.manifest.backend})"
    choice = choose_gamma(engines, batch, 1.0)
    runs = [(f"{label} target-only", GenerationConfig(mode="target", seed=seed))]
    if choice.gamma is not None:
        runs.append((f"{label} auto: {choice.draft} gamma {choice.gamma}",
                     GenerationConfig(mode="speculative", draft=choice.draft, gamma=choice.gamma, seed=seed)))
    else:
        runs.append((f"{label} auto: target-only", GenerationConfig(mode="target", seed=seed)))
    return [(name, lambda classes, gen=gen: generate(engines, classes, gen)[0]) for name, gen in runs], choice


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="factory package.module:function")
    parser.add_argument("--ckpt", required=True, help="the model's state dict")
    parser.add_argument("--engines", nargs="+", required=True, help="engine dirs exported from it (onnx, aoti, ...)")
    parser.add_argument("--batch", type=int, default=8, help="images per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--note", default="", help="written into the JSON (e.g. how loaded the machine was)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    classes = np.arange(args.batch) % 10
    lib_name, lib = library_sampler(args.model, args.ckpt)
    contenders = [(lib_name, lambda c: lib(torch.from_numpy(c)))]
    choices = {}
    for d in args.engines:
        runs, choice = engine_runs(d, args.batch, args.seed, args.threads)
        contenders += runs
        choices[d] = choice.to_dict()
    for _, fn in contenders:                # warm-up: first calls load kernels, allocate, compile
        fn(classes)
    seconds = {name: [] for name, _ in contenders}
    for r in range(args.repeats):           # interleaved repeats
        for name, fn in contenders:
            began = time.perf_counter()
            fn(classes)
            seconds[name].append(time.perf_counter() - began)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    base = statistics.median(seconds[lib_name])
    rows = []
    print(f"\n{'contender':<70} {'images/s':>9} {'vs library':>10}")
    for name, _ in contenders:
        med = statistics.median(seconds[name])
        rows.append({"contender": name, "median_s": med, "images_per_s": args.batch / med, "ratio": base / med,
                     "seconds": seconds[name]})
        print(f"{name:<70} {args.batch / med:>9.2f} {base / med:>9.2f}x")
    for d, choice in choices.items():
        print(f"gamma auto on {d}: {choice['reason']}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "batch": args.batch, "repeats": args.repeats,
                                         "threads": args.threads, "rows": rows, "gamma_auto": choices,
                                         **({"note": args.note} if args.note else {})}, indent=2))


if __name__ == "__main__":
    main()

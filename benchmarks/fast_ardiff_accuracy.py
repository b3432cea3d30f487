"""Full-image quality of the fast-ardiff family's speculative runs against target-only with the same head: class
accuracy and Fréchet distance (the shipped classifier) of `--n` images per seed, for the CSpD rule and the exact
conditional rule (runtime/token_rules.py). Torch reference backend, seeded.

    .venv/bin/python benchmarks/fast_ardiff_accuracy.py --json docs/fast-ardiff-accuracy.json [--n 1000]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
    from fastardiff.exporter.bench_heads import QualityScorer
    from fastardiff.exporter.torch_backend import load_torch_engines
    from fastardiff.recipes.checkpoint import default_checkpoint_path
    from fastardiff.runtime.speculative import GenerationConfig, generate

    shipped = default_checkpoint_path()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images per seed and row")
    parser.add_argument("--seeds", default="11,12")
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--head", default="student", choices=["student", "teacher"])
    parser.add_argument("--ckpt", default=str(shipped.with_name("tiny-mnist-fast-ardiff.pt")))
    parser.add_argument("--rows", default="target,speculative-cspd,speculative-conditional",
                        help="which rows (baseline = target-only with the teacher head)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    engines = load_torch_engines(args.ckpt, max_batch=500)
    scorer = QualityScorer(shipped.with_name("digit-classifier.pt"))
    classes = np.arange(args.n) % engines.manifest.config["num_classes"]
    every = {"baseline": {"mode": "target", "head": "teacher"}, "target": {"mode": "target"},
             "speculative-cspd": {"mode": "speculative", "gamma": args.gamma},
             "speculative-conditional": {"mode": "speculative", "gamma": args.gamma, "acceptance": "conditional"}}
    rows_def = {name: every[name] for name in args.rows.split(",")}
    rows = []
    for name, options in rows_def.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            began = time.perf_counter()
            images, stats = generate(engines, classes, GenerationConfig(seed=seed, **{"head": args.head, **options}))
            rows.append({"row": name, "seed": seed, **scorer.score(images, classes),
                         "acceptance_rate": stats.summary()["acceptance_rate"],
                         "seconds": round(time.perf_counter() - began, 1)})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for name in rows_def:
        mine = [r for r in rows if r["row"] == name]
        acc = float(np.mean([r["class accuracy"] for r in mine]))
        summary[name] = {"class accuracy": acc, "standard error": float(np.sqrt(acc * (1 - acc) / (len(mine) * args.n))),
                         "frechet distance (mean over seeds)": float(np.mean([r["frechet distance"] for r in mine]))}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary, "n": args.n, "gamma": args.gamma, "head": args.head,
                       "backend": "torch"}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

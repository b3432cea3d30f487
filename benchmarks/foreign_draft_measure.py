"""The draft made for a foreign model (recipes/foreign_draft.py) on its exported engines: acceptance rate and tokens
per target call of `--draft model` per gamma (early stopping off and static), Jacobi beside it, and the two-sample
p-values of target-only against model-draft sampling (whole images, the same engines, independent seeds).

    python benchmarks/foreign_draft_measure.py --engines xt --images 2000 --json docs/foreign-draft.json

Counts, not speed: the figures do not depend on the machine's load (timings are left to the lead's quiet runs).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run(engines, classes, **gen):
    from fastardiff.runtime.speculative import GenerationConfig, generate

    n = engines.manifest.config["image_size"] // engines.manifest.config["patch"]
    tokens, stats = generate(engines, classes, GenerationConfig(num_tokens=n * n, **gen))
    s = stats.summary()
    return tokens, {k: s[k] for k in ("acceptance_rate", "tokens_per_target_call", "mean_accepted_per_verify",
                                     "early_stops") if k in s}


def main(argv=None) -> None:
    from fastardiff.recipes.two_sample import two_sample_pvalue
    from fastardiff.runtime.engine import load_engines

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True, type=Path)
    parser.add_argument("--images", type=int, default=2000, help="images per two-sample set")
    parser.add_argument("--rate-images", type=int, default=200, help="images per acceptance figure")
    parser.add_argument("--gammas", default="1,2,3,4")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    engines = load_engines(args.engines)
    started = time.perf_counter()
    classes = np.arange(args.rate_images) % engines.manifest.config["num_classes"]
    rates = {}
    for g in map(int, args.gammas.split(",")):
        for stop in ("off", "static"):
            _, rates[f"model:{g} early_stop {stop}"] = run(engines, classes, mode="speculative", draft="model",
                                                           gamma=g, early_stop=stop, seed=100 + g)
            print(f"model:{g} early_stop {stop}: {rates[f'model:{g} early_stop {stop}']}", flush=True)
    for w in (4, 8):
        _, rates[f"jacobi:{w}"] = run(engines, classes, mode="speculative", draft="jacobi", gamma=w, seed=200 + w)
        print(f"jacobi:{w}: {rates[f'jacobi:{w}']}", flush=True)
    classes = np.arange(args.images) % engines.manifest.config["num_classes"]
    target, _ = run(engines, classes, mode="target", seed=1)
    target_again, _ = run(engines, classes, mode="target", seed=2)
    best = max((k for k in rates if k.startswith("model:") and k.endswith("off")),
               key=lambda k: rates[k]["tokens_per_target_call"])
    g = int(best.split(":")[1].split()[0])
    drafted, _ = run(engines, classes, mode="speculative", draft="model", gamma=g, early_stop="off", seed=3)
    drafted_static, _ = run(engines, classes, mode="speculative", draft="model", gamma=g, early_stop="static", seed=4)
    from fastardiff.runtime import proposals       # the negative control: q's variance read as its std in the
    exact = proposals.accept_drafts                 # acceptance (drafts still drawn from q): the test must see it

    def variance_as_std(rng, drafts, num_drafts, p, q, *rest):
        return exact(rng, drafts, num_drafts, p, q._replace(sigma=q.sigma ** 2), *rest)

    proposals.accept_drafts = variance_as_std
    try:
        wrong, _ = run(engines, classes, mode="speculative", draft="model", gamma=g, early_stop="off", seed=5)
    finally:
        proposals.accept_drafts = exact
    # the draft alone: how far q is from p at all (an acceptance bug can only show where q differs from p)
    draft_only, _ = run(engines, classes, mode="draft", seed=6)
    pvalues = {"target vs target (other seed)": two_sample_pvalue(target, target_again),
               "target vs draft alone (no acceptance at all)": two_sample_pvalue(target, draft_only),
               f"target vs model:{g} with the variance-as-std acceptance (mutant)": two_sample_pvalue(target, wrong),
               f"target vs model:{g} (early stop off)": two_sample_pvalue(target, drafted),
               f"target vs model:{g} (early stop static)": two_sample_pvalue(target, drafted_static)}
    print(json.dumps(pvalues, indent=2), flush=True)
    record = {"engines": str(args.engines), "manifest_export": {k: engines.manifest.export.get(k) for k in (
              "model", "draft_checkpoint_sha256", "draft")}, "rate_images": args.rate_images, "rates": rates,
              "two_sample": {"images": args.images, "tokens_per_image": int(target.shape[1]), "pvalues": pvalues,
                             "test": "recipes/two_sample.py (KS on 3 statistics per token, Bonferroni)"},
              "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

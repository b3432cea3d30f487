"""Is Jacobi decoding on a model trained elsewhere lossless? Many images, every token: target-only samples against
Jacobi samples (coupled and not) by the losslessness tests' two-sample test (recipes/two_sample.py: KS on per-token
statistics, Bonferroni over 3 x tokens tests), with a null row (target-only against target-only, another seed)
that shows what the test gives when nothing differs.

    python benchmarks/foreign_two_sample.py --engines xt-onnx --n 4000 --gamma 8 --json docs/foreign-two-sample.json

`--tokens` compares the first T tokens of each image as well as all of them (the first tokens are where the
tests look; the whole image has 3 x 64 statistics, so its correction is stronger but every position counts).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np


def per_token_pvalues(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[T, 3] uncorrected KS p-values (mean over D, coordinate 0, coordinate 1) per token."""
    from scipy import stats as sps

    out = np.empty((a.shape[1], 3))
    for t in range(a.shape[1]):
        for s, stat in enumerate((lambda x: x.mean(-1), lambda x: x[..., 0], lambda x: x[..., 1])):
            out[t, s] = sps.ks_2samp(stat(a[:, t]), stat(b[:, t])).pvalue
    return out


def main(argv=None) -> int:
    from scipy import stats as sps

    from fastardiff.recipes.two_sample import two_sample_pvalue
    from fastardiff.runtime.engine import load_engines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True)
    parser.add_argument("--n", type=int, default=4000, help="images per contender")
    parser.add_argument("--gamma", type=int, default=8, help="Jacobi window L")
    parser.add_argument("--tokens", type=int, default=8, help="also compare the first T tokens alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--save", default=None, help="also keep the samples (.npz)")
    args = parser.parse_args(argv)
    engines = load_engines(args.engines, threads=args.threads)
    config = engines.manifest.config
    classes = np.arange(args.n) % int(config["num_classes"])
    tokens_per_image = (config["image_size"] // config["patch"]) ** 2
    runs = {"target-only (seed 1)": dict(mode="target", seed=1),
            "target-only (seed 2)": dict(mode="target", seed=2),
            f"jacobi L{args.gamma} coupled": dict(mode="speculative", draft="jacobi", gamma=args.gamma,
                                                  coupling=True, seed=3),
            f"jacobi L{args.gamma} independent": dict(mode="speculative", draft="jacobi", gamma=args.gamma,
                                                      coupling=False, seed=4)}
    samples, info = {}, {}
    for name, gen in runs.items():
        began = time.perf_counter()
        tokens, stats = generate(engines, classes, GenerationConfig(num_tokens=tokens_per_image, **gen))
        samples[name] = np.asarray(tokens, np.float64)
        info[name] = {"seconds": round(time.perf_counter() - began, 1),
                      "tokens_per_target_call": stats.summary().get("tokens_per_target_call")}
        print(f"{name}: {info[name]}", flush=True)
    if args.save:
        np.savez_compressed(args.save, **{k.replace(" ", "_"): v for k, v in samples.items()})
    reference = samples["target-only (seed 1)"]
    rows = []
    for name in list(runs)[1:]:
        ours = samples[name]
        per_token = per_token_pvalues(ours, reference)
        worst = np.unravel_index(per_token.argmin(), per_token.shape)
        rows.append({"contender": name, "against": "target-only (seed 1)", "n": args.n, **info[name],
                     "p_all_tokens": two_sample_pvalue(ours, reference),
                     f"p_first_{args.tokens}_tokens": two_sample_pvalue(ours[:, :args.tokens],
                                                                        reference[:, :args.tokens]),
                     "smallest_uncorrected_p": float(per_token.min()),
                     "at": {"token": int(worst[0]), "statistic": ["mean over D", "x[0]", "x[1]"][worst[1]]},
                     "uncorrected_p_below_0.01": int((per_token < 0.01).sum()), "tests": int(per_token.size)})
        print(json.dumps(rows[-1]), flush=True)
    pairs = {}
    for a, b in itertools.combinations(samples, 2):      # every pair: is the seed-1 reference itself typical?
        x, y = samples[a], samples[b]
        coords = np.array([[sps.ks_2samp(x[:, t, c], y[:, t, c]).pvalue for c in range(x.shape[2])]
                           for t in range(x.shape[1])])                    # per token and coordinate, uncorrected
        pairs[f"{a} vs {b}"] = {"p_all_tokens": two_sample_pvalue(x, y),
                                f"p_first_{args.tokens}_tokens": two_sample_pvalue(x[:, :args.tokens],
                                                                                   y[:, :args.tokens]),
                                "coordinate_tests": int(coords.size),
                                "coordinate_min_p_bonferroni": float(min(1.0, coords.min() * coords.size)),
                                "coordinate_p_below_0.01": int((coords < 0.01).sum()),
                                "coordinate_p_below_0.05": int((coords < 0.05).sum())}
        print(f"{a} vs {b}: {pairs[f'{a} vs {b}']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engines": args.engines, "manifest_model": engines.manifest.export.get("model"),
                       "rows": rows, "pairs": pairs, "note": "p > 1e-3: the test cannot tell the contender from "
                       "target-only; the null row is target-only against itself with another seed; pairs: every "
                       "pair of runs, with KS per token and coordinate (uncorrected counts, corrected minimum)"},
                      f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

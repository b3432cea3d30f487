"""Mutation testing of the runtime and the export parity gate: insert one plausible bug at a time, run a fast test
selection, and report which bugs the tests catch (killed) and which survive.

    .venv/bin/python scripts/mutation.py                 # every mutant, JSON report in runs/mutation.json
    .venv/bin/python scripts/mutation.py --only jacobi   # mutants whose id contains 'jacobi'
    .venv/bin/python scripts/mutation.py --list

Each mutant is an exact source edit (the snippet must occur exactly once: a stale mutant fails loudly instead of
silently testing nothing). The file is restored after every run, also on Ctrl-C. Not part of CI (minutes per
mutant); bash scripts/mutation.sh wraps it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the fast selection: unit tests of sampling / loop / coupling / cache / manifest / parity / hashes (no export, no
# two-sample tests on the shipped model: those take minutes; run them with --slow)
FAST_TESTS = ["tests/test_sampling.py", "tests/test_jacobi.py", "tests/test_runtime_fast_paths.py",
              "tests/test_speculative.py", "tests/test_reliability.py", "tests/test_gamma_auto.py",
              "tests/test_rollout.py", "tests/test_export_onnx.py::test_parity_comparator_semantics"]
FAST_DESELECT = ["indistinguishable", "distinguishable", "no_draft"]


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    why: str


MUTANTS = [
    # sampling
    Mutant("sampling-accept-ge", "runtime/sampling.py", "(np.log(rng.random((rows, gamma))) >= log_ratio)",
           "(np.log(rng.random((rows, gamma))) > log_ratio + 0.05)", "acceptance test slightly too lenient"),
    Mutant("sampling-ratio-swapped", "runtime/sampling.py",
           "log_ratio = log_density_ratio(drafts, p.mean[:, :gamma], p.sigma[:, :gamma], q.mean, q.sigma,",
           "log_ratio = log_density_ratio(drafts, q.mean, q.sigma, p.mean[:, :gamma], p.sigma[:, :gamma],",
           "acceptance ratio q/p instead of p/q"),
    Mutant("sampling-bonus-slot", "runtime/sampling.py",
           "next_token = sample_gaussian(rng, p.mean[r, accepted], p.sigma[r, accepted])",
           "next_token = sample_gaussian(rng, p.mean[r, np.maximum(accepted - 1, 0)], "
           "p.sigma[r, np.maximum(accepted - 1, 0)])", "bonus token from the previous slot"),
    Mutant("sampling-residual-is-p", "runtime/sampling.py", "    if hit.all():\n        return out\n",
           "    return sample_gaussian(rng, p_mean, p_sigma)\n", "residual replaced by a plain sample of p"),
    Mutant("sampling-residual-q-for-p", "runtime/sampling.py",
           "y = p_mean[:, None] + p_sigma[:, None, None] * z\n    log_ratio = (0.5",
           "y = q_mean[:, None] + q_sigma[:, None, None] * z\n    log_ratio = (0.5", "residual proposals from q"),
    Mutant("sampling-log-ratio-dim", "runtime/sampling.py", "+ d * np.log(b_sigma / a_sigma)",
           "+ np.log(b_sigma / a_sigma)", "normaliser of a D-dimensional Gaussian ratio missing D"),
    Mutant("sampling-temperature-dropped", "runtime/sampling.py", "        sigma = sigma * temperature",
           "        sigma = sigma * 1.0", "temperature never reaches sigma"),
    Mutant("sampling-temperature-squared", "runtime/sampling.py", "        sigma = sigma * temperature",
           "        sigma = sigma * temperature**2", "temperature enters sigma squared"),
    Mutant("sampling-guidance-sign", "runtime/sampling.py", "return uncond + cfg_scale * (cond - uncond), entropy[:half]",
           "return cond + cfg_scale * (cond - uncond), entropy[:half]", "guidance mixes from the wrong base"),
    Mutant("sampling-guidance-entropy-half", "runtime/sampling.py",
           "return uncond + cfg_scale * (cond - uncond), entropy[:half]",
           "return uncond + cfg_scale * (cond - uncond), entropy[half:]", "sigma from the unconditional rows"),
    # sigma(E)
    Mutant("sigma-args-swapped", "runtime/distribution.py",
           "return cls(float(config[\"sigma_max\"]), float(config[\"tau_sigma\"]), float(calibration[\"e_max\"]),",
           "return cls(float(config[\"tau_sigma\"]), float(config[\"sigma_max\"]), float(calibration[\"e_max\"]),",
           "sigma_max and tau_sigma swapped"),
    Mutant("sigma-no-floor", "runtime/distribution.py",
           "return np.maximum(p.sigma_max * np.expm1(np.asarray(entropy) / p.tau_sigma) / denom, p.sigma_min)",
           "return np.maximum(p.sigma_max * np.expm1(np.asarray(entropy) / p.tau_sigma) / denom, 0.0)",
           "sigma floor dropped"),
    Mutant("sigma-emax-tau", "runtime/distribution.py", "denom = math.expm1(p.e_max / p.tau_sigma)",
           "denom = math.expm1(p.e_max)", "E_max not divided by tau"),
    # loop
    Mutant("loop-rollback-off-by-one", "runtime/speculative.py",
           "        target.rollback(act, base + accepted)          # = nc + n - 1",
           "        target.rollback(act, base + accepted + 1)          # = nc + n - 1", "target keeps a rejected key"),
    Mutant("loop-draft-rollback-missing", "runtime/speculative.py", "        draft.rollback(act, base + accepted)\n",
           "", "draft cache keeps rejected drafts"),
    Mutant("loop-next-token-slot", "runtime/speculative.py", "        seq[act, base + accepted] = next_token",
           "        seq[act, base + accepted + 1] = next_token", "residual/bonus written one slot late"),
    Mutant("loop-entropy-not-recorded", "runtime/speculative.py",
           "        entropy_windows[act, na, :kmax + 1] = p.entropy", "        pass",
           "decoder gets no target entropies"),
    Mutant("loop-uncond-class", "runtime/speculative.py",
           "np.full_like(classes, shape.num_classes)", "np.full_like(classes, 0)",
           "unconditional rows fed class 0 instead of the null class"),
    Mutant("loop-verify-too-narrow", "runtime/speculative.py",
           "        p, _ = target.predict(seq, act, base - 1, base + k, kmax + 1)",
           "        p, _ = target.predict(seq, act, base - 1, base + k, kmax + 1) if kmax == 0 else "
           "target.predict(seq, act, base - 1, base + k - 1, kmax + 1)", "verify misses the last draft"),
    Mutant("loop-eta-ignored", "runtime/speculative.py",
           "min(total, int(round(gen.eta / 100 * shape.num_tokens)))", "0", "eta prefill ignored"),
    Mutant("loop-rollout-fed", "runtime/speculative.py", "fed = starts + (width + gamma - 1)",
           "fed = starts + (width + gamma)", "draft cache claims one position it was not fed"),
    Mutant("loop-check-finite-off", "runtime/speculative.py", "    if not math.isfinite(",
           "    if False and not math.isfinite(", "NaN from an engine passes silently"),
    Mutant("loop-rollback-max", "runtime/speculative.py", "np.minimum(lengths, length, out=lengths)",
           "np.maximum(lengths, length, out=lengths)", "rollback never shortens the cache"),
    # early stop
    Mutant("early-stop-flipped", "runtime/early_stop.py",
           "            return shallow_entropy < np.float64(self.tau_static)",
           "            return shallow_entropy > np.float64(self.tau_static)", "stops on high entropy"),
    Mutant("early-stop-ema-rate", "runtime/early_stop.py",
           "ema = np.where(live, self.ema * ema + (1 - self.ema) * entropy[:, j], ema)",
           "ema = np.where(live, (1 - self.ema) * ema + self.ema * entropy[:, j], ema)", "EMA weights swapped"),
    Mutant("early-stop-ema-all-tokens", "runtime/early_stop.py", "            live = j < counts",
           "            live = j <= counts", "EMA fed a token the target did not emit"),
    # KV cache
    Mutant("kv-write-offset", "runtime/kv_cache.py", "            span = slice(lo, lo + num_new)",
           "            span = slice(lo + 1, lo + 1 + num_new)", "cache written one position late"),
    Mutant("kv-overflow-unchecked", "runtime/kv_cache.py", "if lo < 0 or hi + num_new > self.capacity:",
           "if lo < 0:", "overflow not refused"),
    # jacobi
    Mutant("jacobi-keep-always", "runtime/jacobi.py", "        keep = held & ~rejected[rows, at]",
           "        keep = held.copy()\n        keep[:, 0] &= ~rejected[rows, at][:, 0]", "coupling keeps every old guess"),
    Mutant("jacobi-q-stale", "runtime/jacobi.py",
           "        mean_windows[act, first], sigma_windows[act, first] = next_mean, next_sigma",
           "        pass", "recorded q never updated (tests against p_old)"),
    Mutant("jacobi-proposal-shift", "runtime/jacobi.py", "    source = np.minimum(slots, k[:, None])",
           "    source = np.minimum(slots + 1, k[:, None])", "guesses drawn from the next slot's p"),
    Mutant("jacobi-rollback-off-by-one", "runtime/jacobi.py",
           "        target.rollback(act, base + accepted)  ", "        target.rollback(act, base + accepted + 1)  ",
           "target keeps a rejected guess's key"),
    Mutant("jacobi-residual-from-p", "runtime/jacobi.py",
           "            out[r, c] = sample_residual(rng, p.mean[r, j], p.sigma[r, j], q.mean[r, j], q.sigma[r, j])",
           "            out[r, c] = sample_gaussian(rng, p.mean[r, j], p.sigma[r, j])",
           "residual replaced by a plain sample of p"),
    Mutant("jacobi-window-unset", "runtime/jacobi.py", "        have[act] = L\n", "",
           "no guesses kept: every round a plain step (a speed bug)"),
    # the in-graph round (target_jacobi engine module)
    Mutant("jacobi-graph-keep-always", "exporter/engine_modules.py",
           "        keep = has_guess & (failed < 0.5) & coupled ", "        keep = has_guess & (slot > accepted.unsqueeze(1)) & coupled ",
           "in-graph coupling keeps every later guess"),
    Mutant("jacobi-graph-ratio-swapped", "exporter/engine_modules.py",
           "        fails = held & (torch.log(coins) >= log_ratio)", "        fails = held & (torch.log(coins) >= -log_ratio)",
           "in-graph acceptance with q/p"),
    Mutant("jacobi-graph-residual-from-p", "exporter/engine_modules.py",
           "torch.where(residual.unsqueeze(-1), from_residual,", "torch.where(residual.unsqueeze(-1) & False, from_residual,",
           "in-graph residual replaced by a fresh sample of p"),
    Mutant("jacobi-graph-q-slot", "exporter/engine_modules.py",
           "        pick_p = (torch.minimum(slot, k).unsqueeze(-1)", "        pick_p = (torch.minimum(slot + 1, k).unsqueeze(-1)",
           "in-graph guesses drawn from the next slot's p"),
    Mutant("jacobi-graph-miss-dropped", "runtime/jacobi.py", "            if res.residual_miss.any():",
           "            if False:", "residual slots the graph could not serve are never finished"),
    # manifest / hashes / parity gate / backends' verification
    Mutant("backend-onnx-no-verify", "runtime/backend_onnxruntime.py",
           "            verify_engine_files(self.engine_dir, manifest)", "            pass",
           "onnxruntime backend loads unverified files"),
    Mutant("backend-trt-no-verify", "runtime/backend_tensorrt.py",
           "            verify_engine_files(self.engine_dir, manifest)", "            pass",
           "tensorrt backend loads unverified files"),
    Mutant("backend-aoti-no-verify", "runtime/backend_aoti.py",
           "            verify_engine_files(self.engine_dir, manifest)", "            pass",
           "aoti backend loads unverified files"),
    Mutant("hash-check-skipped", "runtime/manifest.py", "        if sha256_file(path) != entry.sha256:",
           "        if False:", "tampered engine files accepted"),
    Mutant("manifest-version-unchecked", "runtime/manifest.py",
           "    if type(version) is not int or version != FORMAT_VERSION:", "    if False:",
           "other manifest versions accepted"),
    Mutant("parity-both-tolerances", "exporter/parity.py", "    got = np.asarray(got)\n    if got.shape != ref.shape:",
           "    got = np.asarray(got)\n    atol, rtol = max(atol, 1e-2), max(rtol, 1e-2)\n    if got.shape != ref.shape:",
           "parity gate blind below 1e-2"),
    Mutant("parity-or", "exporter/parity.py", "    got = np.asarray(got)\n    if got.shape != ref.shape:",
           "    got = np.asarray(got)\n    atol, rtol = 0.0, 0.0\n    if got.shape != ref.shape:",
           "parity gate ignores the tolerances (too strict)"),
]


def apply(m: Mutant) -> str:
    path = ROOT / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutant {m.id}: snippet found {count} times in {m.file} (expected once); update it")
    path.write_text(text.replace(m.old, m.new, 1))
    return text


def run_tests(tests, deselect, timeout: int) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests,
           "-k", " and ".join(f"not {d}" for d in deselect) if deselect else ""]
    start = time.perf_counter()
    try:
        res = subprocess.run([c for c in cmd if c], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        status = "survived" if res.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        status = "killed (timeout)"
    return status, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run mutants whose id contains this (comma-separated: any of them)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--slow", action="store_true", help="also the two-sample tests on the shipped model")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json", default=str(ROOT / "runs" / "mutation.json"))
    args = ap.parse_args(argv)
    wanted = [w for w in args.only.split(",")] or [""]
    chosen = [m for m in MUTANTS if any(w in m.id for w in wanted)]
    if args.list:             # also checks that every snippet still occurs exactly once
        for m in chosen:
            count = (ROOT / m.file).read_text().count(m.old)
            print(f"{m.id:<32} {m.file:<26} {'ok' if count == 1 else f'SNIPPET x{count}'}  {m.why}")
        return 0
    status, _ = run_tests(FAST_TESTS, FAST_DESELECT, args.timeout)
    if status != "survived":
        raise SystemExit("the unmutated tree fails the selection; fix that first")
    results = []
    for i, m in enumerate(chosen, 1):
        original = apply(m)
        try:
            status, seconds = run_tests(FAST_TESTS, [] if args.slow else FAST_DESELECT, args.timeout)
        finally:
            (ROOT / m.file).write_text(original)
        results.append({"id": m.id, "file": m.file, "why": m.why, "status": status, "seconds": round(seconds, 1)})
        print(f"[{i}/{len(chosen)}] {m.id:<32} {status:<17} {seconds:6.1f} s  ({m.why})", flush=True)
    killed = sum(r["status"].startswith("killed") for r in results)
    print(f"mutation score: {killed}/{len(results)} killed")
    for r in results:
        if r["status"] == "survived":
            print(f"  survived: {r['id']} ({r['why']})")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"killed": killed, "total": len(results), "mutants": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

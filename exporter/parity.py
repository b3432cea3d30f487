"""Export parity: every engine against the fp32 PyTorch reference on seeded inputs at several shapes.

Comparison semantics follow polygraphy's default (elementwise) comparator: an element fails only when it is
outside BOTH tolerances, |got - ref| > atol and |got - ref| > rtol * |ref|; non-finite values must match
exactly. Per output we record the max absolute error, the max relative error (|got - ref| / |ref|) and the
number of failing elements, aggregated over all shapes. Any failing element aborts the export.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from fastardiff.errors import FastardiffError
from fastardiff.recipes.config import DriftARConfig

from .engine_modules import ENGINE_IO, ROLLOUT_GAMMA, ShapeProfile, example_inputs


class ParityError(FastardiffError):
    pass


def parity_shapes(cfg: DriftARConfig, name: str, profile: ShapeProfile) -> list[tuple[int, int, int]]:
    """(batch, K, cache) at the profile's min, opt and max corners (deduplicated, contract-valid)."""
    b0, b1, b2 = profile.batch
    if name in ROLLOUT_GAMMA:  # odd rows: unguided; even rows: [cond; uncond] halves (guided)
        k1 = max(1, min(3, profile.new_tokens[2]))
        s = profile.cache[2]
        odd = b2 if b2 % 2 else b2 - 1                 # the most rows without guidance
        even = b2 - b2 % 2 if b2 > 1 else b2           # the most rows with guidance
        shapes = [(b0, 1, s), (odd, k1, s), (even, k1, s)]
    elif name == "decoder":
        shapes = [(b0, cfg.num_tokens, 0), (b1, cfg.num_tokens, 0), (b2, cfg.num_tokens, 0)]
    else:
        k0, k1, k2 = profile.new_tokens
        s0, s1, s2 = profile.cache
        k2 = min(k2, cfg.seq_len)
        shapes = [(b0, k0, s0), (b1, k1, s1), (b2, k1, s2), (b2, k2, s0), (b1, max(k0, min(k1 + 2, k2)), s1 - 1)]
    out = []
    for s in shapes:
        if s not in out and s[2] >= 0:
            out.append(s)
    return out


def compare_arrays(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict:
    """Elementwise comparison of one output; returns max_abs, max_rel, mismatches, elements."""
    got = np.asarray(got)
    if got.shape != ref.shape:
        raise ParityError(f"engine output has shape {list(got.shape)}, the PyTorch reference {list(ref.shape)}")
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(ref64) & np.isfinite(got64)
    nonfinite_mismatch = int(np.sum(~finite & ~((ref64 == got64) | (np.isnan(ref64) & np.isnan(got64)))))
    diff = np.where(finite, np.abs(got64 - ref64), 0.0)
    mag = np.abs(np.where(finite, ref64, 0.0))
    rel = diff / np.maximum(mag, np.finfo(np.float64).tiny)
    fails = (diff > atol) & (diff > rtol * mag)
    return {"max_abs": float(diff.max(initial=0.0)), "max_rel": float(np.where(diff > 0, rel, 0.0).max(initial=0.0)),
            "mismatches": int(fails.sum()) + nonfinite_mismatch, "elements": int(ref.size)}


def _merge(acc: dict | None, new: dict) -> dict:
    if acc is None:
        return dict(new)
    return {"max_abs": max(acc["max_abs"], new["max_abs"]), "max_rel": max(acc["max_rel"], new["max_rel"]),
            "mismatches": acc["mismatches"] + new["mismatches"], "elements": acc["elements"] + new["elements"]}


def check_engine_parity(name: str, run: Callable[[tuple], Sequence[np.ndarray]], reference: torch.nn.Module,
                        cfg: DriftARConfig, layers: int, profile: ShapeProfile, atol: float, rtol: float,
                        seed: int = 0) -> dict:
    """Run `run` (engine under test: CPU torch tensors in, numpy arrays out) and the fp32 reference module on
    seeded inputs at each parity shape; raise ParityError naming the output and the errors when out of
    tolerance; return the report written into the manifest's EngineEntry.parity."""
    output_names = ENGINE_IO[name][1]
    shapes = parity_shapes(cfg, name, profile)
    per_output: dict[str, dict] = {}
    for i, (batch, k, cache) in enumerate(shapes):
        inputs = example_inputs(cfg, name, layers, batch, k, cache, seed=seed + i)
        with torch.no_grad():
            ref = reference(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = list(run(inputs))
        if len(got) != len(ref):
            raise ParityError(f"engine '{name}' returned {len(got)} outputs, the reference {len(ref)}")
        for out_name, r, g in zip(output_names, ref, got):
            stats = compare_arrays(r.detach().float().cpu().numpy(), g, atol, rtol)
            per_output[out_name] = _merge(per_output.get(out_name), stats)
            if stats["mismatches"]:
                raise ParityError(
                    f"engine '{name}' output '{out_name}' differs from the PyTorch reference beyond --atol {atol:g} "
                    f"/ --rtol {rtol:g} at batch={batch} K={k} cache={cache}: max abs {stats['max_abs']:.3e}, "
                    f"max rel {stats['max_rel']:.3e}, {stats['mismatches']} of {stats['elements']} elements; "
                    "nothing was written (loosen --atol/--rtol for fp16/bf16, or report the export bug)")
    return {"atol": atol, "rtol": rtol, "seed": seed, "shapes": [list(s) for s in shapes], "outputs": per_output}

"""Export parity: every engine against the fp32 PyTorch reference on seeded inputs at several shapes.

The comparison is Polygraphy's (polygraphy.comparator.SimpleCompareFunc, elementwise): an element fails only when
it is outside BOTH tolerances, |got - ref| > atol and |got - ref| > rtol * |ref|; matching infinities compare
equal, and a NaN fails unless the reference has a NaN there too (those pairs are set aside before the
comparison). Per output we record Polygraphy's max absolute and max relative error and the number of failing
elements over all shapes; Polygraphy's verdict is the gate, and any failing element aborts the export.
Polygraphy reports pass/fail but not how many elements failed, so the count applies the same rule with numpy and
must agree with Polygraphy's verdict (a Polygraphy release with other semantics is an error, not a silent drift).

The engines themselves run through the runtime's own backends (the code that serves them later), not
Polygraphy's runners: there is no Polygraphy runner for AOTInductor packages, and for ONNX Runtime and TensorRT
the point is to check fastardiff's binding code, which Polygraphy's runners would bypass.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import polygraphy
import torch
from polygraphy.comparator import IterationResult, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

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
    elif name.startswith("head_"):
        shapes = [(b, profile.new_tokens[0], 0) for b in (b0, b1, b2)]
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


def _polygraphy_compare(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float):
    compare = SimpleCompareFunc(check_shapes=True, atol=atol, rtol=rtol, check_error_stat="elemwise",
                                infinities_compare_equal=True)
    # Its per-output report goes to stdout otherwise; it formats the arrays even when not logging, so they go in
    # flat (the shapes were checked; the comparison is elementwise) and that formatting stays a short summary.
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.printoptions(threshold=8, edgeitems=2), \
            np.errstate(invalid="ignore", divide="ignore"):  # inf - inf, NaN: counted below, not warned about
        results = compare(IterationResult({"output": got.reshape(-1)}, runner_name="engine"),
                          IterationResult({"output": ref.reshape(-1)}, runner_name="pytorch-reference"))
    return results["output"]


def compare_arrays(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict:
    """Elementwise comparison of one output (Polygraphy); returns max_abs, max_rel, mismatches, elements."""
    got = np.asarray(got)
    if got.shape != ref.shape:
        raise ParityError(f"engine output has shape {list(got.shape)}, the PyTorch reference {list(ref.shape)}")
    if ref.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "mismatches": 0, "elements": 0}
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    both_nan = np.isnan(ref64) & np.isnan(got64)   # a NaN the reference has too is not an engine error
    ref64[both_nan] = got64[both_nan] = 0.0
    result = _polygraphy_compare(ref64, got64, atol, rtol)
    with np.errstate(invalid="ignore", divide="ignore"):
        same_inf = np.isinf(ref64) & (ref64 == got64)
        diff = np.where(same_inf, 0.0, np.abs(got64 - ref64))
        rel = diff / np.where(ref64 == 0, np.finfo(np.float64).eps, np.abs(ref64))  # Polygraphy's zero guard
        fails = int(np.count_nonzero(~(diff <= atol) & ~(rel <= rtol)))             # NaN fails both
    if bool(result) != (fails == 0):
        raise ParityError(f"Polygraphy {polygraphy.__version__} {'passed' if result else 'failed'} an output in "
                          f"which fastardiff counts {fails} elements outside --atol/--rtol: its comparison "
                          "semantics changed; install polygraphy>=0.49,<0.60 or report this")
    return {"max_abs": float(result.max_absdiff), "max_rel": float(result.max_reldiff), "mismatches": fails,
            "elements": int(ref.size)}


def check_engine_parity(name: str, run: Callable[[tuple], Sequence[np.ndarray]], reference: torch.nn.Module,
                        cfg: DriftARConfig, layers: int, profile: ShapeProfile, atol: float, rtol: float,
                        seed: int = 0) -> dict:
    """Run `run` (engine under test: CPU torch tensors in, numpy arrays out) and the fp32 reference module on
    seeded inputs at each parity shape; raise ParityError naming the output, the shape and the errors when out of
    tolerance; return the report written into the manifest's EngineEntry.parity. Each output is compared once
    over all shapes (one Polygraphy comparison per output: its fixed cost is per call), and per shape only to
    name the failing one."""
    output_names = ENGINE_IO[name][1]
    shapes = parity_shapes(cfg, name, profile)
    collected: dict[str, list] = {n: [] for n in output_names}
    for i, (batch, k, cache) in enumerate(shapes):
        inputs = example_inputs(cfg, name, layers, batch, k, cache, seed=seed + i)
        with torch.no_grad():
            ref = reference(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = list(run(inputs))
        if len(got) != len(ref):
            raise ParityError(f"engine '{name}' returned {len(got)} outputs, the reference {len(ref)}")
        for out_name, r, g in zip(output_names, ref, got):
            r, g = r.detach().float().cpu().numpy(), np.asarray(g)
            if g.shape != r.shape:
                raise ParityError(f"engine '{name}' output '{out_name}' has shape {list(g.shape)} at batch={batch} "
                                  f"K={k} cache={cache}, the PyTorch reference {list(r.shape)}; re-export")
            collected[out_name].append(((batch, k, cache), r, g))
    per_output: dict[str, dict] = {}
    for out_name, items in collected.items():
        stats = compare_arrays(np.concatenate([r.reshape(-1) for _, r, _ in items]),
                               np.concatenate([g.reshape(-1) for _, _, g in items]), atol, rtol)
        if stats["mismatches"]:
            where, bad = next(((s, b) for s, r, g in items if (b := compare_arrays(r, g, atol, rtol))["mismatches"]),
                              (None, stats))  # elementwise: some shape fails; else report the whole
            at = f" at batch={where[0]} K={where[1]} cache={where[2]}" if where else ""
            raise ParityError(
                f"engine '{name}' output '{out_name}' differs from the PyTorch reference beyond --atol {atol:g} / "
                f"--rtol {rtol:g}{at}: max abs {bad['max_abs']:.3e}, max rel {bad['max_rel']:.3e}, "
                f"{bad['mismatches']} of {bad['elements']} elements; nothing was written (loosen --atol/--rtol for "
                "fp16/bf16, or report the export bug)")
        per_output[out_name] = stats
    return {"atol": atol, "rtol": rtol, "seed": seed, "shapes": [list(s) for s in shapes], "outputs": per_output}


def with_room(k_cache: np.ndarray, v_cache: np.ndarray, fed: int) -> tuple[np.ndarray, np.ndarray]:
    """The caches with `fed` more zero positions: room for the positions an in-place engine writes (the runtime
    always passes caches with room; positions past each row's length are masked, so the outputs are the same)."""
    pad = lambda a: np.concatenate([a, np.zeros(a.shape[:3] + (fed, a.shape[4]), a.dtype)], axis=3)  # noqa: E731
    return pad(k_cache), pad(v_cache)


def check_cache_update(name: str, lengths, before: Sequence[np.ndarray], after: Sequence[np.ndarray],
                       new: Sequence[np.ndarray]) -> None:
    """An in-place engine's caches after the call must be the caches before it with new_k / new_v written at each
    row's length, bit for bit; ParityError otherwise."""
    for cache, old, got, written in zip(("k_cache", "v_cache"), before, after, new):
        want = np.array(old, copy=True)
        k = written.shape[3]
        for r, start in enumerate(np.asarray(lengths).tolist()):
            want[:, r, :, start:start + k] = written[:, r]
        if np.shape(got) != want.shape or not np.array_equal(got, want):
            raise ParityError(f"engine '{name}': its in-place update of {cache} is not the input cache with the "
                              "call's new keys/values written at each row's length; re-export")


def per_layer_runner(name: str, cache_layers: int, run_feed: Callable[[dict], list]) -> Callable[[tuple], list]:
    """The contract call of an in-place engine with one cache buffer per layer (onnx and trt targets): contract
    torch inputs -> contract outputs. run_feed(feed) runs the engine on the named numpy inputs (k_cache_<l> /
    v_cache_<l> with room for the fed positions) and returns the contract outputs followed by the updated buffers,
    which are checked on every call with check_cache_update (ParityError otherwise)."""
    from fastardiff.runtime.engine import per_layer_io

    input_names, output_names = ENGINE_IO[name]

    def run(inputs: tuple) -> list[np.ndarray]:
        feed = {n: x.detach().cpu().numpy() for n, x in zip(input_names, inputs)}
        k, v = with_room(feed.pop("k_cache"), feed.pop("v_cache"), feed["tokens"].shape[1])
        feed.update({f"k_cache_{layer}": k[layer] for layer in range(cache_layers)})
        feed.update({f"v_cache_{layer}": v[layer] for layer in range(cache_layers)})
        ordered = {n: feed[n] for n in per_layer_io(input_names, output_names, cache_layers)[0]}
        outputs = run_feed(ordered)
        named = dict(zip(output_names, outputs))
        updated = outputs[len(output_names):]
        check_cache_update(name, feed["lengths"], (k, v),
                           (np.stack(updated[:cache_layers]), np.stack(updated[cache_layers:])),
                           (named["new_k"], named["new_v"]))
        return outputs[:len(output_names)]

    return run

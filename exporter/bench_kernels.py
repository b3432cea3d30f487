"""`fastardiff bench kernels`: fused entropy attention (Triton) vs PyTorch SDPA (no entropy) vs the unfused
reference, side by side in one run on one CUDA GPU, timed with CUDA events.

Every case is one attention call: B samples, H heads, K new queries over N keys (a cache of N-K entries plus the
K new ones). The three columns compute:
  fused      torch.ops.fastardiff.entropy_attention: output + normalised row entropy in one pass
  sdpa       torch SDPA with the same visible keys and no entropy (lower-right causal bias; a boolean mask
             with --ragged), the cost to beat
  reference  entropy_attention_reference: decomposed, materialises the probabilities
Timing: by default each implementation is captured `--inner` times in a CUDA graph and the graph replays are
timed with CUDA events (so Python dispatch is not measured); --no-cuda-graphs times eager calls instead.
For K <= 5 the achieved bandwidth is the bytes of K and V that the op must read divided by the time.

Without CUDA it raises FastardiffError (the CLI prints `error: ...` and exits 2); `--interpret-smoke` runs tiny shapes through Triton's
interpreter on CPU to check that the code path works (no timings: the interpreter says nothing about speed).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import sys

from fastardiff.errors import FastardiffError

log = logging.getLogger(__name__)

SMOKE_SHAPES = {"n": [16, 40], "k": [1, 5], "batch": [1, 2], "heads": 2, "head_dim": 16}


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are FastardiffError: one `error: ...` line and exit status 2, as every CLI."""

    def error(self, message):
        raise FastardiffError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastardiff bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int_list, default=[256, 1024, 4096], help="total keys N (cache + new), list")
    p.add_argument("--k", type=int_list, default=[1, 5, 256], help="new tokens (queries) K, list")
    p.add_argument("--batch", type=int_list, default=[1, 8, 64], help="batch sizes, list")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64, choices=[16, 32, 64, 128])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--ragged", action="store_true", help="random per-sample cache lengths (SDPA gets a bool mask)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before capture")
    p.add_argument("--inner", type=int, default=10, help="calls captured per CUDA graph replay")
    p.add_argument("--repeats", type=int, default=10, help="timed replays; the median is reported")
    p.add_argument("--no-cuda-graphs", action="store_true", help="time eager calls (includes Python dispatch)")
    p.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="no GPU: run tiny shapes through Triton's interpreter on CPU (correctness only, no timings)")
    return p


def make_case(torch, batch, heads, num_keys, new_tokens, head_dim, dtype, device, ragged, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    cache = num_keys - new_tokens
    q = torch.randn(batch, heads, new_tokens, head_dim, generator=g)
    k = torch.randn(batch, heads, num_keys, head_dim, generator=g)
    v = torch.randn(batch, heads, num_keys, head_dim, generator=g)
    lengths = torch.randint(0, cache + 1, (batch,), generator=g) if ragged else torch.full((batch,), cache)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), lengths.to(device), cache


def implementations(torch, q, k, v, lengths, cache, ragged):
    """name -> zero-argument callable, all over the same inputs and visible keys."""
    from torch.nn.functional import scaled_dot_product_attention

    from fastardiff.recipes import triton_attention  # noqa: F401  registers the op
    from fastardiff.recipes.entropy_attention import entropy_attention_reference, visible_keys_mask

    scale = q.shape[-1] ** -0.5
    new_tokens, num_keys = q.shape[-2], k.shape[-2]
    if ragged:
        mask = visible_keys_mask(lengths, new_tokens, num_keys, cache)
    else:  # every sample has the full cache: the visible keys are exactly the lower-right causal pattern
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(new_tokens, num_keys)
    return {
        "fused": lambda: torch.ops.fastardiff.entropy_attention(q, k, v, lengths, cache, scale, True),
        "sdpa": lambda: scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
        "reference": lambda: entropy_attention_reference(q, k, v, lengths, cache, scale, True),
    }


def time_ms(torch, fn, args) -> float:
    """Median milliseconds per call, from CUDA events around graph replays (or eager calls)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(args.warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if args.no_cuda_graphs:
        def run():
            for _ in range(args.inner):
                fn()
    else:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(args.inner):
                fn()
        run = graph.replay
    run()
    times = []
    for _ in range(args.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / args.inner)
    return statistics.median(times)


def kv_bytes(lengths, cache, new_tokens, heads, head_dim, element_size) -> int:
    """Bytes of K and V an exact kernel must read: the valid cache entries plus the new keys, per head."""
    keys = int((lengths.clamp(max=cache) + new_tokens).sum().item())
    return 2 * keys * heads * head_dim * element_size


def max_errors(torch, fns) -> tuple[float, float]:
    out, ent = fns["fused"]()
    ref_out, ref_ent = fns["reference"]()
    return (out.float() - ref_out.float()).abs().max().item(), (ent.float() - ref_ent.float()).abs().max().item()


def bench_case(torch, args, n, kk, batch, dtype) -> dict:
    row = {"N": n, "K": kk, "batch": batch}
    q, k, v, lengths, cache = make_case(torch, batch, args.heads, n, kk, args.head_dim, dtype, "cuda", args.ragged)
    fns = implementations(torch, q, k, v, lengths, cache, args.ragged)
    row["out_err"], row["entropy_err"] = max_errors(torch, fns)
    for name, fn in fns.items():
        try:
            row[f"{name}_ms"] = time_ms(torch, fn, args)
        except torch.cuda.OutOfMemoryError:
            row[f"{name}_ms"] = None
            log.warning("N=%d K=%d batch=%d: %s ran out of GPU memory", n, kk, batch, name)
        torch.cuda.empty_cache()
    if kk <= 5:
        nbytes = kv_bytes(lengths, cache, kk, args.heads, args.head_dim, q.element_size())
        for name in ("fused", "sdpa"):
            ms = row[f"{name}_ms"]
            row[f"{name}_GBps"] = nbytes / (ms * 1e-3) / 1e9 if ms else None
    return row


def fmt(value, spec) -> str:
    width = spec.split(".")[0]
    return format("-", f">{width}") if value is None else format(value, spec)


def print_table(rows, out=sys.stdout) -> None:
    header = (f"{'N':>5} {'K':>4} {'B':>3} | {'fused ms':>9} {'sdpa ms':>9} {'ref ms':>9} | {'fused/sdpa':>10} "
              f"{'ref/fused':>9} | {'fused GB/s':>10} {'sdpa GB/s':>9} | {'out err':>8} {'H err':>8}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        fused, sdpa, ref = r.get("fused_ms"), r.get("sdpa_ms"), r.get("reference_ms")
        vs_sdpa = fused / sdpa if fused and sdpa else None
        vs_ref = ref / fused if fused and ref else None
        print(f"{r['N']:>5} {r['K']:>4} {r['batch']:>3} | {fmt(fused, '9.4f')} {fmt(sdpa, '9.4f')} "
              f"{fmt(ref, '9.4f')} | {fmt(vs_sdpa, '10.2f')} {fmt(vs_ref, '9.2f')} | "
              f"{fmt(r.get('fused_GBps'), '10.0f')} {fmt(r.get('sdpa_GBps'), '9.0f')} | "
              f"{fmt(r['out_err'], '8.1e')} {fmt(r['entropy_err'], '8.1e')}", file=out)


def interpret_smoke(args) -> int:
    """CPU, Triton interpreter, tiny shapes: the fused op must run its kernel and match the reference."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede triton's import; this is a CLI process
    import torch

    from fastardiff.recipes import triton_attention

    if not triton_attention.kernel_is_interpreted():
        raise FastardiffError("--interpret-smoke needs Triton's interpreter, but triton was imported without it; "
                              "run with TRITON_INTERPRET=1 set in the environment")
    rows, worst = [], 0.0
    for n, kk, batch in itertools.product(SMOKE_SHAPES["n"], SMOKE_SHAPES["k"], SMOKE_SHAPES["batch"]):
        q, k, v, lengths, cache = make_case(torch, batch, SMOKE_SHAPES["heads"], n, kk, SMOKE_SHAPES["head_dim"],
                                            torch.float32, "cpu", ragged=True)
        fns = implementations(torch, q, k, v, lengths, cache, ragged=True)
        fns["sdpa"]()
        out_err, ent_err = max_errors(torch, fns)
        rows.append({"N": n, "K": kk, "batch": batch, "out_err": out_err, "entropy_err": ent_err})
        worst = max(worst, out_err, ent_err)
    print("interpret smoke (CPU, Triton interpreter, fp32): correctness only, no timings")
    print_table(rows)
    if worst > 1e-4:
        raise FastardiffError(f"the fused kernel differs from the reference by {worst:.3g} (tolerance 1e-4)")
    print("ok: the fused kernel ran under the interpreter and matches the reference")
    return 0


def main(argv=None) -> int:
    """Entry point of `fastardiff bench kernels` and benchmarks/bench_kernels.py. Returns 0; raises
    FastardiffError (no GPU, no interpreter, kernel mismatch), which the CLI reports as `error: ...`, exit 2."""
    args = build_parser().parse_args(argv)
    if args.interpret_smoke:
        return interpret_smoke(args)
    import torch

    if not torch.cuda.is_available():
        raise FastardiffError("`bench kernels` times CUDA kernels and torch sees no CUDA GPU on this machine, so no "
                              "timings were taken; run it on a GPU machine, or pass --interpret-smoke to check the "
                              "code path on CPU")
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, dtype {args.dtype}, "
          f"heads {args.heads}, head dim {args.head_dim}, {'ragged' if args.ragged else 'full'} cache, "
          f"{'eager' if args.no_cuda_graphs else 'CUDA graph'} timing, median of {args.repeats}x{args.inner} calls")
    rows = []
    from tqdm import tqdm

    cases = list(itertools.product(args.n, args.k, args.batch))
    for n, kk, batch in tqdm(cases, desc="bench kernels", unit="case", file=sys.stderr):
        if kk > n:
            continue
        rows.append(bench_case(torch, args, n, kk, batch, dtype))
    print_table(rows)
    if args.json_path:
        tmp = f"{args.json_path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"gpu": props.name, "dtype": args.dtype, "heads": args.heads, "head_dim": args.head_dim,
                       "ragged": args.ragged, "cuda_graphs": not args.no_cuda_graphs, "rows": rows}, f, indent=1)
        os.replace(tmp, args.json_path)
    return 0


def script_main() -> None:
    """Entry point for `python benchmarks/bench_kernels.py`: one `error:` line and exit 2 on user errors."""
    try:
        sys.exit(main())
    except FastardiffError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    script_main()

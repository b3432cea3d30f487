"""Should TensorRT's built-in attention (INetworkDefinition.add_attention_v2) replace the decomposed attention of the
layers that compute no entropy? Builds, with the installed TensorRT-RTX and no GPU, a network of `--layers`
attention blocks at a model's target_verify shapes (batch 1..8, K 1..gamma+1 new queries, the in-place static
cache buffer of seq_len + gamma + 1 keys, a boolean visibility mask from the lengths as the decomposed graph
has), once decomposed (MatMul, scale, masked Select, SoftMax, MatMul: what the ONNX parser makes of the exported
graph) and once as IAttention layers (fp32 needs decomposable=True: no fused fp32 kernel), in fp32 and fp16,
and reports engine bytes and build seconds side by side, repeats interleaved.

  .venv/bin/python benchmarks/trt_attention_probe.py --json docs/trt-attention-probe.json

What it cannot measure here: run time (no GPU). Build seconds depend on the machine's load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def network(trt, builder, kind: str, precision: str, layers: int, heads: int, head_dim: int, keys: int):
    from fastardiff.exporter.trt_build import network_flags

    net = builder.create_network(network_flags(trt))
    dtype = trt.float16 if precision == "fp16" else trt.float32
    x = net.add_input("q", dtype, (-1, heads, -1, head_dim))
    k = net.add_input("k", dtype, (-1, heads, keys, head_dim))
    v = net.add_input("v", dtype, (-1, heads, keys, head_dim))
    mask = net.add_input("mask", trt.bool, (-1, 1, -1, keys))
    scale = net.add_constant((1, 1, 1, 1), trt.Weights(__import__("numpy").full((1, 1, 1, 1), head_dim ** -0.5,
                                                        "float16" if precision == "fp16" else "float32"))).get_output(0)
    neg = net.add_constant((1, 1, 1, 1), trt.Weights(__import__("numpy").full((1, 1, 1, 1), -1e4 if precision == "fp16"
                                                      else -1e30, "float16" if precision == "fp16" else "float32")))
    for _ in range(layers):
        if kind == "builtin":
            att = net.add_attention_v2(x, k, v, trt.AttentionNormalizationOp.SOFTMAX, trt.CausalMaskKind.NONE)
            att.mask = mask
            att.decomposable = precision == "fp32"
            x = att.get_output(0)
        else:
            s = net.add_matrix_multiply(x, trt.MatrixOperation.NONE, k, trt.MatrixOperation.TRANSPOSE).get_output(0)
            s = net.add_elementwise(s, scale, trt.ElementWiseOperation.PROD).get_output(0)
            s = net.add_select(mask, s, neg.get_output(0)).get_output(0)
            sm = net.add_softmax(s)
            sm.axes = 1 << 3
            x = net.add_matrix_multiply(sm.get_output(0), trt.MatrixOperation.NONE, v,
                                        trt.MatrixOperation.NONE).get_output(0)
    net.mark_output(x)
    return net


def build(trt, kind, precision, args):
    from fastardiff.runtime.trt_library import compute_capability_enum

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    net = network(trt, builder, kind, precision, args.layers, args.heads, args.head_dim, args.keys)
    config = builder.create_builder_config()
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    config.num_compute_capabilities = 1
    config.set_compute_capability(compute_capability_enum(trt, args.compute_capability), 0)
    profile = builder.create_optimization_profile()
    b, q = (1, 4, args.batch), (1, args.queries, args.queries)
    shapes = {"q": lambda i: (b[i], args.heads, q[i], args.head_dim),
              "k": lambda i: (b[i], args.heads, args.keys, args.head_dim),
              "v": lambda i: (b[i], args.heads, args.keys, args.head_dim),
              "mask": lambda i: (b[i], 1, q[i], args.keys)}
    for name, shape in shapes.items():
        profile.set_shape(name, shape(0), shape(1), shape(2))
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    blob = builder.build_serialized_network(net, config)
    seconds = time.perf_counter() - start
    if blob is None:
        return {"built": False}
    return {"built": True, "seconds": seconds, "bytes": len(bytes(blob)), "layers": net.num_layers}


def main(argv=None) -> int:
    from fastardiff.recipes.checkpoint import load_checkpoint

    cfg = load_checkpoint(ROOT / "recipes/checkpoints/tiny-mnist.pt").config
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=cfg.target_layers - 1,
                        help="attention blocks (default: the shipped target's layers without entropy)")
    parser.add_argument("--heads", type=int, default=cfg.heads)
    parser.add_argument("--head-dim", type=int, default=cfg.head_dim)
    parser.add_argument("--keys", type=int, default=cfg.seq_len + 5, help="static cache buffer length")
    parser.add_argument("--queries", type=int, default=5, help="largest K (gamma + 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compute-capability", default="8.6")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    from fastardiff.runtime.trt_library import TRT_LIBRARIES, import_library

    trt = import_library(TRT_LIBRARIES["tensorrt_rtx"], "the attention probe")
    runs: dict[str, list] = {}
    for _ in range(args.repeats):               # interleaved: each repeat builds every variant once
        for precision in ("fp32", "fp16"):
            for kind in ("decomposed", "builtin"):
                runs.setdefault(f"{kind}/{precision}", []).append(build(trt, kind, precision, args))
    summary = {}
    for key, results in runs.items():
        ok = [r for r in results if r["built"]]
        summary[key] = {"built": len(ok) == len(results), "bytes": ok[0]["bytes"] if ok else None,
                        "layers": ok[0]["layers"] if ok else None,
                        "median_build_seconds": round(statistics.median(r["seconds"] for r in ok), 3) if ok else None}
    for precision in ("fp32", "fp16"):
        d, b = summary[f"decomposed/{precision}"], summary[f"builtin/{precision}"]
        if d["built"] and b["built"]:
            summary[f"builtin_vs_decomposed/{precision}"] = {
                "bytes_ratio": round(b["bytes"] / d["bytes"], 3),
                "build_seconds_ratio": round(b["median_build_seconds"] / d["median_build_seconds"], 3)}
    result = {"meta": {"library": "tensorrt_rtx", "version": trt.__version__, **{k: v for k, v in vars(args).items()
                                                                                 if k != "json"}},
              "summary": summary}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

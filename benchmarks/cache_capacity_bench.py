"""Does an engine call's time grow with the KV cache's capacity beyond attention's own work? (issue 13)

Times target_verify at one batch and a few K over caches of several capacities (the same valid length), through
the runtime's backend, interleaved round robin so machine drift hits every case alike:
  - each engine dir given (e.g. `--kv-update host` engines, which take the stacked cache and concat the new keys,
    against `--kv-update in-place` engines, which take per-layer buffers and attend over them in place);
  - `attention only`: an ONNX graph of just the target's masked attention over the same buffers (per layer:
    scores against every cache position, mask, softmax, weighted sum, and the entropy where the model computes
    one; no projections, no copies), the floor for an engine that attends over the whole static buffer.
It prints each case's median ms and its growth from the smallest capacity; --json writes the rows.

    .venv/bin/python benchmarks/cache_capacity_bench.py engines/onnx engines/onnx-ip --batch 8 --json F
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def attention_only_session(config: dict, threads: int):
    """ONNX Runtime session of the target's masked attentions of K queries over per-layer [B, H, S, Dh] buffers
    (the entropy form at the layers whose entropy the model returns, SDPA elsewhere: as the engines do)."""
    import onnxruntime as ort
    import torch

    from fastardiff.exporter.onnx_target import export_onnx_file
    from fastardiff.recipes.config import DriftARConfig
    from fastardiff.recipes.entropy_attention import entropy_attention_reference, visible_keys_mask

    cfg = DriftARConfig.from_dict(config)
    layers, heads, head_dim = cfg.target_layers, cfg.heads, cfg.head_dim
    entropy_layers = {cfg.entropy_layer(layers), min(cfg.shallow_layer, layers - 1)}

    class AttentionOnly(torch.nn.Module):
        def forward(self, q, lengths, k_cache, v_cache):
            mask = visible_keys_mask(lengths, q.shape[2], k_cache[0].shape[2], None)
            scale = head_dim ** -0.5
            outputs = []
            for i, (k, v) in enumerate(zip(k_cache, v_cache)):
                if i in entropy_layers:
                    outputs += entropy_attention_reference(q, k, v, lengths, None, scale)
                else:
                    outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                     scale=scale))
            return tuple(outputs)

    Dim = torch.export.Dim
    batch, k, s = Dim("batch", min=1, max=64), Dim("K", min=1, max=64), Dim("cache", min=2, max=4096)
    example = (torch.randn(2, heads, 3, head_dim), torch.tensor([4, 5]),
               tuple(torch.randn(2, heads, 16, head_dim) for _ in range(layers)),
               tuple(torch.randn(2, heads, 16, head_dim) for _ in range(layers)))
    shapes = ({0: batch, 2: k}, {0: batch}, tuple({0: batch, 2: s} for _ in range(layers)),
              tuple({0: batch, 2: s} for _ in range(layers)))
    path = Path(tempfile.mkdtemp()) / "attention_only.onnx"
    names = ["q", "lengths"] + [f"{c}_{i}" for c in ("k_cache", "v_cache") for i in range(layers)]
    outputs = [f"{kind}_{i}" for i in range(layers) for kind in (("out", "entropy") if i in entropy_layers
                                                                    else ("out",))]
    export_onnx_file(AttentionOnly(), example, path, names, outputs, shapes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), names


def main() -> None:
    from fastardiff.runtime.engine import load_engines

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dirs", nargs="+")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", default="1,5", help="fed tokens per call")
    parser.add_argument("--capacity", default="16,70,256", help="cache positions passed")
    parser.add_argument("--length", type=int, default=10, help="valid cache length of every row")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ks, caps = [int(k) for k in args.k.split(",")], sorted(int(c) for c in args.capacity.split(","))
    if args.length + max(ks) > caps[0]:
        parser.error(f"--length {args.length} + K {max(ks)} must fit the smallest --capacity {caps[0]}")
    engines = {d: load_engines(d, threads=args.threads) for d in args.engine_dirs}
    cfg = next(iter(engines.values())).manifest.config
    L, H, Dh, D = cfg["target_layers"], cfg["heads"], cfg["width"] // cfg["heads"], cfg["token_dim"]
    attention, names = attention_only_session(cfg, args.threads)
    rng = np.random.default_rng(0)
    B = args.batch
    cases = {}
    for cap in caps:
        for k in ks:
            tokens = rng.standard_normal((B, k, D), dtype=np.float32)
            lengths = np.full(B, args.length, np.int64)
            cond = np.arange(B, dtype=np.int64) % cfg["num_classes"]
            for d, e in engines.items():
                cache = [rng.standard_normal((L, B, H, cap, Dh), dtype=np.float32) for _ in range(2)]
                cases[(d, cap, k)] = (lambda e=e, a=(tokens, lengths, *cache, cond): e.target_verify(*a))
            q = rng.standard_normal((B, H, k, Dh), dtype=np.float32)
            buffers = [rng.standard_normal((B, H, cap, Dh), dtype=np.float32) for _ in range(2 * L)]
            feed = dict(zip(names, [q, lengths] + buffers))
            cases[("attention only", cap, k)] = (lambda f=feed: attention.run(None, f))
    times = {key: [] for key in cases}
    for _ in range(args.repeats):
        for key, call in cases.items():
            started = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - started)
    rows = []
    print(f"target_verify, batch {B}, {args.length} valid positions, median ms (growth from capacity {caps[0]}):")
    for name in list(engines) + ["attention only"]:
        for k in ks:
            base = np.median(times[(name, caps[0], k)]) * 1e3
            cells = []
            for cap in caps:
                ms = float(np.median(times[(name, cap, k)]) * 1e3)
                rows.append({"engines": name, "batch": B, "K": k, "capacity": cap, "ms": ms, "growth ms": ms - base})
                cells.append(f"c{cap} {ms:6.3f} (+{ms - base:5.3f})")
            print(f"  {name:>24s} K={k}: " + "   ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "repeats": args.repeats, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()

"""Kernel benchmark (same as `fastardiff bench kernels`): fused entropy attention vs SDPA vs the reference.

    python benchmarks/bench_kernels.py                     # on a CUDA GPU: the full table
    python benchmarks/bench_kernels.py --interpret-smoke   # CPU: correctness smoke run, no timings
"""
import sys

from fastardiff.errors import FastardiffError
from fastardiff.exporter.bench_kernels import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except FastardiffError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

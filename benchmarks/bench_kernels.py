"""Kernel benchmark (same as `fastardiff bench kernels`): fused entropy attention vs SDPA vs the reference.

    python benchmarks/bench_kernels.py                     # on a CUDA GPU: the full table
    python benchmarks/bench_kernels.py --interpret-smoke   # CPU: correctness smoke run, no timings
"""
from fastardiff.exporter.bench_kernels import script_main

if __name__ == "__main__":
    script_main()

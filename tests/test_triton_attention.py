"""The fused Triton entropy attention kernel against the reference (recipes/entropy_attention.py).

CPU: the kernel itself is executed by Triton's interpreter. TRITON_INTERPRET=1 must be set before triton is
imported, so those cases run in one subprocess (this file with --worker) and the variable never reaches the
pytest process or other test modules. GPU (`gpu` marker): the compiled kernel at full shapes.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from fastardiff.recipes.entropy_attention import entropy_attention_reference

FP32_TOL = 1e-4
LOW_PRECISION_TOL = 1e-2

# (batch, K new tokens, cache length, head dim, kv splits or None, dtype)
INTERPRETER_CASES = [(b, kk, cache, d, None, "float32")
                     for b, kk, d, cache in itertools.product((1, 3), (1, 5, 17), (16, 64), (0, 37, 70))]
# kv splits (the second split of a 9-entry cache is empty), several query blocks of 64 (prefill), fp16
INTERPRETER_CASES += [(3, 1, 70, 16, 3, "float32"), (3, 5, 70, 64, 2, "float32"), (1, 17, 70, 16, 4, "float32"),
                      (1, 70, 5, 16, None, "float32"), (2, 130, 9, 16, 2, "float32"), (3, 5, 37, 16, None, "float16")]
HEADS = 2


def case_id(case) -> str:
    b, kk, cache, d, splits, dtype = case
    return f"B{b}-K{kk}-S{cache}-D{d}-split{splits}-{dtype}"


def make_inputs(batch, new_tokens, cache, head_dim, dtype=torch.float32, device="cpu", heads=HEADS, seed=0):
    """Seeded q, k, v [B,H,*,Dh] and ragged lengths <= cache (sample 0 has a full cache, sample 1 half)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, new_tokens, head_dim, generator=g)
    k = torch.randn(batch, heads, cache + new_tokens, head_dim, generator=g) * 2.0  # peaky rows too
    v = torch.randn(batch, heads, cache + new_tokens, head_dim, generator=g)
    lengths = torch.randint(0, cache + 1, (batch,), generator=g)
    lengths[0] = cache if batch > 1 else cache // 2
    if batch > 2:
        lengths[1] = cache // 2
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), lengths.to(device)


def max_errors(q, k, v, lengths, cache, run):
    """Largest |kernel - reference| for out and for normalised and raw entropy (reference in fp32). For fp16/bf16
    the error is |kernel - reference| / (1 + |reference|): the outputs are rounded to the input dtype, whose
    spacing near 4 is 0.03 in bf16."""
    scale = q.shape[-1] ** -0.5
    errors = {}
    for normalize in (True, False):
        out, ent = run(q, k, v, lengths, cache, scale, normalize)
        ref_out, ref_ent = entropy_attention_reference(q.float(), k.float(), v.float(), lengths, cache, scale,
                                                       normalize)
        assert out.dtype == q.dtype and ent.dtype == q.dtype and out.shape == q.shape
        def err(a, b):
            scale_by = 1.0 if q.dtype == torch.float32 else 1.0 + b.abs()
            return ((a.float() - b).abs() / scale_by).max().item()

        key = "normalized" if normalize else "raw"
        errors["out"] = max(errors.get("out", 0.0), err(out, ref_out))
        errors[f"entropy_{key}"] = err(ent, ref_ent)
    return errors


def interpreter_worker(cases) -> dict:
    """Runs in the subprocess with TRITON_INTERPRET=1: kernel launches on CPU tensors, the op, a model."""
    import numpy as np

    np.seterr(all="ignore")  # rows past K and masked lanes compute inf/nan that are never stored
    from fastardiff.recipes import triton_attention

    results = {"interpreted": triton_attention.kernel_is_interpreted(), "cases": {}}
    for case in cases:
        b, kk, cache, d, splits, dtype = case
        q, k, v, lengths = make_inputs(b, kk, cache, d, getattr(torch, dtype))

        def run(*args, splits=splits):
            return triton_attention.launch_entropy_attention(*args, num_splits=splits)

        results["cases"][case_id(case)] = max_errors(q, k, v, lengths, cache, run)

    # the registered op on CPU tensors must take the kernel path, never the reference
    def no_reference(*args, **kwargs):
        raise AssertionError("the op fell back to the reference")

    saved = triton_attention.entropy_attention_reference
    triton_attention.entropy_attention_reference = no_reference
    try:
        q, k, v, lengths = make_inputs(3, 5, 37, 16)
        results["op"] = max_errors(q, k, v, lengths, 37, torch.ops.fastardiff.entropy_attention)
        results["model"] = model_parity()
    finally:
        triton_attention.entropy_attention_reference = saved
    return results


def model_parity() -> float:
    """ARTransformer(tiny-mnist) with attention_impl='triton' vs 'reference' on a ragged verify step."""
    from fastardiff.exporter.engine_modules import example_inputs
    from fastardiff.recipes.config import get_config
    from fastardiff.recipes.models import ARTransformer

    cfg = get_config("tiny-mnist")
    torch.manual_seed(0)
    model = ARTransformer(cfg, cfg.target_layers, attention_impl="triton").eval()
    inputs = example_inputs(cfg, "target_verify", cfg.target_layers, batch=2, new_tokens=4, cache=20)
    with torch.no_grad():
        fused = model(*inputs)
        model.attention_impl = "reference"
        ref = model(*inputs)
    return max((a - b).abs().max().item() for a, b in zip(fused, ref))


@pytest.fixture(scope="module")
def interpreter_results():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(INTERPRETER_CASES), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_env_does_not_leak():
    assert os.environ.get("TRITON_INTERPRET") in (None, "", "0")


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=case_id)
def test_interpreted_kernel_matches_reference(interpreter_results, case):
    assert interpreter_results["interpreted"], "the worker did not run Triton's interpreter"
    errors = interpreter_results["cases"][case_id(case)]
    tol = FP32_TOL if case[-1] == "float32" else LOW_PRECISION_TOL
    for name, err in errors.items():
        assert err < tol, f"{name}: max abs error {err:.3g} >= {tol}"


def test_op_on_cpu_runs_the_interpreted_kernel(interpreter_results):
    for name, err in interpreter_results["op"].items():
        assert err < FP32_TOL, f"op {name}: max abs error {err:.3g}"


def test_model_with_triton_impl_matches_reference(interpreter_results):
    assert interpreter_results["model"] < 1e-4


def test_test_inputs_discriminate_wrong_kernels():
    """A kernel without the sum e^(s-m) s term (H = m + log l) or one that ignores ragged lengths would fail."""
    for b, kk, cache in [(3, 5, 70), (1, 17, 37), (3, 1, 37)]:
        q, k, v, lengths = make_inputs(b, kk, cache, 16)
        scale = 16 ** -0.5
        _, ent = entropy_attention_reference(q, k, v, lengths, cache, scale, False)
        full = torch.full_like(lengths, cache)
        out, _ = entropy_attention_reference(q, k, v, lengths, cache, scale, False)
        out_ignoring_lengths, ent_ignoring_lengths = entropy_attention_reference(q, k, v, full, cache, scale, False)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        from fastardiff.recipes.entropy_attention import visible_keys_mask

        mask = visible_keys_mask(lengths, kk, cache + kk, cache)
        log_sum_exp = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)  # m + log l
        assert (log_sum_exp - ent).abs().max() > 100 * FP32_TOL
        if cache:
            assert (out_ignoring_lengths - out).abs().max() > 100 * FP32_TOL
            assert (ent_ignoring_lengths - ent).abs().max() > 100 * FP32_TOL


def test_cpu_op_without_interpreter_is_the_reference():
    from fastardiff.recipes import triton_attention

    assert not triton_attention.kernel_is_interpreted()
    q, k, v, lengths = make_inputs(3, 5, 37, 16)
    out, ent = torch.ops.fastardiff.entropy_attention(q, k, v, lengths, 37, 0.25, True)
    ref_out, ref_ent = entropy_attention_reference(q, k, v, lengths, 37, 0.25, True)
    assert torch.equal(out, ref_out) and torch.equal(ent, ref_ent)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_attention.launch_entropy_attention(q, k, v, lengths, 37, 0.25, True)


def test_registry_and_default_impl():
    from fastardiff.recipes.entropy_attention import (ENTROPY_ATTENTION_IMPLS, default_attention_impl,
                                                      get_entropy_attention)

    impl = get_entropy_attention("triton")
    assert ENTROPY_ATTENTION_IMPLS["triton"] is impl
    # torch finds both kernels behind the op (they key its compile caches)
    kernels = torch._library.triton.get_triton_kernels_for_op("fastardiff::entropy_attention")
    assert {kernel.__name__ for kernel in kernels} == {"_entropy_attention_kernel", "_merge_splits_kernel"}
    assert default_attention_impl("cpu") == "reference"
    assert default_attention_impl(torch.device("cuda", 0)) == "triton"


def test_rejects_unsupported_inputs():
    from fastardiff.recipes import triton_attention

    q, k, v, lengths = make_inputs(1, 2, 3, 24)
    with pytest.raises(ValueError, match="head dim 24"):
        triton_attention.launch_entropy_attention(q, k, v, lengths, 3, 1.0, True)
    q, k, v, lengths = make_inputs(1, 2, 3, 16)
    with pytest.raises(ValueError, match="share one dtype"):
        triton_attention.launch_entropy_attention(q.double(), k, v, lengths, 3, 1.0, True)


def compile_for_gpu(kernel, arch: int, dtype: str, head_dim: int, block_m: int, num_splits: int) -> dict:
    """Ahead-of-time compile one specialisation down to a cubin with triton's bundled ptxas (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastardiff.recipes import triton_attention

    ptr = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}[dtype]
    if kernel is triton_attention._entropy_attention_kernel:
        signature = {name: ptr for name in ("Q", "K", "V", "Out", "Ent")}
        signature |= {"Lengths": "*i64", "PartAcc": "*fp32", "PartStats": "*fp32", "qk_scale": "fp32"}
        signature |= {f"stride_{t}{d}": "i32" for t in "qkv" for d in ("b", "h", "m" if t == "q" else "n", "d")}
        signature |= {name: "i32" for name in ("num_heads", "num_queries", "causal_offset", "split_len")}
        constants = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=head_dim, NUM_SPLITS=num_splits,
                         NORMALIZE=True, FP32_IEEE=dtype == "float32")
    else:
        signature = {"Lengths": "*i64", "Out": ptr, "Ent": ptr, "PartAcc": "*fp32", "PartStats": "*fp32",
                     "num_heads": "i32", "num_queries": "i32"}
        constants = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=head_dim, NUM_SPLITS=num_splits,
                         NORMALIZE=False)
    signature |= {name: "constexpr" for name in constants}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2}).asm


@pytest.mark.parametrize("kernel_name, arch, dtype, head_dim, block_m, num_splits", [
    ("_entropy_attention_kernel", 90, "float16", 64, 16, 1),
    ("_entropy_attention_kernel", 80, "bfloat16", 32, 64, 4),
    ("_entropy_attention_kernel", 90, "float32", 16, 64, 1),
    ("_merge_splits_kernel", 80, "float16", 64, 16, 4),
])
def test_kernels_compile_to_cubin_for_sm80_sm90(kernel_name, arch, dtype, head_dim, block_m, num_splits):
    """No GPU here: compiling through ptxas proves the kernels are valid Triton for the GPU, not just for the
    interpreter (which accepts code the compiler rejects)."""
    from fastardiff.recipes import triton_attention

    assert not triton_attention.kernel_is_interpreted()
    asm = compile_for_gpu(getattr(triton_attention, kernel_name), arch, dtype, head_dim, block_m, num_splits)
    assert f".target sm_{arch}" in asm["ptx"]
    assert len(asm["cubin"]) > 1000


def test_kernel_arguments_never_alias(monkeypatch):
    """Functionalisation (torch.compile / AOTInductor) treats aliased kernel arguments as one value: an output
    aliasing a scratch argument would come back as the scratch. Record the launches instead of running them."""
    from fastardiff.recipes import triton_attention

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel.__name__, grid, args))

    monkeypatch.setattr(triton_attention, "wrap_triton", Recorder)
    monkeypatch.setattr(triton_attention, "kernel_is_interpreted", lambda: True)
    monkeypatch.setattr(triton_attention, "_interpreter_loop_bounds_fix", lambda: None)
    q, k, v, lengths = make_inputs(3, 5, 70, 16)
    for splits in (1, 3):
        launches.clear()
        triton_attention.launch_entropy_attention(q, k, v, lengths, 70, 0.25, True, num_splits=splits)
        expected = ["_entropy_attention_kernel"] + (["_merge_splits_kernel"] if splits > 1 else [])
        assert [name for name, _, _ in launches] == expected
        assert launches[0][1] == (3 * HEADS, 1, splits)
        for _, _, args in launches:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            assert len({id(t) for t in tensors}) == len(tensors)
            pointers = [t.untyped_storage().data_ptr() for t in tensors if t.numel()]
            assert len(set(pointers)) == len(pointers)


def test_num_splits_policy():
    from fastardiff.recipes.triton_attention import choose_num_splits

    assert choose_num_splits(16, 1, 4096, 64, sm_count=132) > 1  # decode, one sample: split the cache
    assert choose_num_splits(64 * 16, 1, 4096, 64, sm_count=132) == 1  # enough programs already
    splits = choose_num_splits(16, 256 // 64, 4096, 64, sm_count=132)  # 64 programs: split to fill the GPU
    assert splits > 1 and 64 * splits >= 132 and 4096 / splits >= 2 * 64
    assert choose_num_splits(16 * 8, 256 // 64, 4096, 64, sm_count=132) == 1
    assert choose_num_splits(16, 1, 100, 64, sm_count=132) == 1  # short cache
    assert choose_num_splits(16, 1, 4096, 64, sm_count=None) == 1  # CPU


GPU_CASES = [(b, kk, cache, d, dtype) for (b, kk, cache), d, dtype in itertools.product(
    [(1, 1, 1024), (8, 1, 1024), (3, 5, 1000), (2, 256, 1024), (4, 17, 0), (1, 256, 0)], (16, 32, 64),
    ("float16", "bfloat16", "float32"))]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}-K{}-S{}-D{}-{}".format(*c))
def test_cuda_kernel_matches_reference(case):
    from fastardiff.recipes import triton_attention

    b, kk, cache, d, dtype = case
    q, k, v, lengths = make_inputs(b, kk, cache, d, getattr(torch, dtype), device="cuda", heads=4)
    tol = FP32_TOL if dtype == "float32" else LOW_PRECISION_TOL
    for splits in (None, 1, 4):
        def run(*args, splits=splits):
            return triton_attention.launch_entropy_attention(*args, num_splits=splits)

        for name, err in max_errors(q, k, v, lengths, cache, run).items():
            assert err < tol, f"splits={splits} {name}: max abs error {err:.3g} >= {tol}"
    errors = max_errors(q, k, v, lengths, cache, torch.ops.fastardiff.entropy_attention)
    assert max(errors.values()) < tol, errors


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_cases = [tuple(c) for c in json.loads(sys.stdin.read())]
    print(json.dumps(interpreter_worker(worker_cases)))

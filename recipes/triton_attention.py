"""Fused entropy attention in Triton: attention output and per-row entropy in one pass, P never materialised.

Semantics are those of `entropy_attention_reference` (recipes/entropy_attention.py); this module only makes
them fast. Per query row the kernel keeps, over the key blocks it visits,

    m = running max of the scores s,   l = sum e^(s-m),   a = sum e^(s-m) * (s-m),   acc = sum e^(s-m) v

and finishes with out = acc / l and H = log l - a / l. This is H = m + log l - (sum e^(s-m) s) / l with the
extra accumulator kept relative to the running max (when m grows to m', a becomes
e^(m-m') (a + (m-m') l)), which avoids the cancellation of two large numbers. The kernel works in base 2
(exp2, scores pre-multiplied by log2 e) and converts to nats at the end.

Launch: grid (batch*heads, query blocks, kv splits). Each program loops over the valid cache keys of its
split (keys j < min(lengths[b], causal_offset); blocks past the sample's length are never visited) and, in
split 0, over the new keys up to the last query of its block (fully masked causal blocks are skipped). With
more than one split (decode: few query blocks, long cache) the programs write partial (m, l, a, acc) and a
second kernel merges them.

The op is `torch.ops.fastardiff.entropy_attention` (torch.library.triton_op), so torch.export keeps it as one
node and AOTInductor compiles the Triton kernels into the .pt2. On CPU tensors it runs the Triton kernel when
Triton's interpreter is on (TRITON_INTERPRET=1 before triton is imported), and the reference otherwise.
Importing this module registers the op as ENTROPY_ATTENTION_IMPLS["triton"].
"""
from __future__ import annotations

import math

import torch
from torch.library import triton_op, wrap_triton

from fastardiff.errors import MissingDependencyError

from .entropy_attention import ENTROPY_ATTENTION_IMPLS, entropy_attention_reference

try:
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - exercised only without the `kernels` extra
    raise MissingDependencyError("triton", "kernels", "the 'triton' entropy attention") from err

LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _attend_block(q, k_ptrs, v_ptrs, load_mask, valid, m, l, a, acc, qk_scale, FP32_IEEE: tl.constexpr):
    """One key block of the online softmax; s in base-2 units. Returns the updated (m, l, a, acc)."""
    k = tl.load(k_ptrs, mask=load_mask, other=0.0)
    if FP32_IEEE:  # fp32 inputs: full fp32 products (tl.dot would otherwise use tf32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))  # m starts at a finite -1e30, so m_new is always finite
    alpha = tl.exp2(m - m_new)
    shifted = s - m_new[:, None]
    p = tl.exp2(shifted)  # masked: exp2(-inf) = 0
    a = alpha * (a + (m - m_new) * l) + tl.sum(p * tl.where(valid, shifted, 0.0), 1)
    l = alpha * l + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=load_mask, other=0.0)
    if FP32_IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, a, acc


@triton.jit
def _finish_rows(Out, Ent, out_offs, ent_offs, row_mask, d_mask, rows, length, l, a, acc, NORMALIZE: tl.constexpr):
    l = tl.where(l > 0.0, l, 1.0)  # only rows past num_queries (never stored) can have l = 0
    out = acc / l[:, None]
    entropy = tl.log(l) - 0.6931471805599453 * a / l  # ln l - ln2 * a / l (a is in base-2 units)
    if NORMALIZE:
        n = (length + rows + 1).to(tl.float32)
        entropy = tl.where(n > 1.0, entropy / tl.log(tl.maximum(n, 2.0)), 0.0)
    tl.store(Out + out_offs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(Ent + ent_offs, entropy.to(Ent.dtype.element_ty), mask=row_mask)


@triton.jit
def _entropy_attention_kernel(
    Q, K, V, Lengths, Out, Ent, PartAcc, PartStats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    num_heads, num_queries, causal_offset, split_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, NORMALIZE: tl.constexpr, FP32_IEEE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    length = tl.load(Lengths + b).to(tl.int32)
    num_cached = tl.minimum(length, causal_offset)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_queries
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh + dims[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh + dims[None, :] * stride_vd

    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    a = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # cache keys of this split: every query sees all of them, so only the block tail is masked
    cache_start = split * split_len
    cache_end = tl.minimum(cache_start + split_len, num_cached)
    for start_n in range(cache_start, cache_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < cache_end
        load_mask = col_ok[:, None] & d_mask[None, :]
        m, l, a, acc = _attend_block(q, k_base + cols[:, None] * stride_kn, v_base + cols[:, None] * stride_vn,
                                     load_mask, col_ok[None, :], m, l, a, acc, qk_scale, FP32_IEEE)
    # new keys (split 0): query i sees new key c <= i; blocks past this query block's last row are skipped
    if split == 0:
        new_end = tl.minimum(num_queries, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, new_end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < new_end
            load_mask = col_ok[:, None] & d_mask[None, :]
            valid = col_ok[None, :] & (cols[None, :] <= rows[:, None])
            key_rows = causal_offset + cols[:, None]
            m, l, a, acc = _attend_block(q, k_base + key_rows * stride_kn, v_base + key_rows * stride_vn,
                                         load_mask, valid, m, l, a, acc, qk_scale, FP32_IEEE)

    if NUM_SPLITS == 1:
        out_offs = (pid_bh * num_queries + rows[:, None]) * HEAD_DIM + dims[None, :]
        _finish_rows(Out, Ent, out_offs, pid_bh * num_queries + rows, row_mask, d_mask, rows, length, l, a, acc,
                     NORMALIZE)
    else:  # partials [B*H, NUM_SPLITS, num_queries, ...], merged by _merge_splits_kernel
        part_rows = (pid_bh * NUM_SPLITS + split) * num_queries + rows
        tl.store(PartAcc + part_rows[:, None] * HEAD_DIM + dims[None, :], acc,
                 mask=row_mask[:, None] & d_mask[None, :])
        tl.store(PartStats + part_rows * 3 + 0, m, mask=row_mask)
        tl.store(PartStats + part_rows * 3 + 1, l, mask=row_mask)
        tl.store(PartStats + part_rows * 3 + 2, a, mask=row_mask)


@triton.jit
def _merge_splits_kernel(
    Lengths, Out, Ent, PartAcc, PartStats, num_heads, num_queries,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    length = tl.load(Lengths + pid_bh // num_heads).to(tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_queries
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < HEAD_DIM
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    a = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(NUM_SPLITS):
        part_rows = (pid_bh * NUM_SPLITS + split) * num_queries + rows
        m_s = tl.load(PartStats + part_rows * 3 + 0, mask=row_mask, other=-1.0e30)
        l_s = tl.load(PartStats + part_rows * 3 + 1, mask=row_mask, other=0.0)
        a_s = tl.load(PartStats + part_rows * 3 + 2, mask=row_mask, other=0.0)
        acc_s = tl.load(PartAcc + part_rows[:, None] * HEAD_DIM + dims[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        a = alpha * (a + (m - m_new) * l) + beta * (a_s + (m_s - m_new) * l_s)
        l = alpha * l + beta * l_s
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m = m_new
    out_offs = (pid_bh * num_queries + rows[:, None]) * HEAD_DIM + dims[None, :]
    _finish_rows(Out, Ent, out_offs, pid_bh * num_queries + rows, row_mask, d_mask, rows, length, l, a, acc,
                 NORMALIZE)


def _is_static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def choose_num_splits(batch_heads, query_blocks, cache_len, block_n: int = 64, sm_count: int | None = None) -> int:
    """Split the cache across programs when there are too few (batch*heads, query block) programs to fill the GPU.

    Only with concrete sizes: while torch.export/AOTInductor trace the op with symbolic sizes this returns 1,
    so no shape guard is added (the engine then runs one program per (batch*head, query block)).
    """
    if not _is_static(batch_heads, query_blocks, cache_len) or sm_count is None:
        return 1
    programs = batch_heads * query_blocks
    if programs >= sm_count or cache_len < 4 * block_n:
        return 1
    return int(max(1, min(triton.cdiv(2 * sm_count, programs), cache_len // (2 * block_n), 16)))


def kernel_is_interpreted() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 was set before triton's import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_entropy_attention_kernel, InterpretedFunction)


def _interpreter_loop_bounds_fix() -> None:
    """Triton <= 3.6's interpreter turns a loop bound into a Python int with int(array of shape (1,)), which
    numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream after 3.6). Only applied when the interpreter
    runs these kernels and this numpy refuses the conversion; it wraps triton's own patch of tl.tensor."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.ones(1, dtype=np.int32))
        return
    except TypeError:
        pass
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "fastardiff_loop_bounds_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.fastardiff_loop_bounds_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def launch_entropy_attention(q, k, v, lengths, causal_offset, scale, normalize, num_splits=None):
    """Validate, allocate and launch. q [B,H,K,Dh], k/v [B,H,T,Dh] (any strides), lengths [B] int.

    Callable directly with CPU tensors under TRITON_INTERPRET=1 (tests) or CUDA tensors; wrap_triton makes the
    launches traceable inside the triton_op and is a no-op for the interpreter.
    """
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"entropy_attention: q/k/v must share one dtype of {SUPPORTED_DTYPES}, "
                         f"got {q.dtype}/{k.dtype}/{v.dtype}")
    if not (q.device == k.device == v.device == lengths.device):
        raise ValueError(f"entropy_attention: q, k, v and lengths must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}, {lengths.device}")
    head_dim = q.shape[-1]
    if not isinstance(head_dim, int) or head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"entropy_attention: head dim {head_dim} unsupported by the Triton kernel; "
                         f"use one of {SUPPORTED_HEAD_DIMS} or the 'reference' implementation")
    if q.device.type == "cpu":
        if not kernel_is_interpreted():
            raise ValueError("entropy_attention: the Triton kernel runs on CPU tensors only under Triton's "
                             "interpreter; set TRITON_INTERPRET=1 before importing triton, or use CUDA tensors")
        _interpreter_loop_bounds_fix()
    batch, heads, num_queries, _ = q.shape
    cache_len = causal_offset
    out = torch.empty((batch, heads, num_queries, head_dim), dtype=q.dtype, device=q.device)
    entropy = torch.empty((batch, heads, num_queries), dtype=q.dtype, device=q.device)
    block_m = 16 if not _is_static(num_queries) or num_queries <= 16 else 64
    block_n = 64 if head_dim <= 64 else 32
    if num_splits is None:
        num_splits = 1
        # (fake CUDA tensors can be traced on a machine without CUDA: no split there)
        if q.device.type == "cuda" and torch.cuda.is_available() and _is_static(batch, heads, num_queries, cache_len):
            sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = choose_num_splits(batch * heads, triton.cdiv(num_queries, block_m), cache_len, block_n,
                                           sm_count)
    split_len = triton.cdiv(triton.cdiv(cache_len, num_splits), block_n) * block_n if num_splits > 1 else cache_len
    if num_splits > 1:
        part_acc = torch.empty((batch * heads, num_splits, num_queries, head_dim), dtype=torch.float32, device=q.device)
        part_stats = torch.empty((batch * heads, num_splits, num_queries, 3), dtype=torch.float32, device=q.device)
    else:  # never touched when NUM_SPLITS == 1; own (empty) tensors, so that no kernel argument aliases another
        # (functionalisation under torch.compile/AOTInductor treats aliased mutable arguments as one value)
        part_acc = torch.empty(0, dtype=torch.float32, device=q.device)
        part_stats = torch.empty(0, dtype=torch.float32, device=q.device)
    grid = (batch * heads, triton.cdiv(num_queries, block_m), num_splits)
    wrap_triton(_entropy_attention_kernel)[grid](
        q, k, v, lengths, out, entropy, part_acc, part_stats,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        heads, num_queries, causal_offset, split_len, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim,
        NUM_SPLITS=num_splits, NORMALIZE=normalize, FP32_IEEE=q.dtype == torch.float32, num_warps=4,
        num_stages=2)
    if num_splits > 1:
        wrap_triton(_merge_splits_kernel)[(batch * heads, triton.cdiv(num_queries, block_m))](
            lengths, out, entropy, part_acc, part_stats, heads, num_queries,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=head_dim, NUM_SPLITS=num_splits, NORMALIZE=normalize,
            num_warps=4)
    return out, entropy




@triton_op("fastardiff::entropy_attention", mutates_args=())
def entropy_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                         causal_offset: int, scale: float, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA: the Triton kernels. CPU: the Triton kernels under the interpreter, else the reference (this is also
    what AOTInductor compiles for a CPU .pt2, since it traces this body)."""
    if q.device.type == "cpu" and not kernel_is_interpreted():
        return entropy_attention_reference(q, k, v, lengths, causal_offset, scale, normalize)
    return launch_entropy_attention(q, k, v, lengths, causal_offset, scale, normalize)


@entropy_attention_op.register_fake
def _entropy_attention_fake(q, k, v, lengths, causal_offset, scale, normalize):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1])


def entropy_attention_triton(q, k, v, lengths, causal_offset: int, scale: float, normalize: bool = True):
    """Same signature and results as entropy_attention_reference, through the fused op."""
    return torch.ops.fastardiff.entropy_attention(q, k, v, lengths, causal_offset, float(scale), bool(normalize))


ENTROPY_ATTENTION_IMPLS["triton"] = entropy_attention_triton

// Fused entropy attention: attention output and per-row entropy in one pass over the keys, fp32 accumulation,
// fp32/fp16/bf16 storage. The per-row math lives in entropy_attention_math.cuh (shared with a CPU test).
//
// Work split: a block of kWarps warps handles kWarps consecutive query rows of one (batch, head). Keys and values
// stream through shared memory in tiles of 32; lane t scores key t of the tile against its warp's query, the warp
// reduces the tile's max / weight sum / entropy sum with shuffles, and each lane owns head_dim / 32 output
// channels. Only the tiles a row can see are visited: the valid cache prefix and the new tokens up to the last
// row of the block, so the cost follows the sample's length, not the cache capacity. With in_buffer the new tokens
// start at the row's length (fa_row_offset), so the two ranges are [0, length) and [length, length + row_last].
#include "entropy_attention_kernel.h"
#include "entropy_attention_math.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastardiff {
namespace {

constexpr int kWarps = 4;
constexpr int kTile = 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ long long load_length(const void* lengths, int lengths_dtype, int b) {
    return lengths_dtype == FASTARDIFF_INT64 ? static_cast<const long long*>(lengths)[b]
                                             : static_cast<const int*>(lengths)[b];
}

// Shared memory: k tile [32][Dh + 1] (padded: lane t reads row t, so rows must not share banks),
// v tile [32][Dh], one query row per warp [kWarps][Dh]; all fp32.
__host__ __device__ inline size_t smem_bytes(int head_dim) {
    return sizeof(float) * (size_t)(kTile * (head_dim + 1) + kTile * head_dim + kWarps * head_dim);
}

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kWarps * 32)
entropy_attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const void* __restrict__ lengths, int lengths_dtype, int heads, int num_q, int num_k,
                         int head_dim, float scale, int normalize, int in_buffer, T* __restrict__ out,
                         T* __restrict__ entropy) {
    extern __shared__ float smem[];
    float* ks = smem;                                // [kTile][head_dim + 1]
    float* vs = ks + kTile * (head_dim + 1);         // [kTile][head_dim]
    float* qs = vs + kTile * head_dim;               // [kWarps][head_dim]

    const int row_blocks = (num_q + kWarps - 1) / kWarps;
    const int bh = blockIdx.x / row_blocks;          // b * heads + h
    const int b = bh / heads;
    const int row0 = (blockIdx.x % row_blocks) * kWarps;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i = row0 + warp;                       // this warp's query row
    const bool active = i < num_q;
    const int row_last = min(row0 + kWarps, num_q) - 1;
    const int length = fa_clamp_length(load_length(lengths, lengths_dtype, b), num_k, num_q);
    const int causal_offset = fa_row_offset(length, num_k, num_q, in_buffer);  // per row when in_buffer

    const size_t q_base = ((size_t)bh * num_q) * head_dim;
    const size_t kv_base = ((size_t)bh * num_k) * head_dim;
    for (int idx = threadIdx.x; idx < kWarps * head_dim; idx += blockDim.x) {
        int r = idx / head_dim, d = idx % head_dim;
        qs[idx] = row0 + r < num_q ? to_float(q[q_base + (size_t)(row0 + r) * head_dim + d]) * scale : 0.0f;
    }

    FaRowState st = fa_row_init();
    float o[kPerLane];
#pragma unroll
    for (int r = 0; r < kPerLane; ++r) o[r] = 0.0f;

    // Two key ranges: the valid cache prefix [0, length) and the new tokens [offset, offset + row_last].
    for (int range = 0; range < 2; ++range) {
        int lo, hi;
        fa_key_range(range, length, causal_offset, row_last, &lo, &hi);
        for (int j0 = lo; j0 < hi; j0 += kTile) {
            __syncthreads();  // previous tile fully consumed (and qs written, on the first pass)
            for (int idx = threadIdx.x; idx < kTile * head_dim; idx += blockDim.x) {
                int t = idx / head_dim, d = idx % head_dim;
                int j = j0 + t;
                bool in = j < hi;
                ks[t * (head_dim + 1) + d] = in ? to_float(k[kv_base + (size_t)j * head_dim + d]) : 0.0f;
                vs[t * head_dim + d] = in ? to_float(v[kv_base + (size_t)j * head_dim + d]) : 0.0f;
            }
            __syncthreads();
            if (!active) continue;
            const int j = j0 + lane;
            const bool visible = j < hi && fa_key_visible(j, i, length, causal_offset);
            float s = fa_neg_inf();
            if (visible) {
                const float* qrow = qs + warp * head_dim;
                const float* krow = ks + lane * (head_dim + 1);
                float dot = 0.0f;
                for (int d = 0; d < head_dim; ++d) dot += qrow[d] * krow[d];
                s = dot;  // the scale is folded into qs
            }
            const float m_new = fa_next_max(st.m, warp_max(s));
            const float w = fa_weight(s, visible, m_new);
            const float tile_l = warp_sum(w);
            const float tile_acc = warp_sum(fa_entropy_term(w, s, visible, m_new));
            const float alpha = fa_row_update(st, m_new, tile_l, tile_acc);
#pragma unroll
            for (int r = 0; r < kPerLane; ++r) o[r] *= alpha;
            for (int t = 0; t < kTile; ++t) {
                const float wt = __shfl_sync(0xffffffffu, w, t);
                if (wt == 0.0f) continue;  // uniform across the warp: wt is the same broadcast value
                const float* vrow = vs + t * head_dim;
#pragma unroll
                for (int r = 0; r < kPerLane; ++r) {
                    const int d = lane + 32 * r;
                    if (d < head_dim) o[r] += wt * vrow[d];
                }
            }
        }
    }
    if (!active) return;
    const float inv_l = fa_output_scale(st);
    const size_t row = (size_t)bh * num_q + i;
#pragma unroll
    for (int r = 0; r < kPerLane; ++r) {
        const int d = lane + 32 * r;
        if (d < head_dim) out[row * head_dim + d] = from_float<T>(o[r] * inv_l);
    }
    if (lane == 0) {
        const int n = fa_attended_keys(i, length, causal_offset);
        entropy[row] = from_float<T>(fa_row_entropy(st, n, normalize != 0));
    }
}

template <typename T, int kPerLane>
int launch_typed(int lengths_dtype, int64_t batch, int64_t heads, int64_t num_q, int64_t num_k, int64_t head_dim,
                 float scale, int normalize, int in_buffer, const void* q, const void* k, const void* v,
                 const void* lengths, void* out, void* entropy, cudaStream_t stream) {
    auto kernel = entropy_attention_kernel<T, kPerLane>;
    const size_t smem = smem_bytes((int)head_dim);
    if (smem > 48 * 1024 &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
        (void)cudaGetLastError();  // consume the error: it must not surface at the next, unrelated CUDA call
        return FASTARDIFF_CUDA_ERROR;
    }
    const int64_t row_blocks = (num_q + kWarps - 1) / kWarps;
    const dim3 grid((unsigned)(batch * heads * row_blocks));
    kernel<<<grid, kWarps * 32, smem, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), lengths, lengths_dtype,
        (int)heads, (int)num_q, (int)num_k, (int)head_dim, scale, normalize, in_buffer, static_cast<T*>(out),
        static_cast<T*>(entropy));
    // cudaGetLastError (not Peek): reads and clears this launch's error, so a failed launch is reported here,
    // once, and not again by whatever CUDA call TensorRT or torch makes next on this thread
    return cudaGetLastError() == cudaSuccess ? FASTARDIFF_OK : FASTARDIFF_CUDA_ERROR;
}

template <typename T>
int launch_dtype(int lengths_dtype, int64_t batch, int64_t heads, int64_t num_q, int64_t num_k, int64_t head_dim,
                 float scale, int normalize, int in_buffer, const void* q, const void* k, const void* v,
                 const void* lengths, void* out, void* entropy, cudaStream_t stream) {
    if (head_dim <= 32)
        return launch_typed<T, 1>(lengths_dtype, batch, heads, num_q, num_k, head_dim, scale, normalize, in_buffer,
                                  q, k, v, lengths, out, entropy, stream);
    if (head_dim <= 64)
        return launch_typed<T, 2>(lengths_dtype, batch, heads, num_q, num_k, head_dim, scale, normalize, in_buffer,
                                  q, k, v, lengths, out, entropy, stream);
    if (head_dim <= 128)
        return launch_typed<T, 4>(lengths_dtype, batch, heads, num_q, num_k, head_dim, scale, normalize, in_buffer,
                                  q, k, v, lengths, out, entropy, stream);
    return launch_typed<T, 8>(lengths_dtype, batch, heads, num_q, num_k, head_dim, scale, normalize, in_buffer, q,
                              k, v, lengths, out, entropy, stream);
}

}  // namespace
}  // namespace fastardiff

extern "C" int fastardiff_entropy_attention_launch(int dtype, int lengths_dtype, int64_t batch, int64_t heads,
                                                   int64_t num_queries, int64_t num_keys, int64_t head_dim,
                                                   float scale, int normalize, int in_buffer, const void* q,
                                                   const void* k, const void* v, const void* lengths, void* out,
                                                   void* entropy, fastardiff_stream_t stream) {
    using namespace fastardiff;
    if (batch < 0 || heads < 0 || num_queries < 0 || num_keys < num_queries || head_dim < 1 ||
        head_dim > FASTARDIFF_MAX_HEAD_DIM || (in_buffer != 0 && in_buffer != 1) ||
        (lengths_dtype != FASTARDIFF_INT32 && lengths_dtype != FASTARDIFF_INT64))
        return FASTARDIFF_BAD_ARGUMENT;
    if (batch == 0 || heads == 0 || num_queries == 0) return FASTARDIFF_OK;
    if (batch * heads * ((num_queries + kWarps - 1) / kWarps) > 0x7fffffffLL || num_keys > 0x7fffffffLL)
        return FASTARDIFF_BAD_ARGUMENT;
    if (!q || !k || !v || !lengths || !out || !entropy) return FASTARDIFF_BAD_ARGUMENT;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case FASTARDIFF_FLOAT32:
            return launch_dtype<float>(lengths_dtype, batch, heads, num_queries, num_keys, head_dim, scale,
                                       normalize, in_buffer, q, k, v, lengths, out, entropy, s);
        case FASTARDIFF_FLOAT16:
            return launch_dtype<__half>(lengths_dtype, batch, heads, num_queries, num_keys, head_dim, scale,
                                        normalize, in_buffer, q, k, v, lengths, out, entropy, s);
        case FASTARDIFF_BFLOAT16:
            return launch_dtype<__nv_bfloat16>(lengths_dtype, batch, heads, num_queries, num_keys, head_dim, scale,
                                               normalize, in_buffer, q, k, v, lengths, out, entropy, s);
        default:
            return FASTARDIFF_BAD_ARGUMENT;
    }
}

extern "C" const char* fastardiff_status_string(int status) {
    switch (status) {
        case FASTARDIFF_OK: return "ok";
        case FASTARDIFF_BAD_ARGUMENT:
            return "bad argument (dtype, lengths dtype, head dim <= 256, in_buffer 0/1, or sizes)";
        case FASTARDIFF_CUDA_ERROR: return "CUDA launch error";
        default: return "unknown status";
    }
}

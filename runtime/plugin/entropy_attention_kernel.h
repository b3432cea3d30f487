// C ABI of the fused entropy attention CUDA kernel (runtime/plugin/entropy_attention_kernel.cu).
//
// Layout (contiguous, row-major):
//   q        [B, H, K, Dh]   the K new queries of each sample
//   k, v     [B, H, T, Dh]   in_buffer = 0: T = causal_offset + K keys, the cache (first causal_offset = T - K)
//                            then the new tokens; row b's query i sees j < lengths[b] and T - K <= j <= T - K + i.
//                            in_buffer = 1: a cache buffer holding the new tokens at positions lengths[b] ..
//                            lengths[b] + K - 1; row b's query i sees j <= lengths[b] + i.
//   lengths  [B]             valid cache entries per sample, int32 or int64 (lengths_dtype), clamped to [0, T - K]
//   out      [B, H, K, Dh]   attention output, same dtype as q
//   entropy  [B, H, K]       row entropy (normalised by log n_i, n_i = lengths[b] + i + 1, when normalize != 0),
//                            same dtype as q
// Accumulation is fp32 for every storage dtype. Semantics: recipes/entropy_attention.py.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* fastardiff_stream_t;  // == cudaStream_t

enum FastardiffDtype {
    FASTARDIFF_FLOAT32 = 0,
    FASTARDIFF_FLOAT16 = 1,
    FASTARDIFF_BFLOAT16 = 2,
};

enum FastardiffIndexType {
    FASTARDIFF_INT32 = 0,
    FASTARDIFF_INT64 = 1,
};

enum FastardiffStatus {
    FASTARDIFF_OK = 0,
    FASTARDIFF_BAD_ARGUMENT = 1,   // unsupported dtype, head dim, in_buffer not 0/1, or negative/zero sizes
    FASTARDIFF_CUDA_ERROR = 2,     // the launch failed (the CUDA error was read and cleared)
};

// Largest head dim the kernel handles (keys/values are staged in shared memory, 32 keys per tile).
#define FASTARDIFF_MAX_HEAD_DIM 256

// Enqueue the kernel on `stream`; returns a FastardiffStatus. K = 0 or B = 0 is a no-op.
int fastardiff_entropy_attention_launch(int dtype, int lengths_dtype, int64_t batch, int64_t heads,
                                        int64_t num_queries, int64_t num_keys, int64_t head_dim,
                                        float scale, int normalize, int in_buffer, const void* q, const void* k,
                                        const void* v, const void* lengths, void* out, void* entropy,
                                        fastardiff_stream_t stream);

// Human-readable name of a FastardiffStatus (static string).
const char* fastardiff_status_string(int status);

#ifdef __cplusplus
}
#endif

// Per-row math of fused entropy attention, shared by the CUDA kernel and a CPU test driver.
//
// One query row i of sample b sees cache keys j < min(length, causal_offset) and the new keys
// causal_offset .. causal_offset + i (causal), i.e. n_i = length + i + 1 keys (recipes/entropy_attention.py).
// causal_offset is num_k - num_q, or the row's clamped length in the in_buffer layout (fa_row_offset).
// Over the visible scores s_j the row keeps, online and without materialising probabilities:
//   m   = max_j s_j                 (running max)
//   l   = sum_j e^{s_j - m}         (softmax denominator relative to m)
//   acc = sum_j e^{s_j - m} * (s_j - m)   (entropy accumulator, kept relative to the running max)
// When a new tile of scores raises the max from m to m', the sums are rescaled by alpha = e^{m - m'} (the output
// accumulator sum_j e^{s_j - m} v_j too), and the entropy accumulator also moves its origin:
//   acc' = alpha * (acc + (m - m') * l) + sum_tile e^{s - m'} (s - m').
// At the end H = log l - acc / l (= -sum p log p, with p = e^{s - m} / l) and, with normalisation, H / log n_i
// (0 when n_i = 1), as in drift-ar Eq. 4.
// This is the design's accumulator sum_j e^{s_j - m} s_j minus m*l, so H = m + log l - sum e^{s-m} s / l is the same
// number; storing it relative to m avoids the cancellation of m against sum e^{s-m} s / l, which in fp32 costs
// ~1e-4 absolute when scores reach ~100 (tests/test_plugin_math.py has such a case).
//
// Everything here is plain C++ marked __host__ __device__: nvcc compiles it into the kernel, and the system
// C++ compiler compiles it for the CPU test (tests/test_plugin_math.py), where the markers are defined away.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define FA_HOST_DEVICE __host__ __device__
#else
#define FA_HOST_DEVICE
#endif

namespace fastardiff {

// -inf without relying on <limits> (usable in device code on every toolkit).
FA_HOST_DEVICE inline float fa_neg_inf() { return -INFINITY; }

// True when query row i (0-based among the K new tokens) of a sample with `length` valid cache entries may
// attend key j of the concatenated [cache (causal_offset entries), new tokens (K entries)] key axis.
FA_HOST_DEVICE inline bool fa_key_visible(int j, int i, int length, int causal_offset) {
    if (j < causal_offset) return j < length;
    return j - causal_offset <= i;
}

// A row's length clamped to the cache capacity num_k - num_q (both layouts).
FA_HOST_DEVICE inline int fa_clamp_length(long long length, int num_k, int num_q) {
    const int cache = num_k - num_q;
    return length < 0 ? 0 : (length > cache ? cache : (int)length);
}

// Where a row's new keys start. in_buffer = 0: keys are [cache prefix (num_k - num_q), new tokens], so the offset
// is num_k - num_q for every row. in_buffer = 1: keys are a cache buffer holding the new tokens at the row's
// (clamped) length, so the offset is that length and row i sees keys j <= length + i.
FA_HOST_DEVICE inline int fa_row_offset(int clamped_length, int num_k, int num_q, int in_buffer) {
    return in_buffer ? clamped_length : num_k - num_q;
}

// The key interval [*lo, *hi) a block visits in range 0 (valid cache keys) or 1 (new keys up to row_last).
FA_HOST_DEVICE inline void fa_key_range(int range, int clamped_length, int causal_offset, int row_last, int* lo,
                                        int* hi) {
    *lo = range == 0 ? 0 : causal_offset;
    *hi = range == 0 ? clamped_length : causal_offset + row_last + 1;
}

// n_i: the number of keys row i attends to (length is clamped to the cache size the keys actually hold).
FA_HOST_DEVICE inline int fa_attended_keys(int i, int length, int causal_offset) {
    int cached = length < causal_offset ? length : causal_offset;
    if (cached < 0) cached = 0;
    return cached + i + 1;
}

struct FaRowState {
    float m;    // running max of the visible scores seen so far (-inf before the first)
    float l;    // sum of e^{s - m}
    float acc;  // sum of e^{s - m} * (s - m)
};

FA_HOST_DEVICE inline FaRowState fa_row_init() {
    FaRowState st;
    st.m = fa_neg_inf();
    st.l = 0.0f;
    st.acc = 0.0f;
    return st;
}

// The max after a tile whose largest visible score is tile_max (-inf when the tile has no visible key).
FA_HOST_DEVICE inline float fa_next_max(float m, float tile_max) { return tile_max > m ? tile_max : m; }

// Factor that moves sums taken relative to m onto m_new (>= m). 1 while nothing has been seen (m = m_new = -inf),
// so an empty prefix never turns into NaN.
FA_HOST_DEVICE inline float fa_rescale(float m, float m_new) {
    if (m == m_new) return 1.0f;
    return expf(m - m_new);  // m = -inf, m_new finite -> 0
}

// Unnormalised probability weight of one score relative to the current max; 0 for masked keys.
FA_HOST_DEVICE inline float fa_weight(float s, bool visible, float m_new) {
    if (!visible || m_new == fa_neg_inf()) return 0.0f;
    return expf(s - m_new);
}

// One key's contribution to the entropy accumulator: w * (s - m_new), 0 for masked keys (never 0 * inf).
FA_HOST_DEVICE inline float fa_entropy_term(float w, float s, bool visible, float m_new) {
    return (visible && w > 0.0f) ? w * (s - m_new) : 0.0f;
}

// Moves an accumulator taken relative to m (with weight sum l) onto m_new, before scaling by alpha.
FA_HOST_DEVICE inline float fa_shift_acc(float acc, float l, float m, float m_new) {
    return l > 0.0f ? acc + (m - m_new) * l : 0.0f;
}

// Fold one tile into the row state: the caller has computed m_new = fa_next_max(st.m, tile_max),
// tile_l = sum_t fa_weight(s_t, vis_t, m_new) and tile_acc = sum_t fa_entropy_term(w_t, s_t, vis_t, m_new).
// Returns alpha, the factor the caller applies to its output accumulator before adding sum_t w_t v_t.
FA_HOST_DEVICE inline float fa_row_update(FaRowState& st, float m_new, float tile_l, float tile_acc) {
    float alpha = fa_rescale(st.m, m_new);
    st.acc = alpha * fa_shift_acc(st.acc, st.l, st.m, m_new) + tile_acc;
    st.l = st.l * alpha + tile_l;
    st.m = m_new;
    return alpha;
}

// Merge two partial states (e.g. two halves of the key axis processed separately). Returns the merged state;
// alpha_a / alpha_b receive the factors for the two partial output accumulators.
FA_HOST_DEVICE inline FaRowState fa_row_merge(FaRowState a, FaRowState b, float* alpha_a, float* alpha_b) {
    FaRowState r;
    r.m = fa_next_max(a.m, b.m);
    float fa = fa_rescale(a.m, r.m);
    float fb = fa_rescale(b.m, r.m);
    if (a.l == 0.0f) fa = 0.0f;
    if (b.l == 0.0f) fb = 0.0f;
    r.acc = fa * fa_shift_acc(a.acc, a.l, a.m, r.m) + fb * fa_shift_acc(b.acc, b.l, b.m, r.m);
    r.l = a.l * fa + b.l * fb;
    *alpha_a = fa;
    *alpha_b = fb;
    return r;
}

// 1 / l, the factor that turns the output accumulator into the attention output (0 for an empty row).
FA_HOST_DEVICE inline float fa_output_scale(const FaRowState& st) { return st.l > 0.0f ? 1.0f / st.l : 0.0f; }

// Row entropy H = log l - acc / l, optionally divided by log n (0 when n <= 1). Rounding can leave H a few
// ulps below 0 for a one-hot row; it is clamped to 0, the true lower bound.
FA_HOST_DEVICE inline float fa_row_entropy(const FaRowState& st, int attended, bool normalize) {
    if (!(st.l > 0.0f)) return 0.0f;
    float h = logf(st.l) - st.acc / st.l;
    if (h < 0.0f) h = 0.0f;
    if (!normalize) return h;
    if (attended <= 1) return 0.0f;
    return h / logf((float)attended);
}

}  // namespace fastardiff

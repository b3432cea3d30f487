// CPU driver for runtime/plugin/entropy_attention_math.cuh, compiled by tests/test_plugin_math.py with the
// system C++ compiler. It replays the CUDA kernel's loop structure on the host (cache range then new-token range,
// tiles of `tile` keys, online max/sum/entropy updates with rescaling) using the shared __host__ __device__ math,
// plus a split-and-merge pass that exercises fa_row_merge.
//
// stdin:  B H K T Dh scale normalize tile, then lengths[B], q[B*H*K*Dh], k[B*H*T*Dh], v[B*H*T*Dh]
// stdout: out[B*H*K*Dh], entropy[B*H*K], entropy_merged[B*H*K], out_merged[B*H*K*Dh]
#include <cstdio>
#include <vector>

#include "entropy_attention_math.cuh"

using namespace fastardiff;

struct Partial {
    FaRowState st;
    std::vector<float> o;
};

// Online pass over keys [lo, hi) of row i in tiles, exactly as one warp of the kernel does it.
static void run_range(Partial& p, int lo, int hi, int tile, int i, int length, int offset, const float* q,
                      const float* k, const float* v, int dh, float scale) {
    for (int j0 = lo; j0 < hi; j0 += tile) {
        std::vector<float> s(tile);
        std::vector<bool> vis(tile);
        float tile_max = fa_neg_inf();
        for (int t = 0; t < tile; ++t) {
            int j = j0 + t;
            vis[t] = j < hi && fa_key_visible(j, i, length, offset);
            s[t] = fa_neg_inf();
            if (vis[t]) {
                float dot = 0.0f;
                for (int d = 0; d < dh; ++d) dot += q[d] * scale * k[(size_t)j * dh + d];
                s[t] = dot;
                if (dot > tile_max) tile_max = dot;
            }
        }
        float m_new = fa_next_max(p.st.m, tile_max);
        float tile_l = 0.0f, tile_acc = 0.0f;
        std::vector<float> w(tile);
        for (int t = 0; t < tile; ++t) {
            w[t] = fa_weight(s[t], vis[t], m_new);
            tile_l += w[t];
            tile_acc += fa_entropy_term(w[t], s[t], vis[t], m_new);
        }
        float alpha = fa_row_update(p.st, m_new, tile_l, tile_acc);
        for (int d = 0; d < dh; ++d) p.o[d] *= alpha;
        for (int t = 0; t < tile; ++t)
            if (w[t] != 0.0f)
                for (int d = 0; d < dh; ++d) p.o[d] += w[t] * v[(size_t)(j0 + t) * dh + d];
    }
}

int main() {
    int B, H, K, T, dh, normalize, tile;
    float scale;
    if (std::scanf("%d %d %d %d %d %f %d %d", &B, &H, &K, &T, &dh, &scale, &normalize, &tile) != 8) return 2;
    std::vector<long long> lengths(B);
    for (auto& x : lengths)
        if (std::scanf("%lld", &x) != 1) return 2;
    auto read = [](std::vector<float>& a) {
        for (auto& x : a)
            if (std::scanf("%f", &x) != 1) return false;
        return true;
    };
    std::vector<float> q((size_t)B * H * K * dh), k((size_t)B * H * T * dh), v((size_t)B * H * T * dh);
    if (!read(q) || !read(k) || !read(v)) return 2;
    const int offset = T - K;
    std::vector<float> out(q.size()), ent((size_t)B * H * K), ent_m(ent.size()), out_m(q.size());
    for (int b = 0; b < B; ++b) {
        int length = (int)lengths[b];
        length = length < 0 ? 0 : (length > offset ? offset : length);
        for (int h = 0; h < H; ++h) {
            size_t bh = (size_t)b * H + h;
            const float* kb = &k[bh * T * dh];
            const float* vb = &v[bh * T * dh];
            for (int i = 0; i < K; ++i) {
                const float* qi = &q[(bh * K + i) * dh];
                size_t row = bh * K + i;
                int n = fa_attended_keys(i, length, offset);
                // the kernel's order: valid cache prefix, then new tokens up to row i
                Partial p{fa_row_init(), std::vector<float>(dh, 0.0f)};
                run_range(p, 0, length, tile, i, length, offset, qi, kb, vb, dh, scale);
                run_range(p, offset, offset + i + 1, tile, i, length, offset, qi, kb, vb, dh, scale);
                float inv = fa_output_scale(p.st);
                for (int d = 0; d < dh; ++d) out[row * dh + d] = p.o[d] * inv;
                ent[row] = fa_row_entropy(p.st, n, normalize != 0);
                // split the whole key axis in two halves (each half masked by fa_key_visible), merge them
                Partial a{fa_row_init(), std::vector<float>(dh, 0.0f)}, c{fa_row_init(), std::vector<float>(dh, 0.0f)};
                run_range(a, 0, T / 2, tile, i, length, offset, qi, kb, vb, dh, scale);
                run_range(c, T / 2, T, tile, i, length, offset, qi, kb, vb, dh, scale);
                float fa, fc;
                FaRowState merged = fa_row_merge(a.st, c.st, &fa, &fc);
                float inv_m = fa_output_scale(merged);
                for (int d = 0; d < dh; ++d) out_m[row * dh + d] = (a.o[d] * fa + c.o[d] * fc) * inv_m;
                ent_m[row] = fa_row_entropy(merged, n, normalize != 0);
            }
        }
    }
    for (float x : out) std::printf("%.9g\n", x);
    for (float x : ent) std::printf("%.9g\n", x);
    for (float x : ent_m) std::printf("%.9g\n", x);
    for (float x : out_m) std::printf("%.9g\n", x);
    return 0;
}

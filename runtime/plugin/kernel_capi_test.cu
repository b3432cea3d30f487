// GPU test of the C ABI launcher against a naive double-precision host reference (materialised softmax).
// Built by CMakeLists.txt as `fastardiff_kernel_test` (ctest runs it); needs a CUDA GPU, no TensorRT.
// Cases: fp32/fp16/bf16, int32/int64 lengths, K in {1, 5, 17, 256}, cache up to 1024 with ragged lengths,
// head dims 16/64/128, both key layouts (in_buffer 0: [cache, new tokens]; 1: a buffer holding the new tokens at
// each row's length, with one out-of-range length to check the clamp). Exit code = number of failing cases.
#include "entropy_attention_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

struct Case {
    int dtype, lengths_dtype, B, H, K, S, Dh, normalize, in_buffer;  // S: cache capacity, T = S + K keys
};

template <typename T> T cast_from(float x);
template <> float cast_from<float>(float x) { return x; }
template <> __half cast_from<__half>(float x) { return __float2half(x); }
template <> __nv_bfloat16 cast_from<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
float cast_to(float x) { return x; }
float cast_to(__half x) { return __half2float(x); }
float cast_to(__nv_bfloat16 x) { return __bfloat162float(x); }

// Key j visible to query i of a row with `len` (clamped) valid cache entries, in either layout.
bool visible(const Case& c, int j, int i, long long len) {
    if (c.in_buffer) return j <= len + i;
    return j < c.S ? j < len : j - c.S <= i;
}

// naive reference on the values as stored (after rounding to T), in double
void reference(const Case& c, const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
               const std::vector<long long>& len, float scale, std::vector<double>& out, std::vector<double>& ent) {
    const int T = c.S + c.K;
    for (int b = 0; b < c.B; ++b)
        for (int h = 0; h < c.H; ++h)
            for (int i = 0; i < c.K; ++i) {
                const long long lb = std::min<long long>(std::max<long long>(len[b], 0), c.S);  // the kernel's clamp
                size_t bh = (size_t)b * c.H + h, row = bh * c.K + i;
                std::vector<double> s(T, -INFINITY);
                double m = -INFINITY;
                for (int j = 0; j < T; ++j) {
                    if (!visible(c, j, i, lb)) continue;
                    double d = 0;
                    for (int x = 0; x < c.Dh; ++x) d += (double)q[row * c.Dh + x] * k[(bh * T + j) * c.Dh + x];
                    s[j] = d * scale;
                    m = std::max(m, s[j]);
                }
                double l = 0, h_acc = 0;
                for (int j = 0; j < T; ++j) if (s[j] > -INFINITY) l += std::exp(s[j] - m);
                for (int x = 0; x < c.Dh; ++x) out[row * c.Dh + x] = 0;
                for (int j = 0; j < T; ++j) {
                    if (!(s[j] > -INFINITY)) continue;
                    double p = std::exp(s[j] - m) / l;
                    if (p > 0) h_acc -= p * std::log(p);
                    for (int x = 0; x < c.Dh; ++x) out[row * c.Dh + x] += p * v[(bh * T + j) * c.Dh + x];
                }
                double n = (double)lb + i + 1;
                ent[row] = c.normalize ? (n > 1 ? h_acc / std::log(n) : 0.0) : h_acc;
            }
}

template <typename T>
int run_case(const Case& c, std::mt19937& rng) {
    const int T_ = c.S + c.K;
    const size_t nq = (size_t)c.B * c.H * c.K * c.Dh, nk = (size_t)c.B * c.H * T_ * c.Dh;
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<T> hq(nq), hk(nk), hv(nk);
    std::vector<float> fq(nq), fk(nk), fv(nk);
    for (size_t i = 0; i < nq; ++i) { hq[i] = cast_from<T>(normal(rng) * 2.f); fq[i] = cast_to(hq[i]); }
    for (size_t i = 0; i < nk; ++i) { hk[i] = cast_from<T>(normal(rng) * 2.f); fk[i] = cast_to(hk[i]); }
    for (size_t i = 0; i < nk; ++i) { hv[i] = cast_from<T>(normal(rng)); fv[i] = cast_to(hv[i]); }
    std::vector<long long> len(c.B);
    std::vector<int> len32(c.B);
    for (int b = 0; b < c.B; ++b) {
        len[b] = b == 0 ? c.S : (long long)(rng() % (unsigned)(c.S + 1));
        if (c.in_buffer && b == 1) len[b] = c.S + 7;  // clamped to S by the kernel
        len32[b] = (int)len[b];
    }
    const float scale = 1.0f / std::sqrt((float)c.Dh);
    T *dq, *dk, *dv, *dout, *dent;
    void* dlen;
    cudaMalloc(&dq, nq * sizeof(T));
    cudaMalloc(&dk, nk * sizeof(T));
    cudaMalloc(&dv, nk * sizeof(T));
    cudaMalloc(&dout, nq * sizeof(T));
    cudaMalloc(&dent, nq / c.Dh * sizeof(T));
    cudaMalloc(&dlen, c.B * sizeof(long long));
    cudaMemcpy(dq, hq.data(), nq * sizeof(T), cudaMemcpyHostToDevice);
    cudaMemcpy(dk, hk.data(), nk * sizeof(T), cudaMemcpyHostToDevice);
    cudaMemcpy(dv, hv.data(), nk * sizeof(T), cudaMemcpyHostToDevice);
    if (c.lengths_dtype == FASTARDIFF_INT64) cudaMemcpy(dlen, len.data(), c.B * 8, cudaMemcpyHostToDevice);
    else cudaMemcpy(dlen, len32.data(), c.B * 4, cudaMemcpyHostToDevice);
    int status = fastardiff_entropy_attention_launch(c.dtype, c.lengths_dtype, c.B, c.H, c.K, T_, c.Dh, scale,
                                                     c.normalize, c.in_buffer, dq, dk, dv, dlen, dout, dent,
                                                     nullptr);
    cudaError_t err = cudaDeviceSynchronize();
    std::vector<T> hout(nq), hent(nq / c.Dh);
    cudaMemcpy(hout.data(), dout, nq * sizeof(T), cudaMemcpyDeviceToHost);
    cudaMemcpy(hent.data(), dent, hent.size() * sizeof(T), cudaMemcpyDeviceToHost);
    cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dout); cudaFree(dent); cudaFree(dlen);
    if (status != FASTARDIFF_OK || err != cudaSuccess) {
        std::printf("FAIL launch status=%s cuda=%s\n", fastardiff_status_string(status), cudaGetErrorString(err));
        return 1;
    }
    std::vector<double> rout(nq), rent(hent.size());
    reference(c, fq, fk, fv, len, scale, rout, rent);
    double err_out = 0, err_ent = 0;
    for (size_t i = 0; i < nq; ++i) err_out = std::max(err_out, std::fabs(cast_to(hout[i]) - rout[i]));
    for (size_t i = 0; i < rent.size(); ++i) err_ent = std::max(err_ent, std::fabs(cast_to(hent[i]) - rent[i]));
    const double tol = c.dtype == FASTARDIFF_FLOAT32 ? 1e-4 : 1e-2 * (c.dtype == FASTARDIFF_BFLOAT16 ? 4 : 1);
    const bool ok = err_out <= tol && err_ent <= tol;
    std::printf("%s dtype=%d len64=%d B=%d H=%d K=%d S=%d Dh=%d norm=%d buf=%d max|out err|=%.3g max|H err|=%.3g\n",
                ok ? "ok  " : "FAIL", c.dtype, c.lengths_dtype, c.B, c.H, c.K, c.S, c.Dh, c.normalize, c.in_buffer,
                err_out, err_ent);
    return ok ? 0 : 1;
}

}  // namespace

int main() {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::printf("no CUDA device: nothing to test\n");
        return 77;  // ctest SKIP_RETURN_CODE
    }
    std::mt19937 rng(1234);
    const Case cases[] = {
        {FASTARDIFF_FLOAT32, FASTARDIFF_INT64, 3, 2, 1, 70, 16, 1, 0},
        {FASTARDIFF_FLOAT32, FASTARDIFF_INT32, 3, 2, 5, 0, 64, 1, 0},
        {FASTARDIFF_FLOAT32, FASTARDIFF_INT64, 1, 4, 17, 33, 64, 0, 0},
        {FASTARDIFF_FLOAT32, FASTARDIFF_INT64, 2, 2, 256, 1024, 128, 1, 0},
        {FASTARDIFF_FLOAT16, FASTARDIFF_INT64, 3, 4, 5, 1024, 64, 1, 0},
        {FASTARDIFF_FLOAT16, FASTARDIFF_INT32, 2, 2, 256, 1024, 128, 1, 0},
        {FASTARDIFF_BFLOAT16, FASTARDIFF_INT64, 3, 4, 1, 1024, 64, 1, 0},
        {FASTARDIFF_BFLOAT16, FASTARDIFF_INT64, 2, 2, 256, 512, 256, 1, 0},
        // in_buffer: ragged lengths (row 1 out of range), K in {1, 5} (17: rows in several blocks)
        {FASTARDIFF_FLOAT32, FASTARDIFF_INT64, 4, 2, 1, 70, 16, 1, 1},
        {FASTARDIFF_FLOAT32, FASTARDIFF_INT32, 4, 2, 5, 100, 64, 0, 1},
        {FASTARDIFF_FLOAT32, FASTARDIFF_INT64, 3, 2, 17, 45, 32, 1, 1},
        {FASTARDIFF_FLOAT16, FASTARDIFF_INT64, 4, 4, 5, 1024, 64, 1, 1},
        {FASTARDIFF_FLOAT16, FASTARDIFF_INT32, 3, 2, 1, 37, 128, 1, 1},
        {FASTARDIFF_BFLOAT16, FASTARDIFF_INT64, 3, 2, 5, 300, 64, 1, 1},
    };
    int failures = 0;
    for (const Case& c : cases) {
        if (c.dtype == FASTARDIFF_FLOAT32) failures += run_case<float>(c, rng);
        else if (c.dtype == FASTARDIFF_FLOAT16) failures += run_case<__half>(c, rng);
        else failures += run_case<__nv_bfloat16>(c, rng);
    }
    std::printf("%d failure(s)\n", failures);
    return failures;
}

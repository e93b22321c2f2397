/* hpcserve fused CPU ops for the decode hot path (fp32, AVX2+FMA, OpenMP).
 *
 * - hpc_add_rms_norm: x += delta (optional), out = x * rsqrt(mean(x^2) + eps) * w.
 * - hpc_rope: in-place rotary embedding (rotate-half convention) of the first
 *   `heads` heads of each row, sin table pre-signed as [-sin1, sin2].
 * - hpc_paged_decode_attn: one query token per sequence attending over its paged
 *   KV cache ([blocks, block_size, kv_heads, head_dim]) through its block table,
 *   without gathering the blocks into a contiguous copy. Parallel over
 *   (sequence, kv head); each item serves the kv head's group of query heads.
 * Built and loaded by hpcserve/kernels/build.py; checked against torch in
 * tests/test_kernels.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

void hpc_add_rms_norm(float *x, const float *delta, const float *w, float *out, int64_t rows, int64_t h,
                      int64_t ld_delta, float eps) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * h;
        if (delta) {
            const float *dr = delta + r * ld_delta;
            for (int64_t j = 0; j < h; j++) xr[j] += dr[j];
        }
        double ss = 0.0;
        for (int64_t j = 0; j < h; j++) ss += (double)xr[j] * xr[j];
        float inv = 1.0f / sqrtf((float)(ss / h) + eps);
        float *o = out + r * h;
        for (int64_t j = 0; j < h; j++) o[j] = w[j] * (xr[j] * inv);
    }
}

void hpc_rope(float *x, int64_t rows, int64_t ld, int64_t heads, int64_t d, const float *cos_t,
              const float *sin_t, const int64_t *pos) {
    int64_t half = d / 2;
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_t + pos[r] * d, *s = sin_t + pos[r] * d;
        for (int64_t hh = 0; hh < heads; hh++) {
            float *v = x + r * ld + hh * d;
            for (int64_t j = 0; j < half; j++) {
                float a = v[j], b = v[j + half];
                v[j] = a * c[j] + b * s[j];
                v[j + half] = b * c[j + half] + a * s[j + half];
            }
        }
    }
}

static inline float dot(const float *a, const float *b, int64_t d) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    float s = hsum(acc);
    for (; j < d; j++) s += a[j] * b[j];
    return s;
}

static inline void axpy(float *y, float a, const float *x, int64_t d) {
    __m256 av = _mm256_set1_ps(a);
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
    for (; j < d; j++) y[j] += a * x[j];
}

/* q: [nd, heads, d] rows ld_q apart; out: [nd, heads, d] contiguous; block_tables: [nd, max_blocks]. */
void hpc_paged_decode_attn(const float *q, int64_t ld_q, const float *k_cache, const float *v_cache,
                           const int64_t *block_tables, int64_t max_blocks, const int64_t *ctx_lens, int64_t nd,
                           int64_t heads, int64_t kv_heads, int64_t d, int64_t block_size, float scale,
                           int64_t window, float *out) {
    int64_t group = heads / kv_heads;
    int64_t row = kv_heads * d; /* floats per token in a block */
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t s = 0; s < nd; s++) {
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            int64_t ctx = ctx_lens[s];
            int64_t start = (window > 0 && ctx > window) ? ctx - window : 0;
            int64_t n = ctx - start;
            const int64_t *bt = block_tables + s * max_blocks;
            float *scores = (float *)malloc(sizeof(float) * (size_t)(n * group));
            for (int64_t g = 0; g < group; g++) {
                const float *qh = q + s * ld_q + (kh * group + g) * d;
                float *sc = scores + g * n, mx = -INFINITY;
                for (int64_t p = start; p < ctx; p++) {
                    const float *kp = k_cache + (bt[p / block_size] * block_size + p % block_size) * row + kh * d;
                    float v = dot(qh, kp, d) * scale;
                    sc[p - start] = v;
                    if (v > mx) mx = v;
                }
                float sum = 0.f;
                for (int64_t i = 0; i < n; i++) {
                    sc[i] = expf(sc[i] - mx);
                    sum += sc[i];
                }
                float inv = 1.f / sum;
                float *o = out + (s * heads + kh * group + g) * d;
                for (int64_t j = 0; j < d; j++) o[j] = 0.f;
                for (int64_t p = start; p < ctx; p++) {
                    const float *vp = v_cache + (bt[p / block_size] * block_size + p % block_size) * row + kh * d;
                    axpy(o, sc[p - start] * inv, vp, d);
                }
            }
            free(scores);
        }
    }
}

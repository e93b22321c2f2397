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

static inline __m256 exp256(__m256 x);

/* out[r, j] = silu(gu[r, j]) * gu[r, inter + j]; rows of gu are ld apart. */
void hpc_silu_mul(const float *gu, int64_t rows, int64_t inter, int64_t ld, float *out) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * ld, *u = g + inter;
        float *o = out + r * inter;
        int64_t j = 0;
        for (; j + 8 <= inter; j += 8) {
            __m256 gv = _mm256_loadu_ps(g + j);
            __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + j)));
        }
        for (; j < inter; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
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

/* exp, 8 lanes, x clamped to [-87, 88]: x = n ln2 + r, e^r by a degree-6 polynomial
 * on |r| <= ln2/2, 2^n through the exponent bits. Rel. error ~2e-7. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.3981999507e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#define MAX_HEADS 256
#define STACK_SCORES 8192

/* q: [nd, heads, d] rows ld_q apart; out: [nd, heads, d] contiguous; block_tables: [nd, max_blocks].
 * One work item per sequence: its blocks are read front to back, each token row (all kv
 * heads) once for the scores and once for P@V, so the KV stream is sequential within a
 * block; the next block is prefetched while the current one is used. */
void hpc_paged_decode_attn(const float *q, int64_t ld_q, const float *k_cache, const float *v_cache,
                           const int64_t *block_tables, int64_t max_blocks, const int64_t *ctx_lens, int64_t nd,
                           int64_t heads, int64_t kv_heads, int64_t d, int64_t block_size, float scale,
                           int64_t window, float *out) {
    int64_t group = heads / kv_heads;
    int64_t row = kv_heads * d; /* floats per token in a block */
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t s = 0; s < nd; s++) {
        int64_t ctx = ctx_lens[s];
        int64_t start = (window > 0 && ctx > window) ? ctx - window : 0;
        int64_t n = ctx - start;
        const int64_t *bt = block_tables + s * max_blocks;
        float stack_buf[STACK_SCORES];
        float *scores = n * heads <= STACK_SCORES ? stack_buf : (float *)malloc(sizeof(float) * (size_t)(n * heads));
        const float *qs = q + s * ld_q;
        float *os = out + s * heads * d;
        float mx[MAX_HEADS], inv[MAX_HEADS];
        for (int64_t h = 0; h < heads; h++) mx[h] = -INFINITY;
        for (int64_t p = start; p < ctx;) {
            int64_t b = p / block_size, off = p % block_size;
            int64_t stop = (b + 1) * block_size < ctx ? (b + 1) * block_size : ctx;
            if ((b + 1) * block_size < ctx) {
                const char *nb = (const char *)(k_cache + bt[b + 1] * block_size * row);
                for (int64_t c = 0; c < block_size * row * 4; c += 64) _mm_prefetch(nb + c, _MM_HINT_T0);
            }
            const float *kp = k_cache + (bt[b] * block_size + off) * row;
            for (; p < stop; p++, kp += row)
                for (int64_t h = 0; h < heads; h++) {
                    float v = dot(qs + h * d, kp + (h / group) * d, d) * scale;
                    scores[h * n + (p - start)] = v;
                    if (v > mx[h]) mx[h] = v;
                }
        }
        for (int64_t h = 0; h < heads; h++) {
            float *sc = scores + h * n;
            __m256 m8 = _mm256_set1_ps(mx[h]), acc = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) {
                __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + i), m8));
                _mm256_storeu_ps(sc + i, e);
                acc = _mm256_add_ps(acc, e);
            }
            float sum = hsum(acc);
            for (; i < n; i++) {
                sc[i] = expf(sc[i] - mx[h]);
                sum += sc[i];
            }
            inv[h] = 1.f / sum;
        }
        for (int64_t j = 0; j < heads * d; j++) os[j] = 0.f;
        for (int64_t p = start; p < ctx;) {
            int64_t b = p / block_size, off = p % block_size;
            int64_t stop = (b + 1) * block_size < ctx ? (b + 1) * block_size : ctx;
            if ((b + 1) * block_size < ctx) {
                const char *nb = (const char *)(v_cache + bt[b + 1] * block_size * row);
                for (int64_t c = 0; c < block_size * row * 4; c += 64) _mm_prefetch(nb + c, _MM_HINT_T0);
            }
            const float *vp = v_cache + (bt[b] * block_size + off) * row;
            for (; p < stop; p++, vp += row)
                for (int64_t h = 0; h < heads; h++)
                    axpy(os + h * d, scores[h * n + (p - start)] * inv[h], vp + (h / group) * d, d);
        }
        if (scores != stack_buf) free(scores);
    }
}

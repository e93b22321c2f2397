/* hpcserve CPU GEMM for projections: Y[M,N] = X[M,K] . W[N,K]^T (+ bias), fp32, AVX2+FMA.
 *
 * Decode batches give small M (one row per running sequence), where library sgemm
 * leaves most of the FMA throughput unused. Weights are packed once into panels of
 * NR=24 output columns, k-major (P[panel][k][0..23]), so a 4x24 register tile streams
 * its panel linearly; 12 accumulators + 3 panel vectors + 1 broadcast = 16 ymm.
 * Panels are split across OpenMP threads. Built at run time by
 * hpcserve/kernels/cpu_gemm.py against the OpenMP runtime torch already loaded, so
 * both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define NR 24
#define MR 4

int64_t hpc_packed_size(int64_t n, int64_t k) { return ((n + NR - 1) / NR) * k * NR; }

void hpc_pack(const float *w, int64_t n, int64_t k, float *p) {
    int64_t panels = (n + NR - 1) / NR;
#pragma omp parallel for schedule(static)
    for (int64_t pi = 0; pi < panels; pi++) {
        float *dst = p + pi * k * NR;
        for (int64_t kk = 0; kk < k; kk++) {
            for (int j = 0; j < NR; j++) {
                int64_t col = pi * NR + j;
                dst[kk * NR + j] = col < n ? w[col * k + kk] : 0.0f;
            }
        }
    }
}

/* pf: when set, the next panel: pulled into L2 while this tile computes, so the
 * stream of weights from DRAM overlaps the FMAs instead of stalling them. */
static inline __attribute__((always_inline)) void tile(const int mr, int64_t k, const float *x, int64_t ldx,
                                                       const float *p, float *y, int64_t ldy, const float *bias,
                                                       int nc, const float *pf) {
    __m256 c[MR][3];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++) {
        c[i][0] = _mm256_setzero_ps();
        c[i][1] = _mm256_setzero_ps();
        c[i][2] = _mm256_setzero_ps();
    }
    for (int64_t kk = 0; kk < k; kk++) {
        const float *pk = p + kk * NR;
        if (pf) {
            _mm_prefetch((const char *)(pf + kk * NR), _MM_HINT_T1);
            _mm_prefetch((const char *)(pf + kk * NR + 16), _MM_HINT_T1);
        }
        __m256 b0 = _mm256_loadu_ps(pk), b1 = _mm256_loadu_ps(pk + 8), b2 = _mm256_loadu_ps(pk + 16);
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) {
            __m256 a = _mm256_broadcast_ss(x + i * ldx + kk);
            c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
            c[i][2] = _mm256_fmadd_ps(a, b2, c[i][2]);
        }
    }
    float buf[NR];
    for (int i = 0; i < mr; i++) {
        __m256 r0 = c[i][0], r1 = c[i][1], r2 = c[i][2];
        if (bias) {
            r0 = _mm256_add_ps(r0, _mm256_loadu_ps(bias));
            r1 = _mm256_add_ps(r1, _mm256_loadu_ps(bias + 8));
            r2 = _mm256_add_ps(r2, _mm256_loadu_ps(bias + 16));
        }
        float *yr = y + i * ldy;
        if (nc == NR) {
            _mm256_storeu_ps(yr, r0);
            _mm256_storeu_ps(yr + 8, r1);
            _mm256_storeu_ps(yr + 16, r2);
        } else {
            _mm256_storeu_ps(buf, r0);
            _mm256_storeu_ps(buf + 8, r1);
            _mm256_storeu_ps(buf + 16, r2);
            memcpy(yr, buf, (size_t)nc * sizeof(float));
        }
    }
}

/* One panel of output columns for rows [r0, r1). */
static void panel_rows(const float *x, int64_t r0, int64_t r1, int64_t k, int64_t ldx, const float *pp,
                       const float *bp, int nc, float *yp, int64_t ldy, const float *next) {
    int64_t i = r0;
    for (; i + MR <= r1; i += MR) tile(4, k, x + i * ldx, ldx, pp, yp + i * ldy, ldy, bp, nc, i == r0 ? next : 0);
    const float *pf = i == r0 ? next : 0;
    switch (r1 - i) {
        case 3: tile(3, k, x + i * ldx, ldx, pp, yp + i * ldy, ldy, bp, nc, pf); break;
        case 2: tile(2, k, x + i * ldx, ldx, pp, yp + i * ldy, ldy, bp, nc, pf); break;
        case 1: tile(1, k, x + i * ldx, ldx, pp, yp + i * ldy, ldy, bp, nc, pf); break;
        default: break;
    }
}

#define SMALL_M 64 /* up to here: one pass over all rows per panel, prefetching the next panel */
#define ROW_BLOCK 128 /* above: rows in L2-sized blocks, each block sweeping every panel */

/* bias, when given, must be padded to a multiple of NR (the wrapper pads it). */
void hpc_linear(const float *x, int64_t m, int64_t k, int64_t ldx, const float *p, const float *bias, int64_t n,
                float *y, int64_t ldy) {
    int64_t panels = (n + NR - 1) / NR;
    if (m <= SMALL_M) {
#pragma omp parallel for schedule(static)
        for (int64_t pi = 0; pi < panels; pi++) {
            const float *pp = p + pi * k * NR;
            int nc = (int)((n - pi * NR) < NR ? (n - pi * NR) : NR);
            const float *next = pi + 1 < panels ? pp + k * NR : 0;
            panel_rows(x, 0, m, k, ldx, pp, bias ? bias + pi * NR : 0, nc, y + pi * NR, ldy, next);
        }
        return;
    }
    int64_t blocks = (m + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t rb = 0; rb < blocks; rb++) {
        for (int64_t pi = 0; pi < panels; pi++) {
            int64_t r0 = rb * ROW_BLOCK, r1 = r0 + ROW_BLOCK < m ? r0 + ROW_BLOCK : m;
            int nc = (int)((n - pi * NR) < NR ? (n - pi * NR) : NR);
            panel_rows(x, r0, r1, k, ldx, p + pi * k * NR, bias ? bias + pi * NR : 0, nc, y + pi * NR, ldy, 0);
        }
    }
}

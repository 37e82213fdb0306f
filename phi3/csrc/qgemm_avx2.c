/* Weight-only int4 / int8 matmuls for x86-64 with AVX2 + FMA + F16C: y[M, N] = x[M, K] · Wᵀ.
 *
 * The activations are quantized to int8 per block of G inputs (the weight group) exactly as
 * llama.cpp quantizes them to Q8_0 (q = round(x·127/amax), scale amax/127 rounded to fp16), so a
 * Q4_0 / Q8_0 matmul gives llama.cpp's numbers up to the order of float sums. The inner loop is integer: vpmaddubsw multiplies unsigned weight bytes by
 * signed activation bytes. Weights are re-laid out once at load time, 8 output rows interleaved, so
 * that one 256-bit load holds 4 bytes of each of 8 rows: a 4-byte activation broadcast then feeds
 * 8 rows at once, the 8 per-row sums sit in the 8 lanes and no horizontal reduction or per-row
 * scale broadcast is needed. The weights stream through memory once per call whatever M is.
 *
 * int4 layout, per block of 8 rows (rb) and group g of G inputs, 32 + 4·G bytes:
 *   fp16 scale[8], fp16 min[8], then G/8 chunks of 32 bytes; chunk c holds 4 bytes per row i at
 *   4·i, byte b = q[k0 + b] | q[k0 + 4 + b] << 4 with k0 = g·G + 8·c and w = q·scale + min.
 *   Scale-only variant (Q4_0, min = −8·scale): 16 + 4·G bytes, the mins left out.
 * int8 layout, per (rb, g), [16 bytes of fp16 scale[8] when grouped] + 8·G bytes:
 *   G/4 chunks of 32 bytes, 4 bytes per row i at 4·i holding w[k0 .. k0 + 3], k0 = g·G + 4·c.
 *   Per-channel int8 keeps fp32 row scales apart and applies them at the end.
 *
 * Built with -DPHI3_VNNI (and AVX-512 VNNI + VL) for CPUs that have them: the integer dot products
 * then use vpdpbusd (4 byte products summed into each 32-bit lane in one instruction) instead of
 * vpmaddubsw + vpmaddwd + adds. The sums are the same integers (the AVX2 path never saturates its
 * int16 partial sums: see the bounds at the loops), so both builds give identical results.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>

#ifndef PREFETCH
#define PREFETCH 1024
#endif
#define ALWAYS_INLINE static inline __attribute__((always_inline))

int phi3_cpu_ok(void) {
    __builtin_cpu_init();
#ifdef PHI3_VNNI
    if (!(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"))) return 0;
#endif
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* x [M, K] fp32 -> qx int8 [M, K], dx = scale and sx = dx · Σ qx per block of B (dx, sx: [M, K/B]).
 * sx is the sum of the *quantized* activations so that the min term cancels the q term's rounding
 * exactly as in the dequantized product (Q4_0's min is −8·scale: the two nearly cancel). */
#define RESIDUAL 200.f  /* second level: q2 = round(r · RESIDUAL / d), |r| <= 0.56·d keeps |q2| <= 112 */

static void quantize_rows(const float *x, int M, int K, int B, int8_t *qx, int8_t *qx2, float *dx, float *sx,
                          int32_t *sq) {
    int nb = K / B;
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)m * K + (size_t)b * B;
            float amax = 0.f;
            for (int i = 0; i < B; i++) { float v = fabsf(xb[i]); amax = v > amax ? v : amax; }
            /* as llama.cpp's quantize_row_q8_0: the scale is stored in fp16 */
            float d = _cvtsh_ss(_cvtss_sh(amax / 127.f, 0)), inv = amax > 0.f ? 127.f / amax : 0.f;
            int8_t *q = qx + (size_t)m * K + (size_t)b * B;
            int sum = 0, sum2 = 0;
            for (int i = 0; i < B; i++) { q[i] = (int8_t)nearbyintf(xb[i] * inv); sum += q[i]; }
            if (qx2) {  /* the rounding error, quantized again: x ≈ d · (q + q2 / RESIDUAL) */
                int8_t *q2 = qx2 + (size_t)m * K + (size_t)b * B;
                const float inv2 = d > 0.f ? RESIDUAL / d : 0.f;
                for (int i = 0; i < B; i++) {
                    float r = nearbyintf((xb[i] - (float)q[i] * d) * inv2);
                    r = r > 127.f ? 127.f : r < -127.f ? -127.f : r;
                    q2[i] = (int8_t)r;
                    sum2 += q2[i];
                }
            }
            dx[(size_t)m * nb + b] = d;
            sx[(size_t)m * nb + b] = d * ((float)sum + (float)sum2 / RESIDUAL);
            if (sq) sq[(size_t)m * nb + b] = sum;
        }
    }
}

ALWAYS_INLINE __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* int4: rows [rb·8, rb·8 + 8) for tokens [m0, m0 + MT); with qx2 (LEVELS 2, MT <= 2) the second
 * rounding level of the activations is accumulated beside the first: x ≈ d · (q + q2 / RESIDUAL) */
ALWAYS_INLINE void int4_block(const uint8_t *W, int ng, int G, const int8_t *qx, const int8_t *qx2,
                              const float *dx, const float *sx, const int32_t *sq, int K, int m0, float *y,
                              int ldy, int rb, const int MT, const int LEVELS, const int SYM) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256 inv_res = _mm256_set1_ps(1.f / RESIDUAL);
    const size_t head = SYM ? 16 : 32, gbytes = head + 4 * (size_t)G;
    __m256 acc[4];
    for (int t = 0; t < MT; t++) acc[t] = _mm256_setzero_ps();
    const uint8_t *p = W + (size_t)rb * ng * gbytes;
    for (int g = 0; g < ng; g++, p += gbytes) {
        const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        const __m256 mins = SYM ? _mm256_mul_ps(scale, _mm256_set1_ps(-8.f))  /* Q4_0: min = −8·scale, exactly */
                                : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
        const uint8_t *wq = p + head;
        for (size_t off = 0; off < gbytes; off += 64) _mm_prefetch((const char *)(p + PREFETCH + off), _MM_HINT_T0);
        __m256i isum[4], isum2[4];
        for (int t = 0; t < MT; t++) isum[t] = isum2[t] = _mm256_setzero_si256();
#ifdef PHI3_VNNI
        for (int c = 0; c < G / 8; c++) {  /* 8 inputs per row: nibbles · activation bytes into int32 */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wq + 32 * c));
            const __m256i lo = _mm256_and_si256(v, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            const size_t k = (size_t)g * G + 8 * c;
            for (int t = 0; t < MT; t++) {
                const int8_t *xk = qx + (size_t)(m0 + t) * K + k;
                isum[t] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(isum[t], lo, bcast4(xk)), hi, bcast4(xk + 4));
                if (LEVELS == 2) {
                    const int8_t *rk = qx2 + (size_t)(m0 + t) * K + k;
                    isum2[t] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(isum2[t], lo, bcast4(rk)), hi, bcast4(rk + 4));
                }
            }
        }
        (void)ones;
#else
        for (int c = 0; c < G / 8; c += 4) {  /* 32 inputs: 8 vpmaddubsw per token fit in int16 (8·2·15·127 < 2^15) */
            __m256i s16[4], r16[4];
            for (int t = 0; t < MT; t++) s16[t] = r16[t] = _mm256_setzero_si256();
            for (int cc = 0; cc < 4; cc++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wq + 32 * (c + cc)));
                const __m256i lo = _mm256_and_si256(v, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                const size_t k = (size_t)g * G + 8 * (c + cc);
                for (int t = 0; t < MT; t++) {
                    const int8_t *xk = qx + (size_t)(m0 + t) * K + k;
                    s16[t] = _mm256_add_epi16(s16[t], _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xk)),
                                                                       _mm256_maddubs_epi16(hi, bcast4(xk + 4))));
                    if (LEVELS == 2) {
                        const int8_t *rk = qx2 + (size_t)(m0 + t) * K + k;
                        r16[t] = _mm256_add_epi16(r16[t], _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(rk)),
                                                                           _mm256_maddubs_epi16(hi, bcast4(rk + 4))));
                    }
                }
            }
            for (int t = 0; t < MT; t++) {
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(s16[t], ones));
                if (LEVELS == 2) isum2[t] = _mm256_add_epi32(isum2[t], _mm256_madd_epi16(r16[t], ones));
            }
        }
#endif
        for (int t = 0; t < MT; t++) {
            const size_t i = (size_t)(m0 + t) * (K / G) + g;
            if (SYM && LEVELS == 1) {  /* Q4_0: Σ(q − 8)·x in integers, one product with the scales (as llama.cpp) */
                const __m256i exact = _mm256_sub_epi32(isum[t], _mm256_set1_epi32(8 * sq[i]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), _mm256_mul_ps(scale, _mm256_set1_ps(dx[i])), acc[t]);
                continue;
            }
            __m256 f = _mm256_cvtepi32_ps(isum[t]);
            if (LEVELS == 2) f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum2[t]), inv_res, f);
            acc[t] = _mm256_fmadd_ps(f, _mm256_mul_ps(scale, _mm256_set1_ps(dx[i])), acc[t]);
            acc[t] = _mm256_fmadd_ps(mins, _mm256_set1_ps(sx[i]), acc[t]);
        }
    }
    for (int t = 0; t < MT; t++) _mm256_storeu_ps(y + (size_t)(m0 + t) * ldy + 8 * (size_t)rb, acc[t]);
}

ALWAYS_INLINE void int4_rows(const uint8_t *W, int ng, int G, const int8_t *qx, const int8_t *qx2,
                             const float *dx, const float *sx, const int32_t *sq, int M, int K, float *y, int N,
                             int rb, const int SYM) {
    int m0 = 0;
    if (qx2) {
        for (; m0 + 2 <= M; m0 += 2) int4_block(W, ng, G, qx, qx2, dx, sx, sq, K, m0, y, N, rb, 2, 2, SYM);
        if (m0 < M) int4_block(W, ng, G, qx, qx2, dx, sx, sq, K, m0, y, N, rb, 1, 2, SYM);
        return;
    }
    for (; m0 + 4 <= M; m0 += 4) int4_block(W, ng, G, qx, NULL, dx, sx, sq, K, m0, y, N, rb, 4, 1, SYM);
    switch (M - m0) {
        case 3: int4_block(W, ng, G, qx, NULL, dx, sx, sq, K, m0, y, N, rb, 3, 1, SYM); break;
        case 2: int4_block(W, ng, G, qx, NULL, dx, sx, sq, K, m0, y, N, rb, 2, 1, SYM); break;
        case 1: int4_block(W, ng, G, qx, NULL, dx, sx, sq, K, m0, y, N, rb, 1, 1, SYM); break;
    }
}

/* x fp32 [M, K] · W (int4 layout above, N a multiple of 8) -> y fp32 [M, N]; `symmetric`: the
 * scale-only layout (16 + 4·G bytes per block and group, min = −8·scale: GGUF's Q4_0) */
void phi3_int4_matmul(const float *x, int M, int K, const uint8_t *W, int N, int G, float *y, int nthreads,
                      int levels, int symmetric) {
    int ng = K / G, nrb = N / 8;
    int8_t *qx = malloc((size_t)M * K * (levels == 2 ? 2 : 1)), *qx2 = levels == 2 ? qx + (size_t)M * K : NULL;
    float *dx = malloc(sizeof(float) * (size_t)M * ng * 2), *sx = dx + (size_t)M * ng;
    int32_t *sq = malloc(sizeof(int32_t) * (size_t)M * ng);
    quantize_rows(x, M, K, G, qx, qx2, dx, sx, sq);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < nrb; rb++) {
        if (symmetric) int4_rows(W, ng, G, qx, qx2, dx, sx, sq, M, K, y, N, rb, 1);
        else int4_rows(W, ng, G, qx, qx2, dx, sx, sq, M, K, y, N, rb, 0);
    }
    free(qx);
    free(dx);
    free(sq);
}

/* int8: rows [rb·8, rb·8 + 8) for tokens [m0, m0 + MT); `grouped`: fp16 scales inline, else 1;
 * with qx2 (LEVELS 2) the second rounding level of the activations beside the first, as int4's */
ALWAYS_INLINE void int8_block(const uint8_t *W, int ng, int G, int grouped, const int8_t *qx, const int8_t *qx2,
                              const float *dx, int K, int m0, float *y, int ldy, int rb, const int MT,
                              const int LEVELS) {
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones;
    const __m256 inv_res = _mm256_set1_ps(1.f / RESIDUAL);
    const size_t gbytes = (grouped ? 16 : 0) + 8 * (size_t)G;
    __m256 acc[4];
    for (int t = 0; t < MT; t++) acc[t] = _mm256_setzero_ps();
    const uint8_t *p = W + (size_t)rb * ng * gbytes;
    for (int g = 0; g < ng; g++, p += gbytes) {
        const __m256 scale = grouped ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)) : _mm256_set1_ps(1.f);
        const uint8_t *wq = p + (grouped ? 16 : 0);
        __m256i isum[4], isum2[4];
        for (int t = 0; t < MT; t++) isum[t] = isum2[t] = _mm256_setzero_si256();
        for (int c = 0; c < G / 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wq + 32 * c));
            const __m256i av = _mm256_sign_epi8(v, v);  /* |w| as unsigned bytes */
            const size_t k = (size_t)g * G + 4 * c;
            for (int t = 0; t < MT; t++) {
                const __m256i xs = _mm256_sign_epi8(bcast4(qx + (size_t)(m0 + t) * K + k), v);  /* x·sign(w) */
                const __m256i rs = LEVELS == 2 ? _mm256_sign_epi8(bcast4(qx2 + (size_t)(m0 + t) * K + k), v) : xs;
#ifdef PHI3_VNNI
                isum[t] = _mm256_dpbusd_epi32(isum[t], av, xs);
                if (LEVELS == 2) isum2[t] = _mm256_dpbusd_epi32(isum2[t], av, rs);
#else  /* |w| <= 128, |x| <= 127: a pair sums to at most 32512, no int16 saturation (q2 alike) */
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(av, xs), ones));
                if (LEVELS == 2)
                    isum2[t] = _mm256_add_epi32(isum2[t], _mm256_madd_epi16(_mm256_maddubs_epi16(av, rs), ones));
#endif
            }
        }
        for (int t = 0; t < MT; t++) {
            const float d = dx[(size_t)(m0 + t) * (K / G) + g];
            __m256 f = _mm256_cvtepi32_ps(isum[t]);
            if (LEVELS == 2) f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum2[t]), inv_res, f);
            acc[t] = _mm256_fmadd_ps(f, _mm256_mul_ps(scale, _mm256_set1_ps(d)), acc[t]);
        }
    }
    for (int t = 0; t < MT; t++) _mm256_storeu_ps(y + (size_t)(m0 + t) * ldy + 8 * (size_t)rb, acc[t]);
}

/* x fp32 [M, K] · W (int8 layout above) -> y fp32 [M, N]; row_scale fp32 [N] or NULL (grouped);
 * `levels` of activation rounding as phi3_int4_matmul's */
void phi3_int8_matmul(const float *x, int M, int K, const uint8_t *W, int N, int G, const float *row_scale,
                      float *y, int nthreads, int levels) {
    int ng = K / G, nrb = N / 8, grouped = row_scale == NULL;
    int8_t *qx = malloc((size_t)M * K * (levels == 2 ? 2 : 1)), *qx2 = levels == 2 ? qx + (size_t)M * K : NULL;
    float *dx = malloc(sizeof(float) * (size_t)M * ng * 2), *sx = dx + (size_t)M * ng;
    quantize_rows(x, M, K, G, qx, qx2, dx, sx, NULL);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < nrb; rb++) {
        int m0 = 0;
        if (qx2) {
            for (; m0 + 2 <= M; m0 += 2) int8_block(W, ng, G, grouped, qx, qx2, dx, K, m0, y, N, rb, 2, 2);
            if (m0 < M) int8_block(W, ng, G, grouped, qx, qx2, dx, K, m0, y, N, rb, 1, 2);
        } else {
            for (; m0 + 4 <= M; m0 += 4) int8_block(W, ng, G, grouped, qx, NULL, dx, K, m0, y, N, rb, 4, 1);
            switch (M - m0) {
                case 3: int8_block(W, ng, G, grouped, qx, NULL, dx, K, m0, y, N, rb, 3, 1); break;
                case 2: int8_block(W, ng, G, grouped, qx, NULL, dx, K, m0, y, N, rb, 2, 1); break;
                case 1: int8_block(W, ng, G, grouped, qx, NULL, dx, K, m0, y, N, rb, 1, 1); break;
            }
        }
        if (!grouped) {
            const __m256 rs = _mm256_loadu_ps(row_scale + 8 * (size_t)rb);
            for (int m = 0; m < M; m++) {
                float *yp = y + (size_t)m * N + 8 * (size_t)rb;
                _mm256_storeu_ps(yp, _mm256_mul_ps(_mm256_loadu_ps(yp), rs));
            }
        }
    }
    free(qx);
    free(dx);
}

/* The int4 layout above from the portable one: qw uint8 [N, K/2] (low nibble = even column),
 * scales / mins fp16 [N, K/G]; out gets ceil(N/8)·(K/G)·(32 + 4·G) bytes, padding rows zero.
 * mins NULL: the scale-only layout (16 + 4·G bytes; the caller has checked min = −8·scale). */
/* bytes b0 b1 b2 b3 -> b0 0 b1 0 b2 0 b3 0 */
static inline uint64_t spread_bytes(uint32_t v) {
    uint64_t x = v;
    x = (x | x << 16) & 0x0000FFFF0000FFFFull;
    return (x | x << 8) & 0x00FF00FF00FF00FFull;
}

void phi3_pack_int4(const uint8_t *qw, const uint16_t *scales, const uint16_t *mins, int N, int K, int G,
                    uint8_t *out, int nthreads) {
    const int ng = K / G, nrb = (N + 7) / 8;
    const size_t head = mins ? 32 : 16, gbytes = head + 4 * (size_t)G, row = (size_t)K / 2;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < nrb; rb++) {
        for (int g = 0; g < ng; g++) {
            uint8_t *o = out + ((size_t)rb * ng + g) * gbytes;
            uint16_t sm[16];
            for (int i = 0; i < 8; i++) {
                const int n = rb * 8 + i;
                sm[i] = n < N ? scales[(size_t)n * ng + g] : 0;
                sm[8 + i] = n < N && mins ? mins[(size_t)n * ng + g] : 0;
            }
            memcpy(o, sm, head);
            for (int i = 0; i < 8; i++) {
                const int n = rb * 8 + i;
                const uint8_t *src = qw + (size_t)n * row + (size_t)g * G / 2;
                for (int c = 0; c < G / 8; c++) {
                    uint8_t *dst = o + head + 32 * c + 4 * i;
                    if (n >= N) { memset(dst, 0, 4); continue; }
                    /* inputs k0 .. k0+7 are the 4 source bytes (k0 | k1<<4, k2 | k3<<4, ...); the
                     * kernel wants (k0 | k4<<4, k1 | k5<<4, k2 | k6<<4, k3 | k7<<4): spread the
                     * low nibbles l and high nibbles h to bytes l0 h0 l1 h1 l2 h2 l3 h3, then fold
                     * the upper four bytes onto the lower four, shifted up a nibble. */
                    uint32_t w, r;
                    memcpy(&w, src + 4 * c, 4);
                    const uint64_t x = spread_bytes(w & 0x0F0F0F0Fu) | spread_bytes((w >> 4) & 0x0F0F0F0Fu) << 8;
                    r = (uint32_t)x | (uint32_t)(x >> 32) << 4;
                    memcpy(dst, &r, 4);
                }
            }
        }
    }
}

/* The inverse of phi3_pack_int4: packed [N8/8][K/G][head + 4·G] -> qw uint8 [N, K/2] (low nibble = even
 * column), scales and mins fp16 [N, K/G]; the scale-only layout gives mins = fp16(−8·scale). */
void phi3_unpack_int4(const uint8_t *packed, int N, int K, int G, int symmetric, uint8_t *qw, uint16_t *scales,
                      uint16_t *mins, int nthreads) {
    const int ng = K / G, nrb = (N + 7) / 8;
    const size_t head = symmetric ? 16 : 32, gbytes = head + 4 * (size_t)G, row = (size_t)K / 2;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < nrb; rb++) {
        for (int g = 0; g < ng; g++) {
            const uint8_t *o = packed + ((size_t)rb * ng + g) * gbytes;
            for (int i = 0; i < 8 && rb * 8 + i < N; i++) {
                const size_t n = (size_t)rb * 8 + i;
                uint16_t sc, mn;
                memcpy(&sc, o + 2 * i, 2);
                if (symmetric) mn = _cvtss_sh(-8.0f * _cvtsh_ss(sc), 0);
                else memcpy(&mn, o + 16 + 2 * i, 2);
                scales[n * ng + g] = sc;
                mins[n * ng + g] = mn;
                uint8_t *dst = qw + n * row + (size_t)g * G / 2;
                for (int c = 0; c < G / 8; c++) {
                    /* chunk byte b = q[8c + b] | q[8c + 4 + b] << 4 -> bytes q[2j] | q[2j + 1] << 4 */
                    const uint8_t *r = o + head + 32 * c + 4 * i;
                    uint8_t q[8];
                    for (int b = 0; b < 4; b++) { q[b] = r[b] & 15; q[4 + b] = r[b] >> 4; }
                    for (int j = 0; j < 4; j++) dst[4 * c + j] = (uint8_t)(q[2 * j] | q[2 * j + 1] << 4);
                }
            }
        }
    }
}

/* The inverse of phi3_pack_int8: packed [N8/8][K/B][(16 if grouped) + 8·B] -> q int8 [N, K] and, grouped,
 * scales fp16 [N, K/B]. */
void phi3_unpack_int8(const uint8_t *packed, int N, int K, int B, int grouped, int8_t *q, uint16_t *scales,
                      int nthreads) {
    const int ng = K / B, nrb = (N + 7) / 8;
    const size_t head = grouped ? 16 : 0, gbytes = head + 8 * (size_t)B;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < nrb; rb++) {
        for (int g = 0; g < ng; g++) {
            const uint8_t *o = packed + ((size_t)rb * ng + g) * gbytes;
            for (int i = 0; i < 8 && rb * 8 + i < N; i++) {
                const size_t n = (size_t)rb * 8 + i;
                if (grouped) memcpy(scales + n * ng + g, o + 2 * i, 2);
                int8_t *dst = q + n * K + (size_t)g * B;
                for (int c = 0; c < B / 4; c++) memcpy(dst + 4 * c, o + head + 32 * c + 4 * i, 4);
            }
        }
    }
}

/* `pack_int8` (cpu_kernels.py) in C: q int8 [N, K] -> [N8/8][K/B][head + 8·B] bytes, head = the
 * 8 rows' fp16 scales of the group (16 bytes) when `scales` [N, K/B] is given, none per channel;
 * then for each 4 inputs c the 8 rows' 4 bytes. Padding rows are zero. */
void phi3_pack_int8(const int8_t *q, const uint16_t *scales, int N, int K, int B, uint8_t *out, int nthreads) {
    const int ng = K / B, nrb = (N + 7) / 8;
    const size_t head = scales ? 16 : 0, gbytes = head + 8 * (size_t)B;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < nrb; rb++) {
        for (int g = 0; g < ng; g++) {
            uint8_t *o = out + ((size_t)rb * ng + g) * gbytes;
            if (scales) {
                uint16_t s[8];
                for (int i = 0; i < 8; i++) s[i] = rb * 8 + i < N ? scales[(size_t)(rb * 8 + i) * ng + g] : 0;
                memcpy(o, s, 16);
            }
            for (int i = 0; i < 8; i++) {
                const int n = rb * 8 + i;
                const int8_t *src = q + (size_t)n * K + (size_t)g * B;
                for (int c = 0; c < B / 4; c++) {
                    uint8_t *dst = o + head + 32 * c + 4 * i;
                    if (n < N) memcpy(dst, src + 4 * c, 4);
                    else memset(dst, 0, 4);
                }
            }
        }
    }
}

/* GGUF Q8_0 blocks (fp16 d, 32 int8) -> q int8 [nblocks·32] and d fp16 [nblocks], in file order. */
void phi3_ggml_q8_0_split(const uint8_t *blocks, long nblocks, int8_t *q, uint16_t *d, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long b = 0; b < nblocks; b++) {
        memcpy(d + b, blocks + (size_t)b * 34, 2);
        memcpy(q + (size_t)b * 32, blocks + (size_t)b * 34 + 2, 32);
    }
}

/* GGUF blocks straight into the kernel layouts above (G = 32), one pass over the file's bytes with no
 * portable copy in between. blocks: [N][nb][bsize] bytes, N a multiple of 8.
 * Q4_0 (bsize 18: fp16 d, 16 qs) -> the scale-only int4 layout; Q4_1 (bsize 20: fp16 d, fp16 m, 16 qs)
 * -> the int4 layout with mins. qs byte j holds w_j (low nibble) and w_{j+16} (high nibble); chunk c of
 * the kernel layout wants, per row, bytes q[8c + b] | q[8c + 4 + b] << 4: for c = 0, 1 the low
 * nibbles of qs[8c .. 8c + 7], for c = 2, 3 the high nibbles of qs[8(c − 2) ..]. */
void phi3_pack_ggml_q4(const uint8_t *blocks, int N, int nb, int has_min, uint8_t *out, int nthreads) {
    const size_t bsize = has_min ? 20 : 18, qs_off = has_min ? 4 : 2, head = has_min ? 32 : 16;
    const size_t gbytes = head + 128;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < N / 8; rb++) {
        for (int g = 0; g < nb; g++) {
            uint8_t *o = out + ((size_t)rb * nb + g) * gbytes;
            for (int i = 0; i < 8; i++) {
                const uint8_t *blk = blocks + ((size_t)(rb * 8 + i) * nb + g) * bsize;
                memcpy(o + 2 * i, blk, 2);
                if (has_min) memcpy(o + 16 + 2 * i, blk + 2, 2);
                const uint8_t *qs = blk + qs_off;
                for (int c = 0; c < 2; c++) {
                    uint32_t lo, hi, r;
                    memcpy(&lo, qs + 8 * c, 4);
                    memcpy(&hi, qs + 8 * c + 4, 4);
                    r = (lo & 0x0F0F0F0Fu) | (hi & 0x0F0F0F0Fu) << 4;
                    memcpy(o + head + 32 * c + 4 * i, &r, 4);
                    r = (lo >> 4 & 0x0F0F0F0Fu) | (hi & 0xF0F0F0F0u);
                    memcpy(o + head + 32 * (c + 2) + 4 * i, &r, 4);
                }
            }
        }
    }
}

/* GGUF Q4_K super-blocks (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales / mins, 128 bytes of
 * nibbles) -> the int4 layout with mins, G = 32: sub-block j of 32 weights is w = q·(d·sc_j) − dmin·m_j,
 * i.e. a group with scale d·sc_j and min −dmin·m_j, both rounded to fp16 (the only change of value);
 * the 4-bit q are kept. Its nibbles: sub-blocks 2i and 2i + 1 share qs[32i .. 32i + 31], low / high. */
void phi3_pack_ggml_q4_k(const uint8_t *blocks, int N, int nsb, uint8_t *out, int nthreads) {
    const int ng = nsb * 8;
    const size_t gbytes = 32 + 128;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < N / 8; rb++) {
        for (int sb = 0; sb < nsb; sb++) {
            for (int i = 0; i < 8; i++) {
                const uint8_t *blk = blocks + ((size_t)(rb * 8 + i) * nsb + sb) * 144;
                uint16_t hd, hdmin;
                memcpy(&hd, blk, 2);
                memcpy(&hdmin, blk + 2, 2);
                const float d = _cvtsh_ss(hd), dmin = _cvtsh_ss(hdmin);
                const uint8_t *sc6 = blk + 4, *qs = blk + 16;
                for (int j = 0; j < 8; j++) {
                    int sc, m;
                    if (j < 4) { sc = sc6[j] & 63; m = sc6[j + 4] & 63; }
                    else { sc = (sc6[j + 4] & 15) | ((sc6[j - 4] >> 6) << 4); m = (sc6[j + 4] >> 4) | ((sc6[j] >> 6) << 4); }
                    uint8_t *o = out + ((size_t)rb * ng + sb * 8 + j) * gbytes;
                    const uint16_t hs = _cvtss_sh(d * (float)sc, 0), hm = _cvtss_sh(-dmin * (float)m, 0);
                    memcpy(o + 2 * i, &hs, 2);
                    memcpy(o + 16 + 2 * i, &hm, 2);
                    const uint8_t *src = qs + 32 * (j / 2);
                    for (int c = 0; c < 4; c++) {
                        uint32_t lo, hi, r;
                        memcpy(&lo, src + 8 * c, 4);
                        memcpy(&hi, src + 8 * c + 4, 4);
                        r = (j & 1) ? ((lo >> 4 & 0x0F0F0F0Fu) | (hi & 0xF0F0F0F0u))
                                    : ((lo & 0x0F0F0F0Fu) | (hi & 0x0F0F0F0Fu) << 4);
                        memcpy(o + 32 + 32 * c + 4 * i, &r, 4);
                    }
                }
            }
        }
    }
}

/* ---- GGUF types requantized while loading (phi3.gguf REQUANT_TYPES) ------------------------------
 * Each block is dequantized exactly as phi3.gguf's torch kernels do (the same float32 operations in
 * the same order: products and differences are kept apart, never fused, hence fp-contract=off), then
 * quantized group by group (32 weights) into a kernel layout: grouped int8 for types above 4.5 bits
 * a weight, int4 with mins for the others. */
enum { REQ_Q6_K, REQ_Q5_K, REQ_Q3_K, REQ_Q2_K, REQ_IQ4_XS, REQ_IQ4_NL,
       /* dequantized only (phi3_dequant_ggml): phi3.cpu_kernels DEQUANT_TYPES */
       REQ_Q8_0, REQ_Q4_0, REQ_Q4_1, REQ_Q5_0, REQ_Q5_1, REQ_Q4_K };
static const int REQ_BLOCK[] = {256, 256, 256, 256, 256, 32, 32, 32, 32, 32, 32, 256},
                 REQ_BYTES[] = {210, 176, 110, 84, 136, 18, 34, 18, 20, 22, 24, 144};
static const float IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* Q4_K / Q5_K: sub-block j's 6-bit scale and min from the 12 packed bytes */
static inline void k_scale_min(const uint8_t *q, int j, int *sc, int *m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else { *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

__attribute__((optimize("fp-contract=off")))
static void dequant_block(int type, const uint8_t *blk, float *w) {
    switch (type) {
    case REQ_Q6_K: {  /* ql[128], qh[64], int8 scales[16], d: weight l + 32i of half h: low 4 bits from
                         nibble i/2 of ql[64h + l + 32(i%2)], high 2 from bits 2i, 2i+1 of qh[32h + l] */
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = f16_at(blk + 208);
        const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
        for (int h = 0; h < 2; h++) {  /* 32 lanes l at once: the four weights 128h + 32k + l */
            const __m256i lo = _mm256_loadu_si256((const __m256i *)(blk + 64 * h)),
                          hi = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32)),
                          qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            const __m256i q[4] = {  /* 6-bit q − 32, int8 */
                _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(lo, m4),
                                                _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)), bias),
                _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(hi, m4),
                                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4)), bias),
                _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 4), m4),
                                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4)), bias),
                _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(hi, 4), m4),
                                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4)), bias)};
            for (int k = 0; k < 4; k++) {
                int8_t b[32];
                _mm256_storeu_si256((__m256i *)b, q[k]);
                for (int e = 0; e < 4; e++) {  /* 8 weights of one sub-block of 16: one scale */
                    const int j = 128 * h + 32 * k + 8 * e;
                    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8 * e))));
                    _mm256_storeu_ps(w + j, _mm256_mul_ps(v, _mm256_set1_ps(d * (float)sc[j / 16])));
                }
            }
        }
        break;
    }
    case REQ_Q5_K: {  /* d, dmin, scales[12], qh[32] (bit j of byte l: 5th bit of weight l of sub-block j),
                         qs[128] (sub-blocks 2i, 2i+1: low / high nibbles of qs[32i ..]) */
        const float d = f16_at(blk), dmin = f16_at(blk + 2);
        const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        for (int j = 0; j < 8; j++) {  /* 32 lanes l at once */
            int sc, m;
            k_scale_min(blk + 4, j, &sc, &m);
            const __m256 scale = _mm256_set1_ps(d * (float)sc), offset = _mm256_set1_ps(dmin * (float)m);
            const __m256i qs = _mm256_loadu_si256((const __m256i *)(blk + 48 + 32 * (j / 2)));
            const __m256i low = _mm256_and_si256((j & 1) ? _mm256_srli_epi16(qs, 4) : qs, m4);
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, j), one);  /* bit j of qh[l] */
            uint8_t q[32];
            _mm256_storeu_si256((__m256i *)q, _mm256_or_si256(low, _mm256_slli_epi16(high, 4)));
            for (int e = 0; e < 4; e++) {
                const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * e))));
                _mm256_storeu_ps(w + 32 * j + 8 * e, _mm256_sub_ps(_mm256_mul_ps(v, scale), offset));
            }
        }
        break;
    }
    case REQ_Q3_K: {  /* hmask[32], qs[64], scales[12] (sixteen 6-bit, biased by 32), d: weight 32i + l
                         has low 2 bits (qs[32(i/4) + l] >> 2(i%4)) & 3, minus 4 where bit i of hmask[l] is 0 */
        const float d = f16_at(blk + 108);
        float dl[16];
        for (int k = 0; k < 16; k++) {
            const int lo = (blk[96 + k % 8] >> (4 * (k / 8))) & 15, hi = (blk[104 + k % 4] >> (2 * (k / 4))) & 3;
            dl[k] = d * (float)((int8_t)(lo | hi << 4) - 32);
        }
        for (int i = 0; i < 8; i++)
            for (int l = 0; l < 32; l++) {
                const int q = ((blk[32 + 32 * (i / 4) + l] >> (2 * (i % 4))) & 3) - (((blk[l] >> i) & 1) ? 0 : 4);
                w[32 * i + l] = (float)q * dl[(32 * i + l) / 16];
            }
        break;
    }
    case REQ_Q2_K: {  /* scales[16] (scale | min << 4), qs[64] (as Q3_K's low bits), d, dmin */
        const float d = f16_at(blk + 80), dmin = f16_at(blk + 82);
        for (int i = 0; i < 8; i++)
            for (int l = 0; l < 32; l++) {
                const int f = 32 * i + l, sc = blk[f / 16];
                const float p = (float)((blk[16 + 32 * (i / 4) + l] >> (2 * (i % 4))) & 3) * (d * (float)(sc & 15));
                w[f] = p - dmin * (float)(sc >> 4);
            }
        break;
    }
    case REQ_IQ4_XS: {  /* d, scales_h (u16: bits 2j, 2j+1), scales_l[4] (nibbles), qs[128]: sub-block j of 32,
                           6-bit scale biased by 32, values from the IQ4 grid (low nibbles first) */
        const float d = f16_at(blk);
        const int sh = blk[2] | blk[3] << 8;
        for (int j = 0; j < 8; j++) {
            const int sc = (((blk[4 + j / 2] >> (4 * (j % 2))) & 15) | ((sh >> (2 * j)) & 3) << 4) - 32;
            const float dl = d * (float)sc;
            const uint8_t *qs = blk + 8 + 16 * j;
            for (int l = 0; l < 32; l++) w[32 * j + l] = IQ4_VALUES[l < 16 ? qs[l] & 15 : qs[l - 16] >> 4] * dl;
        }
        break;
    }
    case REQ_IQ4_NL: {  /* d, qs[16]: the IQ4 grid, low nibbles first */
        const float d = f16_at(blk);
        for (int l = 0; l < 32; l++) w[l] = IQ4_VALUES[l < 16 ? blk[2 + l] & 15 : blk[2 + l - 16] >> 4] * d;
        break;
    }
    case REQ_Q8_0: {  /* d, int8 q[32] */
        const float d = f16_at(blk);
        for (int l = 0; l < 32; l++) w[l] = (float)(int8_t)blk[2 + l] * d;
        break;
    }
    case REQ_Q4_0: case REQ_Q4_1: {  /* d, (Q4_1: m), qs[16]: weight l < 16 the low nibble of qs[l], else
                                        the high nibble of qs[l - 16]; Q4_0: (q − 8)·d, Q4_1: q·d + m */
        const int q41 = type == REQ_Q4_1;
        const float d = f16_at(blk), m = q41 ? f16_at(blk + 2) : 0.0f;
        const uint8_t *qs = blk + (q41 ? 4 : 2);
        for (int l = 0; l < 32; l++) {
            const int q = l < 16 ? qs[l] & 15 : qs[l - 16] >> 4;
            w[l] = q41 ? (float)q * d + m : (float)(q - 8) * d;
        }
        break;
    }
    case REQ_Q5_0: case REQ_Q5_1: {  /* d, (Q5_1: m), qh (u32: bit l the 5th bit of weight l), qs[16] as Q4_0 */
        const int q51 = type == REQ_Q5_1;
        const float d = f16_at(blk), m = q51 ? f16_at(blk + 2) : 0.0f;
        uint32_t qh;
        memcpy(&qh, blk + (q51 ? 4 : 2), 4);
        const uint8_t *qs = blk + (q51 ? 8 : 6);
        for (int l = 0; l < 32; l++) {
            const int q = (l < 16 ? qs[l] & 15 : qs[l - 16] >> 4) | (int)((qh >> l) & 1) << 4;
            w[l] = q51 ? (float)q * d + m : (float)(q - 16) * d;
        }
        break;
    }
    case REQ_Q4_K: {  /* d, dmin, scales[12], qs[128]: sub-blocks 2i, 2i+1 the low / high nibbles of qs[32i ..] */
        const float d = f16_at(blk), dmin = f16_at(blk + 2);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            k_scale_min(blk + 4, j, &sc, &m);
            const float scale = d * (float)sc, offset = dmin * (float)m;
            const uint8_t *qs = blk + 16 + 32 * (j / 2);
            for (int l = 0; l < 32; l++) w[32 * j + l] = (float)((j & 1) ? qs[l] >> 4 : qs[l] & 15) * scale - offset;
        }
        break;
    }
    }
}

#define ROUND_EVEN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)  /* as nearbyintf / torch.round */

ALWAYS_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

ALWAYS_INLINE float req_hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

ALWAYS_INLINE float req_hmin(__m256 v) {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)));
}

/* 32 weights -> row i of a grouped int8 group (the layout of phi3_pack_ggml_q8_0): s = fp16(max|w| / 127)
 * (at least 6.1e-5), q = round(w / s), as phi3.quant.quantize_int8_groups does (a true division, so
 * the same bytes) */
static void int8_group(const float *x, int i, uint8_t *o) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int k = 0; k < 32; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    float s = req_hmax(m) / 127.0f;
    s = s < 6.1e-5f ? 6.1e-5f : s;
    const uint16_t hs = _cvtss_sh(s, 0);
    memcpy(o + 2 * i, &hs, 2);
    const __m256 sv = _mm256_set1_ps(_cvtsh_ss(hs)), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    __m256i q[4];
    for (int k = 0; k < 4; k++) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + 8 * k), sv), ROUND_EVEN);
        q[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    /* 32 int32 in −127..127 -> 32 int8 in order: the packs interleave 128-bit lanes, the permute undoes it */
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    uint32_t words[8];  /* word c: weights 4c .. 4c + 3 */
    _mm256_storeu_si256((__m256i *)words, bytes);
    for (int c = 0; c < 8; c++) memcpy(o + 16 + 32 * c + 4 * i, words + c, 4);
}

/* One group of G weights (G a multiple of 8) -> fp16 scale *hs and min *hm, levels q[G] in 0..15, as
 * phi3.quant.quantize_int4(refine) does: scale and min from the range; then `refine` times the
 * least-squares fit of the levels they give (kept only where it is a real fit); both rounded to fp16;
 * q = round((w − m) / s). Without refinement the scale is (max − fp16 min) / 15 as there, and the
 * results are torch's bit for bit (the same float operations); with it the sums run in another order
 * than torch's, so a byte may differ from it in the last bit. */
static void fit_int4(const float *x, int G, int refine, uint16_t *hs, uint16_t *hm, int32_t *q) {
    __m256 vmin = _mm256_loadu_ps(x), vmax = vmin, vsum = _mm256_setzero_ps();
    for (int k = 0; k < G; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        vmin = _mm256_min_ps(vmin, v);
        vmax = _mm256_max_ps(vmax, v);
        vsum = _mm256_add_ps(vsum, v);
    }
    const float lo = req_hmin(vmin), hi = req_hmax(vmax), sw = hsum_ps(vsum), n = (float)G;
    float scale = (hi - lo) / 15.0f, low = lo;
    scale = scale < 1e-12f ? 1e-12f : scale;
    const __m256 zero = _mm256_setzero_ps(), fifteen = _mm256_set1_ps(15.f);
    for (int it = 0; it < refine; it++) {
        const __m256 lv = _mm256_set1_ps(low), sv = _mm256_set1_ps(scale);
        __m256 a_l = zero, a_ll = zero, a_lw = zero;
        for (int k = 0; k < G; k += 8) {
            const __m256 v = _mm256_loadu_ps(x + k);
            __m256 l = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(v, lv), sv), ROUND_EVEN);
            l = _mm256_min_ps(_mm256_max_ps(l, zero), fifteen);
            a_l = _mm256_add_ps(a_l, l);
            a_ll = _mm256_add_ps(a_ll, _mm256_mul_ps(l, l));
            a_lw = _mm256_add_ps(a_lw, _mm256_mul_ps(l, v));
        }
        const float sl = hsum_ps(a_l), sll = hsum_ps(a_ll), slw = hsum_ps(a_lw);
        const float det = n * sll - sl * sl, dc = det < 1e-12f ? 1e-12f : det;
        const float fs = (n * slw - sl * sw) / dc, fl = (sll * sw - sl * slw) / dc;
        if (det > 0.f && fs > 0.f) { scale = fs; low = fl; }
    }
    low = low < -65504.f ? -65504.f : low > 65504.f ? 65504.f : low;
    *hm = _cvtss_sh(low, 0);
    if (!refine) scale = (hi - _cvtsh_ss(*hm)) / 15.0f;
    scale = scale < 6.1e-5f ? 6.1e-5f : scale > 65504.f ? 65504.f : scale;
    *hs = _cvtss_sh(scale, 0);
    const __m256 sv = _mm256_set1_ps(_cvtsh_ss(*hs)), mv = _mm256_set1_ps(_cvtsh_ss(*hm));
    for (int k = 0; k < G; k += 8) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(x + k), mv), sv), ROUND_EVEN);
        r = _mm256_min_ps(_mm256_max_ps(r, zero), fifteen);
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_cvtps_epi32(r));
    }
}

/* 32 weights -> row i of an int4 group with mins (the layout of phi3_pack_int4, G = 32), fitted as
 * phi3.quant.quantize_int4(refine=2) does (`fit_int4`). */
static void int4_group(const float *x, int i, uint8_t *o) {
    uint16_t hs, hm;
    int32_t q[32];
    fit_int4(x, 32, 2, &hs, &hm, q);
    memcpy(o + 2 * i, &hs, 2);
    memcpy(o + 16 + 2 * i, &hm, 2);
    for (int c = 0; c < 4; c++)
        for (int b = 0; b < 4; b++) o[32 + 32 * c + 4 * i + b] = (uint8_t)(q[8 * c + b] | q[8 * c + 4 + b] << 4);
}

/* Source rows of the quantizers below: dtype 0 fp32, 1 bf16, 2 fp16, or DTYPE_GGML + t: GGUF blocks of
 * type t of phi3_dequant_ggml, dequantized a row at a time (requantizing without a float copy) */
#define DTYPE_GGML 16

static size_t row_bytes(int dtype, int K) {
    if (dtype >= DTYPE_GGML) return (size_t)K / REQ_BLOCK[dtype - DTYPE_GGML] * REQ_BYTES[dtype - DTYPE_GGML];
    return (size_t)K * (dtype == 0 ? 4 : 2);
}

/* K weights of `dtype` -> fp32 */
static void row_to_float(const void *w, int dtype, int K, float *out) {
    if (dtype >= DTYPE_GGML) {
        const int t = dtype - DTYPE_GGML, bsize = REQ_BLOCK[t], bbytes = REQ_BYTES[t];
        for (int b = 0; b < K / bsize; b++) dequant_block(t, (const uint8_t *)w + (size_t)b * bbytes, out + (size_t)b * bsize);
        return;
    }
    if (dtype == 0) { memcpy(out, w, (size_t)K * 4); return; }
    const uint16_t *h = w;
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(h + k));
        _mm256_storeu_ps(out + k, dtype == 1 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
                                             : _mm256_cvtph_ps(v));
    }
    for (; k < K; k++) {
        const uint32_t u = (uint32_t)h[k] << 16;
        if (dtype == 1) memcpy(out + k, &u, 4);
        else out[k] = _cvtsh_ss(h[k]);
    }
}

/* Dense weights w [N, K] of `dtype` (K a multiple of G, G of 8) -> the portable int4 form of
 * phi3.quant.quantize_int4: qw uint8 [N, K/2] (low nibble = even column), scales and mins fp16 [N, K/G]. */
void phi3_quantize_int4(const void *w, int dtype, int N, int K, int G, int refine, uint8_t *qw, uint16_t *scales,
                        uint16_t *mins, int nthreads) {
    const int ng = K / G;
    #pragma omp parallel num_threads(nthreads)
    {
        float *x = malloc((size_t)K * sizeof(float));
        int32_t *q = malloc((size_t)G * sizeof(int32_t));
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            row_to_float((const uint8_t *)w + (size_t)n * row_bytes(dtype, K), dtype, K, x);
            for (int g = 0; g < ng; g++) {
                fit_int4(x + (size_t)g * G, G, refine, scales + (size_t)n * ng + g, mins + (size_t)n * ng + g, q);
                uint8_t *o = qw + (size_t)n * K / 2 + (size_t)g * G / 2;
                for (int j = 0; j < G / 2; j++) o[j] = (uint8_t)(q[2 * j] | q[2 * j + 1] << 4);
            }
        }
        free(x);
        free(q);
    }
}

/* Dense weights w [N, K] of `dtype` (K a multiple of 32) -> GGUF blocks [N][K/32][34 or 18], bit for bit
 * as ggml's reference quantizers (quantize_row_q8_0_ref / quantize_row_q4_0_ref) and gguf-py write them.
 * type 0, Q8_0: d = amax / 127, q = roundf(w · (1/d)); type 1, Q4_0: d = (the first w of largest |w|)
 * / −8, q = min(15, (int)(w · (1/d) + 8.5)); type 2, Q4_1: d = (max − min) / 15, m = min, q = min(15,
 * (int)((w − m) · (1/d) + 0.5)); qs[j] = q[j] | q[j + 16] << 4, d (and m) stored as fp16. Products
 * and sums stay apart (fp-contract off), as in the reference. */
__attribute__((optimize("fp-contract=off")))
void phi3_quantize_ggml(const void *w, int dtype, int N, int K, int type, uint8_t *out, int nthreads) {
    const int nb = K / 32;
    const size_t bsize = type == 0 ? 34 : type == 1 ? 18 : 20;
    #pragma omp parallel num_threads(nthreads)
    {
        float *x = malloc((size_t)K * sizeof(float));
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            row_to_float((const uint8_t *)w + (size_t)n * row_bytes(dtype, K), dtype, K, x);
            for (int b = 0; b < nb; b++) {
                const float *v = x + 32 * b;
                uint8_t *o = out + ((size_t)n * nb + b) * bsize;
                if (type == 2) {
                    float lo = FLT_MAX, hi = -FLT_MAX;
                    for (int j = 0; j < 32; j++) { lo = v[j] < lo ? v[j] : lo; hi = v[j] > hi ? v[j] : hi; }
                    const float d = (hi - lo) / 15.0f, id = d != 0.f ? 1.0f / d : 0.0f;
                    const uint16_t hd = _cvtss_sh(d, 0), hm = _cvtss_sh(lo, 0);
                    memcpy(o, &hd, 2);
                    memcpy(o + 2, &hm, 2);
                    for (int j = 0; j < 16; j++) {
                        const int a = (int)(int8_t)((v[j] - lo) * id + 0.5f), b = (int)(int8_t)((v[16 + j] - lo) * id + 0.5f);
                        o[4 + j] = (uint8_t)((a < 15 ? a : 15) | (b < 15 ? b : 15) << 4);
                    }
                    continue;
                }
                float amax = 0.f, max = 0.f;
                for (int j = 0; j < 32; j++) {
                    const float a = fabsf(v[j]);
                    if (amax < a) { amax = a; max = v[j]; }
                }
                const float d = type == 0 ? amax / 127.0f : max / -8.0f, id = d != 0.f ? 1.0f / d : 0.0f;
                const uint16_t hd = _cvtss_sh(d, 0);
                memcpy(o, &hd, 2);
                if (type == 0) {
                    for (int j = 0; j < 32; j++) o[2 + j] = (uint8_t)(int8_t)roundf(v[j] * id);
                } else {
                    for (int j = 0; j < 16; j++) {
                        const int lo = (int)(int8_t)(v[j] * id + 8.5f), hi = (int)(int8_t)(v[16 + j] * id + 8.5f);
                        o[2 + j] = (uint8_t)((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
                    }
                }
            }
        }
        free(x);
    }
}

/* Dense weights w [N, K] of `dtype` -> per-channel int8 as phi3.quant.quantize_int8_rows:
 * s = max(max|w| / 127, 1e-12) fp32 [N], q = round(w / s) in −128..127 int8 [N, K] (bit for bit). */
void phi3_quantize_int8_rows(const void *w, int dtype, int N, int K, int8_t *q, float *scales, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        float *x = malloc((size_t)K * sizeof(float));
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            row_to_float((const uint8_t *)w + (size_t)n * row_bytes(dtype, K), dtype, K, x);
            float amax = 0.f;
            for (int k = 0; k < K; k++) { const float a = fabsf(x[k]); amax = a > amax ? a : amax; }
            float s = amax / 127.0f;
            s = s < 1e-12f ? 1e-12f : s;
            scales[n] = s;
            int8_t *o = q + (size_t)n * K;
            for (int k = 0; k < K; k++) {
                float r = nearbyintf(x[k] / s);
                o[k] = (int8_t)(r < -128.f ? -128.f : r > 127.f ? 127.f : r);
            }
        }
        free(x);
    }
}

/* blocks [N][nb][REQ_BYTES] of `type` -> grouped int8 (bits 8: [N/8][K/32][16 + 256]) or int4 with mins
 * (bits 4: [N/8][K/32][32 + 128]), K = nb · REQ_BLOCK, in one pass. */
void phi3_requant_ggml(const uint8_t *blocks, int type, int N, int nb, int bits, uint8_t *out, int nthreads) {
    const int bsize = REQ_BLOCK[type], bbytes = REQ_BYTES[type], ng = nb * bsize / 32;
    const size_t gbytes = bits == 8 ? 16 + 256 : 32 + 128;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < N / 8; rb++) {
        float w[256];
        for (int i = 0; i < 8; i++)
            for (int b = 0; b < nb; b++) {
                dequant_block(type, blocks + ((size_t)(rb * 8 + i) * nb + b) * bbytes, w);
                for (int j = 0; j < bsize / 32; j++) {
                    uint8_t *o = out + ((size_t)rb * ng + b * (bsize / 32) + j) * gbytes;
                    if (bits == 8) int8_group(w + 32 * j, i, o);
                    else int4_group(w + 32 * j, i, o);
                }
            }
    }
}

/* blocks [nblocks][REQ_BYTES] of `type` -> float32 [nblocks][REQ_BLOCK], the floats of phi3.gguf's
 * torch kernels. */
void phi3_dequant_ggml(const uint8_t *blocks, int type, long nblocks, float *out, int nthreads) {
    const int bsize = REQ_BLOCK[type], bbytes = REQ_BYTES[type];
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long b = 0; b < nblocks; b++) dequant_block(type, blocks + b * bbytes, out + b * bsize);
}

/* Q8_0 (bsize 34: fp16 d, 32 int8) -> the grouped int8 layout: per (rb, g) the 8 rows' fp16 d, then
 * chunk c (0..7) with 4 bytes w[4c .. 4c + 3] of each row. */
void phi3_pack_ggml_q8_0(const uint8_t *blocks, int N, int nb, uint8_t *out, int nthreads) {
    const size_t gbytes = 16 + 256;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int rb = 0; rb < N / 8; rb++) {
        for (int g = 0; g < nb; g++) {
            uint8_t *o = out + ((size_t)rb * nb + g) * gbytes;
            for (int i = 0; i < 8; i++) {
                const uint8_t *blk = blocks + ((size_t)(rb * 8 + i) * nb + g) * 34;
                memcpy(o + 2 * i, blk, 2);
                for (int c = 0; c < 8; c++) memcpy(o + 16 + 32 * c + 4 * i, blk + 2 + 4 * c, 4);
            }
        }
    }
}

/* Rows `ids` of a weight in the int4 / int8 layouts above, dequantized to fp32 out[n][K] (a tied
 * model's token table read from its head). */
void phi3_int4_rows(const uint8_t *packed, const int64_t *ids, int n, int K, int G, int symmetric, float *out) {
    const int ng = K / G;
    const size_t head = symmetric ? 16 : 32, gbytes = head + 4 * (size_t)G;
    for (int r = 0; r < n; r++) {
        const int64_t id = ids[r];
        const int i = (int)(id % 8);
        for (int g = 0; g < ng; g++) {
            const uint8_t *p = packed + ((size_t)(id / 8) * ng + g) * gbytes;
            uint16_t hs, hm;
            memcpy(&hs, p + 2 * i, 2);
            const float s = _cvtsh_ss(hs);
            float m = -8.f * s;
            if (!symmetric) { memcpy(&hm, p + 16 + 2 * i, 2); m = _cvtsh_ss(hm); }
            float *o = out + (size_t)r * K + (size_t)g * G;
            for (int c = 0; c < G / 8; c++) {
                const uint8_t *q = p + head + 32 * c + 4 * i;
                for (int b = 0; b < 4; b++) {
                    o[8 * c + b] = (float)(q[b] & 15) * s + m;
                    o[8 * c + 4 + b] = (float)(q[b] >> 4) * s + m;
                }
            }
        }
    }
}

void phi3_int8_rows(const uint8_t *packed, const int64_t *ids, int n, int K, int B, const float *row_scale, float *out) {
    const int ng = K / B;
    const size_t head = row_scale ? 0 : 16, gbytes = head + 8 * (size_t)B;
    for (int r = 0; r < n; r++) {
        const int64_t id = ids[r];
        const int i = (int)(id % 8);
        for (int g = 0; g < ng; g++) {
            const uint8_t *p = packed + ((size_t)(id / 8) * ng + g) * gbytes;
            float s;
            if (row_scale) s = row_scale[id];
            else { uint16_t h; memcpy(&h, p + 2 * i, 2); s = _cvtsh_ss(h); }
            float *o = out + (size_t)r * K + (size_t)g * B;
            for (int c = 0; c < B / 4; c++) {
                const int8_t *q = (const int8_t *)(p + head + 32 * c + 4 * i);
                for (int b = 0; b < 4; b++) o[4 * c + b] = (float)q[b] * s;
            }
        }
    }
}

/* exp(x) for x <= 0, 8 lanes: 2^n · p(r) with x = n·ln2 + r, |r| <= ln2/2, a degree-6 Taylor
 * polynomial (relative error < 2e-7, below fp32 rounding of the softmax sums); x < -87 gives 0. */
ALWAYS_INLINE __m256 exp_neg_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln2 split hi + lo: exact n·hi */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* The 8 horizontal sums of a0..a7, in order, in one vector. */
ALWAYS_INLINE __m256 hsum8_ps(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  /* [0123 lo | 0123 hi] */
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

ALWAYS_INLINE __m256 load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* ---- dense bf16 weights, few tokens (decode) ------------------------------------------------ */

ALWAYS_INLINE __m256 load_bf16(const uint16_t *p) {  /* bf16 is the top half of an fp32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}


ALWAYS_INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* rows [n0, n0 + R) (R <= 4) for tokens [m0, m0 + MT): 4 weight streams, each vector of weights
 * feeding MT tokens; fp32 sums. */
ALWAYS_INLINE void bf16_block(const uint16_t *W, int K, const float *x, int m0, const int MT, int n0, int R,
                              float *y, int N) {
    __m256 acc[4][3];
    const uint16_t *w[4];
    for (int r = 0; r < 4; r++) {
        w[r] = W + (size_t)(n0 + (r < R ? r : 0)) * K;
        for (int t = 0; t < MT; t++) acc[r][t] = _mm256_setzero_ps();
    }
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[3];
        for (int t = 0; t < MT; t++) xv[t] = _mm256_loadu_ps(x + (size_t)(m0 + t) * K + k);
        for (int r = 0; r < 4; r++) {
            const __m256 wv = load_bf16(w[r] + k);
            for (int t = 0; t < MT; t++) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < R; r++) {
            float s = hsum_ps(acc[r][t]);
            for (int kk = k; kk < K; kk++) s += bf16_to_f32(w[r][kk]) * x[(size_t)(m0 + t) * K + kk];
            y[(size_t)(m0 + t) * N + n0 + r] = s;
        }
}

/* One token: each weight row read straight through, four accumulators of 8 (one stream per thread,
 * which the hardware prefetchers follow: 34 GB/s on 2 cores against 25 for `bf16_block`'s four
 * interleaved rows; with 2-3 tokens `bf16_block` is faster, its loads of x shared by 4 rows). */
static float bf16_row_dot(const uint16_t *w, const float *x, int K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(load_bf16(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load_bf16(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load_bf16(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load_bf16(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load_bf16(w + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += bf16_to_f32(w[k]) * x[k];
    return s;
}

/* x fp32 [M, K] · W bf16 [N, K] (row-major, as stored) -> y fp32 [M, N]. For a few tokens (decode)
 * this streams the weights once per 3 tokens at memory speed; PyTorch's bf16 matmul on CPUs
 * without native bf16 arithmetic runs at a third of that. */
void phi3_bf16_matmul(const float *x, int M, int K, const uint16_t *W, int N, float *y, int nthreads) {
    if (M == 1) {
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int n = 0; n < N; n++) y[n] = bf16_row_dot(W + (size_t)n * K, x, K);
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int n0 = 0; n0 < N; n0 += 4) {
        const int R = N - n0 < 4 ? N - n0 : 4;
        int m0 = 0;
        for (; m0 + 3 <= M; m0 += 3) bf16_block(W, K, x, m0, 3, n0, R, y, N);
        if (M - m0 == 2) bf16_block(W, K, x, m0, 2, n0, R, y, N);
        else if (M - m0 == 1) bf16_block(W, K, x, m0, 1, n0, R, y, N);
    }
}

/* Attention of one new query per row over an fp16 KV cache (decode; llama.cpp also keeps K and V
 * in fp16). q fp32 [B, H, D]; k, v fp16 [B, KV, L, D] of which keys 0 .. S-1 are read; query head h
 * reads KV head h / (H / KV); valid uint8 [B, S] (1 = attend) or NULL; out fp32 [B, H, D].
 * D must be a multiple of 8. Softmax in fp32, scale 1/sqrt(D) given as `scale`.
 * Scores go 8 keys at a time (8 dot products side by side, one horizontal reduction for all 8);
 * the weighted sum of V goes through D in slices of 32 outputs held in registers, a block of keys
 * at a time so that each cache line of V comes from memory once. */
#define VBLOCK 64
#define KAHEAD 32  /* keys ahead for software prefetch */
#define MAX_HEAD_DIM 512
/* One query head: o[D] = softmax(qh·khᵀ · scale over keys 0 .. S-1 with ok[s] != 0) · vh, keys and
 * values fp16 rows of D; p: scratch of S rounded up to 8 floats, 32-byte aligned. */
ALWAYS_INLINE __m256 load_kv(const uint16_t *p, const int BF16) { return BF16 ? load_bf16(p) : load_f16(p); }

/* BF16: keys and values are bf16 (a bf16 model's cache), products in fp32 without the fp16
 * roundings of the query and the weights that mirror llama.cpp's fp16 cache. */
ALWAYS_INLINE void attend_head_t(const float *qf, const uint16_t *kh, const uint16_t *vh, const uint8_t *ok, int S,
                                 int D, float scale, float *o, float *p, const int BF16) {
    const int S8 = (S + 7) & ~7;
    float qh[MAX_HEAD_DIM];  /* fp16: the query rounded to fp16, as llama.cpp multiplies it with the fp16 keys */
    for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qf + d);
        _mm256_storeu_ps(qh + d, BF16 ? qv : _mm256_cvtph_ps(_mm256_cvtps_ph(qv, _MM_FROUND_TO_NEAREST_INT)));
    }
    /* scores, 8 keys at a time (the last block reads key 0 again for its missing keys) */
    for (int s0 = 0; s0 < S; s0 += 8) {
        const uint16_t *kr[8];
        for (int j = 0; j < 8; j++) kr[j] = kh + (size_t)(s0 + j < S ? s0 + j : 0) * D;
        if (s0 + KAHEAD + 8 <= S) {  /* the rows KAHEAD keys ahead: 8·D fp16 = 8·2·D bytes */
            const char *ahead = (const char *)(kh + (size_t)(s0 + KAHEAD) * D);
            for (int l = 0; l < 16 * D; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
        }
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int d = 0; d < D; d += 8) {
            const __m256 qd = _mm256_loadu_ps(qh + d);
            a0 = _mm256_fmadd_ps(qd, load_kv(kr[0] + d, BF16), a0);
            a1 = _mm256_fmadd_ps(qd, load_kv(kr[1] + d, BF16), a1);
            a2 = _mm256_fmadd_ps(qd, load_kv(kr[2] + d, BF16), a2);
            a3 = _mm256_fmadd_ps(qd, load_kv(kr[3] + d, BF16), a3);
            a4 = _mm256_fmadd_ps(qd, load_kv(kr[4] + d, BF16), a4);
            a5 = _mm256_fmadd_ps(qd, load_kv(kr[5] + d, BF16), a5);
            a6 = _mm256_fmadd_ps(qd, load_kv(kr[6] + d, BF16), a6);
            a7 = _mm256_fmadd_ps(qd, load_kv(kr[7] + d, BF16), a7);
        }
        _mm256_store_ps(p + s0, _mm256_mul_ps(hsum8_ps(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_set1_ps(scale)));
    }
    float mx = -INFINITY;
    for (int s = 0; s < S; s++) {
        if (ok && !ok[s]) p[s] = -INFINITY;
        else if (p[s] > mx) mx = p[s];
    }
    if (mx == -INFINITY) {  /* nothing to attend: zeros, never NaN */
        for (int d = 0; d < D; d++) o[d] = 0.f;
        return;
    }
    for (int s = S; s < S8; s++) p[s] = -INFINITY;
    __m256 sum = _mm256_setzero_ps();
    for (int s0 = 0; s0 < S8; s0 += 8) {
        const __m256 e = exp_neg_ps(_mm256_sub_ps(_mm256_load_ps(p + s0), _mm256_set1_ps(mx)));
        _mm256_store_ps(p + s0, e);
        sum = _mm256_add_ps(sum, e);
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    const __m256 inv = _mm256_set1_ps(1.f / _mm_cvtss_f32(r));
    for (int s0 = 0; s0 < S8; s0 += 8) {  /* the weights normalised (fp16: then rounded, as llama.cpp's V product) */
        const __m256 w = _mm256_mul_ps(_mm256_load_ps(p + s0), inv);
        _mm256_store_ps(p + s0, BF16 ? w : _mm256_cvtph_ps(_mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT)));
    }
    /* o = Σ p_s v_s: blocks of VBLOCK keys (in L1 after the first slice), slices of 32 outputs */
    for (int d = 0; d < D; d++) o[d] = 0.f;
    for (int s0 = 0; s0 < S; s0 += VBLOCK) {
        const int s1 = s0 + VBLOCK < S ? s0 + VBLOCK : S;
        int d0 = 0;
        for (; d0 + 32 <= D; d0 += 32) {
            __m256 o0 = _mm256_loadu_ps(o + d0), o1 = _mm256_loadu_ps(o + d0 + 8);
            __m256 o2 = _mm256_loadu_ps(o + d0 + 16), o3 = _mm256_loadu_ps(o + d0 + 24);
            for (int s = s0; s < s1; s++) {
                if (d0 == 0 && s + KAHEAD < S) {  /* first slice: fetch the whole row ahead */
                    const char *ahead = (const char *)(vh + (size_t)(s + KAHEAD) * D);
                    for (int l = 0; l < 2 * D; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
                }
                if (p[s] == 0.f) continue;
                const __m256 w = _mm256_set1_ps(p[s]);
                const uint16_t *vs = vh + (size_t)s * D + d0;
                o0 = _mm256_fmadd_ps(w, load_kv(vs, BF16), o0);
                o1 = _mm256_fmadd_ps(w, load_kv(vs + 8, BF16), o1);
                o2 = _mm256_fmadd_ps(w, load_kv(vs + 16, BF16), o2);
                o3 = _mm256_fmadd_ps(w, load_kv(vs + 24, BF16), o3);
            }
            _mm256_storeu_ps(o + d0, o0);
            _mm256_storeu_ps(o + d0 + 8, o1);
            _mm256_storeu_ps(o + d0 + 16, o2);
            _mm256_storeu_ps(o + d0 + 24, o3);
        }
        for (; d0 < D; d0 += 8) {
            __m256 o0 = _mm256_loadu_ps(o + d0);
            for (int s = s0; s < s1; s++)
                if (p[s] != 0.f) o0 = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), load_kv(vh + (size_t)s * D + d0, BF16), o0);
            _mm256_storeu_ps(o + d0, o0);
        }
    }
}

/* Every (row, query head) of q fp32 [B, H, D] over the cache k, v [B, KV, L, D] (fp16, or bf16 with
 * BF16: a bf16 model's decode), slots 0 .. S-1; out fp32 [B, H, D]. */
ALWAYS_INLINE void attend_rows(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid, float *out,
                               int B, int H, int KV, int L, int S, int D, float scale, int nthreads, const int BF16) {
    const int group = H / KV;
    const size_t scratch = sizeof(float) * (size_t)((S + 7) & ~7) + 32;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        float *p = aligned_alloc(32, scratch & ~(size_t)31);
        attend_head_t(q + (size_t)bh * D, k + ((size_t)b * KV + h / group) * L * D,
                      v + ((size_t)b * KV + h / group) * L * D, valid ? valid + (size_t)b * S : NULL, S, D, scale,
                      out + (size_t)bh * D, p, BF16);
        free(p);
    }
}

void phi3_attend_f16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid, float *out,
                     int B, int H, int KV, int L, int S, int D, float scale, int nthreads) {
    attend_rows(q, k, v, valid, out, B, H, KV, L, S, D, scale, nthreads, 0);
}

void phi3_attend_bf16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid, float *out,
                      int B, int H, int KV, int L, int S, int D, float scale, int nthreads) {
    attend_rows(q, k, v, valid, out, B, H, KV, L, S, D, scale, nthreads, 1);
}

/* HF rotate-half RoPE of one head x[D] into y[D]: the first `rot` channels rotated by cos / sin
 * (whose two halves repeat), the rest copied. Products rounded before the sum (no fused
 * multiply-add), as PyTorch's elementwise ops do: the same bits as the unfused path. */
__attribute__((optimize("fp-contract=off")))
static void rope_head(const float *x, const float *cos, const float *sin, int rot, int D, float *y) {
    const int half = rot / 2;
    for (int i = 0; i < half; i++) {
        y[i] = x[i] * cos[i] - x[i + half] * sin[i];
        y[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
    for (int i = rot; i < D; i++) y[i] = x[i];
}

static void store_f16(const float *x, int D, uint16_t *dst) {
    for (int d = 0; d < D; d += 8)
        _mm_storeu_si128((__m128i *)(dst + d), _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT));
}

/* fp32 -> bf16 rounded to nearest even, as PyTorch's cast (a NaN stays a NaN) */
static void store_bf16(const float *x, int D, uint16_t *dst) {
    for (int d = 0; d < D; d++) {
        uint32_t u;
        memcpy(&u, x + d, 4);
        dst[d] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
    }
}

/* One decode step of attention for B rows, straight from the fused projection: qkv fp32 [B, (H + 2·KV)·D]
 * ([Q | K | V] heads); cos, sin fp32 [B, rot] for each row's new position. Row b's new key (rotated)
 * and value go into slot starts[b] of the fp16 (with `bf16`: bf16) caches k, v [B, KV, L, D]; each query head (rotated)
 * then attends over slots lo .. S-1 with `valid` uint8 [B, S] (which must hide what a row may not
 * see when the rows' slots differ) or NULL; out fp32 [B, H·D]. Slots before `lo` are visible to no row
 * (a sliding window has left them behind): they are not read.
 * Replaces ~25 small tensor operations per layer (split, RoPE, transposes, cache writes, casts). */
static void decode_attend(const float *qkv, const float *cos, const float *sin, uint16_t *k, uint16_t *v,
                          const uint8_t *valid, float *out, int B, int H, int KV, int L, const int *starts, int lo,
                          int S, int D, int rot, float scale, int nthreads, int bf16) {
    const int W = (H + 2 * KV) * D, group = H / KV;
    float tmp[MAX_HEAD_DIM];
    for (int b = 0; b < B; b++)
        for (int j = 0; j < KV; j++) {
            const size_t slot = (((size_t)b * KV + j) * L + starts[b]) * D;
            rope_head(qkv + (size_t)b * W + (size_t)(H + j) * D, cos + (size_t)b * rot, sin + (size_t)b * rot, rot, D, tmp);
            (bf16 ? store_bf16 : store_f16)(tmp, D, k + slot);
            (bf16 ? store_bf16 : store_f16)(qkv + (size_t)b * W + (size_t)(H + KV + j) * D, D, v + slot);
        }
    const int n = S - lo;  /* keys attended: slots lo .. S-1 */
    const size_t scratch = sizeof(float) * (size_t)((n + 7) & ~7) + 32;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        float qr[MAX_HEAD_DIM];
        float *p = aligned_alloc(32, scratch & ~(size_t)31);
        rope_head(qkv + (size_t)b * W + (size_t)h * D, cos + (size_t)b * rot, sin + (size_t)b * rot, rot, D, qr);
        const size_t first = (((size_t)b * KV + h / group) * L + lo) * D;
        const uint16_t *kh = k + first, *vh = v + first;
        const uint8_t *ok = valid ? valid + (size_t)b * S + lo : NULL;
        if (bf16) attend_head_t(qr, kh, vh, ok, n, D, scale, out + (size_t)bh * D, p, 1);
        else attend_head_t(qr, kh, vh, ok, n, D, scale, out + (size_t)bh * D, p, 0);
        free(p);
    }
}

void phi3_decode_attend_f16(const float *qkv, const float *cos, const float *sin, uint16_t *k, uint16_t *v,
                            const uint8_t *valid, float *out, int B, int H, int KV, int L, const int *starts, int lo,
                            int S, int D, int rot, float scale, int nthreads) {
    decode_attend(qkv, cos, sin, k, v, valid, out, B, H, KV, L, starts, lo, S, D, rot, scale, nthreads, 0);
}

/* GGUF Q4_0 / Q4_1 blocks -> the portable int4 layout (low nibble = even column). Each block of
 * `bsize` bytes holds 32 weights in 16 bytes at `qs_off` (byte j: w_j in the low nibble, w_{j+16}
 * in the high one); out gets 16 bytes per block, byte i = w_{2i} | w_{2i+1} << 4. */
void phi3_ggml_q4_nibbles(const uint8_t *blocks, long nblocks, int bsize, int qs_off, uint8_t *out, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long b = 0; b < nblocks; b++) {
        const uint8_t *qs = blocks + (size_t)b * bsize + qs_off;
        uint8_t w[32], *o = out + (size_t)b * 16;
        for (int j = 0; j < 16; j++) { w[j] = qs[j] & 15; w[j + 16] = qs[j] >> 4; }
        for (int i = 0; i < 16; i++) o[i] = (uint8_t)(w[2 * i] | (w[2 * i + 1] << 4));
    }
}

/* ---- one decode step of a stack of quantized Phi-3 decoder layers ------------------------------
 * The whole per-token work of the decoder in one call, so no Python or tensor-library dispatch
 * sits between the kernels: per layer RMSNorm, [Q|K|V] projection, RoPE + fp16 cache write +
 * attention (`phi3_decode_attend_f16`), output projection, residual, RMSNorm, [gate|up] projection,
 * up·silu(gate), down projection, residual. The linears are int4 or int8 in the layouts above, or bf16
 * (a bf16 model: the residual stream then stays fp32 inside the call, and the caches are bf16). */
typedef struct {
    const uint8_t *packed;    /* kernel layout; bits 16: the bf16 weight [N, K] as stored */
    const float *row_scale;   /* int8 per output channel: fp32 [N]; NULL for int4 and grouped int8 */
    const float *bias;        /* fp32 [N] or NULL */
    int bits;                 /* 4, 8, or 16 (bf16) */
    int N, K, G;              /* outputs (a multiple of 8), inputs, group / block of inputs */
    int symmetric, levels;    /* int4: scale-only layout; activation rounding levels (1 or 2), both kinds */
} phi3_linear;

typedef struct {
    const float *ln1, *ln2;   /* RMSNorm weights fp32 [D] */
    phi3_linear qkv, o, gate_up, down;
    uint16_t *k, *v;          /* fp16 caches [B, KV, L, hd] (bf16 with kv_bf16) */
    int kv_bf16;
} phi3_layer;

static void linear_forward(const phi3_linear *l, const float *x, int M, float *y, int nthreads) {
    if (l->bits == 4) phi3_int4_matmul(x, M, l->K, l->packed, l->N, l->G, y, nthreads, l->levels, l->symmetric);
    else if (l->bits == 16) phi3_bf16_matmul(x, M, l->K, (const uint16_t *)l->packed, l->N, y, nthreads);
    else phi3_int8_matmul(x, M, l->K, l->packed, l->N, l->G, l->row_scale, y, nthreads, l->levels);
    if (l->bias)
        for (int m = 0; m < M; m++)
            for (int n = 0; n < l->N; n++) y[(size_t)m * l->N + n] += l->bias[n];
}

/* y = x / sqrt(mean(x²) + eps) · w, as llama.cpp's rms_norm + mul: the squares summed in double,
 * the row scaled, then multiplied by the weight. */
static void rms_norm_rows(const float *x, const float *w, float eps, int M, int D, float *y) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * D;
        float *yr = y + (size_t)m * D;
        double sum = 0.0;
        for (int i = 0; i < D; i++) sum += (double)(xr[i] * xr[i]);
        const float scale = 1.0f / sqrtf((float)(sum / D) + eps);
        for (int i = 0; i < D; i++) yr[i] = (xr[i] * scale) * w[i];
    }
}

/* out[m, i] = up · silu(gate) from gu [M, 2I] = [gate | up]; silu(g) = g / (1 + e^−g), with e^−|g| so
 * that the exponential never overflows. I a multiple of 8. */
static void swiglu_rows(const float *gu, int M, int I, float *out) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int m = 0; m < M; m++) {
        const float *g = gu + (size_t)m * 2 * I, *u = g + I;
        float *o = out + (size_t)m * I;
        for (int i = 0; i < I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 e = exp_neg_ps(_mm256_or_ps(gv, sign));  /* e^−|g| */
            const __m256 pos = _mm256_cmp_ps(gv, zero, _CMP_GE_OQ);
            /* g ≥ 0: g / (1 + e^−g); g < 0: g·e^g / (1 + e^g) */
            const __m256 num = _mm256_blendv_ps(_mm256_mul_ps(gv, e), gv, pos);
            const __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(u + i), s));
        }
    }
}

/* Test entry points for the two elementwise steps above. */
void phi3_rms_norm(const float *x, const float *w, float eps, int M, int D, float *y) { rms_norm_rows(x, w, eps, M, D, y); }
void phi3_swiglu(const float *gu, int M, int I, float *out) { swiglu_rows(gu, M, I, out); }

/* x fp32 [B, D] (one new token per row, the residual stream) through `n_layers` layers, in place.
 * H query heads and KV key/value heads of hd channels; intermediate size I; cos, sin fp32 [B, rot]
 * for each row's position; caches hold L slots, row b's new token goes to slot starts[b]; attention
 * over slots lo .. S-1 with valid uint8 [B, S] or NULL (see `phi3_decode_attend_f16`). */
void phi3_decode_layers(float *x, int B, int D, const phi3_layer *layers, int n_layers, float eps, int H, int KV,
                        int hd, int I, const float *cos, const float *sin, int rot, int L, const int *starts,
                        int lo, int S, const uint8_t *valid, float scale, int nthreads) {
    const size_t W = (size_t)(H + 2 * KV) * hd;
    float *h = malloc(sizeof(float) * (size_t)B * (D + W + (size_t)H * hd + 3 * (size_t)I + D));
    float *qkv = h + (size_t)B * D, *att = qkv + (size_t)B * W, *gu = att + (size_t)B * H * hd;
    float *act = gu + (size_t)B * 2 * I, *y = act + (size_t)B * I;
    for (int l = 0; l < n_layers; l++) {
        const phi3_layer *ly = layers + l;
        rms_norm_rows(x, ly->ln1, eps, B, D, h);
        linear_forward(&ly->qkv, h, B, qkv, nthreads);
        decode_attend(qkv, cos, sin, ly->k, ly->v, valid, att, B, H, KV, L, starts, lo, S, hd, rot, scale, nthreads,
                      ly->kv_bf16);
        linear_forward(&ly->o, att, B, y, nthreads);
        for (size_t i = 0; i < (size_t)B * D; i++) x[i] += y[i];
        rms_norm_rows(x, ly->ln2, eps, B, D, h);
        linear_forward(&ly->gate_up, h, B, gu, nthreads);
        swiglu_rows(gu, B, I, act);
        linear_forward(&ly->down, act, B, y, nthreads);
        for (size_t i = 0; i < (size_t)B * D; i++) x[i] += y[i];
    }
    free(h);
}

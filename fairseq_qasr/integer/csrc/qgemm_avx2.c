/* Exact integer GEMM for AVX2 CPUs without int8 dot-product instructions (no VNNI/AMX).
 *
 *   out[m, n] = init[n] - bz * rowsum[m] + sum_g ratio[g, n] * sum_{k in group g} a'[m, k] * b[k, n]
 *
 * a' = a - off: the left operand's codes (int8, int16 or int32 storage, row stride lda) shifted into int16, converted
 * a block of rows at a time into a thread-local buffer (K padded to Kh = Kp / reps, repeated reps times: a product
 * with a right operand stacked from reps parts, e.g. the two bytes of 16-bit codes); rowsum[m] = sum_k a'[m, k] (over
 * one repetition). b: codes in [-255, 255] packed by qasr_pack into panels of 16 columns, [Np/16][Kp/2][16][2] int16.
 * vpmaddwd multiplies int16 pairs into int32 exactly; each group's int32 partial sum (gs columns, gs <= 256 keeps
 * |sum| < 256 * 2^15 * 255 < 2^31) is flushed into int64, times its ratio if given. One group and no ratio: int32
 * out (the caller guarantees the result fits). int64 out may be rounded down by 2^rshift (half up) and get post[n]
 * added: the grouped Linear's epilogue. Integer arithmetic only. Built on first use by cgemm.py. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 4
#define NR 16
#define MB 48 /* rows per thread block: a' [MB, Kp] stays in L2 while the column panels stream past */

int qasr_mr(void) { return MR; }

static int64_t code(const void *a, int type, int64_t i) {
    return type == 0 ? ((const int8_t *)a)[i] : type == 1 ? ((const int16_t *)a)[i] : ((const int32_t *)a)[i];
}

/* b [K, N] (element (k, n) at k * ldk + n * ldn; part 0: the code, 1: its high byte v >> 8, 2: its low byte v & 255)
 * -> rows 0..K-1 of the panels at bp (panel stride Kp * 16; the caller zeroes bp and offsets it to an even row),
 * colsum[n] = sum_k of the packed values (n < N). */
void qasr_pack(const void *b, int type, int64_t ldk, int64_t ldn, int64_t K, int64_t N, int part, int16_t *bp,
               int64_t Kp, int64_t Np, int64_t *colsum) {
    (void)Np;
    for (int64_t n = 0; n < N; n++) colsum[n] = 0;
    for (int64_t k = 0; k < K; k++) {
        int16_t *row = bp + (k / 2) * 2 * NR + (k & 1);
        for (int64_t n = 0; n < N; n++) {
            int64_t v = code(b, type, k * ldk + n * ldn);
            v = part == 1 ? v >> 8 : part == 2 ? v & 255 : v;
            row[(n / NR) * Kp * NR + (n % NR) * 2] = (int16_t)v;
            colsum[n] += v;
        }
    }
}

/* qasr_pack of `batch` matrices: matrix i at b + i * bstride elements, packed to bp + i * bpstride, its column sums
 * to colsum + i * N */
void qasr_pack_batch(const void *b, int type, int64_t bstride, int64_t ldk, int64_t ldn, int64_t K, int64_t N, int part,
                     int16_t *bp, int64_t bpstride, int64_t Kp, int64_t Np, int64_t *colsum, int64_t batch,
                     int nthreads) {
    const int64_t size = type == 0 ? 1 : type == 1 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (batch > 1 && K * N >= 4096)
    for (int64_t i = 0; i < batch; i++)
        qasr_pack((const char *)b + i * bstride * size, type, ldk, ldn, K, N, part, bp + i * bpstride, Kp, Np,
                  colsum + i * N);
}

/* int8 codes of `batch` matrices b [K, N] (matrix i at b + i * bstride, element (k, n) at k * ldk + n * ldn) in the
 * u8 x s8 kernels' layout: out [batch][Np/16][Kq/4][16][4] int8, every byte written (0 past K and N) */
void qasr_pack_bytes(const int8_t *b, int64_t bstride, int64_t ldk, int64_t ldn, int64_t K, int64_t N, int8_t *out,
                     int64_t Kq, int64_t Np, int64_t batch, int nthreads) {
    const int64_t mat = Np * Kq;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (batch > 1 && K * N >= 4096)
    for (int64_t i = 0; i < batch; i++) {
        int8_t *o = out + i * mat;
        const int8_t *src = b + i * bstride;
        memset(o, 0, (size_t)mat);
        for (int64_t k = 0; k < K; k++) {
            int8_t *row = o + (k / 4) * 4 * NR + (k & 3);
            const int8_t *s = src + k * ldk;
            for (int64_t n = 0; n < N; n++) row[(n / NR) * Kq * NR + (n % NR) * 4] = s[n * ldn];
        }
    }
}

static inline int64_t floordiv(int64_t a, int64_t b) { /* b > 0 */
    int64_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

static void load_rows(const void *a, int type, int64_t lda, int32_t off, int64_t M, int64_t K, int64_t Kh, int reps,
                      int64_t m0, int64_t rows, int16_t *buf, int64_t *rowsum) {
    const int64_t Kp = Kh * reps;
    for (int64_t r = 0; r < rows; r++) {
        int16_t *dst = buf + r * Kp;
        int64_t s = 0;
        if (m0 + r < M) {
            const int64_t base = (m0 + r) * lda;
            if (type == 0) {
                const int8_t *src = (const int8_t *)a + base;
                for (int64_t k = 0; k < K; k++) { dst[k] = (int16_t)(src[k] - off); s += dst[k]; }
            } else if (type == 1) {
                const int16_t *src = (const int16_t *)a + base;
                for (int64_t k = 0; k < K; k++) { dst[k] = (int16_t)(src[k] - off); s += dst[k]; }
            } else {
                const int32_t *src = (const int32_t *)a + base;
                for (int64_t k = 0; k < K; k++) { dst[k] = (int16_t)(src[k] - off); s += dst[k]; }
            }
            memset(dst + K, 0, (size_t)(Kh - K) * sizeof(int16_t));
        } else {
            memset(dst, 0, (size_t)Kh * sizeof(int16_t));
        }
        for (int rep = 1; rep < reps; rep++) memcpy(dst + rep * Kh, dst, (size_t)Kh * sizeof(int16_t));
        rowsum[r] = s;
    }
}

/* k pair p of an MR x NR tile: acc[2r], acc[2r+1] (columns 0-7, 8-15 of row r) += a[r, 2p:2p+2] . b[2p:2p+2, :] */
static inline void tile_pair(const int16_t *a, int64_t lda, const int16_t *bp, int64_t p, __m256i *acc) {
    __m256i b0 = _mm256_loadu_si256((const __m256i *)(bp + p * 32));
    __m256i b1 = _mm256_loadu_si256((const __m256i *)(bp + p * 32 + 16));
    for (int r = 0; r < MR; r++) {
        __m256i x = _mm256_set1_epi32(*(const int32_t *)(a + r * lda + 2 * p));
        acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(x, b0));
        acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(x, b1));
    }
}

/* MR x NR tile over k pairs [p0, p1) */
static inline void tile(const int16_t *a, int64_t lda, const int16_t *bp, int64_t p0, int64_t p1, __m256i *acc) {
    for (int i = 0; i < 2 * MR; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t p = p0; p < p1; p++) tile_pair(a, lda, bp, p, acc);
}

static inline void flush(int64_t *t, __m256i acc, const int32_t *ratio) {
    __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc));
    __m256i hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc, 1));
    if (ratio) {
        lo = _mm256_mul_epi32(lo, _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)ratio)));
        hi = _mm256_mul_epi32(hi, _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(ratio + 4))));
    }
    _mm256_storeu_si256((__m256i *)t, _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)t), lo));
    _mm256_storeu_si256((__m256i *)(t + 4), _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(t + 4)), hi));
}

/* The u8 x s8 way (vpmaddubsw, 32 products an instruction) for int8 left codes and right codes in [-127, 127]
 * (bq: the same panels as bytes, [Np/16][Kq/4][16][4], Kq = K rounded up to 4). The codes of a block of rows (GEMM),
 * or of each row (attention queries), are centred on c = round(their mean): u = clamp(a - c, -U8, U8) + U8 in
 * [0, 2 U8] (bytes, unsigned), so a byte pair sums to at most 2 x 128 x 127 < 2^15: vpmaddubsw cannot saturate,
 * whatever the codes. What the clamp cut off (the
 * outliers: e = a - c - clamp(a - c)) is added back exactly, one (row, k) at a time, from the int16 panels:
 *   sum_k (a - off) b = sum_k u b + (c - off - U8) colsum + sum_outliers e b      (times the group ratios)
 * A block of rows with more than 1/OUT_DIV outliers takes the vpmaddwd way instead. */
#define U8 64
#define OUT_DIV 64

typedef struct { int32_t k, e; } outlier;

static int64_t blocks_taken[2]; /* row blocks (GEMM; attention query blocks) taken the vpmaddwd way, the u8 x s8 way */

/* the counts above since the last call (then reset): how often the u8 x s8 way ran */
void qasr_byte_way_blocks(int64_t *out) {
#pragma omp critical(qasr_blocks)
    {
        out[0] = blocks_taken[0];
        out[1] = blocks_taken[1];
        blocks_taken[0] = blocks_taken[1] = 0;
    }
}

/* rows of the int8 codes a -> u bytes (K padded to Kq with 0), rowsum (sum of a - off), centre term
 * cterm = c - off - U8 (c: each row's rounded mean, or with per_row 0 the block's, the same for all its rows), and
 * the outliers of each row (ostart[r] .. ostart[r + 1]); 0 when there are more than maxout */
static int load_rows8(const int8_t *a, int64_t lda, int32_t off, int64_t M, int64_t K, int64_t Kq, int64_t m0,
                      int64_t rows, int per_row, uint8_t *u, int64_t *rowsum, int64_t *cterm, outlier *ol,
                      int32_t *ostart, int64_t maxout) {
    int64_t n = 0, total = 0, real = 0;
    for (int64_t r = 0; r < rows && m0 + r < M; r++, real++) {
        const int8_t *src = a + (m0 + r) * lda;
        int64_t s = 0;
        for (int64_t k = 0; k < K; k++) s += src[k];
        rowsum[r] = s;
        total += s;
    }
    const int64_t cb = real ? floordiv(2 * total + real * K, 2 * real * K) : 0; /* round(mean), half up */
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *dst = u + r * Kq;
        ostart[r] = (int32_t)n;
        if (r >= real) {
            memset(dst, U8, (size_t)Kq);
            rowsum[r] = 0;
            cterm[r] = cb - off - U8;
            continue;
        }
        const int8_t *src = a + (m0 + r) * lda;
        const int64_t c = per_row ? floordiv(2 * rowsum[r] + K, 2 * K) : cb;
        rowsum[r] -= K * off;
        cterm[r] = c - off - U8;
        const __m256i vc = _mm256_set1_epi16((int16_t)c), hi = _mm256_set1_epi16(U8), lo = _mm256_set1_epi16(-U8);
        for (int64_t k0 = 0; k0 < K; k0 += 16) { /* 16 codes a step; a step with an outlier (or the tail): scalar */
            if (k0 + 16 <= K) {
                const __m256i v = _mm256_sub_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + k0))),
                                                   vc);
                const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi16(v, hi), _mm256_cmpgt_epi16(lo, v));
                if (_mm256_testz_si256(out, out)) {
                    const __m256i b = _mm256_permute4x64_epi64(_mm256_packus_epi16(_mm256_add_epi16(v, hi), hi), 0xD8);
                    _mm_storeu_si128((__m128i *)(dst + k0), _mm256_castsi256_si128(b));
                    continue;
                }
            }
            for (int64_t k = k0; k < k0 + 16 && k < K; k++) {
                int64_t v = src[k] - c;
                if (v > U8 || v < -U8) {
                    if (n >= maxout) return 0;
                    const int64_t cl = v > U8 ? U8 : -U8;
                    ol[n].k = (int32_t)k;
                    ol[n].e = (int32_t)(v - cl);
                    n++;
                    v = cl;
                }
                dst[k] = (uint8_t)(v + U8);
            }
        }
        memset(dst + K, 0, (size_t)(Kq - K));
    }
    ostart[rows] = (int32_t)n;
    return 1;
}

/* MR x NR tile over k quads [q0, q1), u8 x s8 */
static inline void tile8(const uint8_t *u, int64_t ldu, const int8_t *bq, int64_t q0, int64_t q1, __m256i *acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < 2 * MR; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t q = q0; q < q1; q++) {
        __m256i b0 = _mm256_loadu_si256((const __m256i *)(bq + q * 64));
        __m256i b1 = _mm256_loadu_si256((const __m256i *)(bq + q * 64 + 32));
        for (int r = 0; r < MR; r++) {
            __m256i x = _mm256_set1_epi32(*(const int32_t *)(u + r * ldu + 4 * q));
            acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b0), ones));
            acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b1), ones));
        }
    }
}

/* t[0..16) += e * b[k, n0..n0+16) (* ratio of k's group): b from the int16 panel b16 (row pairs) */
static inline void add_outlier64(int64_t *t, const int16_t *b16, int64_t k, int64_t e, const int32_t *rg) {
    const __m256i sel = _mm256_set1_epi32(k & 1 ? 0x10000 : 1), ev = _mm256_set1_epi64x(e);
    for (int h = 0; h < 2; h++) {
        __m256i w = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(b16 + (k / 2) * 2 * NR + 16 * h)), sel);
        __m256i lo = _mm256_mul_epi32(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(w)), ev); /* |b e| < 2^31 */
        __m256i hi = _mm256_mul_epi32(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(w, 1)), ev);
        if (rg) { /* times the int32 ratio in int64 lanes: ratios up to 2^31 */
            lo = _mm256_mul_epi32(lo, _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(rg + 8 * h))));
            hi = _mm256_mul_epi32(hi, _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(rg + 8 * h + 4))));
        }
        _mm256_storeu_si256((__m256i *)(t + 8 * h), _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(t + 8 * h)), lo));
        _mm256_storeu_si256((__m256i *)(t + 8 * h + 4),
                            _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(t + 8 * h + 4)), hi));
    }
}

static inline void add_outlier32(int32_t *t, const int16_t *b16, int64_t k, int32_t e) {
    const __m256i sel = _mm256_set1_epi32(k & 1 ? 0x10000 : 1), ev = _mm256_set1_epi32(e);
    for (int h = 0; h < 2; h++) {
        __m256i w = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(b16 + (k / 2) * 2 * NR + 16 * h)), sel);
        _mm256_storeu_si256((__m256i *)(t + 8 * h),
                            _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(t + 8 * h)), _mm256_mullo_epi32(w, ev)));
    }
}

static inline int64_t rq1(int64_t a, int64_t m, int64_t ml, int64_t sh, int64_t zp, int64_t qmin, int64_t qmax);
static void rq_row(const void *acc, int type, int64_t cols, int64_t sub, const int64_t *mult, const int64_t *mlo,
                   const int64_t *shift, int per_col, int64_t zp, int64_t qmin, int64_t qmax, void *out, int otype);
static int rq_vector_ok(const int64_t *mult, const int64_t *mlo, const int64_t *shift, int64_t n, int otype,
                        int64_t qmin, int64_t qmax);

/* A requantization fused into a GEMM's int64 epilogue (qasr_requant's arithmetic on the values the int64 output
 * would hold): out codes [M, N] (row stride ldr) of type otype (0 int8, 1 int16, 2 int32) */
typedef struct {
    const int64_t *mult, *mlo, *shift; /* mlo: second words (NULL: none) */
    int per_col, otype, vec;
    int64_t zp, qmin, qmax, ldr;
    void *out;
    __m256i *narrow; /* int32 values: NK vectors of constants per 8 columns (narrow_constants) */
} rq_epilogue;

static int64_t floordiv128(__int128 a, int64_t b) { /* b > 0; the quotient fits int64 here */
    __int128 q = a / b;
    if (a % b != 0 && a < 0) q--;
    return (int64_t)q;
}

/* The int32 values that clamp: y(v) = ((v * m + 2^(sh-1)) >> sh) + zp is non-decreasing in v, so
 * clamp(y(v), qmin, qmax) = clamp(y(clamp(v, vlo, vhi)), qmin, qmax) with vlo the largest v where y(v) <= qmin and vhi
 * the smallest where y(v) >= qmax (each kept within int32). Between them y stays within [qmin, qmax] +- (2^30 + 1)
 * (m < 2^31, sh >= 1: a step of v moves y by at most 2^30 + 1), inside int32 where |qmin|, |qmax| < 2^30 - 1, so it
 * is computed in 32-bit lanes whatever the multiplier and zero point. */
static void clamp_bounds(int64_t m, int64_t ml, int64_t sh, int64_t zp, int64_t qmin, int64_t qmax, int32_t *vlo,
                         int32_t *vhi) {
    if (m == 0 && ml == 0) { /* y = zp for every v */
        *vlo = INT32_MIN;
        *vhi = INT32_MAX;
        return;
    }
    /* (two words: y(v) = round(v (m 2^31 + ml) / 2^(sh+31)), the same rounding at 31 more bits) */
    const int64_t M = m * ((int64_t)1 << 31) + ml, S = sh + 31;
    const __int128 h = (__int128)1 << (S - 1), p = (__int128)1 << S;
    const int64_t hi = -floordiv128(-((__int128)(qmax - zp) * p - h), M); /* ceil */
    const int64_t lo = -floordiv128(-((__int128)(qmin - zp + 1) * p - h), M) - 1;
    *vhi = hi > INT32_MAX ? INT32_MAX : hi < INT32_MIN ? INT32_MIN : (int32_t)hi;
    *vlo = lo > INT32_MAX ? INT32_MAX : lo < INT32_MIN ? INT32_MIN : (int32_t)lo;
}

/* The constants of rq8k for columns c..c+7 of every 8 (one multiplier: the same for all): multipliers, biases
 * 2^62 + 2^(sh-1) (minus 2^31 with second words: rq8k's offset of their term) and shifts of the even and odd columns
 * as int64 lanes, fix = 2^(62-sh) - zp, vlo and vhi as 8 int32 each, the second words of the even and odd columns (0
 * without); NK vectors per 8 columns. 0 (the int64 lanes' arithmetic stays) where a multiplier or shift is out of
 * range (0 <= m, ml < 2^31, 1 <= sh <= 62, rq_vector_ok's ranges) */
#define NK 11
static __m256i *narrow_constants(const int64_t *mult, const int64_t *mlo, const int64_t *shift, int per_col, int64_t n,
                                 int64_t zp, int64_t qmin, int64_t qmax) {
    if (qmin < -((int64_t)1 << 30) + 1 || qmax > ((int64_t)1 << 30) - 2) return 0; /* y within qmin/qmax +- 2^30 + 1 */
    for (int64_t j = 0; j < (per_col ? n : 1); j++)
        if (shift[j] < 1 || shift[j] > 62 || mult[j] < 0 || mult[j] >= ((int64_t)1 << 31) ||
            (mlo && (mlo[j] < 0 || mlo[j] >= ((int64_t)1 << 31))))
            return 0;
    const int64_t chunks = (n + 7) / 8;
    __m256i *k = aligned_alloc(32, (size_t)chunks * NK * sizeof(__m256i));
    for (int64_t c = 0; c < chunks; c++) {
        int64_t v[8][4];
        int32_t fix[8], vlo[8], vhi[8];
        for (int l = 0; l < 8; l++) {
            const int64_t col = c * 8 + l < n ? c * 8 + l : n - 1, j = per_col ? col : 0;
            const int64_t m = mult[j], ml = mlo ? mlo[j] : 0, sh = shift[j];
            v[l & 1][l / 2] = m;
            v[2 + (l & 1)][l / 2] = ((int64_t)1 << 62) + ((int64_t)1 << (sh - 1)) - (mlo ? (int64_t)1 << 31 : 0);
            v[4 + (l & 1)][l / 2] = sh;
            v[6 + (l & 1)][l / 2] = ml;
            fix[l] = (int32_t)(uint32_t)(((int64_t)1 << (62 - sh)) - zp);
            clamp_bounds(m, ml, sh, zp, qmin, qmax, vlo + l, vhi + l);
        }
        for (int i = 0; i < 6; i++) k[c * NK + i] = _mm256_loadu_si256((const __m256i *)v[i]);
        k[c * NK + 6] = _mm256_loadu_si256((const __m256i *)fix);
        k[c * NK + 7] = _mm256_loadu_si256((const __m256i *)vlo);
        k[c * NK + 8] = _mm256_loadu_si256((const __m256i *)vhi);
        k[c * NK + 9] = _mm256_loadu_si256((const __m256i *)v[6]);
        k[c * NK + 10] = _mm256_loadu_si256((const __m256i *)v[7]);
    }
    return k;
}

#define NARROW_MIN_ROWS 32 /* GEMMs with fewer rows do not pay for narrow_constants */

/* floor(s ml / 2^31) + 2^31 for the low dwords s of int64 lanes (|s ml| < 2^62: a logical shift of s ml + 2^62) */
static inline __m256i lo_term(__m256i s, __m256i ml) {
    return _mm256_srli_epi64(_mm256_add_epi64(_mm256_mul_epi32(s, ml), _mm256_set1_epi64x((int64_t)1 << 62)), 31);
}

/* 8 int32 values -> their codes (clamped, int32 lanes) with rq8n's arithmetic and the column constants k (haslo:
 * second words, their term's 2^31 offset taken out of the biases) */
static inline __m256i rq8k(__m256i s, const __m256i *k, __m256i lo, __m256i hi, int haslo) {
    s = _mm256_min_epi32(_mm256_max_epi32(s, k[7]), k[8]);
    const __m256i so = _mm256_srli_epi64(s, 32);
    __m256i pe = _mm256_mul_epi32(s, k[0]), po = _mm256_mul_epi32(so, k[1]);
    if (haslo) {
        pe = _mm256_add_epi64(pe, lo_term(s, k[9]));
        po = _mm256_add_epi64(po, lo_term(so, k[10]));
    }
    __m256i e = _mm256_srlv_epi64(_mm256_add_epi64(pe, k[2]), k[4]);
    __m256i o = _mm256_srlv_epi64(_mm256_add_epi64(po, k[3]), k[5]);
    __m256i y = _mm256_sub_epi32(_mm256_blend_epi32(e, _mm256_slli_epi64(o, 32), 0xAA), k[6]);
    return _mm256_min_epi32(_mm256_max_epi32(y, lo), hi);
}

/* 16 int32 codes -> out (otype 0 int8, 1 int16, 2 int32) */
static inline void store_codes16(void *out, int otype, __m256i y0, __m256i y1) {
    if (otype == 2) {
        _mm256_storeu_si256((__m256i *)out, y0);
        _mm256_storeu_si256((__m256i *)out + 1, y1);
        return;
    }
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(y0, y1), 0xD8); /* (in range: no saturation) */
    if (otype == 1) _mm256_storeu_si256((__m256i *)out, w);
    else _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(_mm256_permute4x64_epi64(
             _mm256_packs_epi16(w, w), 0xD8)));
}

/* values v[0..nc) (int32: vtype 2, int64: 3) of output row m, columns n0.. -> their codes */
static inline void rq_tile_row(const rq_epilogue *rq, const void *v, int vtype, int64_t m, int64_t n0, int64_t nc) {
    char *o = (char *)rq->out + (m * rq->ldr + n0) * ((int64_t)1 << rq->otype);
    const int64_t j0 = rq->per_col ? n0 : 0;
    if (rq->vec && nc == NR) {
        rq_row(v, vtype, NR, 0, rq->mult + j0, rq->mlo ? rq->mlo + j0 : 0, rq->shift + j0, rq->per_col, rq->zp,
               rq->qmin, rq->qmax, o, rq->otype);
        return;
    }
    for (int64_t c = 0; c < nc; c++) {
        const int64_t j = rq->per_col ? j0 + c : 0;
        const int64_t a = vtype == 3 ? ((const int64_t *)v)[c] : ((const int32_t *)v)[c];
        const int64_t y = rq1(a, rq->mult[j], rq->mlo ? rq->mlo[j] : 0, rq->shift[j], rq->zp, rq->qmin, rq->qmax);
        if (rq->otype == 2) ((int32_t *)o)[c] = (int32_t)y;
        else if (rq->otype == 1) ((int16_t *)o)[c] = (int16_t)y;
        else ((int8_t *)o)[c] = (int8_t)y;
    }
}

/* epilogue of one MR x NR tile, full panel (16 columns): out = t + ci[n] - bz * rowsum[r] (int32 wrapping: the result
 * fits, so it is exact), rows < rc */
static inline void store32(int32_t *o, int64_t ldo, const int32_t *t, const int32_t *ci, const int64_t *rowsum,
                           int64_t bz, int64_t rc) {
    const __m256i c0 = _mm256_loadu_si256((const __m256i *)ci), c1 = _mm256_loadu_si256((const __m256i *)(ci + 8));
    for (int64_t r = 0; r < rc; r++) {
        const __m256i rs = _mm256_set1_epi32((int32_t)(bz * rowsum[r]));
        _mm256_storeu_si256((__m256i *)(o + r * ldo), _mm256_sub_epi32(
            _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(t + r * NR)), c0), rs));
        _mm256_storeu_si256((__m256i *)(o + r * ldo + 8), _mm256_sub_epi32(
            _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(t + r * NR + 8)), c1), rs));
    }
}

/* ... int64: v = t + ci[n] - bz * rowsum[r], rounded down by 2^rshift (half up; |v| < 2^62: the shift is logical
 * on v + 2^62), + post[n] */
static inline void store64(int64_t *o, int64_t ldo, const int64_t *t, const int64_t *ci, const int64_t *rowsum,
                           int64_t bz, int rshift, const int64_t *post, int64_t rc, const rq_epilogue *rq,
                           int64_t m0, int64_t n0) {
    int64_t row[NR];
    const __m256i bias = _mm256_set1_epi64x(rshift ? ((int64_t)1 << 62) + ((int64_t)1 << (rshift - 1)) : 0);
    const __m256i fix = _mm256_set1_epi64x(rshift ? (int64_t)1 << (62 - rshift) : 0);
    for (int64_t r = 0; r < rc; r++) {
        const __m256i rs = _mm256_set1_epi64x(bz * rowsum[r]);
        for (int h = 0; h < NR; h += 4) {
            __m256i v = _mm256_sub_epi64(_mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(t + r * NR + h)),
                                                          _mm256_loadu_si256((const __m256i *)(ci + h))), rs);
            if (rshift) v = _mm256_sub_epi64(_mm256_srli_epi64(_mm256_add_epi64(v, bias), rshift), fix);
            if (post) v = _mm256_add_epi64(v, _mm256_loadu_si256((const __m256i *)(post + h)));
            _mm256_storeu_si256((__m256i *)(rq ? row + h : o + r * ldo + h), v);
        }
        if (rq) rq_tile_row(rq, row, 3, m0 + r, n0, NR);
    }
}

/* ... two-word ratios (bz = 0, rshift = 0): v = t + ci[n] + post[n] + floor((tl + cil[n] + postl[n]) / 2^L), the exact
 * floor((sum_g (ratio 2^L + ratio_lo) partial_g + ...) / 2^L) (|tl + ...| < 2^61: the floor is a logical shift on
 * v + 2^62); columns < nc */
static inline void store64w(int64_t *o, int64_t ldo, const int64_t *t, const int64_t *tl, const int64_t *ci,
                            const int64_t *cil, const int64_t *post, const int64_t *postl, int L, int64_t rc,
                            int64_t nc, const rq_epilogue *rq, int64_t m0, int64_t n0) {
    int64_t row[NR];
    const __m256i bias = _mm256_set1_epi64x((int64_t)1 << 62), fix = _mm256_set1_epi64x((int64_t)1 << (62 - L));
    for (int64_t r = 0; r < rc; r++) {
        int64_t *d = rq ? row : o + r * ldo;
        if (nc == NR) {
            for (int h = 0; h < NR; h += 4) {
#define LD(p) _mm256_loadu_si256((const __m256i *)(p))
                __m256i vl = _mm256_add_epi64(LD(tl + r * NR + h), LD(cil + h));
                __m256i v = _mm256_add_epi64(LD(t + r * NR + h), LD(ci + h));
                if (post) {
                    vl = _mm256_add_epi64(vl, LD(postl + h));
                    v = _mm256_add_epi64(v, LD(post + h));
                }
#undef LD
                vl = _mm256_sub_epi64(_mm256_srli_epi64(_mm256_add_epi64(vl, bias), L), fix);
                _mm256_storeu_si256((__m256i *)(d + h), _mm256_add_epi64(v, vl));
            }
        } else {
            for (int64_t c = 0; c < nc; c++) {
                const int64_t vl = tl[r * NR + c] + cil[c] + (post ? postl[c] : 0);
                d[c] = t[r * NR + c] + ci[c] + (post ? post[c] : 0) + (vl >> L); /* (arithmetic: floor) */
            }
        }
        if (rq) rq_tile_row(rq, row, 3, m0 + r, n0, nc);
    }
}

void qasr_qgemm(const void *a, int atype, int64_t lda, int32_t off, int reps, int64_t M, int64_t K,
                const int16_t *bp, int64_t Kp, int64_t Np, int64_t N, int64_t gs, const int32_t *ratio,
                const int64_t *init, int64_t bz, int rshift, const int64_t *post, int32_t *out32, int64_t *out64,
                int64_t ldo, const int8_t *bq, const int64_t *colsum, const int64_t *rq_mult, const int64_t *rq_mlo,
                const int64_t *rq_shift, int rq_per_col, int64_t rq_zp, int64_t rq_qmin, int64_t rq_qmax, void *rq_out,
                int rq_otype,
                int64_t ldr, const int32_t *ratio_lo, int lshift, int nthreads) {
    const int64_t panels = Np / NR, groups = (Kp + gs - 1) / gs, gp = gs / 2, pairs = Kp / 2, Kh = Kp / reps;
    /* rq_out: the int64 values are requantized in the epilogue (qasr_requant's arithmetic) instead of stored */
    rq_epilogue rqe = {rq_mult, rq_mlo, rq_shift, rq_per_col, rq_otype, 0, rq_zp, rq_qmin, rq_qmax, ldr, rq_out, 0};
    if (rq_out) rqe.vec = rq_vector_ok(rq_mult, rq_mlo, rq_shift, rq_per_col ? N : 1, rq_otype, rq_qmin, rq_qmax);
    if (rq_out && out32 && rqe.vec && M >= NARROW_MIN_ROWS) /* (the constants cost ~25 ns a column: few rows, e.g.
                                                               decoder steps over the vocabulary, keep rq_row) */
        rqe.narrow = narrow_constants(rq_mult, rq_mlo, rq_shift, rq_per_col, N, rq_zp, rq_qmin, rq_qmax);
    const rq_epilogue *rq = rq_out ? &rqe : 0; /* (int32 accumulators too: out32 then only selects that way) */
    const int64_t Kq = (K + 3) / 4 * 4, quads = Kq / 4, gq = gs / 4;
    const int byteway = bq && colsum && atype == 0 && reps == 1 && (out32 || gs % 4 == 0);
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t brows = M < MB ? (M + MR - 1) / MR * MR : MB; /* small M (decoder steps): a small buffer */
        int16_t *buf = aligned_alloc(64, (size_t)((brows * Kp * sizeof(int16_t) + 63) / 64 * 64));
        uint8_t *ubuf = byteway ? aligned_alloc(64, (size_t)((brows * Kq + 63) / 64 * 64)) : 0;
        const int64_t maxout = brows * K / OUT_DIV;
        outlier *ol = byteway ? malloc((size_t)(maxout + 1) * sizeof(outlier)) : 0;
        /* the block's column terms: init (+ centre term); two-word ratios: the low words' at + Np */
        int64_t *ci64 = malloc((size_t)(ratio_lo ? 2 * Np : Np) * sizeof(int64_t));
        int32_t *ci32 = malloc((size_t)Np * sizeof(int32_t));
        int ci_bytes = -1; /* what ci holds: -1 nothing yet, 0 init, 1 a block's init + centre term */
        int32_t ostart[MB + 1];
        int64_t rowsum[MB], cterm[MB];
        int32_t t32[MR * NR];
        int64_t t64[MR * NR], t64l[MR * NR];
        __m256i acc[2 * MR];
#pragma omp for schedule(static)
        for (int64_t mb = 0; mb < M; mb += MB) {
            const int64_t rows = mb + MB < M ? MB : M - mb, rows4 = (rows + MR - 1) / MR * MR;
            const int bytes = byteway && load_rows8((const int8_t *)a, lda, off, M, K, Kq, mb, rows4, 0, ubuf, rowsum,
                                                    cterm, ol, ostart, rows4 * K / OUT_DIV);
            if (!bytes) load_rows(a, atype, lda, off, M, K, Kh, reps, mb, rows4, buf, rowsum);
            if (byteway) {
#pragma omp atomic
                blocks_taken[bytes]++;
            }
            if (bytes || ci_bytes != 0) { /* the centre (one per block) joins the column terms */
                for (int64_t n = 0; n < (ratio_lo ? 2 * Np : Np); n++) {
                    ci64[n] = (init ? init[n] : 0) + (bytes ? cterm[0] * colsum[n] : 0);
                    if (n < Np) ci32[n] = (int32_t)(uint32_t)ci64[n]; /* (int32 outputs: exact modulo 2^32) */
                }
                ci_bytes = bytes;
            }
            for (int64_t pn = 0; pn < panels; pn++) {
                const int16_t *b = bp + pn * Kp * NR;
                const int8_t *b8 = bytes ? bq + pn * Kq * NR : 0;
                const int64_t n0 = pn * NR, nc = N - n0 < NR ? N - n0 : NR;
                for (int64_t i = 0; i < rows4; i += MR) {
                    const int16_t *arow = buf + i * Kp;
                    const int64_t rc = rows - i < MR ? rows - i : MR;
                    if (out32) {
                        if (bytes) tile8(ubuf + i * Kq, Kq, b8, 0, quads, acc);
                        else tile(arow, Kp, b, 0, pairs, acc);
                        for (int r = 0; r < MR; r++) {
                            _mm256_storeu_si256((__m256i *)(t32 + r * NR), acc[2 * r]);
                            _mm256_storeu_si256((__m256i *)(t32 + r * NR + 8), acc[2 * r + 1]);
                        }
                        if (bytes)
                            for (int64_t r = 0; r < rc; r++)
                                for (int32_t j = ostart[i + r]; j < ostart[i + r + 1]; j++)
                                    add_outlier32(t32 + r * NR, b, ol[j].k, ol[j].e);
                        if (rq && rq->narrow && nc == NR) { /* 16 columns at once in int32 lanes */
                            const __m256i *k0 = rq->narrow + (n0 / 8) * NK, *k1 = k0 + NK;
                            const int haslo = rq->mlo != 0;
                            const __m256i c0 = _mm256_loadu_si256((const __m256i *)(ci32 + n0));
                            const __m256i c1 = _mm256_loadu_si256((const __m256i *)(ci32 + n0 + 8));
                            const __m256i lo = _mm256_set1_epi32((int32_t)rq->qmin);
                            const __m256i hi = _mm256_set1_epi32((int32_t)rq->qmax);
                            for (int64_t r = 0; r < rc; r++) {
                                const __m256i rs = _mm256_set1_epi32((int32_t)(bz * rowsum[i + r]));
                                const __m256i t0 = _mm256_loadu_si256((const __m256i *)(t32 + r * NR));
                                const __m256i t1 = _mm256_loadu_si256((const __m256i *)(t32 + r * NR + 8));
                                const __m256i v0 = _mm256_sub_epi32(_mm256_add_epi32(t0, c0), rs);
                                const __m256i v1 = _mm256_sub_epi32(_mm256_add_epi32(t1, c1), rs);
                                char *o = (char *)rq->out + ((mb + i + r) * rq->ldr + n0) * ((int64_t)1 << rq->otype);
                                store_codes16(o, rq->otype, rq8k(v0, k0, lo, hi, haslo), rq8k(v1, k1, lo, hi, haslo));
                            }
                            continue;
                        }
                        if (rq) { /* the int32 values requantized here, never stored */
                            int32_t v[NR];
                            for (int64_t r = 0; r < rc; r++) {
                                const int64_t rs = bz * rowsum[i + r];
                                for (int64_t c = 0; c < nc; c++) v[c] = (int32_t)(t32[r * NR + c] + ci64[n0 + c] - rs);
                                rq_tile_row(rq, v, 2, mb + i + r, n0, nc);
                            }
                            continue;
                        }
                        if (nc == NR) {
                            store32(out32 + (mb + i) * ldo + n0, ldo, t32, ci32 + n0, rowsum + i, bz, rc);
                            continue;
                        }
                        for (int64_t r = 0; r < rc; r++) {
                            int32_t *o = out32 + (mb + i + r) * ldo + n0;
                            const int64_t rs = bz * rowsum[i + r];
                            for (int64_t c = 0; c < nc; c++) o[c] = (int32_t)(t32[r * NR + c] + ci64[n0 + c] - rs);
                        }
                        continue;
                    }
                    memset(t64, 0, sizeof(t64));
                    if (ratio_lo) memset(t64l, 0, sizeof(t64l));
                    for (int64_t g = 0; g < groups; g++) {
                        if (bytes) tile8(ubuf + i * Kq, Kq, b8, g * gq, (g + 1) * gq < quads ? (g + 1) * gq : quads, acc);
                        else tile(arow, Kp, b, g * gp, (g + 1) * gp < pairs ? (g + 1) * gp : pairs, acc);
                        const int32_t *rg = ratio ? ratio + g * Np + n0 : 0;
                        if (ratio_lo) {
                            const int32_t *rl = ratio_lo + g * Np + n0;
                            for (int r = 0; r < MR; r++) {
                                flush(t64 + r * NR, acc[2 * r], rg); /* (inlined: the widening is shared) */
                                flush(t64l + r * NR, acc[2 * r], rl);
                                flush(t64 + r * NR + 8, acc[2 * r + 1], rg + 8);
                                flush(t64l + r * NR + 8, acc[2 * r + 1], rl + 8);
                            }
                            continue;
                        }
                        for (int r = 0; r < MR; r++) {
                            flush(t64 + r * NR, acc[2 * r], rg);
                            flush(t64 + r * NR + 8, acc[2 * r + 1], rg ? rg + 8 : 0);
                        }
                    }
                    if (bytes)
                        for (int64_t r = 0; r < rc; r++)
                            for (int32_t j = ostart[i + r]; j < ostart[i + r + 1]; j++) {
                                const int64_t k = ol[j].k;
                                add_outlier64(t64 + r * NR, b, k, ol[j].e, ratio ? ratio + (k / gs) * Np + n0 : 0);
                                if (ratio_lo) add_outlier64(t64l + r * NR, b, k, ol[j].e, ratio_lo + (k / gs) * Np + n0);
                            }
                    if (ratio_lo) {
                        store64w(rq ? 0 : out64 + (mb + i) * ldo + n0, ldo, t64, t64l, ci64 + n0, ci64 + Np + n0,
                                 post ? post + n0 : 0, post ? post + Np + n0 : 0, lshift, rc, nc, rq, mb + i, n0);
                        continue;
                    }
                    if (nc == NR) {
                        store64(rq ? 0 : out64 + (mb + i) * ldo + n0, ldo, t64, ci64 + n0, rowsum + i, bz, rshift,
                                post ? post + n0 : 0, rc, rq, mb + i, n0);
                        continue;
                    }
                    for (int64_t r = 0; r < rc; r++) {
                        int64_t row[NR], *o = rq ? row : out64 + (mb + i + r) * ldo + n0;
                        const int64_t rs = bz * rowsum[i + r];
                        for (int64_t c = 0; c < nc; c++) {
                            int64_t v = t64[r * NR + c] + ci64[n0 + c] - rs;
                            if (rshift) v = (v + ((int64_t)1 << (rshift - 1))) >> rshift;
                            o[c] = v + (post ? post[n0 + c] : 0);
                        }
                        if (rq) rq_tile_row(rq, row, 3, mb + i + r, n0, nc);
                    }
                }
            }
        }
        free(buf);
        free(ubuf);
        free(ol);
        free(ci64);
        free(ci32);
    }
    free(rqe.narrow);
}

/* Fused attention (key padding as per-head key counts), per (batch x head, block of AB query rows), no [Tq, Tk]
 * tensor in memory:
 *   s = (q - zq) . (k - zk)                        int32 (kinit, zk fold the zero points, as in qasr_qgemm)
 *   c = clamp(round(s * m1 / 2^sh1) + zp1)         softmax input codes
 *   p = clamp(((lut[max - c] * r) + 2^(sh-1)) >> sh) + zpo),  r = floor(mult_r / sum lut[max - c])   (softmax)
 *   d = clamp(round((p - zpo) * m2 / 2^sh2) + zp2) - zp2   AV input grid codes minus their zero point, in [0, 2^16)
 *   out = d . (v - zv) = d . v' + (vo - zv) * sum(d)   int64, v' = v - vo int16 codes (V packed as qasr_pack)
 * d goes as its high and low bytes (partial sums combined by 256 and 1); a key pair whose bytes are zero in all rows
 * of a 4-row tile is skipped: most probabilities of long rows are 0 on the grid. Each step is the integer arithmetic
 * of the engine's unfused kernels (kernels.py), bit for bit. */
#define AB 16
#define PAIRS_PER_SUM 128 /* key pairs per int32 partial sum: 128 x 2 x 255 x 2^15 < 2^31, whatever the values */

static inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

/* clamp(((s * m + 2^(sh-1)) >> sh) + zp, lo, hi) for 4 int64 lanes holding int32 values s (|s| < 2^31, 0 <= m < 2^31):
 * the arithmetic shift as a logical one on s * m + 2^62 + 2^(sh-1) (= bias, the sum >= 0), minus fix = 2^(62-sh) - zp.
 * haslo: plus floor(s * ml / 2^31) (a second word; bias then holds -2^31 for lo_term's offset) */
static inline __m256i rq4(__m256i s, __m256i m, __m256i ml, int haslo, __m256i bias, __m128i shv, __m256i fix,
                          __m256i lo, __m256i hi) {
    __m256i p = _mm256_mul_epi32(s, m);
    if (haslo) p = _mm256_add_epi64(p, lo_term(s, ml));
    __m256i y = _mm256_sub_epi64(_mm256_srl_epi64(_mm256_add_epi64(p, bias), shv), fix);
    y = _mm256_blendv_epi8(y, lo, _mm256_cmpgt_epi64(lo, y));
    return _mm256_blendv_epi8(y, hi, _mm256_cmpgt_epi64(y, hi));
}

/* 8 int32 scores -> 8 int32 codes (rq4 on each half, low dwords gathered back) */
static inline __m256i rq8(__m256i s, __m256i m, __m256i ml, int haslo, __m256i bias, __m128i shv, __m256i fix,
                          __m256i lo, __m256i hi) {
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    __m256i a = rq4(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(s)), m, ml, haslo, bias, shv, fix, lo, hi);
    __m256i b = rq4(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(s, 1)), m, ml, haslo, bias, shv, fix, lo, hi);
    return _mm256_set_m128i(_mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, even)),
                            _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(a, even)));
}

/* rq8 where every unclamped code fits int32 (m <= 2^(sh-1), so |s * m / 2^sh| <= 2^30, and |zp| < 2^29): the even
 * and odd lanes multiplied in place, their low dwords merged, the offset and the clamps in 32 bits (fix32: the low
 * dword of 2^(62-sh) - zp) */
static inline __m256i rq8n(__m256i s, __m256i m, __m256i ml, int haslo, __m256i bias, __m128i shv, __m256i fix32,
                           __m256i lo, __m256i hi) {
    const __m256i so = _mm256_srli_epi64(s, 32);
    __m256i pe = _mm256_mul_epi32(s, m), po = _mm256_mul_epi32(so, m);
    if (haslo) {
        pe = _mm256_add_epi64(pe, lo_term(s, ml));
        po = _mm256_add_epi64(po, lo_term(so, ml));
    }
    __m256i e = _mm256_srl_epi64(_mm256_add_epi64(pe, bias), shv);
    __m256i o = _mm256_srl_epi64(_mm256_add_epi64(po, bias), shv);
    __m256i y = _mm256_sub_epi32(_mm256_blend_epi32(e, _mm256_slli_epi64(o, 32), 0xAA), fix32);
    return _mm256_min_epi32(_mm256_max_epi32(y, lo), hi);
}

/* The attention's softmax: one-word (int32 table lut, r = floor(mult_r / total), p = (e r + 2^(sh-1)) >> sh) or exact
 * (format version 5: lut64 = round(2^62 exp(-s d)), r = floor(cq / total) in 128 bits with cq = floor(2^Q / s_out),
 * p = (e r + 2^(Q-1)) >> Q: kernels.softmax_exact) */
typedef struct {
    const int32_t *lut;
    const int64_t *lut64;
    int64_t mult_r;
    int sh, Q;
    __int128 cq;
} smx;
static inline int64_t sm_e(const smx *s, int64_t d) { return s->lut64 ? s->lut64[d] : s->lut[d]; }
static inline __int128 sm_recip(const smx *s, __int128 total) {
    total = total > 1 ? total : 1;
    return s->lut64 ? s->cq / total : (__int128)(s->mult_r / (int64_t)total);
}
static inline int64_t sm_p(const smx *s, int64_t e, __int128 r) {
    if (s->lut64)
        return (int64_t)(((unsigned __int128)e * (unsigned __int128)r + ((unsigned __int128)1 << (s->Q - 1))) >> s->Q);
    return (e * (int64_t)r + ((int64_t)1 << (s->sh - 1))) >> s->sh;
}

/* the pairs p < pairs (pairs % 8 == 0) where any of the MR rows at a (row stride lda) is nonzero -> idx; count */
static inline int64_t active_pairs(const int16_t *a, int64_t lda, int64_t pairs, int32_t *idx) {
    int64_t n = 0;
    for (int64_t p = 0; p < pairs; p += 8) {
        __m256i o = _mm256_loadu_si256((const __m256i *)(a + 2 * p));
        for (int r = 1; r < MR; r++) o = _mm256_or_si256(o, _mm256_loadu_si256((const __m256i *)(a + r * lda + 2 * p)));
        unsigned m = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(o, _mm256_setzero_si256())))
                     & 0xFFu;
        while (m) {
            idx[n++] = (int32_t)(p + __builtin_ctz(m));
            m &= m - 1;
        }
    }
    return n;
}

/* tile() over the listed k pairs */
static inline void tile_list(const int16_t *a, int64_t lda, const int16_t *bp, const int32_t *idx, int64_t n,
                             __m256i *acc) {
    for (int i = 0; i < 2 * MR; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t t = 0; t < n; t++) tile_pair(a, lda, bp, idx[t], acc);
}

/* Tk keys (klen: per head, keys at and past klen[h] masked: no part in the max and the sums, probability 0); K packed
 * per head as qasr_pack ([Tkp/16] panels of d rows); V' per head as qasr_pack ([dp/16] panels of vKp rows,
 * vKp % 16 == 0, rows >= Tk zero); out [BH, Tq, d] int64 */
void qasr_attention(const int8_t *q, int64_t BH, int64_t Tq, int64_t d,
                    const int16_t *kp, int64_t kstride, int64_t Tk, int64_t Tkp, const int32_t *kinit, int64_t zk,
                    int64_t m1, int64_t m1l, int sh1, int64_t zp1, int64_t qmin1, int64_t qmax1,
                    const int32_t *lut, int64_t mult_r, int sh, int64_t zpo, int64_t qmino, int64_t qmaxo,
                    const int64_t *lut64, int64_t cq_hi, int64_t cq_lo, int Q,
                    int64_t m2, int64_t m2l, int sh2, int64_t zp2, int64_t qmin2, int64_t qmax2,
                    const int16_t *vp, int64_t vstride, int64_t vKp, int64_t vo_zv, int64_t dp, const int32_t *klen,
                    const int8_t *kq, const int32_t *kcol, int64_t *out, int nthreads) {
    const int64_t blocks = (Tq + AB - 1) / AB, vpairs = vKp / 2, lda = 2 * vKp; /* pb rows: [high bytes | low bytes] */
#pragma omp parallel num_threads(nthreads)
    {
        int16_t *qb = aligned_alloc(64, (size_t)((AB * d * 2 + 63) / 64 * 64));
        const int64_t dq = (d + 3) / 4 * 4, maxout = AB * d / OUT_DIV; /* QK^T the u8 x s8 way where kq is given */
        uint8_t *ub = kq ? aligned_alloc(64, (size_t)((AB * dq + 63) / 64 * 64)) : 0;
        outlier *ol = kq ? malloc((size_t)(maxout + 1) * sizeof(outlier)) : 0;
        int32_t ostart[AB + 1];
        int64_t cterm[AB];
        int32_t *sc = aligned_alloc(64, (size_t)((AB * Tkp * 4 + 63) / 64 * 64));
        int16_t *pb = aligned_alloc(64, (size_t)((AB * lda * 2 + 63) / 64 * 64));
        int32_t *idx = malloc((size_t)(2 * vpairs) * sizeof(int32_t));
        const int64_t span = qmax1 - qmin1 + 1;
        const smx sm = {lut, lut64, mult_r, sh, Q, ((__int128)cq_hi << 63) | (__int128)cq_lo};
        int64_t lz = span; /* lut[lz..] are 0 */
        while (lz > 0 && sm_e(&sm, lz - 1) == 0) lz--;
        /* short table loops: a non-increasing table, and probability 0 (p = zpo) taken to d = 0 on the AV grid; then
         * the codes below the first (from the top) whose d is 0 all have d = 0 */
        int shortcut = clamp64((((int64_t)1 << (sh2 - 1)) >> sh2) + zp2, qmin2, qmax2) == zp2 && zpo >= qmino &&
                       zpo <= qmaxo;
        for (int64_t i = 1; i < span && shortcut; i++)
            shortcut = sm_e(&sm, i) <= sm_e(&sm, i - 1) && sm_e(&sm, i) >= 0;
        int32_t *hist = span <= 4096 ? malloc((size_t)(4 * span) * sizeof(int32_t)) : 0; /* 4 interleaved counts */
        int32_t *tab = span <= 4096 ? malloc((size_t)span * sizeof(int32_t)) : 0;
        /* the table's 31-bit words in reverse (erev[span - 1 - d], then the low words): the softmax sum over the codes
         * in vector lanes, sum hist * hi and sum hist * lo in int64 (sum hist <= Tk < 2^31: no overflow) */
        int32_t *erev = hist ? malloc((size_t)(2 * span) * sizeof(int32_t)) : 0;
        int vsum = erev != 0 && Tk < ((int64_t)1 << 31);
        for (int64_t i = 0; i < span && erev; i++) {
            const int64_t e = sm_e(&sm, i);
            vsum = vsum && e >= 0;
            erev[span - 1 - i] = (int32_t)(e >> 31);
            erev[2 * span - 1 - i] = (int32_t)(e & 0x7FFFFFFF);
        }
        int64_t qsum[AB], psum[AB], t64[MR * NR];
        static const int32_t r256[NR] = {256, 256, 256, 256, 256, 256, 256, 256,
                                          256, 256, 256, 256, 256, 256, 256, 256};
        __m256i acc[2 * MR];
        const __m256i vm1 = _mm256_set1_epi64x(m1), vfix1 = _mm256_set1_epi64x(((int64_t)1 << (62 - sh1)) - zp1);
        const int lo1 = m1l != 0; /* a second word of the scores' multiplier (lo_term's 2^31 out of the bias) */
        const __m256i vm1l = _mm256_set1_epi64x(m1l);
        const __m256i vb1 = _mm256_set1_epi64x(((int64_t)1 << 62) + ((int64_t)1 << (sh1 - 1)) -
                                               (lo1 ? (int64_t)1 << 31 : 0));
        const __m256i vlo1 = _mm256_set1_epi64x(qmin1), vhi1 = _mm256_set1_epi64x(qmax1);
        const __m128i vsh1 = _mm_cvtsi32_si128(sh1);
        const int narrow = (m1 < ((int64_t)1 << (sh1 - 1)) || (m1 == ((int64_t)1 << (sh1 - 1)) && !lo1)) &&
                           zp1 > -((int64_t)1 << 29) && zp1 < ((int64_t)1 << 29);
        const __m256i vfix32 = _mm256_set1_epi32((int32_t)(uint32_t)(((int64_t)1 << (62 - sh1)) - zp1));
        const __m256i vlo32 = _mm256_set1_epi32((int32_t)qmin1), vhi32 = _mm256_set1_epi32((int32_t)qmax1);
#pragma omp for schedule(static) collapse(2)
        for (int64_t h = 0; h < BH; h++) {
            for (int64_t blk = 0; blk < blocks; blk++) {
                const int64_t r0 = blk * AB, rows = r0 + AB < Tq ? AB : Tq - r0;
                const int64_t tk = klen ? klen[h] : Tk; /* keys past tk: masked (probability 0) */
                const int64_t rows4q = (rows + MR - 1) / MR * MR;
                /* q rows r0.. as bytes around their means (as qasr_qgemm's u8 x s8 way), else as int16 */
                const int bytes = kq && load_rows8(q + h * Tq * d, d, 0, Tq, d, dq, r0, rows4q, 1, ub, qsum, cterm, ol,
                                                   ostart, rows4q * d / OUT_DIV);
                if (kq) {
#pragma omp atomic
                    blocks_taken[bytes]++;
                }
                if (!bytes)
                    for (int64_t r = 0; r < AB; r++) { /* zero rows past Tq */
                        int64_t s = 0;
                        for (int64_t k = 0; k < d; k++) {
                            int16_t v = r < rows ? q[(h * Tq + r0 + r) * d + k] : 0;
                            qb[r * d + k] = v;
                            s += v;
                        }
                        qsum[r] = s;
                    }
                const int16_t *kb = kp + h * kstride;
                const int32_t *ki = kinit + h * Tkp, *kc = kcol ? kcol + h * Tkp : 0;
                for (int64_t pn = 0; pn < Tkp / NR; pn++) {
                    const __m256i k0 = _mm256_loadu_si256((const __m256i *)(ki + pn * NR));
                    const __m256i k1 = _mm256_loadu_si256((const __m256i *)(ki + pn * NR + 8));
                    for (int64_t i = 0; i < rows; i += MR) { /* (rows past the last tile: no scores needed) */
                        if (bytes) {
                            tile8(ub + i * dq, dq, kq + h * (Tkp / NR) * dq * NR + pn * dq * NR, 0, dq / 4, acc);
                            const __m256i c0 = _mm256_loadu_si256((const __m256i *)(kc + pn * NR));
                            const __m256i c1 = _mm256_loadu_si256((const __m256i *)(kc + pn * NR + 8));
                            int32_t t[NR];
                            for (int r = 0; r < MR; r++) { /* + (c - U8) kcol + the outliers */
                                const __m256i ct = _mm256_set1_epi32((int32_t)cterm[i + r]);
                                acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_mullo_epi32(ct, c0));
                                acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_mullo_epi32(ct, c1));
                                if (ostart[i + r] == ostart[i + r + 1]) continue;
                                _mm256_storeu_si256((__m256i *)t, acc[2 * r]);
                                _mm256_storeu_si256((__m256i *)(t + 8), acc[2 * r + 1]);
                                for (int32_t j = ostart[i + r]; j < ostart[i + r + 1]; j++)
                                    add_outlier32(t, kb + pn * d * NR, ol[j].k, ol[j].e);
                                acc[2 * r] = _mm256_loadu_si256((const __m256i *)t);
                                acc[2 * r + 1] = _mm256_loadu_si256((const __m256i *)(t + 8));
                            }
                        } else {
                            tile(qb + i * d, d, kb + pn * d * NR, 0, d / 2, acc);
                        }
                        for (int r = 0; r < MR; r++) { /* exact int32 scores, then their codes */
                            const __m256i rs = _mm256_set1_epi32((int32_t)(zk * qsum[i + r]));
                            int32_t *o = sc + (i + r) * Tkp + pn * NR;
                            __m256i s0 = _mm256_sub_epi32(_mm256_add_epi32(acc[2 * r], k0), rs);
                            __m256i s1 = _mm256_sub_epi32(_mm256_add_epi32(acc[2 * r + 1], k1), rs);
                            if (narrow) {
                                _mm256_storeu_si256((__m256i *)o,
                                                    rq8n(s0, vm1, vm1l, lo1, vb1, vsh1, vfix32, vlo32, vhi32));
                                _mm256_storeu_si256((__m256i *)(o + 8),
                                                    rq8n(s1, vm1, vm1l, lo1, vb1, vsh1, vfix32, vlo32, vhi32));
                            } else {
                                _mm256_storeu_si256((__m256i *)o, rq8(s0, vm1, vm1l, lo1, vb1, vsh1, vfix1, vlo1, vhi1));
                                _mm256_storeu_si256((__m256i *)(o + 8),
                                                    rq8(s1, vm1, vm1l, lo1, vb1, vsh1, vfix1, vlo1, vhi1));
                            }
                        }
                    }
                }
                const int64_t rows4 = (rows + MR - 1) / MR * MR; /* the AV tiles read rows < rows4 only */
                for (int64_t r = 0; r < rows4; r++) { /* softmax, then d on the AV grid as bytes; rows past Tq: 0 */
                    int16_t *dh = pb + r * lda, *dl = dh + vKp;
                    const int32_t *row = sc + r * Tkp;
                    int64_t s2 = 0;
                    if (r >= rows) memset(dh, 0, (size_t)lda * sizeof(int16_t));
                    if (r < rows) {
                        memset(dh + tk, 0, (size_t)(vKp - tk) * sizeof(int16_t));
                        memset(dl + tk, 0, (size_t)(vKp - tk) * sizeof(int16_t));
                        int32_t mx32 = (int32_t)qmin1; /* (every code >= qmin1; no key: all probabilities 0) */
                        for (int64_t j = 0; j < tk; j++) mx32 = row[j] > mx32 ? row[j] : mx32; /* (vectorized) */
                        const int64_t mx = mx32, top = mx - qmin1;
                        __int128 total = 0;
                        if (hist) { /* k-bit input: sums and outputs per code value, not per lane */
                            /* four interleaved histograms: repeated codes do not wait on each other's increments */
                            int32_t *h1 = hist + span, *h2 = h1 + span, *h3 = h2 + span;
                            for (int k = 0; k < 4; k++) memset(hist + k * span, 0, (size_t)(top + 1) * sizeof(int32_t));
                            int64_t j = 0;
                            for (; j + 4 <= tk; j += 4) {
                                hist[row[j] - qmin1]++;
                                h1[row[j + 1] - qmin1]++;
                                h2[row[j + 2] - qmin1]++;
                                h3[row[j + 3] - qmin1]++;
                            }
                            for (; j < tk; j++) hist[row[j] - qmin1]++;
                            /* codes from the top down; with the shortcut, the codes below top - lz add 0 to the sum
                             * (lut[lz..] = 0) and have d = 0, and so do those below the first whose d is 0 */
                            const int64_t cl = shortcut && top - lz + 1 > 0 ? top - lz + 1 : 0;
                            int64_t c = cl;
                            if (vsum) { /* 8 codes a step: the four counts merged, times both words of e */
                                const int32_t *eh = erev + (span - 1 - top), *el = eh + span; /* e(top - c) */
                                __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
                                for (; c + 8 <= top + 1; c += 8) {
#define LD(p) _mm256_loadu_si256((const __m256i *)(p))
                                    const __m256i hv = _mm256_add_epi32(_mm256_add_epi32(LD(hist + c), LD(h1 + c)),
                                                                        _mm256_add_epi32(LD(h2 + c), LD(h3 + c)));
                                    const __m256i ev = LD(eh + c), lv = LD(el + c), ho = _mm256_srli_epi64(hv, 32);
#undef LD
                                    _mm256_storeu_si256((__m256i *)(hist + c), hv);
                                    ah = _mm256_add_epi64(_mm256_add_epi64(ah, _mm256_mul_epu32(hv, ev)),
                                                          _mm256_mul_epu32(ho, _mm256_srli_epi64(ev, 32)));
                                    al = _mm256_add_epi64(_mm256_add_epi64(al, _mm256_mul_epu32(hv, lv)),
                                                          _mm256_mul_epu32(ho, _mm256_srli_epi64(lv, 32)));
                                }
                                int64_t sh_[4], sl_[4];
                                _mm256_storeu_si256((__m256i *)sh_, ah);
                                _mm256_storeu_si256((__m256i *)sl_, al);
                                total = ((__int128)(sh_[0] + sh_[1] + sh_[2] + sh_[3]) << 31) + sl_[0] + sl_[1] + sl_[2] +
                                        sl_[3];
                            }
                            for (; c <= top; c++) {
                                hist[c] += h1[c] + h2[c] + h3[c];
                                total += (__int128)hist[c] * sm_e(&sm, top - c);
                            }
                            const __int128 recip = sm_recip(&sm, total);
                            int64_t c0 = top + 1; /* the lowest code present whose d is not 0 */
                            for (int64_t c = top; c >= cl; c--) { /* (codes no lane has: not looked up; the first
                                                                    * present one whose d is 0 still ends the loop) */
                                if (!hist[c]) continue;
                                int64_t p = clamp64(sm_p(&sm, sm_e(&sm, top - c), recip) + zpo, qmino, qmaxo);
                                tab[c] = (int32_t)(rq1(p - zpo, m2, m2l, sh2, zp2, qmin2, qmax2) - zp2); /* [0, 2^16) */
                                if (!tab[c] && shortcut) break;
                                s2 += hist[c] * (int64_t)tab[c];
                                if (tab[c]) c0 = c;
                            }
                            /* d = tab[row - qmin1] as bytes: every lane below c0 is 0 (most lanes of long rows), so
                             * only 8 lanes with one at or above c0 are looked up (a masked gather), others store 0 */
                            const __m256i vc0 = _mm256_set1_epi32((int32_t)(c0 + qmin1 - 1));
                            const __m256i vq = _mm256_set1_epi32((int32_t)qmin1), b255 = _mm256_set1_epi32(255);
                            for (j = 0; j + 8 <= tk; j += 8) {
                                const __m256i rv = _mm256_loadu_si256((const __m256i *)(row + j));
                                const __m256i act = _mm256_cmpgt_epi32(rv, vc0);
                                __m128i vh = _mm_setzero_si128(), vl = vh;
                                if (!_mm256_testz_si256(act, act)) {
                                    const __m256i g = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), tab,
                                                                                  _mm256_sub_epi32(rv, vq), act, 4);
                                    const __m256i w = _mm256_permute4x64_epi64( /* (values < 2^16: no saturation) */
                                        _mm256_packus_epi32(_mm256_srli_epi32(g, 8), _mm256_and_si256(g, b255)), 0xD8);
                                    vh = _mm256_castsi256_si128(w);
                                    vl = _mm256_extracti128_si256(w, 1);
                                }
                                _mm_storeu_si128((__m128i *)(dh + j), vh);
                                _mm_storeu_si128((__m128i *)(dl + j), vl);
                            }
                            for (; j < tk; j++) {
                                const int32_t v = row[j] - qmin1 >= c0 ? tab[row[j] - qmin1] : 0;
                                dh[j] = (int16_t)(v >> 8);
                                dl[j] = (int16_t)(v & 255);
                            }
                        } else {
                            for (int64_t j = 0; j < tk; j++) total += sm_e(&sm, mx - row[j]);
                            const __int128 recip = sm_recip(&sm, total);
                            for (int64_t j = 0; j < tk; j++) {
                                int64_t p = clamp64(sm_p(&sm, sm_e(&sm, mx - row[j]), recip) + zpo, qmino, qmaxo);
                                int64_t v = rq1(p - zpo, m2, m2l, sh2, zp2, qmin2, qmax2) - zp2;
                                dh[j] = (int16_t)(v >> 8);
                                dl[j] = (int16_t)(v & 255);
                                s2 += v;
                            }
                        }
                    }
                    psum[r] = s2;
                }
                const int16_t *vb = vp + h * vstride;
                for (int64_t i = 0; i < rows; i += MR) {
                    const int16_t *a = pb + i * lda;
                    const int64_t nh = active_pairs(a, lda, vpairs, idx);
                    const int64_t nl = active_pairs(a + vKp, lda, vpairs, idx + vpairs);
                    for (int64_t pn = 0; pn < dp / NR; pn++) {
                        const int16_t *b = vb + pn * vKp * NR;
                        memset(t64, 0, sizeof(t64));
                        for (int part = 0; part < 2; part++) { /* high bytes (x 256), low bytes */
                            const int64_t n = part ? nl : nh;
                            const int32_t *ix = idx + part * vpairs;
                            for (int64_t t0 = 0; t0 < n; t0 += PAIRS_PER_SUM) {
                                const int64_t cnt = n - t0 < PAIRS_PER_SUM ? n - t0 : PAIRS_PER_SUM;
                                tile_list(a + part * vKp, lda, b, ix + t0, cnt, acc);
                                for (int r = 0; r < MR; r++) {
                                    flush(t64 + r * NR, acc[2 * r], part ? 0 : r256);
                                    flush(t64 + r * NR + 8, acc[2 * r + 1], part ? 0 : r256 + 8);
                                }
                            }
                        }
                        for (int64_t r = 0; r < MR && i + r < rows; r++) {
                            int64_t *o = out + (h * Tq + r0 + i + r) * d + pn * NR;
                            for (int c = 0; c < NR && pn * NR + c < d; c++)
                                o[c] = t64[r * NR + c] + vo_zv * psum[i + r];
                        }
                    }
                }
            }
        }
        free(qb);
        free(ub);
        free(ol);
        free(sc);
        free(pb);
        free(idx);
        free(hist);
        free(erev);
        free(tab);
    }
}

/* floor(sqrt(x)) for x < 2^62, bitwise (kernels.isqrt, bit for bit) */
static inline uint64_t isqrt64(uint64_t x) {
    uint64_t res = 0;
    for (int b = 31; b >= 0; b--) {
        uint64_t cand = res | ((uint64_t)1 << b);
        if (cand * cand <= x) res = cand;
    }
    return res;
}

/* floor(sqrt(v)) of non-negative int64 values below 2^62 */
void qasr_isqrt(const int64_t *v, int64_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = (int64_t)isqrt64((uint64_t)v[i]);
}

/* --- element-wise integer ops of the engine (kernels.py twins, bit for bit) ----------------------------------- */

/* kernels.layer_norm_int over rows of n codes: c = n x - sum x, D = max(isqrt(floor(sum c^2 2^2k / n) + eps), 1),
 * xhat = floor((c 2^(F+1+k) + D) / 2D) (F fraction bits), out = xhat * gain + (bias << (F - 16)) (int64).
 * Rows of fewer than 2^14 codes within +-2^15 (c fits int32) take ln_row_fast: the sums in vector lanes, the division
 * in vector lanes (a 31-bit reciprocal with a per-row shift and one exact check) or, where its bounds fail, as a
 * multiply by floor((2^64 - 1) / 2D) and one correction; other rows the scalar loop with a division per element. */
/* floor(ss 2^2k / n) for ss >= 0, as (ss / n) 2^2k + floor((ss % n) 2^2k / n); (ss / n) 2^2k < 2^62
 * (kernels.ln_shift_bits) */
static inline int64_t ln_variance(int64_t ss, int64_t n, int k) {
    return ((ss / n) << (2 * k)) + ((ss % n) << (2 * k)) / n;
}

static int ln_vector_division = 1; /* tests turn it off to reach the 64-bit reciprocal path (qasr_ln_vector) */

void qasr_ln_vector(int on) { ln_vector_division = on; }

static int ln_row_fast(const void *x, int type, int64_t n, const int8_t *gain, const int32_t *bias, int64_t eps_term,
                       int k, int frac, int32_t *c, int64_t *out) {
    const int bs = frac - 16; /* the bias codes' grid is gain scale * 2^-16 */
    __m256i vs = _mm256_setzero_si256(), lim = _mm256_setzero_si256();
    int64_t i = 0, s = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i v = type == 0 ? _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)x + i)))
                        : type == 1 ? _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)((const int16_t *)x + i)))
                                    : _mm256_loadu_si256((const __m256i *)((const int32_t *)x + i));
        _mm256_storeu_si256((__m256i *)(c + i), v);
        lim = _mm256_or_si256(lim, _mm256_or_si256(_mm256_cmpgt_epi32(v, _mm256_set1_epi32(1 << 15)),
                                                   _mm256_cmpgt_epi32(_mm256_set1_epi32(-(1 << 15)), v)));
        vs = _mm256_add_epi32(vs, v); /* |sum| <= 2^14 x 2^15 where every |code| <= 2^15 */
    }
    for (; i < n; i++) {
        c[i] = (int32_t)code(x, type, i);
        if (c[i] > (1 << 15) || c[i] < -(1 << 15)) return 0;
    }
    if (!_mm256_testz_si256(lim, lim)) return 0; /* int32 codes beyond 16 bits: the scalar loop */
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, vs);
    for (int l = 0; l < 8; l++) s += lanes[l];
    for (int64_t j = i - i % 8; j < n; j++) s += c[j];
    const __m256i vn = _mm256_set1_epi32((int32_t)n), vsum = _mm256_set1_epi32((int32_t)s);
    __m256i q0 = _mm256_setzero_si256(), q1 = _mm256_setzero_si256(), am = _mm256_setzero_si256();
    for (i = 0; i + 8 <= n; i += 8) { /* c = n x - s (|c| < 2^30), sum c^2 in int64 lanes */
        const __m256i v = _mm256_sub_epi32(_mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)(c + i)), vn), vsum);
        _mm256_storeu_si256((__m256i *)(c + i), v);
        am = _mm256_max_epi32(am, _mm256_abs_epi32(v));
        q0 = _mm256_add_epi64(q0, _mm256_mul_epi32(v, v));
        q1 = _mm256_add_epi64(q1, _mm256_mul_epi32(_mm256_srli_epi64(v, 32), _mm256_srli_epi64(v, 32)));
    }
    int64_t ss = 0, l64[4];
    _mm256_storeu_si256((__m256i *)l64, _mm256_add_epi64(q0, q1));
    for (int l = 0; l < 4; l++) ss += l64[l];
    int64_t cmax = 0;
    _mm256_storeu_si256((__m256i *)lanes, am);
    for (int l = 0; l < 8; l++) cmax = lanes[l] > cmax ? lanes[l] : cmax;
    for (; i < n; i++) {
        c[i] = (int32_t)(n * c[i] - s);
        ss += (int64_t)c[i] * c[i];
        cmax = c[i] > cmax ? c[i] : -c[i] > cmax ? -c[i] : cmax;
    }
    const uint64_t d = isqrt64((uint64_t)(ln_variance(ss, n, k) + eps_term));
    const int64_t dd = d ? (int64_t)d : 1, mul = (int64_t)1 << (frac + 1 + k), D = 2 * dd;
    /* e = floor((c R + 2^(sh-1)) / 2^sh) with R = floor(2^P / D) in [2^30, 2^31), sh = P - (F+1+k), is
     * floor(c 2^(F+1+k) / D + 1/2) or one off where |c| < 2^(sh-1) (the error c (2^P/D - R) / 2^sh is below 1/2) */
    int bl = 0;
    while (bl < 62 && ((int64_t)1 << bl) <= D) bl++; /* D < 2^bl */
    const int P = 30 + bl, sh = P - (frac + 1 + k);
    const int64_t R = dd < ((int64_t)1 << 31) && sh >= 2 && sh <= 61 && P < 126
                          ? (int64_t)((((unsigned __int128)1) << P) / (uint64_t)D) : 0;
    const unsigned __int128 cm = (unsigned __int128)cmax * (uint64_t)mul; /* bounds |c 2^(F+1+k)| */
    if (ln_vector_division && R && R < ((int64_t)1 << 31) && cmax < ((int64_t)1 << (sh - 1)) && cmax < ((int64_t)1 << 30)
        && cm < ((unsigned __int128)D << 29) && cm < ((unsigned __int128)1 << 61)) {
        /* 4 lanes (|c R| < 2^61, |e| < 2^30, |c 2^(F+1+k)| < 2^61); then one exact check of
         * r = c 2^(F+1+k) + dd - e D against [0, D) */
        const __m256i vR = _mm256_set1_epi64x(R), one = _mm256_set1_epi64x(1), zero = _mm256_setzero_si256();
        const __m256i bias62 = _mm256_set1_epi64x(((int64_t)1 << 62) + ((int64_t)1 << (sh - 1)));
        const __m256i off = _mm256_set1_epi64x((int64_t)1 << (62 - sh)), vdd = _mm256_set1_epi64x(dd);
        const __m256i vD = _mm256_set1_epi64x(D);
        const __m128i vsh = _mm_cvtsi32_si128(sh), sl = _mm_cvtsi32_si128(frac + 1 + k), bsh = _mm_cvtsi32_si128(bs);
        for (i = 0; i + 4 <= n; i += 4) {
            const __m256i cv = _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(c + i)));
            /* (c R + 2^(sh-1)) >> sh as a logical shift of c R + 2^(sh-1) + 2^62 (> 0), minus 2^(62-sh) */
            __m256i e = _mm256_sub_epi64(_mm256_srl_epi64(_mm256_add_epi64(_mm256_mul_epi32(cv, vR), bias62), vsh), off);
            const __m256i r = _mm256_sub_epi64(_mm256_add_epi64(_mm256_sll_epi64(cv, sl), vdd),
                                               _mm256_slli_epi64(_mm256_mul_epi32(e, vdd), 1));
            e = _mm256_add_epi64(e, _mm256_cmpgt_epi64(zero, r));                        /* r < 0: e - 1 */
            e = _mm256_add_epi64(e, _mm256_andnot_si256(_mm256_cmpgt_epi64(vD, r), one)); /* r >= D: e + 1 */
            int32_t g4;
            memcpy(&g4, gain + i, 4);
            __m256i y = _mm256_mul_epi32(e, _mm256_cvtepi8_epi64(_mm_cvtsi32_si128(g4)));
            if (bias) y = _mm256_add_epi64(y, _mm256_sll_epi64(_mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(bias + i))), bsh));
            _mm256_storeu_si256((__m256i *)(out + i), y);
        }
        for (; i < n; i++) out[i] = floordiv((int64_t)c[i] * mul + dd, D) * gain[i] + (bias ? (int64_t)bias[i] << bs : 0);
        return 1;
    }
    const int64_t nmax = cmax * mul + dd; /* |c mul + dd| <= nmax */
    if (nmax >= ((int64_t)1 << 61) || D >= ((int64_t)1 << 61)) return 0;
    /* floor(N / D) = floor((N + B D) / D) - B with N + B D in [0, 2^62): q0 = (u * floor((2^64 - 1) / D)) >> 64 is
     * floor(u / D) or one less (u < 2^63) */
    const int64_t B = nmax / D + 1;
    const uint64_t inv = UINT64_MAX / (uint64_t)D, BD = (uint64_t)(B * D);
    for (i = 0; i < n; i++) {
        const uint64_t u = (uint64_t)((int64_t)c[i] * mul + dd) + BD;
        uint64_t q = (uint64_t)(((unsigned __int128)u * inv) >> 64);
        q += u - q * (uint64_t)D >= (uint64_t)D;
        out[i] = ((int64_t)q - B) * gain[i] + (bias ? (int64_t)bias[i] << bs : 0);
    }
    return 1;
}

void qasr_layer_norm(const void *x, int type, int64_t rows, int64_t n, const int8_t *gain, const int32_t *bias,
                     int64_t eps_term, int k, int frac, int64_t *out, int nthreads) {
    const int fast = n < ((int64_t)1 << 14); /* (int32 codes: where every code of the row is within 2^15) */
#pragma omp parallel num_threads(nthreads)
    {
        int32_t *cbuf = fast ? malloc((size_t)n * sizeof(int32_t)) : 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const size_t size = type == 0 ? 1 : type == 1 ? 2 : 4;
            if (fast && ln_row_fast((const char *)x + r * n * size, type, n, gain, bias, eps_term, k, frac, cbuf,
                                    out + r * n))
                continue;
            int64_t s = 0, ss = 0;
            for (int64_t i = 0; i < n; i++) s += code(x, type, r * n + i);
            for (int64_t i = 0; i < n; i++) {
                int64_t c = n * code(x, type, r * n + i) - s;
                ss += c * c;
            }
            const uint64_t d = isqrt64((uint64_t)(ln_variance(ss, n, k) + eps_term));
            const int64_t dd = d ? (int64_t)d : 1, mul = (int64_t)1 << (frac + 1 + k);
            for (int64_t i = 0; i < n; i++) {
                int64_t c = n * code(x, type, r * n + i) - s;
                out[r * n + i] = floordiv(c * mul + dd, 2 * dd) * gain[i] + (bias ? (int64_t)bias[i] << (frac - 16) : 0);
            }
        }
        free(cbuf);
    }
}

/* out[i] = table[x[i] - base] (x, table and out: int8 / int16 / int32); returns how many codes fell outside the
 * table (their outputs are left unset: the caller raises) */
#define LUT_LOOP(XT, TT)                                                                                       \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) reduction(+ : bad) if (n >= 65536)")       \
    for (int64_t i = 0; i < n; i++) {                                                                          \
        int64_t j = (int64_t)((const XT *)x)[i] - base;                                                        \
        if ((uint64_t)j < (uint64_t)size) ((TT *)out)[i] = ((const TT *)table)[j]; else bad++;                \
    }
#define LUT_TABLE(XT)                                                                                          \
    if (ttype == 0) { LUT_LOOP(XT, int8_t) } else if (ttype == 1) { LUT_LOOP(XT, int16_t) } else { LUT_LOOP(XT, int32_t) }

/* kernels.softmax_exact, bit for bit: rows of n codes x (masked lanes: mask[r n + j] != 0, or no mask), e = lut[max - x]
 * (0 on masked lanes), r = floor(cq / max(sum e, 1)) in 128 bits, out = clamp(((e r + 2^(Q-1)) >> Q) + zp, qmin, qmax) */
void qasr_softmax_exact(const void *x, int type, int64_t rows, int64_t n, const uint8_t *mask, int64_t cmin,
                        const int64_t *lut, int64_t cq_hi, int64_t cq_lo, int Q, int64_t zp, int64_t qmin,
                        int64_t qmax, void *out, int otype, int nthreads) {
    const smx sm = {0, lut, 0, 0, Q, ((__int128)cq_hi << 63) | (__int128)cq_lo}; /* (the attention's exact softmax) */
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *mk = mask ? mask + r * n : 0;
        int64_t mx = cmin - 1;
        for (int64_t j = 0; j < n; j++) {
            const int64_t v = mk && mk[j] ? cmin : code(x, type, r * n + j);
            if (!(mk && mk[j]) && v > mx) mx = v;
        }
        if (mx < cmin) mx = cmin; /* (no lane: every probability from e = 0) */
        __int128 total = 0;
        for (int64_t j = 0; j < n; j++)
            if (!(mk && mk[j])) total += lut[mx - code(x, type, r * n + j)];
        const __int128 rr = sm_recip(&sm, total);
        for (int64_t j = 0; j < n; j++) {
            const int64_t e = mk && mk[j] ? 0 : lut[mx - code(x, type, r * n + j)];
            const int64_t p = clamp64(sm_p(&sm, e, rr) + zp, qmin, qmax);
            if (otype == 0) ((int8_t *)out)[r * n + j] = (int8_t)p;
            else if (otype == 1) ((int16_t *)out)[r * n + j] = (int16_t)p;
            else ((int32_t *)out)[r * n + j] = (int32_t)p;
        }
    }
}

/* floor(sqrt(x)) for 0 <= x < 2^126, bitwise */
static inline __int128 isqrt128(__int128 x) {
    __int128 res = 0;
    for (int b = 62; b >= 0; b--) {
        const __int128 cand = res | ((__int128)1 << b);
        if (cand * cand <= x) res = cand;
    }
    return res;
}

#define LN_ROW_BITS 110 /* kernels.LN_ROW_BITS */

/* kernels.ln_row_multiplier, bit for bit: M = round(mA 2^(S+30-SA+G) / isqrt(floor((V / n + E) 2^2G))) */
static int64_t ln_row_multiplier(int64_t V, int64_t n, const int64_t *c) {
    if (V == 0) return 0;
    const int64_t mA = c[0], SA = c[1], S = c[2], Em = c[3], Ee = c[4], Eint = c[5];
    const int64_t Wi = V / n, top = Wi + Eint;
    const int bl = top ? 64 - __builtin_clzll((uint64_t)top) : 0;
    const int64_t G = (LN_ROW_BITS - bl) >> 1, e2 = 2 * G - Ee; /* (LN_ROW_BITS - bl >= 0: floor of a halving) */
    const __int128 Wf = ((__int128)Wi << (2 * G)) + (((__int128)(V % n) << (2 * G)) / n) +
                        (e2 >= 0 ? (__int128)Em << e2 : (e2 > -64 ? (__int128)(Em >> -e2) : 0));
    const __int128 D = isqrt128(Wf);
    const int64_t k = S + 30 - SA + G;
    const __int128 num = k >= 0 ? (__int128)mA << k : (__int128)(k > -64 ? mA >> -k : 0);
    const __int128 M = (num + D / 2) / D;
    const __int128 cap = ((__int128)1 << 60) - 1;
    return (int64_t)(M < cap ? M : cap);
}

/* 4 elements of qasr_layer_norm_exact's last step in int64 lanes: cv (|cv| < 2^31, |cv gain| < 2^31), gain, the
 * row multiplier's words mh, ml (< 2^30), bias words with |bh| < 2^60 and S <= 60 (so |t + 2^(S-1)| < 2^62: the
 * floors are logical shifts on the values plus 2^62, vb = 2^62 + 2^(S-1), fix = 2^(62-S) - zp) -> clamped codes
 * (low dwords of the lanes) */
static inline __m256i ln_exact4(const int64_t *cv, const int8_t *gain, const int64_t *bh, const int64_t *bl, __m256i mh,
                                __m256i ml, __m256i vb, __m128i shv, __m256i fix, __m256i vlo, __m256i vhi) {
    const __m256i big = _mm256_set1_epi64x((int64_t)1 << 62), fix30 = _mm256_set1_epi64x((int64_t)1 << 32);
    int32_t g4;
    memcpy(&g4, gain, sizeof g4); /* (4 gain codes, any alignment) */
    const __m256i g = _mm256_cvtepi8_epi64(_mm_cvtsi32_si128(g4));
    const __m256i u = _mm256_mul_epi32(_mm256_loadu_si256((const __m256i *)cv), g);
    const __m256i lo = _mm256_add_epi64(_mm256_mul_epi32(u, ml), _mm256_loadu_si256((const __m256i *)bl));
    const __m256i t = _mm256_add_epi64(_mm256_add_epi64(_mm256_mul_epi32(u, mh), _mm256_loadu_si256((const __m256i *)bh)),
                                       _mm256_sub_epi64(_mm256_srli_epi64(_mm256_add_epi64(lo, big), 30), fix30));
    __m256i y = _mm256_sub_epi64(_mm256_srl_epi64(_mm256_add_epi64(t, vb), shv), fix);
    y = _mm256_blendv_epi8(y, vlo, _mm256_cmpgt_epi64(vlo, y));
    return _mm256_blendv_epi8(y, vhi, _mm256_cmpgt_epi64(y, vhi));
}

/* 8 codes (int8, int16 or int32 storage) from element i as int32 lanes */
static inline __m256i load8_i32(const void *x, int type, int64_t i) {
    if (type == 0) return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)x + i)));
    if (type == 1) return _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)((const int16_t *)x + i)));
    return _mm256_loadu_si256((const __m256i *)((const int32_t *)x + i));
}

static inline int64_t hsum64(__m256i v) {
    int64_t t[4];
    _mm256_storeu_si256((__m256i *)t, v);
    return t[0] + t[1] + t[2] + t[3];
}

/* LayerNorm row statistics: sum x, then cv = n x - sum (int64), V = sum cv^2 and max |cv|; in int64 vector lanes
 * when n (max x - min x) < 2^31 (every cv fits the 32-bit multiplies), else scalar */
static void ln_row_stats(const void *x, int type, int64_t off, int64_t n, int64_t *cv, int64_t *V_, int64_t *cmax_) {
    int64_t sum = 0, V = 0, cmax = 0, j = 0, xmin = 0, xmax = 0;
    if (n >= 8) {
        __m256i s = _mm256_setzero_si256(), mn = load8_i32(x, type, off), mx = mn;
        for (; j + 8 <= n; j += 8) {
            const __m256i v = load8_i32(x, type, off + j);
            s = _mm256_add_epi64(s, _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                                     _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1))));
            mn = _mm256_min_epi32(mn, v);
            mx = _mm256_max_epi32(mx, v);
        }
        int32_t a[8], b[8];
        _mm256_storeu_si256((__m256i *)a, mn);
        _mm256_storeu_si256((__m256i *)b, mx);
        xmin = a[0], xmax = b[0];
        for (int k = 1; k < 8; k++) {
            xmin = a[k] < xmin ? a[k] : xmin;
            xmax = b[k] > xmax ? b[k] : xmax;
        }
        sum = hsum64(s);
    }
    for (int64_t k = j; k < n; k++) {
        const int64_t v = code(x, type, off + k);
        sum += v;
        xmin = k == 0 || v < xmin ? v : xmin;
        xmax = k == 0 || v > xmax ? v : xmax;
    }
    j = 0;
    if (n >= 8 && n * (xmax - xmin) < ((int64_t)1 << 31)) {
        const __m256i vn = _mm256_set1_epi64x(n), vs = _mm256_set1_epi64x(sum);
        __m256i acc = _mm256_setzero_si256(), hi = _mm256_setzero_si256(), lo = hi;
        for (; j + 8 <= n; j += 8) {
            const __m256i v = load8_i32(x, type, off + j);
            for (int h = 0; h < 2; h++) {
                const __m256i c = _mm256_sub_epi64(
                    _mm256_mul_epi32(_mm256_cvtepi32_epi64(h ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v)),
                                     vn), vs);
                _mm256_storeu_si256((__m256i *)(cv + j + 4 * h), c);
                acc = _mm256_add_epi64(acc, _mm256_mul_epi32(c, c));
                hi = _mm256_blendv_epi8(hi, c, _mm256_cmpgt_epi64(c, hi));
                lo = _mm256_blendv_epi8(lo, c, _mm256_cmpgt_epi64(lo, c));
            }
        }
        int64_t a[4], b[4];
        _mm256_storeu_si256((__m256i *)a, hi);
        _mm256_storeu_si256((__m256i *)b, lo);
        for (int k = 0; k < 4; k++) {
            cmax = a[k] > cmax ? a[k] : cmax;
            cmax = -b[k] > cmax ? -b[k] : cmax;
        }
        V = hsum64(acc);
    }
    for (; j < n; j++) {
        cv[j] = n * code(x, type, off + j) - sum;
        V += cv[j] * cv[j];
        cmax = cv[j] > cmax ? cv[j] : -cv[j] > cmax ? -cv[j] : cmax;
    }
    *V_ = V;
    *cmax_ = cmax;
}

/* kernels.layer_norm_exact: per row c = n x - sum x, M (ln_row_multiplier), u = c gain, t = u M_hi + bh + ((u M_lo + bl)
 * >> 30), out = clamp(((t + 2^(S-1)) >> S) + zp, qmin, qmax); c = [mA, SA, S, Em, Ee, Eint]. Rows whose products fit
 * (|c| max |gain| < 2^31) take int64 vector lanes, 8 elements a step */
void qasr_layer_norm_exact(const void *x, int type, int64_t rows, int64_t n, const int8_t *gain, const int64_t *bh,
                           const int64_t *bl, const int64_t *c, int64_t zp, int64_t qmin, int64_t qmax, void *out,
                           int otype, int nthreads) {
    const int64_t S = c[2], half = (int64_t)1 << (S - 1);
    int64_t gmax = 1, bmax = 0;
    for (int64_t j = 0; j < n; j++) {
        gmax = gain[j] > gmax ? gain[j] : -gain[j] > gmax ? -gain[j] : gmax;
        bmax = bh[j] > bmax ? bh[j] : -bh[j] > bmax ? -bh[j] : bmax;
    }
    const int vec = S >= 1 && S <= 60 && bmax < ((int64_t)1 << 60);
#pragma omp parallel num_threads(nthreads)
    {
        int64_t *cv = malloc((size_t)(n + 8) * sizeof(int64_t));
        const __m128i shv = _mm_cvtsi32_si128((int)S);
        const __m256i fix = _mm256_set1_epi64x(((int64_t)1 << (62 - S)) - zp);
        const __m256i vb = _mm256_set1_epi64x(((int64_t)1 << 62) + half);
        const __m256i vlo = _mm256_set1_epi64x(qmin), vhi = _mm256_set1_epi64x(qmax);
        const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            int64_t V, cmax;
            ln_row_stats(x, type, r * n, n, cv, &V, &cmax);
            const int64_t M = ln_row_multiplier(V, n, c), mh = M >> 30, ml = M & (((int64_t)1 << 30) - 1);
            int64_t j = 0;
            if (vec && cmax * gmax < ((int64_t)1 << 31)) {
                const __m256i vmh = _mm256_set1_epi64x(mh), vml = _mm256_set1_epi64x(ml);
                for (; j + 8 <= n; j += 8) {
                    const __m256i a = ln_exact4(cv + j, gain + j, bh + j, bl + j, vmh, vml, vb, shv, fix, vlo, vhi);
                    const __m256i b = ln_exact4(cv + j + 4, gain + j + 4, bh + j + 4, bl + j + 4, vmh, vml, vb, shv, fix,
                                                vlo, vhi);
                    const __m128i wa = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(a, even));
                    const __m128i wb = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, even));
                    const __m128i w16 = _mm_packs_epi32(wa, wb); /* (codes in range: no saturation) */
                    if (otype == 2) {
                        _mm_storeu_si128((__m128i *)((int32_t *)out + r * n + j), wa);
                        _mm_storeu_si128((__m128i *)((int32_t *)out + r * n + j + 4), wb);
                    } else if (otype == 1) {
                        _mm_storeu_si128((__m128i *)((int16_t *)out + r * n + j), w16);
                    } else {
                        _mm_storel_epi64((__m128i *)((int8_t *)out + r * n + j), _mm_packs_epi16(w16, w16));
                    }
                }
            }
            for (; j < n; j++) {
                const int64_t u = cv[j] * gain[j];
                const int64_t t = u * mh + bh[j] + ((u * ml + bl[j]) >> 30); /* (>>: floor, gcc) */
                const int64_t y = clamp64(((t + half) >> S) + zp, qmin, qmax);
                if (otype == 0) ((int8_t *)out)[r * n + j] = (int8_t)y;
                else if (otype == 1) ((int16_t *)out)[r * n + j] = (int16_t)y;
                else ((int32_t *)out)[r * n + j] = (int32_t)y;
            }
        }
        free(cv);
    }
}

int64_t qasr_lut(const void *x, int type, int64_t n, int64_t base, const void *table, int ttype, int64_t size,
                 void *out, int nthreads) {
    int64_t bad = 0;
    if (type == 0) { LUT_TABLE(int8_t) } else if (type == 1) { LUT_TABLE(int16_t) } else { LUT_TABLE(int32_t) }
    return bad;
}

/* 4 codes at i as int64 lanes */
static inline __m256i load4(const void *x, int type, int64_t i) {
    if (type == 0) {
        int32_t v;
        memcpy(&v, (const int8_t *)x + i, 4);
        return _mm256_cvtepi8_epi64(_mm_cvtsi32_si128(v));
    }
    if (type == 1) return _mm256_cvtepi16_epi64(_mm_loadl_epi64((const __m128i *)((const int16_t *)x + i)));
    return _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)((const int32_t *)x + i)));
}

#define ADD_BLOCK 1024

/* out[i] = (a[i] - za) * ka + (b[i] - zb) * kb (int64). Where both factors of each product fit int32 (multipliers
 * and zero points checked once, codes a block of ADD_BLOCK at a time), 4 lanes with vpmuldq; else the int64 loop. */
void qasr_add(const void *a, int atype, int64_t za, int64_t ka, const void *b, int btype, int64_t zb, int64_t kb,
              int64_t n, int64_t *out, int nthreads) {
    const int64_t lim = (int64_t)1 << 30; /* |code|, |zero point| < 2^30: their difference fits int32 */
    const int vec = ka > -lim && ka < lim && kb > -lim && kb < lim && za > -lim && za < lim && zb > -lim && zb < lim;
    const int64_t blocks = (n + ADD_BLOCK - 1) / ADD_BLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n >= 65536)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t i0 = blk * ADD_BLOCK, i1 = i0 + ADD_BLOCK < n ? i0 + ADD_BLOCK : n;
        int64_t i = i0;
        if (vec) {
            const __m256i vza = _mm256_set1_epi64x(za), vzb = _mm256_set1_epi64x(zb), vka = _mm256_set1_epi64x(ka);
            const __m256i vkb = _mm256_set1_epi64x(kb), hi = _mm256_set1_epi64x(lim - 1), lo = _mm256_set1_epi64x(-lim);
            __m256i bad = _mm256_setzero_si256();
            for (; i + 4 <= i1; i += 4) {
                const __m256i x = load4(a, atype, i), y = load4(b, btype, i);
                bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi64(x, hi), _mm256_cmpgt_epi64(lo, x)));
                bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi64(y, hi), _mm256_cmpgt_epi64(lo, y)));
                _mm256_storeu_si256((__m256i *)(out + i),
                                    _mm256_add_epi64(_mm256_mul_epi32(_mm256_sub_epi64(x, vza), vka),
                                                     _mm256_mul_epi32(_mm256_sub_epi64(y, vzb), vkb)));
            }
            if (!_mm256_testz_si256(bad, bad)) i = i0; /* a code beyond 2^30: the block again, in int64 */
        }
        for (; i < i1; i++) out[i] = (code(a, atype, i) - za) * ka + (code(b, btype, i) - zb) * kb;
    }
}

/* kernels.add_requant_int: out = clamp(((x ma 2^ta + y mb 2^tb + floor((x la 2^ta + y lb 2^tb) / 2^31) + 2^(sh-1)) >> sh)
 * + zp, qmin, qmax), x = a - za, y = b - zb (ma, mb, la, lb < 2^31: second words la, lb, 0 for one-word multipliers;
 * ta, tb <= 13, 1 <= sh <= 62), codes within 2^17 of their zero points: every product is below 2^61, their sums and
 * the rounding term below 2^63. 4 int64 lanes a step (vpmuldq); *bad counts the codes 2^17 or more from their zero
 * point (their outputs are left unset: the caller raises). */
/* one code of qasr_add_requant: t = x ma 2^ta + y mb 2^tb + floor(low / 2^31), low = x la 2^ta + y lb 2^tb, rounded
 * by 2^sh half up, except at an exact tie of the real value, rounded to even as the fake model's torch.round: the
 * 93-bit product t 2^31 + (low mod 2^31) lies within w = (|x| 2^ta + |y| 2^tb) / 2 + 1 of the exact value (the
 * multipliers' rounding), so a tie shows as t mod 2^sh = 2^(sh-1) with low mod 2^31 <= w (from above) or t mod 2^sh
 * = 2^(sh-1) - 1 with 2^31 - (low mod 2^31) <= w (from below) */
static inline int64_t add_rq1(int64_t x, int64_t y, int64_t ma, int64_t ta, int64_t mb, int64_t tb, int64_t sh,
                              int64_t la, int64_t lb, int64_t zp, int64_t qmin, int64_t qmax) {
    const int64_t low = x * la * ((int64_t)1 << ta) + y * lb * ((int64_t)1 << tb); /* >>: floor (gcc) */
    const int64_t t = x * ma * ((int64_t)1 << ta) + y * mb * ((int64_t)1 << tb) + (low >> 31);
    const int64_t half = (int64_t)1 << (sh - 1), rem = t & ((half << 1) - 1), d = low & (((int64_t)1 << 31) - 1);
    const int64_t w = (((x < 0 ? -x : x) << ta) + ((y < 0 ? -y : y) << tb)) / 2 + 1;
    int64_t q = (t + half) >> sh;
    if ((q & 1) && ((rem == half && d <= w) || (rem == half - 1 && ((int64_t)1 << 31) - d <= w)))
        q += rem == half ? -1 : 1;
    return clamp64(q + zp, qmin, qmax);
}

void qasr_add_requant(const void *a, int atype, const void *b, int btype, int64_t n, int64_t za, int64_t ma,
                      int64_t ta, int64_t zb, int64_t mb, int64_t tb, int64_t sh, int64_t zp, int64_t qmin,
                      int64_t qmax, int64_t la, int64_t lb, int64_t *bad, void *out, int otype, int nthreads) {
    const int haslo = la || lb;
    const int64_t lim = (int64_t)1 << 17, blocks = (n + ADD_BLOCK - 1) / ADD_BLOCK;
    int64_t nbad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : nbad) if (n >= 65536)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t i0 = blk * ADD_BLOCK, i1 = i0 + ADD_BLOCK < n ? i0 + ADD_BLOCK : n;
        const __m256i vza = _mm256_set1_epi64x(za), vzb = _mm256_set1_epi64x(zb), vma = _mm256_set1_epi64x(ma);
        const __m256i vmb = _mm256_set1_epi64x(mb), hi = _mm256_set1_epi64x(lim - 1), lo = _mm256_set1_epi64x(-lim);
        /* the arithmetic shift as a logical one on v + 2^62 + 2^(sh-1) (>= 0), minus 2^(62-sh), plus zp */
        const __m256i bias = _mm256_set1_epi64x(((int64_t)1 << 62) + ((int64_t)1 << (sh - 1)) -
                                                (haslo ? (int64_t)1 << 31 : 0)); /* (the second words' offset) */
        const __m256i fix = _mm256_set1_epi64x(((int64_t)1 << (62 - sh)) - zp);
        const __m256i vlo = _mm256_set1_epi64x(qmin), vhi = _mm256_set1_epi64x(qmax);
        const __m256i vla = _mm256_set1_epi64x(la), vlb = _mm256_set1_epi64x(lb), c62 = _mm256_set1_epi64x((int64_t)1 << 62);
        const __m128i vta = _mm_cvtsi32_si128((int)ta), vtb = _mm_cvtsi32_si128((int)tb), vsh = _mm_cvtsi32_si128((int)sh);
        const __m256i rmask = _mm256_set1_epi64x(((int64_t)1 << sh) - 1);
        int64_t i = i0;
        __m256i over = _mm256_setzero_si256();
        for (; i + 4 <= i1; i += 4) {
            const __m256i x = _mm256_sub_epi64(load4(a, atype, i), vza), y = _mm256_sub_epi64(load4(b, btype, i), vzb);
            over = _mm256_or_si256(over, _mm256_or_si256(_mm256_cmpgt_epi64(x, hi), _mm256_cmpgt_epi64(lo, x)));
            over = _mm256_or_si256(over, _mm256_or_si256(_mm256_cmpgt_epi64(y, hi), _mm256_cmpgt_epi64(lo, y)));
            __m256i v = _mm256_add_epi64(_mm256_sll_epi64(_mm256_mul_epi32(x, vma), vta),
                                         _mm256_sll_epi64(_mm256_mul_epi32(y, vmb), vtb));
            if (haslo) /* floor(low / 2^31) + 2^31, |low| < 2^62: a logical shift of low + 2^62 */
                v = _mm256_add_epi64(v, _mm256_srli_epi64(_mm256_add_epi64(_mm256_add_epi64(
                    _mm256_sll_epi64(_mm256_mul_epi32(x, vla), vta), _mm256_sll_epi64(_mm256_mul_epi32(y, vlb), vtb)),
                    c62), 31));
            const __m256i u = _mm256_add_epi64(v, bias); /* t + 2^62 + 2^(sh-1) */
            __m256i q = _mm256_sub_epi64(_mm256_srl_epi64(u, vsh), fix);
            q = _mm256_blendv_epi8(q, vlo, _mm256_cmpgt_epi64(vlo, q));
            q = _mm256_blendv_epi8(q, vhi, _mm256_cmpgt_epi64(q, vhi));
            int64_t t[4];
            _mm256_storeu_si256((__m256i *)t, q);
            /* t mod 2^sh at 2^(sh-1) or 2^(sh-1) - 1 (rare): maybe an exact tie, the lanes again in add_rq1 */
            const __m256i r = _mm256_and_si256(u, rmask);
            const __m256i near = _mm256_or_si256(_mm256_cmpeq_epi64(r, _mm256_setzero_si256()), _mm256_cmpeq_epi64(r, rmask));
            if (!_mm256_testz_si256(near, near)) {
                int64_t xs[4], ys[4];
                _mm256_storeu_si256((__m256i *)xs, x);
                _mm256_storeu_si256((__m256i *)ys, y);
                for (int l = 0; l < 4; l++)
                    if (xs[l] < lim && xs[l] >= -lim && ys[l] < lim && ys[l] >= -lim)
                        t[l] = add_rq1(xs[l], ys[l], ma, ta, mb, tb, sh, la, lb, zp, qmin, qmax);
            }
            for (int l = 0; l < 4; l++) {
                if (otype == 0) ((int8_t *)out)[i + l] = (int8_t)t[l];
                else if (otype == 1) ((int16_t *)out)[i + l] = (int16_t)t[l];
                else ((int32_t *)out)[i + l] = (int32_t)t[l];
            }
        }
        if (!_mm256_testz_si256(over, over)) i = i0; /* recount the block in the scalar loop */
        for (; i < i1; i++) {
            const int64_t x = code(a, atype, i) - za, y = code(b, btype, i) - zb;
            if (x >= lim || x < -lim || y >= lim || y < -lim) {
                nbad++;
                continue;
            }
            const int64_t q = add_rq1(x, y, ma, ta, mb, tb, sh, la, lb, zp, qmin, qmax);
            if (otype == 0) ((int8_t *)out)[i] = (int8_t)q;
            else if (otype == 1) ((int16_t *)out)[i] = (int16_t)q;
            else ((int32_t *)out)[i] = (int32_t)q;
        }
    }
    *bad = nbad;
}

/* kernels.requantize: out = clamp((((acc - sub) * m[j] + floor((acc - sub) * ml[j] / 2^31) + 2^(sh[j]-1)) >> sh[j])
 * + zp, qmin, qmax), j = the column (per-column multipliers) or 0, ml = 0 where mlo is NULL (a one-word multiplier; with
 * two words the multiplier is m + ml 2^-31, 62 bits: exact rounding of acc (m 2^31 + ml) / 2^(sh+31)); acc
 * int8/int16/int32 or int64 (type 3), out int8 / int16 / int32 */
static inline int64_t rq1(int64_t a, int64_t m, int64_t ml, int64_t sh, int64_t zp, int64_t qmin, int64_t qmax) {
    /* two-word multiplier m + ml 2^-31 (ml = 0: one word): a m + floor(a ml / 2^31), then rounded by 2^sh; 128 bits */
    const __int128 t = (__int128)a * m + (ml ? ((__int128)a * ml) >> 31 : 0);
    const __int128 y = ((t + ((__int128)1 << (sh - 1))) >> sh) + zp;
    return y < qmin ? qmin : y > qmax ? qmax : (int64_t)y;
}
#define RQ_LOOP(AT, OT)                                                                                        \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (rows * cols >= 65536)")               \
    for (int64_t r = 0; r < rows; r++) {                                                                       \
        const AT *a = (const AT *)acc + r * cols;                                                              \
        OT *o = (OT *)out + r * cols;                                                                          \
        for (int64_t c = 0; c < cols; c++) {                                                                   \
            const int64_t j = per_col ? c : 0;                                                                 \
            o[c] = (OT)rq1((int64_t)a[c] - sub, mult[j], mlo ? mlo[j] : 0, shift[j], zp, qmin, qmax);          \
        }                                                                                                      \
    }
#define RQ_OUT(AT)                                                                                             \
    if (otype == 0) { RQ_LOOP(AT, int8_t) } else if (otype == 1) { RQ_LOOP(AT, int16_t) } else { RQ_LOOP(AT, int32_t) }

/* v * m for int64 lanes v and 0 <= m < 2^31 (the product within int64): from two 32 x 32 products */
static inline __m256i mul64x32(__m256i v, __m256i m) {
    return _mm256_add_epi64(_mm256_mul_epu32(v, m), _mm256_slli_epi64(_mm256_mul_epi32(_mm256_srli_epi64(v, 32), m), 32));
}

/* arithmetic right shift of int64 lanes: a logical one on the one's complement of negative values */
static inline __m256i sra64(__m256i p, __m256i sh) {
    const __m256i neg = _mm256_cmpgt_epi64(_mm256_setzero_si256(), p);
    return _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(p, neg), sh), neg);
}

/* 4 int64 lanes: clamp(((v * m + floor(v * ml / 2^31) + 2^(sh-1)) >> sh) + zp, lo, hi) for 0 <= m, ml < 2^31 (v * m
 * within int64; with a second word ml (haslo): |v| < 2^32) */
static inline __m256i rq64(__m256i v, __m256i m, __m256i ml, int haslo, __m256i sh, __m256i half, __m256i zp,
                           __m256i lo, __m256i hi) {
    __m256i p = mul64x32(v, m);
    if (haslo) p = _mm256_add_epi64(p, sra64(mul64x32(v, ml), _mm256_set1_epi64x(31)));
    __m256i y = _mm256_add_epi64(sra64(_mm256_add_epi64(p, half), sh), zp);
    y = _mm256_blendv_epi8(y, lo, _mm256_cmpgt_epi64(lo, y));
    return _mm256_blendv_epi8(y, hi, _mm256_cmpgt_epi64(y, hi));
}

/* one row of qasr_requant (int8 / int16 / int32 / int64 in, int8 / int16 / int32 codes out), 8 lanes a step, scalar
 * tail */
static void rq_row(const void *acc, int type, int64_t cols, int64_t sub, const int64_t *mult, const int64_t *mlo,
                   const int64_t *shift, int per_col, int64_t zp, int64_t qmin, int64_t qmax, void *out, int otype) {
    const __m256i vsub = _mm256_set1_epi64x(sub), vzp = _mm256_set1_epi64x(zp), one = _mm256_set1_epi64x(1);
    const __m256i lo = _mm256_set1_epi64x(qmin), hi = _mm256_set1_epi64x(qmax);
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const int haslo = mlo != 0;
    __m256i m0 = _mm256_set1_epi64x(mult[0]), m1 = m0, s0 = _mm256_set1_epi64x(shift[0]), s1 = s0;
    __m256i l0 = _mm256_set1_epi64x(haslo ? mlo[0] : 0), l1 = l0;
    __m256i h0 = _mm256_sllv_epi64(one, _mm256_sub_epi64(s0, one)), h1 = h0;
    const int vec = !(type == 3 && haslo); /* (int64 values with a second word: the scalar loop, in 128 bits) */
    int64_t c = 0;
    for (; vec && c + 8 <= cols; c += 8) {
        __m256i v0, v1;
        if (type == 0) {
            const __m128i a = _mm_loadl_epi64((const __m128i *)((const int8_t *)acc + c));
            v0 = _mm256_cvtepi8_epi64(a);
            v1 = _mm256_cvtepi8_epi64(_mm_srli_si128(a, 4));
        } else if (type == 1) {
            const __m128i a = _mm_loadu_si128((const __m128i *)((const int16_t *)acc + c));
            v0 = _mm256_cvtepi16_epi64(a);
            v1 = _mm256_cvtepi16_epi64(_mm_srli_si128(a, 8));
        } else if (type == 2) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)((const int32_t *)acc + c));
            v0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(a));
            v1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a, 1));
        } else {
            v0 = _mm256_loadu_si256((const __m256i *)((const int64_t *)acc + c));
            v1 = _mm256_loadu_si256((const __m256i *)((const int64_t *)acc + c + 4));
        }
        if (per_col) {
            m0 = _mm256_loadu_si256((const __m256i *)(mult + c));
            m1 = _mm256_loadu_si256((const __m256i *)(mult + c + 4));
            s0 = _mm256_loadu_si256((const __m256i *)(shift + c));
            s1 = _mm256_loadu_si256((const __m256i *)(shift + c + 4));
            h0 = _mm256_sllv_epi64(one, _mm256_sub_epi64(s0, one));
            h1 = _mm256_sllv_epi64(one, _mm256_sub_epi64(s1, one));
            if (haslo) {
                l0 = _mm256_loadu_si256((const __m256i *)(mlo + c));
                l1 = _mm256_loadu_si256((const __m256i *)(mlo + c + 4));
            }
        }
        __m256i y0 = rq64(_mm256_sub_epi64(v0, vsub), m0, l0, haslo, s0, h0, vzp, lo, hi);
        __m256i y1 = rq64(_mm256_sub_epi64(v1, vsub), m1, l1, haslo, s1, h1, vzp, lo, hi);
        const __m128i d0 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(y0, even));
        const __m128i d1 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(y1, even));
        if (otype == 2) {
            _mm256_storeu_si256((__m256i *)((int32_t *)out + c), _mm256_set_m128i(d1, d0));
            continue;
        }
        __m128i w = _mm_packs_epi32(d0, d1); /* (values in range: no saturation) */
        if (otype == 1) _mm_storeu_si128((__m128i *)((int16_t *)out + c), w);
        else _mm_storel_epi64((__m128i *)((int8_t *)out + c), _mm_packs_epi16(w, w));
    }
    for (; c < cols; c++) {
        const int64_t j = per_col ? c : 0;
        const int64_t a = type == 3 ? ((const int64_t *)acc)[c] : code(acc, type, c);
        const int64_t y = rq1(a - sub, mult[j], haslo ? mlo[j] : 0, shift[j], zp, qmin, qmax);
        if (otype == 2) ((int32_t *)out)[c] = (int32_t)y;
        else if (otype == 1) ((int16_t *)out)[c] = (int16_t)y;
        else ((int8_t *)out)[c] = (int8_t)y;
    }
}

/* whether rq_row's vector path applies: its operand ranges (n multipliers / shifts) */
static int rq_vector_ok(const int64_t *mult, const int64_t *mlo, const int64_t *shift, int64_t n, int otype,
                        int64_t qmin, int64_t qmax) {
    int vec = otype == 2 ? qmin >= INT32_MIN && qmax <= INT32_MAX : qmin >= -32768 && qmax <= 32767;
    for (int64_t j = 0; vec && j < n; j++)
        vec = mult[j] >= 0 && mult[j] < ((int64_t)1 << 31) && shift[j] >= 1 && shift[j] <= 62 &&
              (!mlo || (mlo[j] >= 0 && mlo[j] < ((int64_t)1 << 31)));
    return vec;
}

void qasr_requant(const void *acc, int type, int64_t rows, int64_t cols, int64_t sub, const int64_t *mult,
                  const int64_t *mlo, const int64_t *shift, int per_col, int64_t zp, int64_t qmin, int64_t qmax,
                  void *out, int otype, int nthreads) {
    if (rq_vector_ok(mult, mlo, shift, per_col ? cols : 1, otype, qmin, qmax)) {
        const int64_t osize = (int64_t)1 << otype, asize = (int64_t)1 << type; /* 1, 2, 4, 8 bytes */
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * cols >= 65536)
        for (int64_t r = 0; r < rows; r++)
            rq_row((const char *)acc + r * cols * asize, type, cols, sub, mult, mlo, shift, per_col, zp, qmin, qmax,
                   (char *)out + r * cols * osize, otype);
        return;
    }
    if (type == 0) { RQ_OUT(int8_t) } else if (type == 1) { RQ_OUT(int16_t) }
    else if (type == 2) { RQ_OUT(int32_t) } else { RQ_OUT(int64_t) }
}

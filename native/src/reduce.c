/* Element-wise reduction, scaling and copy kernels behind the topocomm C ABI
 * (native/include/topocomm.h). Pure C, no Python.h.
 *
 * Semantics (mirrored bit for bit by comms/kernels/reference_ops.py):
 *  - left fold in source order: dst = ((s0 op s1) op s2) ...
 *  - float16 / bfloat16: every pairwise step widens both operands to float32,
 *    applies the op and rounds back to 16 bits (round to nearest even; a NaN
 *    stays a quiet NaN). That is exactly what numpy float16 arithmetic does.
 *  - min/max propagate NaN (like np.minimum / np.maximum):
 *      min(a, b) = (a < b || a is NaN) ? a : b
 *      max(a, b) = (a > b || a is NaN) ? a : b
 *  - integer sum/prod wrap (computed on unsigned types).
 *  - bool: any nonzero byte is true, outputs are 0/1; sum=or, prod=and,
 *    min=and, max=or, band=and, bor=or, bxor=xor.
 *
 * dst may alias any source (exactly; partial overlap is not supported): every
 * element of every source is loaded before that element of dst is stored. With
 * more than two sources, blocks of BLK_BYTES are folded into a stack temporary.
 * Pointers may be unaligned (even to the element size).
 *
 * Hot loops are plain C, auto-vectorized at -O3 and multiversioned (avx2 /
 * default) on x86_64. float16 additionally has an explicit F16C path (hardware
 * conversions, same rounding as the scalar code, which the tails use).
 */
#include "topocomm.h"

#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TC_X86 1
#include <immintrin.h>
#define HOT __attribute__((target_clones("avx2", "default")))
#define F16C_TARGET __attribute__((target("avx2,f16c")))
#else
#define TC_X86 0
#define HOT
#endif

#define INLINE static inline __attribute__((always_inline))

/* accumulator block: 8 KiB, comfortably inside L1 together with the source lines */
#define BLK_BYTES 8192

/* element types that may sit at any byte address (shared-memory segments, offset views):
 * the compiler must not assume natural alignment (no aligned vector moves after peeling) */
typedef float __attribute__((aligned(1))) uf32;
typedef double __attribute__((aligned(1))) uf64;
typedef uint16_t __attribute__((aligned(1))) uu16;
typedef uint32_t __attribute__((aligned(1))) uu32;
typedef int32_t __attribute__((aligned(1))) ui32;
typedef uint64_t __attribute__((aligned(1))) uu64;
typedef int64_t __attribute__((aligned(1))) ui64;

/* ------------------------------------------------------------------------ */
/* scalar conversions                                                        */
/* ------------------------------------------------------------------------ */

INLINE uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float16 bits -> float32, exact; a signaling NaN comes back quiet (as F16C does) */
INLINE float h2f(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0) {
        /* zero or subnormal: m * 2^-24 is exact in float32 */
        float f = (float)m * 0x1p-24f;
        bits = sign | f32_bits(f);
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13) | (m ? 0x00400000u : 0u);
    } else {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    return bits_f32(bits);
}

/* float32 -> float16 bits, round to nearest even; NaN -> quiet NaN keeping the top
 * payload bits (what vcvtps2ph does). Needs the default FP rounding mode. */
INLINE uint16_t f2h(float f)
{
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u)                      /* inf or NaN */
        return (uint16_t)(sign | (x > 0x7f800000u ? (0x7e00u | ((x >> 13) & 0x3ffu)) : 0x7c00u));
    if (x >= 0x477ff000u)                      /* >= 65520 rounds to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (x < 0x38800000u) {                     /* below 2^-14: subnormal result */
        /* 0.5 + |f|: the float32 ulp at 0.5 is 2^-24, the float16 subnormal step,
         * so the hardware add does the RNE rounding */
        float t = bits_f32(x) + 0.5f;
        return (uint16_t)(sign | (f32_bits(t) - 0x3f000000u));
    }
    uint32_t odd = (x >> 13) & 1u;
    x += 0xc8000fffu + odd;                    /* rebias exponent (-112 << 23), round */
    return (uint16_t)(sign | (x >> 13));
}

INLINE float b2f(uint16_t b) { return bits_f32((uint32_t)b << 16); }

INLINE uint16_t f2b(float f)
{
    uint32_t x = f32_bits(f);
    uint32_t nan = (x & 0x7fffffffu) > 0x7f800000u;
    uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    uint32_t q = (x >> 16) | 0x40u;
    return (uint16_t)(nan ? q : r);
}

/* ------------------------------------------------------------------------ */
/* ops                                                                       */
/* ------------------------------------------------------------------------ */

#define OP_SUM(a, b) ((a) + (b))
#define OP_PROD(a, b) ((a) * (b))
#define OP_FMIN(a, b) ((((a) < (b)) | ((a) != (a))) ? (a) : (b))
#define OP_FMAX(a, b) ((((a) > (b)) | ((a) != (a))) ? (a) : (b))
#define OP_IMIN(a, b) ((a) < (b) ? (a) : (b))
#define OP_IMAX(a, b) ((a) > (b) ? (a) : (b))
#define OP_AND(a, b) ((a) & (b))
#define OP_OR(a, b) ((a) | (b))
#define OP_XOR(a, b) ((a) ^ (b))

/* wrapping integer arithmetic: compute on the unsigned type of the same width;
 * the cast back truncates (uint8 * uint8 promotes to int, but 255*255 fits) */
#define ID(x) (x)
#define NZ(x) ((uint8_t)((x) != 0))

/* ------------------------------------------------------------------------ */
/* generic reduction kernel                                                  */
/*   T: storage type, ACC: accumulator type, LD: T -> ACC, ST: ACC -> T,     */
/*   OP(acc, acc) -> acc (includes the 16-bit rounding for f16/bf16).        */
/* ------------------------------------------------------------------------ */

typedef void (*red_fn)(void *dst, void *dst2, const void *const *srcs, int nsrc, size_t count);

/* Per block of elements: nsrc == 1 and 2 go straight from the sources to dst; for more
 * sources the first nsrc-1 are folded into a stack temporary and the last step stores to
 * dst. Every element of every source is loaded before that element of dst is stored, so
 * dst (and dst2) may equal any source. dst, dst2 and the sources are deliberately not
 * restrict: gcc versions the loops with overlap checks that accept distance 0, so exact
 * aliasing stays on the vectorized path without undefined behaviour. */
#define DEF_RED(NAME, T, ACC, LD, OP, ST)                                              \
    static HOT void NAME(void *dst_, void *dst2_, const void *const *srcs, int nsrc,   \
                         size_t count)                                                 \
    {                                                                                  \
        ACC tmp[BLK_BYTES / sizeof(ACC)] __attribute__((aligned(64)));                 \
        const size_t blk = BLK_BYTES / sizeof(ACC);                                    \
        for (size_t base = 0; base < count; base += blk) {                             \
            const size_t n = count - base < blk ? count - base : blk;                  \
            T *d = (T *)dst_ + base;                                                   \
            T *e = dst2_ ? (T *)dst2_ + base : NULL;                                   \
            const T *a = (const T *)srcs[0] + base;                                    \
            const T *z = (const T *)srcs[nsrc - 1] + base;                             \
            if (nsrc == 1) {                                                           \
                if (e) {                                                               \
                    for (size_t j = 0; j < n; j++) {                                   \
                        T v = ST(LD(a[j])); d[j] = v; e[j] = v;                        \
                    }                                                                  \
                } else {                                                               \
                    for (size_t j = 0; j < n; j++) d[j] = ST(LD(a[j]));                \
                }                                                                      \
                continue;                                                              \
            }                                                                          \
            if (nsrc == 2) {                                                           \
                if (e) {                                                               \
                    for (size_t j = 0; j < n; j++) {                                   \
                        T v = ST(OP(LD(a[j]), LD(z[j]))); d[j] = v; e[j] = v;          \
                    }                                                                  \
                } else {                                                               \
                    for (size_t j = 0; j < n; j++) d[j] = ST(OP(LD(a[j]), LD(z[j])));  \
                }                                                                      \
                continue;                                                              \
            }                                                                          \
            {                                                                          \
                const T *b = (const T *)srcs[1] + base;                                \
                for (size_t j = 0; j < n; j++) tmp[j] = OP(LD(a[j]), LD(b[j]));        \
            }                                                                          \
            for (int k = 2; k < nsrc - 1; k++) {                                       \
                const T *c = (const T *)srcs[k] + base;                                \
                for (size_t j = 0; j < n; j++) tmp[j] = OP(tmp[j], LD(c[j]));          \
            }                                                                          \
            if (e) {                                                                   \
                for (size_t j = 0; j < n; j++) {                                       \
                    T v = ST(OP(tmp[j], LD(z[j]))); d[j] = v; e[j] = v;                \
                }                                                                      \
            } else {                                                                   \
                for (size_t j = 0; j < n; j++) d[j] = ST(OP(tmp[j], LD(z[j])));        \
            }                                                                          \
        }                                                                              \
    }

/* float32 / float64 */
DEF_RED(red_f32_sum, uf32, float, ID, OP_SUM, ID)
DEF_RED(red_f32_prod, uf32, float, ID, OP_PROD, ID)
DEF_RED(red_f32_min, uf32, float, ID, OP_FMIN, ID)
DEF_RED(red_f32_max, uf32, float, ID, OP_FMAX, ID)
DEF_RED(red_f64_sum, uf64, double, ID, OP_SUM, ID)
DEF_RED(red_f64_prod, uf64, double, ID, OP_PROD, ID)
DEF_RED(red_f64_min, uf64, double, ID, OP_FMIN, ID)
DEF_RED(red_f64_max, uf64, double, ID, OP_FMAX, ID)

/* bfloat16: accumulator holds 16-bit values, every step rounds */
#define BF_SUM(a, b) f2b(b2f(a) + b2f(b))
#define BF_PROD(a, b) f2b(b2f(a) * b2f(b))
#define BF_MIN(a, b) f2b(OP_FMIN(b2f(a), b2f(b)))
#define BF_MAX(a, b) f2b(OP_FMAX(b2f(a), b2f(b)))
DEF_RED(red_bf16_sum, uu16, uint16_t, ID, BF_SUM, ID)
DEF_RED(red_bf16_prod, uu16, uint16_t, ID, BF_PROD, ID)
DEF_RED(red_bf16_min, uu16, uint16_t, ID, BF_MIN, ID)
DEF_RED(red_bf16_max, uu16, uint16_t, ID, BF_MAX, ID)

/* float16, portable path (software conversions) */
#define H_SUM(a, b) f2h(h2f(a) + h2f(b))
#define H_PROD(a, b) f2h(h2f(a) * h2f(b))
#define H_MIN(a, b) f2h(OP_FMIN(h2f(a), h2f(b)))
#define H_MAX(a, b) f2h(OP_FMAX(h2f(a), h2f(b)))
DEF_RED(red_f16_sum, uu16, uint16_t, ID, H_SUM, ID)
DEF_RED(red_f16_prod, uu16, uint16_t, ID, H_PROD, ID)
DEF_RED(red_f16_min, uu16, uint16_t, ID, H_MIN, ID)
DEF_RED(red_f16_max, uu16, uint16_t, ID, H_MAX, ID)

/* integers: arithmetic on unsigned, compare on signed */
#define U8_SUM(a, b) ((uint8_t)((a) + (b)))
#define U8_PROD(a, b) ((uint8_t)((unsigned)(a) * (unsigned)(b)))
#define U32_SUM(a, b) ((uint32_t)((a) + (b)))
#define U32_PROD(a, b) ((uint32_t)((a) * (b)))
#define U64_SUM(a, b) ((uint64_t)((a) + (b)))
#define U64_PROD(a, b) ((uint64_t)((a) * (b)))

#define DEF_INT(SFX, ST_T, UT_T, SA, UA, SUMX, PRODX)                           \
    DEF_RED(red_##SFX##_sum, UT_T, UA, ID, SUMX, ID)                            \
    DEF_RED(red_##SFX##_prod, UT_T, UA, ID, PRODX, ID)                          \
    DEF_RED(red_##SFX##_min, ST_T, SA, ID, OP_IMIN, ID)                         \
    DEF_RED(red_##SFX##_max, ST_T, SA, ID, OP_IMAX, ID)                         \
    DEF_RED(red_##SFX##_band, UT_T, UA, ID, OP_AND, ID)                         \
    DEF_RED(red_##SFX##_bor, UT_T, UA, ID, OP_OR, ID)                           \
    DEF_RED(red_##SFX##_bxor, UT_T, UA, ID, OP_XOR, ID)

DEF_INT(i8, int8_t, uint8_t, int8_t, uint8_t, U8_SUM, U8_PROD)
DEF_INT(u8, uint8_t, uint8_t, uint8_t, uint8_t, U8_SUM, U8_PROD)
DEF_INT(i32, ui32, uu32, int32_t, uint32_t, U32_SUM, U32_PROD)
DEF_INT(i64, ui64, uu64, int64_t, uint64_t, U64_SUM, U64_PROD)

/* bool: inputs normalized to 0/1 on load */
DEF_RED(red_bool_and, uint8_t, uint8_t, NZ, OP_AND, ID)
DEF_RED(red_bool_or, uint8_t, uint8_t, NZ, OP_OR, ID)
DEF_RED(red_bool_xor, uint8_t, uint8_t, NZ, OP_XOR, ID)

#define NOSUP NULL
static const red_fn red_table[TC_NUM_DTYPES][TC_NUM_OPS] = {
    [TC_F16] = {red_f16_sum, red_f16_prod, red_f16_min, red_f16_max, NOSUP, NOSUP, NOSUP},
    [TC_BF16] = {red_bf16_sum, red_bf16_prod, red_bf16_min, red_bf16_max, NOSUP, NOSUP, NOSUP},
    [TC_F32] = {red_f32_sum, red_f32_prod, red_f32_min, red_f32_max, NOSUP, NOSUP, NOSUP},
    [TC_F64] = {red_f64_sum, red_f64_prod, red_f64_min, red_f64_max, NOSUP, NOSUP, NOSUP},
    [TC_I8] = {red_i8_sum, red_i8_prod, red_i8_min, red_i8_max, red_i8_band, red_i8_bor,
               red_i8_bxor},
    [TC_U8] = {red_u8_sum, red_u8_prod, red_u8_min, red_u8_max, red_u8_band, red_u8_bor,
               red_u8_bxor},
    [TC_I32] = {red_i32_sum, red_i32_prod, red_i32_min, red_i32_max, red_i32_band, red_i32_bor,
                red_i32_bxor},
    [TC_I64] = {red_i64_sum, red_i64_prod, red_i64_min, red_i64_max, red_i64_band, red_i64_bor,
                red_i64_bxor},
    [TC_BOOL] = {red_bool_or, red_bool_and, red_bool_and, red_bool_or, red_bool_and, red_bool_or,
                 red_bool_xor},
};

/* ------------------------------------------------------------------------ */
/* float16 with F16C (x86_64)                                                */
/* ------------------------------------------------------------------------ */
#if TC_X86

#define CVT_RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

#define V_SUM(a, b) _mm256_add_ps(a, b)
#define V_PROD(a, b) _mm256_mul_ps(a, b)
/* blendv(b, a, m): lanes of a where m is set */
#define V_MIN(a, b) _mm256_blendv_ps(b, a, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ),     \
                                                        _mm256_cmp_ps(a, a, _CMP_UNORD_Q)))
#define V_MAX(a, b) _mm256_blendv_ps(b, a, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ),     \
                                                        _mm256_cmp_ps(a, a, _CMP_UNORD_Q)))

/* 8 elements of a 16-bit float type <-> __m256: float16 by F16C, bfloat16 by shifts (its
 * float32 rounding as f2b: nearest even, a NaN comes back quiet) */
INLINE F16C_TARGET __m256 ldh(const void *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
INLINE F16C_TARGET __m128i cvh(__m256 v)
{
    return _mm256_cvtps_ph(v, CVT_RNE);
}
INLINE F16C_TARGET void sth(void *p, __m256 v)
{
    _mm_storeu_si128((__m128i *)p, cvh(v));
}
INLINE F16C_TARGET __m256 ldb(const void *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
INLINE F16C_TARGET __m128i cvb(__m256 v)
{
    const __m256i x = _mm256_castps_si256(v);
    const __m256i hi = _mm256_srli_epi32(x, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i q = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i res = _mm256_blendv_epi8(r, q, nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(res), _mm256_extracti128_si256(res, 1));
}

/* LD8: 8 elements -> __m256; CV8: __m256 -> 8 elements (__m128i); SOP: the scalar step of
 * the tails (same rounding) */
#define DEF_RED_V16(NAME, LD8, CV8, VOP, SOP)                                          \
    static F16C_TARGET void NAME(void *dst_, void *dst2_, const void *const *srcs,     \
                                 int nsrc, size_t count)                               \
    {                                                                                  \
        uint16_t tmp[BLK_BYTES / 2] __attribute__((aligned(64)));                      \
        const size_t blk = BLK_BYTES / 2;                                              \
        for (size_t base = 0; base < count; base += blk) {                             \
            const size_t n = count - base < blk ? count - base : blk;                  \
            const size_t nv = n & ~(size_t)7;                                          \
            uu16 *d = (uu16 *)dst_ + base;                                             \
            uu16 *e = dst2_ ? (uu16 *)dst2_ + base : NULL;                             \
            const uu16 *a = (const uu16 *)srcs[0] + base;                              \
            const uu16 *z = (const uu16 *)srcs[nsrc - 1] + base;                       \
            size_t j;                                                                  \
            if (nsrc == 1) {                                                           \
                memmove(d, a, n * 2);                                                  \
                if (e) memmove(e, a, n * 2);                                           \
                continue;                                                              \
            }                                                                          \
            const uu16 *acc = a;                                                       \
            if (nsrc > 2) {                                                            \
                const uu16 *b = (const uu16 *)srcs[1] + base;                          \
                for (j = 0; j < nv; j += 8)                                            \
                    _mm_storeu_si128((__m128i *)(tmp + j), CV8(VOP(LD8(a + j), LD8(b + j)))); \
                for (; j < n; j++) tmp[j] = SOP(a[j], b[j]);                           \
                for (int k = 2; k < nsrc - 1; k++) {                                   \
                    const uu16 *c = (const uu16 *)srcs[k] + base;                      \
                    for (j = 0; j < nv; j += 8)                                        \
                        _mm_storeu_si128((__m128i *)(tmp + j),                         \
                                         CV8(VOP(LD8(tmp + j), LD8(c + j))));          \
                    for (; j < n; j++) tmp[j] = SOP(tmp[j], c[j]);                     \
                }                                                                      \
                acc = tmp;                                                             \
            }                                                                          \
            for (j = 0; j < nv; j += 8) {                                              \
                __m128i v = CV8(VOP(LD8(acc + j), LD8(z + j)));                        \
                _mm_storeu_si128((__m128i *)(d + j), v);                               \
                if (e) _mm_storeu_si128((__m128i *)(e + j), v);                        \
            }                                                                          \
            for (; j < n; j++) {                                                       \
                uint16_t v = SOP(acc[j], z[j]);                                        \
                d[j] = v;                                                              \
                if (e) e[j] = v;                                                       \
            }                                                                          \
        }                                                                              \
    }

DEF_RED_V16(red_f16c_sum, ldh, cvh, V_SUM, H_SUM)
DEF_RED_V16(red_f16c_prod, ldh, cvh, V_PROD, H_PROD)
DEF_RED_V16(red_f16c_min, ldh, cvh, V_MIN, H_MIN)
DEF_RED_V16(red_f16c_max, ldh, cvh, V_MAX, H_MAX)
DEF_RED_V16(red_bf16v_sum, ldb, cvb, V_SUM, BF_SUM)
DEF_RED_V16(red_bf16v_prod, ldb, cvb, V_PROD, BF_PROD)
DEF_RED_V16(red_bf16v_min, ldb, cvb, V_MIN, BF_MIN)
DEF_RED_V16(red_bf16v_max, ldb, cvb, V_MAX, BF_MAX)

static const red_fn red_f16c_table[4] = {red_f16c_sum, red_f16c_prod, red_f16c_min,
                                         red_f16c_max};
static const red_fn red_bf16v_table[4] = {red_bf16v_sum, red_bf16v_prod, red_bf16v_min,
                                          red_bf16v_max};

static F16C_TARGET void scale_f16c(uu16 *dst, const uu16 *src, size_t count, float f)
{
    const __m256 vf = _mm256_set1_ps(f);
    size_t j = 0;
    for (; j + 8 <= count; j += 8) sth(dst + j, _mm256_mul_ps(ldh(src + j), vf));
    for (; j < count; j++) dst[j] = f2h(h2f(src[j]) * f);
}

static F16C_TARGET void scale_bf16v(uu16 *dst, const uu16 *src, size_t count, float f)
{
    const __m256 vf = _mm256_set1_ps(f);
    size_t j = 0;
    for (; j + 8 <= count; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j), cvb(_mm256_mul_ps(ldb(src + j), vf)));
    for (; j < count; j++) dst[j] = f2b(b2f(src[j]) * f);
}

static int have_avx2_f16c(void)
{
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return cached;
}
#endif /* TC_X86 */

/* ------------------------------------------------------------------------ */
/* public API                                                                */
/* ------------------------------------------------------------------------ */

size_t tc_dtype_size(int dtype)
{
    switch (dtype) {
    case TC_F16: case TC_BF16: return 2;
    case TC_F32: case TC_I32: return 4;
    case TC_F64: case TC_I64: return 8;
    case TC_I8: case TC_U8: case TC_BOOL: return 1;
    default: return 0;
    }
}

int tc_op_supported(int dtype, int op)
{
    if (dtype < 0 || dtype >= TC_NUM_DTYPES || op < 0 || op >= TC_NUM_OPS) return 0;
    return red_table[dtype][op] != NULL;
}

int tc_reduce2(void *dst, void *dst2, const void *const *srcs, int nsrc, size_t count,
               int dtype, int op)
{
    if (!tc_op_supported(dtype, op) || nsrc < 1) return -1;
    if (count == 0) return 0;
    if (!dst || !srcs) return -1;
    for (int k = 0; k < nsrc; k++)
        if (!srcs[k]) return -1;
    red_fn fn = red_table[dtype][op];
#if TC_X86
    if (dtype == TC_F16 && have_avx2_f16c()) fn = red_f16c_table[op];
    if (dtype == TC_BF16 && have_avx2_f16c()) fn = red_bf16v_table[op];
#endif
    fn(dst, dst2 == dst ? NULL : dst2, srcs, nsrc, count);
    return 0;
}

int tc_reduce(void *dst, const void *const *srcs, int nsrc, size_t count, int dtype, int op)
{
    return tc_reduce2(dst, NULL, srcs, nsrc, count, dtype, op);
}

static HOT void scale_f32(uf32 *d, const uf32 *s, size_t n, float f)
{
    for (size_t j = 0; j < n; j++) d[j] = s[j] * f;
}
static HOT void scale_f64(uf64 *d, const uf64 *s, size_t n, double f)
{
    for (size_t j = 0; j < n; j++) d[j] = s[j] * f;
}
static HOT void scale_bf16(uu16 *d, const uu16 *s, size_t n, float f)
{
    for (size_t j = 0; j < n; j++) d[j] = f2b(b2f(s[j]) * f);
}
static HOT void scale_f16(uu16 *d, const uu16 *s, size_t n, float f)
{
    for (size_t j = 0; j < n; j++) d[j] = f2h(h2f(s[j]) * f);
}

/* dst may equal src: each element is loaded before it is stored. No restrict: gcc's
 * runtime overlap check accepts distance 0, so the in-place case stays vectorized. */
int tc_scale(void *dst, const void *src, size_t count, int dtype, double factor)
{
    if (count && (!dst || !src)) return -1;
    switch (dtype) {
    case TC_F32: scale_f32(dst, src, count, (float)factor); return 0;
    case TC_F64: scale_f64(dst, src, count, factor); return 0;
    case TC_BF16:
#if TC_X86
        if (have_avx2_f16c()) { scale_bf16v(dst, src, count, (float)factor); return 0; }
#endif
        scale_bf16(dst, src, count, (float)factor);
        return 0;
    case TC_F16:
#if TC_X86
        if (have_avx2_f16c()) { scale_f16c(dst, src, count, (float)factor); return 0; }
#endif
        scale_f16(dst, src, count, (float)factor);
        return 0;
    default: return -1;
    }
}

/* ------------------------------------------------------------------------ */
/* copy                                                                      */
/* ------------------------------------------------------------------------ */

/* glibc (2.36) copies 2 KiB .. ~1 MiB with `rep movsb`, which on this AMD EPYC runs at
 * ~3 GB/s instead of ~40 GB/s when (dst - src) mod 4096 is in [1, 31] (measured for every
 * skew 0..4095 at 8 KiB and 256 KiB; at 1 MiB glibc uses a vector loop and is fine). In
 * that window we copy with a plain AVX2 loop. Copies of 16 MiB or more (half the 32 MiB
 * L3) use non-temporal stores: ~12 GB/s against ~8.5 GB/s for glibc's cached vector loop
 * at 16-64 MiB (glibc streams only above 192 MiB here). Everything else goes to memcpy. */
#define COPY_SMALL 2048
#define SKEW_WINDOW 32

#if TC_X86
static F16C_TARGET void copy_avx2(char *d, const char *s, size_t n, int stream)
{
    /* n >= COPY_SMALL: store the first 32 bytes unaligned, then aligned 128-byte steps */
    _mm256_storeu_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
    size_t i = 32 - ((uintptr_t)d & 31);
    if (stream) {
        for (; i + 128 <= n; i += 128) {
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(s + i));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(s + i + 32));
            __m256i v2 = _mm256_loadu_si256((const __m256i *)(s + i + 64));
            __m256i v3 = _mm256_loadu_si256((const __m256i *)(s + i + 96));
            _mm256_stream_si256((__m256i *)(d + i), v0);
            _mm256_stream_si256((__m256i *)(d + i + 32), v1);
            _mm256_stream_si256((__m256i *)(d + i + 64), v2);
            _mm256_stream_si256((__m256i *)(d + i + 96), v3);
        }
        _mm_sfence();
    } else {
        for (; i + 128 <= n; i += 128) {
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(s + i));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(s + i + 32));
            __m256i v2 = _mm256_loadu_si256((const __m256i *)(s + i + 64));
            __m256i v3 = _mm256_loadu_si256((const __m256i *)(s + i + 96));
            _mm256_store_si256((__m256i *)(d + i), v0);
            _mm256_store_si256((__m256i *)(d + i + 32), v1);
            _mm256_store_si256((__m256i *)(d + i + 64), v2);
            _mm256_store_si256((__m256i *)(d + i + 96), v3);
        }
    }
    if (i < n) memcpy(d + i, s + i, n - i); /* < 128 bytes: glibc's vector path */
}

/* Fixed rather than derived from sysconf(_SC_LEVEL3_CACHE_SIZE): on the VM this was tuned
 * on, sysconf reports 256 MiB of L3 where lscpu shows 32 MiB. Below this size the copy
 * stays in cache, which also helps the process that reads the destination next. */
#define STREAM_THRESHOLD ((size_t)16 << 20)
#endif

/* Copy with non-temporal stores whatever the size: for a piece of a large destination that
 * nobody reads soon (a chunk of a big receive buffer), so it bypasses the cache instead of
 * first reading every destination line. Falls back to tc_copy where streaming is not built. */
void tc_copy_stream(void *dst, const void *src, size_t nbytes)
{
#if TC_X86
    if (nbytes >= COPY_SMALL && have_avx2_f16c() &&
        !((uintptr_t)dst - (uintptr_t)src < nbytes || (uintptr_t)src - (uintptr_t)dst < nbytes)) {
        copy_avx2((char *)dst, (const char *)src, nbytes, 1);
        return;
    }
#endif
    tc_copy(dst, src, nbytes);
}

void tc_copy(void *dst, const void *src, size_t nbytes)
{
    if (nbytes == 0 || dst == src) return;
    char *d = dst;
    const char *s = src;
    if ((uintptr_t)d - (uintptr_t)s < nbytes || (uintptr_t)s - (uintptr_t)d < nbytes) {
        /* overlapping ranges: not a memcpy */
        memmove(d, s, nbytes);
        return;
    }
#if TC_X86
    if (nbytes >= COPY_SMALL && have_avx2_f16c()) {
        if (nbytes >= STREAM_THRESHOLD) {
            copy_avx2(d, s, nbytes, 1);
            return;
        }
        size_t skew = (size_t)((uintptr_t)d - (uintptr_t)s) & 4095;
        if (skew != 0 && skew < SKEW_WINDOW) {
            copy_avx2(d, s, nbytes, 0);
            return;
        }
    }
#endif
    memcpy(d, s, nbytes);
}

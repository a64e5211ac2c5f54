/* topocomm C ABI: the small set of data-path helpers the Python layer calls.
 *
 * Everything works on raw addresses so that numpy arrays, torch tensors and
 * shared-memory segments are handled alike. Python wrappers (module.c) release
 * the GIL around every call that touches data.
 */
#ifndef TOPOCOMM_H
#define TOPOCOMM_H

#include <stddef.h>
#include <stdint.h>

/* dtype codes: keep in sync with comms/core/dtypes.py */
enum tc_dtype {
    TC_F16 = 0, TC_BF16 = 1, TC_F32 = 2, TC_F64 = 3,
    TC_I8 = 4, TC_U8 = 5, TC_I32 = 6, TC_I64 = 7, TC_BOOL = 8,
    TC_NUM_DTYPES = 9
};

/* op codes: keep in sync with comms/core/dtypes.py. AVG is SUM followed by tc_scale. */
enum tc_op {
    TC_SUM = 0, TC_PROD = 1, TC_MIN = 2, TC_MAX = 3,
    TC_BAND = 4, TC_BOR = 5, TC_BXOR = 6,
    TC_NUM_OPS = 7
};

/* size in bytes of one element of dtype, 0 if unknown */
size_t tc_dtype_size(int dtype);

/* 1 if (dtype, op) is supported: bitwise ops on integers and bool only. */
int tc_op_supported(int dtype, int op);

/* dst[i] = srcs[0][i] op srcs[1][i] op ... op srcs[nsrc-1][i], a left fold in
 * the given order, rounding after every step for float16/bfloat16 (as numpy
 * and gloo do). dst may alias any source. Integer overflow wraps. nsrc >= 1.
 * Returns 0, or -1 for an unsupported dtype/op. */
int tc_reduce(void *dst, const void *const *srcs, int nsrc, size_t count, int dtype, int op);

/* Same as tc_reduce but writes the result to two destinations (dst2 may be NULL). */
int tc_reduce2(void *dst, void *dst2, const void *const *srcs, int nsrc, size_t count,
               int dtype, int op);

/* dst[i] = src[i] * factor for float dtypes (float64 math for float64, float32 math for
 * the others, one rounding back for float16/bfloat16). Used for AVG, which is defined for
 * float dtypes only (as in NCCL; gloo has no AVG). Returns 0, or -1 for other dtypes. */
int tc_scale(void *dst, const void *src, size_t count, int dtype, double factor);

/* memcpy that stays fast when src and dst page offsets differ (4K aliasing). */
void tc_copy(void *dst, const void *src, size_t nbytes);

/* memcpy with non-temporal stores: for pieces of a destination that is large and not read
 * again soon (bypasses the cache, skips reading the destination lines first). */
void tc_copy_stream(void *dst, const void *src, size_t nbytes);

#endif

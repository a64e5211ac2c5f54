/* MoE dispatch / combine row kernels (comms/moe), with their Python bindings; the method
 * table is merged into comms.kernels._native by module.c. numpy twins with the same signatures and
 * bit-identical results: comms/kernels/reference_moe.py (used when TOPOCOMM_PURE_PYTHON=1).
 *
 * Buffers are raw addresses of C-contiguous row-major arrays; index arrays are int64,
 * weights float32. The caller (comms/moe/ops.py) checks every index; nothing is checked here.
 *
 *   moe_gather_rows(dst, src, idx, n, row_bytes)
 *       dst[i] = src[idx[i]]                                  (pack, unpack, self rows)
 *   moe_reduce_rows(out, n_out, offsets, entries, weights, src_a, split, src_b, hidden, dtype)
 *       out[j] = fold over e in [offsets[j], offsets[j+1]) of  w[e] * row(entries[e])
 *       row(r) = src_a[r] if r < split else src_b[r - split]; w[e] = 1 when weights == 0.
 *       The fold starts from +0 and adds in entry order in the accumulator type
 *       (float32 for float32 and bfloat16, float64 for float64), each product rounded before
 *       its add (no fused multiply-add), and rounds to the storage type once at the end:
 *       exactly `acc = 0; acc = acc + w * y` in torch / numpy. An empty fold writes zeros.
 *   moe_row_dot(out, n, src_a, idx_a, src_b, idx_b, hidden, dtype)
 *       out[i] (float32) = sum over h of a[h] * b[h] with a = src_a[idx_a[i]] (idx_a == 0:
 *       row i), b likewise; accumulated in float64 in 8 lanes (lane h % 8, h ascending),
 *       lanes added 0..7 in order, rounded to float32.
 * dtype: comms.dtypes codes; float32, float64 and bfloat16 (ValueError otherwise).
 * Every loop runs with the GIL released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "topocomm.h"

/* a + w * y must round the product before the add, as torch and numpy do */
#pragma GCC optimize("fp-contract=off")

typedef float __attribute__((aligned(1))) mf32;
typedef double __attribute__((aligned(1))) mf64;
typedef uint16_t __attribute__((aligned(1))) mu16;

static inline float moe_b2f(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t moe_f2b(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t nan = (x & 0x7fffffffu) > 0x7f800000u;
    uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    uint32_t q = (x >> 16) | 0x40u;
    return (uint16_t)(nan ? q : r);
}

static int moe_dtype_ok(int dtype)
{
    if (dtype == TC_F32 || dtype == TC_F64 || dtype == TC_BF16) return 1;
    PyErr_Format(PyExc_ValueError, "dtype: MoE kernels handle float32, float64 and bfloat16, "
                 "got code %d", dtype);
    return 0;
}

static size_t moe_esize(int dtype) { return dtype == TC_F64 ? 8 : dtype == TC_F32 ? 4 : 2; }

/* ------------------------------------------------------------------------ gather */

/* Rows go through tc_copy (reduce.c), which dodges glibc's slow path for source/destination
 * page-offset skews of 1..31 bytes (an 8 KiB row at 3 GB/s instead of 40); a destination of
 * 16 MiB or more (pack buffers, expert-grouped copies: written once, read later by someone
 * else) is written with non-temporal stores. */
#define MOE_STREAM_BYTES ((size_t)16 << 20)

static void gather_rows(char *dst, const char *src, const int64_t *idx, size_t n, size_t rb)
{
    if (n * rb >= MOE_STREAM_BYTES) {
        for (size_t i = 0; i < n; i++)
            tc_copy_stream(dst + i * rb, src + (size_t)idx[i] * rb, rb);
    } else {
        for (size_t i = 0; i < n; i++)
            tc_copy(dst + i * rb, src + (size_t)idx[i] * rb, rb);
    }
}

static PyObject *py_moe_gather_rows(PyObject *self, PyObject *args)
{
    unsigned long long dst, src, idx;
    Py_ssize_t n, rb;
    if (!PyArg_ParseTuple(args, "KKKnn", &dst, &src, &idx, &n, &rb)) return NULL;
    if (n < 0 || rb < 0) {
        PyErr_SetString(PyExc_ValueError, "n, row_bytes: must be >= 0");
        return NULL;
    }
    if (n && rb) {
        Py_BEGIN_ALLOW_THREADS
        gather_rows((char *)dst, (const char *)src, (const int64_t *)idx, (size_t)n, (size_t)rb);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ reduce */

typedef struct {
    const char *a, *b;
    int64_t split;
    size_t rb;
} rowsrc;

static inline const char *row_of(const rowsrc *s, int64_t r)
{
    return r < s->split ? s->a + (size_t)r * s->rb : s->b + (size_t)(r - s->split) * s->rb;
}

static void reduce_f32(float *out, size_t n_out, const int64_t *off, const int64_t *ent,
                       const float *w, const rowsrc *s, size_t H)
{
    for (size_t j = 0; j < n_out; j++) {
        float *restrict o = out + j * H;
        int64_t e0 = off[j], e1 = off[j + 1];
        if (e0 >= e1) {
            memset(o, 0, H * sizeof(float));
            continue;
        }
        for (int64_t e = e0; e < e1; e++) {
            const mf32 *restrict y = (const mf32 *)row_of(s, ent[e]);
            if (w) {
                float we = w[e];
                if (e == e0)
                    for (size_t h = 0; h < H; h++) o[h] = 0.0f + we * y[h];
                else
                    for (size_t h = 0; h < H; h++) o[h] = o[h] + we * y[h];
            } else {
                if (e == e0)
                    for (size_t h = 0; h < H; h++) o[h] = 0.0f + y[h];
                else
                    for (size_t h = 0; h < H; h++) o[h] = o[h] + y[h];
            }
        }
    }
}

static void reduce_f64(double *out, size_t n_out, const int64_t *off, const int64_t *ent,
                       const float *w, const rowsrc *s, size_t H)
{
    for (size_t j = 0; j < n_out; j++) {
        double *restrict o = out + j * H;
        int64_t e0 = off[j], e1 = off[j + 1];
        if (e0 >= e1) {
            memset(o, 0, H * sizeof(double));
            continue;
        }
        for (int64_t e = e0; e < e1; e++) {
            const mf64 *restrict y = (const mf64 *)row_of(s, ent[e]);
            double we = w ? (double)w[e] : 1.0;
            if (!w) {
                if (e == e0)
                    for (size_t h = 0; h < H; h++) o[h] = 0.0 + y[h];
                else
                    for (size_t h = 0; h < H; h++) o[h] = o[h] + y[h];
            } else if (e == e0) {
                for (size_t h = 0; h < H; h++) o[h] = 0.0 + we * y[h];
            } else {
                for (size_t h = 0; h < H; h++) o[h] = o[h] + we * y[h];
            }
        }
    }
}

static void reduce_bf16(uint16_t *out, size_t n_out, const int64_t *off, const int64_t *ent,
                        const float *w, const rowsrc *s, size_t H, float *restrict acc)
{
    for (size_t j = 0; j < n_out; j++) {
        uint16_t *restrict o = out + j * H;
        int64_t e0 = off[j], e1 = off[j + 1];
        if (e0 >= e1) {
            memset(o, 0, H * sizeof(uint16_t));
            continue;
        }
        for (int64_t e = e0; e < e1; e++) {
            const mu16 *restrict y = (const mu16 *)row_of(s, ent[e]);
            float we = w ? w[e] : 1.0f;
            if (!w) {
                if (e == e0)
                    for (size_t h = 0; h < H; h++) acc[h] = 0.0f + moe_b2f(y[h]);
                else
                    for (size_t h = 0; h < H; h++) acc[h] = acc[h] + moe_b2f(y[h]);
            } else if (e == e0) {
                for (size_t h = 0; h < H; h++) acc[h] = 0.0f + we * moe_b2f(y[h]);
            } else {
                for (size_t h = 0; h < H; h++) acc[h] = acc[h] + we * moe_b2f(y[h]);
            }
        }
        for (size_t h = 0; h < H; h++) o[h] = moe_f2b(acc[h]);
    }
}

static PyObject *py_moe_reduce_rows(PyObject *self, PyObject *args)
{
    unsigned long long out, off, ent, w, a, b;
    Py_ssize_t n_out, split, H;
    int dtype;
    if (!PyArg_ParseTuple(args, "KnKKKKnKni", &out, &n_out, &off, &ent, &w, &a, &split, &b, &H,
                          &dtype))
        return NULL;
    if (!moe_dtype_ok(dtype)) return NULL;
    if (n_out < 0 || H < 0) {
        PyErr_SetString(PyExc_ValueError, "n_out, hidden: must be >= 0");
        return NULL;
    }
    if (!n_out || !H) Py_RETURN_NONE;
    rowsrc s = {(const char *)a, (const char *)b, (int64_t)split, (size_t)H * moe_esize(dtype)};
    float *acc = NULL;
    if (dtype == TC_BF16) {
        acc = (float *)malloc((size_t)H * sizeof(float));
        if (!acc) return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    if (dtype == TC_F32)
        reduce_f32((float *)out, (size_t)n_out, (const int64_t *)off, (const int64_t *)ent,
                   (const float *)w, &s, (size_t)H);
    else if (dtype == TC_F64)
        reduce_f64((double *)out, (size_t)n_out, (const int64_t *)off, (const int64_t *)ent,
                   (const float *)w, &s, (size_t)H);
    else
        reduce_bf16((uint16_t *)out, (size_t)n_out, (const int64_t *)off, (const int64_t *)ent,
                    (const float *)w, &s, (size_t)H, acc);
    Py_END_ALLOW_THREADS
    free(acc);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ row dot */

#define LOAD(p, h) (dtype == TC_F32 ? (double)((const mf32 *)(p))[h] \
                    : dtype == TC_F64 ? ((const mf64 *)(p))[h] : (double)moe_b2f(((const mu16 *)(p))[h]))

static void row_dot(float *out, size_t n, const char *a, const int64_t *ia, const char *b,
                    const int64_t *ib, size_t H, int dtype)
{
    size_t rb = H * moe_esize(dtype);
    for (size_t i = 0; i < n; i++) {
        const char *pa = a + (ia ? (size_t)ia[i] : i) * rb;
        const char *pb = b + (ib ? (size_t)ib[i] : i) * rb;
        double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        size_t h = 0;
        if (dtype == TC_F32) {
            const mf32 *x = (const mf32 *)pa, *y = (const mf32 *)pb;
            for (; h + 8 <= H; h += 8)
                for (int l = 0; l < 8; l++) lane[l] = lane[l] + (double)x[h + l] * (double)y[h + l];
        } else if (dtype == TC_F64) {
            const mf64 *x = (const mf64 *)pa, *y = (const mf64 *)pb;
            for (; h + 8 <= H; h += 8)
                for (int l = 0; l < 8; l++) lane[l] = lane[l] + x[h + l] * y[h + l];
        } else {
            const mu16 *x = (const mu16 *)pa, *y = (const mu16 *)pb;
            for (; h + 8 <= H; h += 8)
                for (int l = 0; l < 8; l++)
                    lane[l] = lane[l] + (double)moe_b2f(x[h + l]) * (double)moe_b2f(y[h + l]);
        }
        for (; h < H; h++) lane[h & 7] = lane[h & 7] + LOAD(pa, h) * LOAD(pb, h);
        double t = lane[0];
        for (int l = 1; l < 8; l++) t = t + lane[l];
        out[i] = (float)t;
    }
}

static PyObject *py_moe_row_dot(PyObject *self, PyObject *args)
{
    unsigned long long out, a, ia, b, ib;
    Py_ssize_t n, H;
    int dtype;
    if (!PyArg_ParseTuple(args, "KnKKKKni", &out, &n, &a, &ia, &b, &ib, &H, &dtype)) return NULL;
    if (!moe_dtype_ok(dtype)) return NULL;
    if (n <= 0) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    row_dot((float *)out, (size_t)n, (const char *)a, (const int64_t *)ia, (const char *)b,
            (const int64_t *)ib, (size_t)H, dtype);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef tc_moe_methods[] = {
    {"moe_gather_rows", py_moe_gather_rows, METH_VARARGS,
     "moe_gather_rows(dst, src, idx, n, row_bytes): dst[i] = src[idx[i]]"},
    {"moe_reduce_rows", py_moe_reduce_rows, METH_VARARGS,
     "moe_reduce_rows(out, n_out, offsets, entries, weights, src_a, split, src_b, hidden, dtype)"},
    {"moe_row_dot", py_moe_row_dot, METH_VARARGS,
     "moe_row_dot(out, n, src_a, idx_a, src_b, idx_b, hidden, dtype)"},
    {NULL, NULL, 0, NULL}};

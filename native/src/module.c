/* comms.kernels._native: Python bindings of the C helpers. Every call that touches data or
 * waits releases the GIL. Signatures match comms/kernels/reference.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "tc_internal.h"

#define MAX_RANKS 4096

/* Ctrl-C during a long wait: the waits call this every ~20 ms (sync.c, tcp.c). On the main
 * thread it takes the GIL and asks whether SIGINT arrived; if so, it trips it again for Python
 * and the wait returns TC_STATUS_INTERRUPTED. Python's handler runs once the wait has returned and
 * its memory is no longer read (wait_result), never inside the wait: a handler that closes
 * the group there would unmap what the wait reads. Other signals' handlers run after the
 * operation, as before. KeyboardInterrupt: the binding returns NULL and the Communicator
 * aborts the group (peers raise at once). */
static unsigned long g_main_thread;

static int check_signals(void) {
    if (!g_main_thread || PyThread_get_thread_ident() != g_main_thread) return 0;
    PyGILState_STATE gs = PyGILState_Ensure();
    int hit = PyOS_InterruptOccurred();
    if (hit) {
#if PY_VERSION_HEX >= 0x030A0000
        PyErr_SetInterruptEx(SIGINT);
#else
        PyErr_SetInterrupt();
#endif
    }
    PyGILState_Release(gs);
    return hit;
}

/* (status, idx) of a wait; interrupted: NULL with the exception Python's SIGINT handler
 * raised (TC_STATUS_INTERRUPTED if it did not raise: the operation was cut short all the same) */
static PyObject *wait_result(int st, int idx) {
    if (st == TC_STATUS_INTERRUPTED && PyErr_CheckSignals() < 0) return NULL;
    return Py_BuildValue("(ii)", st, idx);
}

/* tuple/list of ints -> uint64 array (caller frees); returns count or -1 */
static Py_ssize_t to_u64s(PyObject *seq, uint64_t **out, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_RANKS) { Py_DECREF(fast); PyErr_Format(PyExc_ValueError, "%s: too long", what); return -1; }
    uint64_t *a = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)(n ? n : 1));
    if (!a) { Py_DECREF(fast); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(fast, i);
        long long v = PyLong_AsLongLong(o);
        if (v == -1 && PyErr_Occurred()) { free(a); Py_DECREF(fast); return -1; }
        a[i] = (uint64_t)v;
    }
    Py_DECREF(fast);
    *out = a;
    return n;
}

static PyObject *py_post(PyObject *self, PyObject *args) {
    unsigned long long addr, v, waiters;
    if (!PyArg_ParseTuple(args, "KKK", &addr, &v, &waiters)) return NULL;
    tc_post((void *)(uintptr_t)addr, v, (void *)(uintptr_t)waiters);
    Py_RETURN_NONE;
}

static PyObject *py_wait_all(PyObject *self, PyObject *args) {
    PyObject *a_addrs, *a_aborts, *a_pids, *a_waiters;
    unsigned long long target;
    double timeout;
    if (!PyArg_ParseTuple(args, "OKOOOd", &a_addrs, &target, &a_aborts, &a_pids, &a_waiters, &timeout))
        return NULL;
    uint64_t *addrs = NULL, *aborts = NULL, *pids = NULL, *waiters = NULL;
    PyObject *res = NULL;
    Py_ssize_t n = to_u64s(a_addrs, &addrs, "addrs");
    if (n < 0) goto out;
    if (to_u64s(a_aborts, &aborts, "abort_addrs") != n) goto bad;
    if (to_u64s(a_pids, &pids, "pids") != n) goto bad;
    if (to_u64s(a_waiters, &waiters, "waiters_addrs") != n) goto bad;
    {
        tc_waitset ws = {(int)n, (uint64_t **)addrs, (uint64_t **)aborts, (uint64_t **)waiters,
                         (const int64_t *)pids, timeout};
        int idx = -1, st;
        Py_BEGIN_ALLOW_THREADS
        st = tc_wait_all(&ws, target, &idx);
        Py_END_ALLOW_THREADS
        res = wait_result(st, idx);
    }
    goto out;
bad:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "wait_all: sequences differ in length");
out:
    free(addrs); free(aborts); free(pids); free(waiters);
    return res;
}

static int check_dtype_op(int dtype, int op) {
    if (dtype < 0 || dtype >= TC_NUM_DTYPES || op < 0 || op >= TC_NUM_OPS || !tc_op_supported(dtype, op)) {
        PyErr_Format(PyExc_ValueError, "unsupported dtype/op pair (%d, %d)", dtype, op);
        return 0;
    }
    return 1;
}

static PyObject *reduce_impl(PyObject *args, int two) {
    unsigned long long dst, dst2 = 0;
    PyObject *a_srcs;
    Py_ssize_t count;
    int dtype, op;
    if (two) {
        if (!PyArg_ParseTuple(args, "KKOnii", &dst, &dst2, &a_srcs, &count, &dtype, &op)) return NULL;
    } else if (!PyArg_ParseTuple(args, "KOnii", &dst, &a_srcs, &count, &dtype, &op)) {
        return NULL;
    }
    if (!check_dtype_op(dtype, op)) return NULL;
    uint64_t *srcs = NULL;
    Py_ssize_t ns = to_u64s(a_srcs, &srcs, "srcs");
    if (ns < 0) return NULL;
    if (ns < 1 || count < 0) {
        free(srcs);
        PyErr_SetString(PyExc_ValueError, "reduce: need at least one source and count >= 0");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tc_reduce2((void *)(uintptr_t)dst, (void *)(uintptr_t)dst2, (const void *const *)srcs,
                    (int)ns, (size_t)count, dtype, op);
    Py_END_ALLOW_THREADS
    free(srcs);
    if (rc) { PyErr_SetString(PyExc_ValueError, "reduce: unsupported dtype/op"); return NULL; }
    Py_RETURN_NONE;
}

static PyObject *py_reduce(PyObject *self, PyObject *args) { return reduce_impl(args, 0); }
static PyObject *py_reduce2(PyObject *self, PyObject *args) { return reduce_impl(args, 1); }

static PyObject *py_scale(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    Py_ssize_t count;
    int dtype;
    double factor;
    if (!PyArg_ParseTuple(args, "KKnid", &dst, &src, &count, &dtype, &factor)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tc_scale((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, (size_t)count, dtype, factor);
    Py_END_ALLOW_THREADS
    if (rc) { PyErr_SetString(PyExc_ValueError, "scale: float dtypes only"); return NULL; }
    Py_RETURN_NONE;
}

static PyObject *py_copy(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    Py_ssize_t nbytes;
    if (!PyArg_ParseTuple(args, "KKn", &dst, &src, &nbytes)) return NULL;
    if (nbytes <= 0) Py_RETURN_NONE;
    if (nbytes < 65536) {  /* not worth dropping the GIL */
        tc_copy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, (size_t)nbytes);
    } else {
        Py_BEGIN_ALLOW_THREADS
        tc_copy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, (size_t)nbytes);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

/* ---- per-group handle for the latency path: the constant arguments converted once ---- */
typedef struct {
    tc_group g;
    uint64_t seg[MAX_RANKS];
    int64_t pids[MAX_RANKS];
    uint64_t arrived_off, abort_off, waiters_off, header_off[2], small_off[2];
    tc_stats stats;
    PyObject *warn_cb;        /* warn_cb(last_rank, wait_ns) when a wait exceeds stats.warn_ns */
} group_t;

static void group_free(PyObject *cap) {
    group_t *G = (group_t *)PyCapsule_GetPointer(cap, "topocomm.group");
    if (!G) return;
    free(G->stats.last);
    free(G->stats.waits);
    Py_XDECREF(G->warn_cb);
    free(G);
}

/* (status, idx) of an arrival-led call, after telling warn_cb about a straggler the
 * arrival saw (the call itself never fails for it) */
static PyObject *group_result(group_t *G, int st, int idx) {
    if (G->stats.warn_rank >= 0) {
        int q = G->stats.warn_rank;
        G->stats.warn_rank = -1;
        if (G->warn_cb && !PyErr_Occurred()) {
            PyObject *r = PyObject_CallFunction(G->warn_cb, "iK", q,
                                                (unsigned long long)G->stats.warn_wait_ns);
            if (r) Py_DECREF(r); else PyErr_Clear();
        }
    }
    return wait_result(st, idx);
}

/* group_stats(group) -> (last, waits): bytes of uint64, [TC_NUM_COLL][n] and
 * [n][TC_WAIT_BUCKETS] (tc_stats) */
static PyObject *py_group_stats(PyObject *self, PyObject *cap) {
    group_t *G = (group_t *)PyCapsule_GetPointer(cap, "topocomm.group");
    if (!G) return NULL;
    size_t n = (size_t)G->g.n;
    return Py_BuildValue("(y#y#)", (const char *)G->stats.last,
                         (Py_ssize_t)(TC_NUM_COLL * n * sizeof(uint64_t)),
                         (const char *)G->stats.waits,
                         (Py_ssize_t)(TC_WAIT_BUCKETS * n * sizeof(uint64_t)));
}

/* group_set_warn(group, warn_ns, callback or None): report waits above warn_ns (0: never) */
static PyObject *py_group_set_warn(PyObject *self, PyObject *args) {
    PyObject *cap, *cb;
    unsigned long long warn_ns;
    if (!PyArg_ParseTuple(args, "OKO", &cap, &warn_ns, &cb)) return NULL;
    group_t *G = (group_t *)PyCapsule_GetPointer(cap, "topocomm.group");
    if (!G) return NULL;
    Py_XDECREF(G->warn_cb);
    G->warn_cb = cb == Py_None ? NULL : (Py_INCREF(cb), cb);
    G->stats.warn_ns = cb == Py_None ? 0 : warn_ns;
    Py_RETURN_NONE;
}

static PyObject *py_group_new(PyObject *self, PyObject *args) {
    int rank, n;
    PyObject *a_seg, *a_pids;
    double timeout;
    unsigned long long arrived_off, abort_off, waiters_off, h0, h1, s0, s1;
    if (!PyArg_ParseTuple(args, "iiOOdKKKKKKK", &rank, &n, &a_seg, &a_pids, &timeout, &arrived_off,
                          &abort_off, &waiters_off, &h0, &h1, &s0, &s1))
        return NULL;
    if (n < 1 || n > MAX_RANKS || rank < 0 || rank >= n) {
        PyErr_SetString(PyExc_ValueError, "group_new: bad rank/size");
        return NULL;
    }
    uint64_t *seg = NULL, *pids = NULL;
    if (to_u64s(a_seg, &seg, "seg_bases") != n || to_u64s(a_pids, &pids, "pids") != n) {
        free(seg); free(pids);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "group_new: bad lengths");
        return NULL;
    }
    group_t *G = (group_t *)calloc(1, sizeof(group_t));
    if (!G) { free(seg); free(pids); return PyErr_NoMemory(); }
    memcpy(G->seg, seg, sizeof(uint64_t) * (size_t)n);
    memcpy(G->pids, pids, sizeof(int64_t) * (size_t)n);
    free(seg); free(pids);
    G->g.rank = rank; G->g.n = n; G->g.seg = G->seg; G->g.pids = G->pids; G->g.timeout_s = timeout;
    G->arrived_off = arrived_off; G->abort_off = abort_off; G->waiters_off = waiters_off;
    G->header_off[0] = h0; G->header_off[1] = h1; G->small_off[0] = s0; G->small_off[1] = s1;
    G->stats.last = (uint64_t *)calloc((size_t)TC_NUM_COLL * (size_t)n, sizeof(uint64_t));
    G->stats.waits = (uint64_t *)calloc((size_t)TC_WAIT_BUCKETS * (size_t)n, sizeof(uint64_t));
    G->stats.warn_rank = -1;
    if (!G->stats.last || !G->stats.waits) {
        free(G->stats.last); free(G->stats.waits); free(G);
        return PyErr_NoMemory();
    }
    G->g.stats = &G->stats;
    PyObject *cap = PyCapsule_New(G, "topocomm.group", group_free);
    if (!cap) { free(G->stats.last); free(G->stats.waits); free(G); }
    return cap;
}

/* allreduce_small_g(group, op_id, coll, root, in_addr, out_addr, count, dtype, op, avg_n) */
static PyObject *py_allreduce_small_g(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) { PyErr_SetString(PyExc_TypeError, "allreduce_small_g takes 10 arguments"); return NULL; }
    group_t *G = (group_t *)PyCapsule_GetPointer(args[0], "topocomm.group");
    if (!G) return NULL;
    unsigned long long op_id = PyLong_AsUnsignedLongLong(args[1]);
    long long coll = PyLong_AsLongLong(args[2]), root = PyLong_AsLongLong(args[3]);
    unsigned long long in = PyLong_AsUnsignedLongLong(args[4]), out = PyLong_AsUnsignedLongLong(args[5]);
    Py_ssize_t count = PyLong_AsSsize_t(args[6]);
    int dtype = (int)PyLong_AsLong(args[7]), op = (int)PyLong_AsLong(args[8]), avg_n = (int)PyLong_AsLong(args[9]);
    if (PyErr_Occurred()) return NULL;
    if (!check_dtype_op(dtype, op)) return NULL;
    int idx = -1, st, par = (int)(op_id & 1);
    Py_BEGIN_ALLOW_THREADS
    st = tc_allreduce_small(&G->g, G->arrived_off, G->abort_off, G->waiters_off, G->header_off[par],
                            G->small_off[par], op_id, coll, root, (void *)(uintptr_t)in,
                            (void *)(uintptr_t)out, (size_t)count, dtype, op, avg_n, &idx);
    Py_END_ALLOW_THREADS
    if (st == TC_STATUS_NO_MEMORY) return PyErr_NoMemory();
    return group_result(G, st, idx);
}

/* the n control-word offsets of a collective (a sequence of ints) into out: 0, or -1 with
 * a Python error set */
static int offsets_of(PyObject *obj, uint64_t *out, Py_ssize_t n) {
    PyObject *fast = PySequence_Fast(obj, "ctrl");
    if (!fast) return -1;
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "ctrl: %zd offsets", n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) out[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, i));
    Py_DECREF(fast);
    return PyErr_Occurred() ? -1 : 0;
}

/* ring_once_g(group, op_id, coll, in, out, count, dtype, op, avg_n, ctrl, data_off,
 *             block_elems, chunk_elems, num_slots, slot_stride, block_stride, do_gather)
 * -> (status, idx): the arrival and ring_reduce_g in one call */
static PyObject *py_ring_once_g(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 17) { PyErr_SetString(PyExc_TypeError, "ring_once_g takes 17 arguments"); return NULL; }
    group_t *G = (group_t *)PyCapsule_GetPointer(args[0], "topocomm.group");
    if (!G) return NULL;
    unsigned long long op_id = PyLong_AsUnsignedLongLong(args[1]);
    long long coll = PyLong_AsLongLong(args[2]);
    unsigned long long in = PyLong_AsUnsignedLongLong(args[3]), out = PyLong_AsUnsignedLongLong(args[4]);
    Py_ssize_t count = PyLong_AsSsize_t(args[5]);
    int dtype = (int)PyLong_AsLong(args[6]), op = (int)PyLong_AsLong(args[7]), avg_n = (int)PyLong_AsLong(args[8]);
    unsigned long long data_off = PyLong_AsUnsignedLongLong(args[10]);
    Py_ssize_t block_elems = PyLong_AsSsize_t(args[11]), chunk_elems = PyLong_AsSsize_t(args[12]);
    int num_slots = (int)PyLong_AsLong(args[13]);
    Py_ssize_t slot_stride = PyLong_AsSsize_t(args[14]), block_stride = PyLong_AsSsize_t(args[15]);
    int do_gather = (int)PyLong_AsLong(args[16]);
    if (PyErr_Occurred()) return NULL;
    if (!check_dtype_op(dtype, op)) return NULL;
    if (count < 0 || block_elems < 0 || chunk_elems <= 0 || num_slots <= 0 || slot_stride < 0 ||
        block_stride < 0) {
        PyErr_SetString(PyExc_ValueError, "ring_once_g: bad count, block, chunk, slots or strides");
        return NULL;
    }
    uint64_t ctrl[5];
    if (offsets_of(args[9], ctrl, 5) < 0) return NULL;
    int idx = -1, st, par = (int)(op_id & 1);
    Py_BEGIN_ALLOW_THREADS
    st = tc_ring_once(&G->g, G->arrived_off, G->abort_off, G->waiters_off, G->header_off[par],
                      ctrl, data_off, op_id, coll, (const char *)(uintptr_t)in,
                      (char *)(uintptr_t)out, (size_t)count, (size_t)block_elems, dtype, op,
                      (size_t)chunk_elems, num_slots, (size_t)slot_stride, (size_t)block_stride,
                      do_gather != 0, avg_n, &idx);
    Py_END_ALLOW_THREADS
    if (st == TC_STATUS_NO_MEMORY) return PyErr_NoMemory();
    return group_result(G, st, idx);
}

/* ring_reduce_g(group, ctrl(posted, reduced, done, abort, waiters), data_off, op_id, in, out,
 *               count, block_elems, dtype, op, chunk_elems, num_slots, slot_stride,
 *               block_stride, pads, do_gather, avg_n) -> (status, idx) */
static PyObject *py_ring_reduce_g(PyObject *self, PyObject *args) {
    PyObject *cap, *a_ctrl, *a_pads;
    int dtype, op, num_slots, do_gather, avg_n;
    unsigned long long data_off, op_id, in, out;
    Py_ssize_t count, block_elems, chunk_elems, slot_stride, block_stride;
    if (!PyArg_ParseTuple(args, "OOKKKKnniininnOii", &cap, &a_ctrl, &data_off, &op_id, &in, &out,
                          &count, &block_elems, &dtype, &op, &chunk_elems, &num_slots,
                          &slot_stride, &block_stride, &a_pads, &do_gather, &avg_n))
        return NULL;
    group_t *G = (group_t *)PyCapsule_GetPointer(cap, "topocomm.group");
    if (!G) return NULL;
    if (!check_dtype_op(dtype, op)) return NULL;
    if (chunk_elems <= 0 || num_slots <= 0) {
        PyErr_SetString(PyExc_ValueError, "ring_reduce: chunk_elems and num_slots must be > 0");
        return NULL;
    }
    uint64_t *ctrl = NULL, *pads = NULL;
    PyObject *res = NULL;
    if (to_u64s(a_ctrl, &ctrl, "ctrl") != 5 || to_u64s(a_pads, &pads, "pads") != G->g.n) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "ring_reduce: bad lengths");
        goto out;
    }
    {
        int idx = -1, st;
        Py_BEGIN_ALLOW_THREADS
        st = tc_ring_reduce(&G->g, ctrl, data_off, op_id, (const char *)(uintptr_t)in,
                            (char *)(uintptr_t)out, (size_t)count, (size_t)block_elems, dtype, op,
                            (size_t)chunk_elems, num_slots, (size_t)slot_stride,
                            (size_t)block_stride, (const int64_t *)pads, do_gather, avg_n, &idx);
        Py_END_ALLOW_THREADS
        if (st == TC_STATUS_NO_MEMORY) { PyErr_NoMemory(); goto out; }
        res = wait_result(st, idx);
    }
out:
    free(ctrl); free(pads);
    return res;
}

/* arrive_g(group, op_id, coll, count, dtype, op, root, error, extra, cmp_mask, meta_off, meta)
 * meta: None or a sequence of ints written (int64) at meta_off before arriving. */
static PyObject *py_arrive_g(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) { PyErr_SetString(PyExc_TypeError, "arrive_g takes 12 arguments"); return NULL; }
    group_t *G = (group_t *)PyCapsule_GetPointer(args[0], "topocomm.group");
    if (!G) return NULL;
    unsigned long long op_id = PyLong_AsUnsignedLongLong(args[1]);
    int64_t words[9] = {0};
    for (int i = 1; i <= 5; i++) words[i] = PyLong_AsLongLong(args[i + 1]); /* coll..root */
    words[6] = 0;                                                            /* pad */
    words[7] = PyLong_AsLongLong(args[7]);                                   /* error */
    words[8] = PyLong_AsLongLong(args[8]);                                   /* extra */
    int cmp_mask = (int)PyLong_AsLong(args[9]);
    unsigned long long meta_off = PyLong_AsUnsignedLongLong(args[10]);
    if (PyErr_Occurred()) return NULL;
    uint64_t *meta = NULL;
    Py_ssize_t nmeta = 0;
    if (args[11] != Py_None && (nmeta = to_u64s(args[11], &meta, "meta")) < 0) return NULL;
    int idx = -1, st, par = (int)(op_id & 1);
    Py_BEGIN_ALLOW_THREADS
    st = tc_arrive(&G->g, G->arrived_off, G->abort_off, G->waiters_off, G->header_off[par], op_id,
                   words, cmp_mask, meta_off, meta, (size_t)nmeta * sizeof(int64_t), &idx);
    Py_END_ALLOW_THREADS
    free(meta);
    if (st == TC_STATUS_NO_MEMORY) return PyErr_NoMemory();
    return group_result(G, st, idx);
}

/* alltoall_pairwise(group, ctrl(posted, done, abort, waiters), data_off, op_id, send, recv,
 *                   sdispl, sbytes, rdispl, rbytes, chunk, num_slots[, stream_in]) -> (status, idx) */
static PyObject *py_alltoall_pairwise(PyObject *self, PyObject *args) {
    PyObject *cap, *a_ctrl, *a_sd, *a_sb, *a_rd, *a_rb;
    unsigned long long data_off, op_id, send, recv;
    Py_ssize_t chunk;
    int num_slots, flags = 0;
    if (!PyArg_ParseTuple(args, "OOKKKKOOOOni|i", &cap, &a_ctrl, &data_off, &op_id, &send, &recv,
                          &a_sd, &a_sb, &a_rd, &a_rb, &chunk, &num_slots, &flags))
        return NULL;
    group_t *G = (group_t *)PyCapsule_GetPointer(cap, "topocomm.group");
    if (!G) return NULL;
    if (chunk <= 0 || num_slots <= 0 || G->g.n > 1024) {
        PyErr_SetString(PyExc_ValueError, "alltoall_pairwise: chunk, num_slots > 0 and n <= 1024");
        return NULL;
    }
    uint64_t *ctrl = NULL, *sd = NULL, *sb = NULL, *rd = NULL, *rb = NULL;
    PyObject *res = NULL;
    int n = G->g.n;
    if (to_u64s(a_ctrl, &ctrl, "ctrl") != 4 || to_u64s(a_sd, &sd, "sdispl") != n ||
        to_u64s(a_sb, &sb, "sbytes") != n || to_u64s(a_rd, &rd, "rdispl") != n ||
        to_u64s(a_rb, &rb, "rbytes") != n) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "alltoall_pairwise: bad lengths");
        goto out;
    }
    {
        int idx = -1, st;
        Py_BEGIN_ALLOW_THREADS
        st = tc_alltoall_pairwise(&G->g, ctrl, data_off, op_id, (const char *)(uintptr_t)send,
                                  (char *)(uintptr_t)recv, sd, sb, rd, rb, (size_t)chunk, num_slots,
                                  flags, &idx);
        Py_END_ALLOW_THREADS
        if (st == TC_STATUS_NO_MEMORY) { PyErr_NoMemory(); goto out; }
        res = wait_result(st, idx);
    }
out:
    free(ctrl); free(sd); free(sb); free(rd); free(rb);
    return res;
}

/* alltoall_even_g(group, op_id, coll, send, recv, count, dtype, cmp_mask, ctrl, data_off, chunk,
 *                 num_slots, algo, direct_mode) -> (status, algo used): the even-split
 * all-to-all in one call: arrive (header: coll, count, dtype, split mode 1, root word = the
 * algorithm this rank proposes, extra = send address), then run the algorithm RANK 0
 * proposed, or TC_A2A_PAIRED when any rank proposed it (a rank whose send is its recv),
 * so the ranks always agree (enum tc_a2a_algorithm): TC_A2A_PAIRWISE rounds,
 * TC_A2A_DIRECT reads (direct_mode 1: process_vm_readv, 2: memcpy between threads),
 * TC_A2A_PAIRWISE_STREAMED rounds with streamed slot writes. TC_STATUS_MISMATCH: the headers
 * disagree (Python reads them); TC_STATUS_OTHER_ALGORITHM: rank 0 asked for another
 * algorithm (its number is returned; the arrival is done, no data moved); a status <=
 * TC_STATUS_READ_FAILED: a direct read failed with errno TC_STATUS_READ_FAILED - st. */
static PyObject *py_alltoall_even_g(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 14) { PyErr_SetString(PyExc_TypeError, "alltoall_even_g takes 14 arguments"); return NULL; }
    group_t *G = (group_t *)PyCapsule_GetPointer(args[0], "topocomm.group");
    if (!G) return NULL;
    unsigned long long op_id = PyLong_AsUnsignedLongLong(args[1]);
    long long coll = PyLong_AsLongLong(args[2]);
    unsigned long long send = PyLong_AsUnsignedLongLong(args[3]), recv = PyLong_AsUnsignedLongLong(args[4]);
    long long count = PyLong_AsLongLong(args[5]);
    int dtype = (int)PyLong_AsLong(args[6]), cmp_mask = (int)PyLong_AsLong(args[7]);
    unsigned long long data_off = PyLong_AsUnsignedLongLong(args[9]);
    Py_ssize_t chunk = PyLong_AsSsize_t(args[10]);
    int num_slots = (int)PyLong_AsLong(args[11]), algo = (int)PyLong_AsLong(args[12]);
    int direct_mode = (int)PyLong_AsLong(args[13]);
    if (PyErr_Occurred()) return NULL;
    const int n = G->g.n;
    if (dtype < 0 || dtype >= TC_NUM_DTYPES || count < 0 || count % n || chunk <= 0 || num_slots <= 0 ||
        n > 1024 || (algo != TC_A2A_PAIRWISE && algo != TC_A2A_DIRECT && algo != TC_A2A_PAIRWISE_STREAMED &&
                     !(algo == TC_A2A_PAIRED && n % 2 == 0)) ||
        (algo == TC_A2A_DIRECT && direct_mode != 1 && direct_mode != 2)) {
        PyErr_SetString(PyExc_ValueError, "alltoall_even_g: bad dtype, count, chunk or slots");
        return NULL;
    }
    uint64_t ctrl[4], *d = NULL;
    if (offsets_of(args[8], ctrl, 4) < 0) return NULL;
    d = (uint64_t *)malloc(sizeof(uint64_t) * 2 * (size_t)n);
    if (!d) return PyErr_NoMemory();
    const uint64_t block = (uint64_t)(count / n) * (uint64_t)tc_dtype_size(dtype);
    for (int q = 0; q < n; q++) { d[q] = (uint64_t)q * block; d[n + q] = block; }
    int64_t words[9] = {0, coll, count, dtype, 1, algo, 0, 0, (int64_t)send};
    int idx = -1, st, par = (int)(op_id & 1);
    Py_BEGIN_ALLOW_THREADS
    st = tc_arrive(&G->g, G->arrived_off, G->abort_off, G->waiters_off, G->header_off[par], op_id,
                   words, cmp_mask, 0, NULL, 0, &idx);
    if (st == TC_STATUS_OK) {
        /* rank 0's proposal, unless a rank proposed paired rounds (it runs in place) */
        algo = (int)((const int64_t *)(uintptr_t)(G->g.seg[0] + G->header_off[par]))[5];
        for (int q = 1; q < n; q++)
            if (((const int64_t *)(uintptr_t)(G->g.seg[q] + G->header_off[par]))[5] == TC_A2A_PAIRED)
                algo = TC_A2A_PAIRED;
        idx = algo;
        if (algo == TC_A2A_PAIRWISE || algo == TC_A2A_PAIRWISE_STREAMED || algo == TC_A2A_PAIRED)
            st = tc_alltoall_pairwise(&G->g, ctrl, data_off, op_id, (const char *)(uintptr_t)send,
                                      (char *)(uintptr_t)recv, d, d + n, d, d + n, (size_t)chunk,
                                      num_slots,
                                      algo == TC_A2A_PAIRWISE_STREAMED ? TC_A2A_FLAG_STREAM_IN :
                                      algo == TC_A2A_PAIRED ? TC_A2A_FLAG_PAIRED : 0, &idx);
        else if (algo == TC_A2A_DIRECT && (direct_mode == 1 || direct_mode == 2))
            st = tc_alltoall_direct(&G->g, ctrl, G->header_off[par], op_id, (const char *)(uintptr_t)send,
                                    (char *)(uintptr_t)recv, (size_t)block, direct_mode == 1, &idx);
        else
            st = TC_STATUS_OTHER_ALGORITHM;
        if (st == TC_STATUS_OK) idx = algo;
    }
    Py_END_ALLOW_THREADS
    free(d);
    if (st == TC_STATUS_NO_MEMORY) return PyErr_NoMemory();
    return group_result(G, st, idx);
}

/* address of a writable-or-readonly contiguous buffer (numpy array, bytearray, ...) */
static PyObject *py_addr_of(PyObject *self, PyObject *obj) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_ANY_CONTIGUOUS) != 0) return NULL;
    PyObject *r = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return r;
}

static PyObject *py_set_spin(PyObject *self, PyObject *args) {
    double spin_s, yield_s;
    if (!PyArg_ParseTuple(args, "dd", &spin_s, &yield_s)) return NULL;
    tc_set_spin(spin_s, yield_s);
    Py_RETURN_NONE;
}

/* cma_read_many(pids, local_addrs, remote_addrs, sizes) -> 0 or the errno of the first failure */
static PyObject *py_cma_read_many(PyObject *self, PyObject *args) {
    PyObject *a_pids, *a_loc, *a_rem, *a_sz;
    if (!PyArg_ParseTuple(args, "OOOO", &a_pids, &a_loc, &a_rem, &a_sz)) return NULL;
    uint64_t *pids = NULL, *loc = NULL, *rem = NULL, *sz = NULL;
    PyObject *res = NULL;
    Py_ssize_t n = to_u64s(a_pids, &pids, "pids");
    if (n < 0 || to_u64s(a_loc, &loc, "local_addrs") != n || to_u64s(a_rem, &rem, "remote_addrs") != n ||
        to_u64s(a_sz, &sz, "sizes") != n) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "cma_read_many: lengths differ");
        goto out;
    }
    {
        int err = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n && !err; i++)
            if (sz[i]) err = tc_cma_read((int64_t)pids[i], (void *)(uintptr_t)loc[i], rem[i], (size_t)sz[i]);
        Py_END_ALLOW_THREADS
        res = PyLong_FromLong(err);
    }
out:
    free(pids); free(loc); free(rem); free(sz);
    return res;
}

static PyMethodDef methods[] = {
    {"cma_read_many", py_cma_read_many, METH_VARARGS,
     "cma_read_many(pids, local_addrs, remote_addrs, sizes) -> 0 or errno"},
    {"set_spin", py_set_spin, METH_VARARGS, "set_spin(spin_s, yield_s): how long waiters spin, then yield"},
    {"group_new", py_group_new, METH_VARARGS, "group_new(rank, n, seg_bases, pids, timeout_s, offsets...): the constant arguments of every *_g call, converted once"},
    {"group_stats", py_group_stats, METH_O, "group_stats(group) -> (last, waits) bytes (tc_stats)"},
    {"group_set_warn", py_group_set_warn, METH_VARARGS,
     "group_set_warn(group, warn_ns, callback): callback(rank, wait_ns) on a straggler"},
    {"allreduce_small_g", (PyCFunction)(void (*)(void))py_allreduce_small_g, METH_FASTCALL,
     "allreduce_small_g(group, op_id, coll, root, in, out, count, dtype, op, avg_n) -> (status, idx)"},
    {"ring_once_g", (PyCFunction)(void (*)(void))py_ring_once_g, METH_FASTCALL,
     "ring_once_g(group, op_id, coll, in, out, count, dtype, op, avg_n, ctrl, data_off, block_elems, chunk_elems, num_slots, slot_stride, block_stride, do_gather) -> (status, idx)"},
    {"arrive_g", (PyCFunction)(void (*)(void))py_arrive_g, METH_FASTCALL,
     "arrive_g(group, op_id, coll, count, dtype, op, root, error, extra, cmp_mask, meta_off, meta) -> (status, idx)"},
    {"alltoall_pairwise", py_alltoall_pairwise, METH_VARARGS, "see comms/algorithms/host/pairwise.py"},
    {"alltoall_even_g", (PyCFunction)(void (*)(void))py_alltoall_even_g, METH_FASTCALL,
     "alltoall_even_g(group, op_id, coll, send, recv, count, dtype, cmp_mask, ctrl, data_off, chunk, num_slots, algo, direct_mode) -> (status, idx or algo)"},
    {"addr_of", py_addr_of, METH_O, "addr_of(buffer) -> address of its first byte"},
    {"post", py_post, METH_VARARGS, "post(addr, value, waiters_addr): store, wake sleepers"},
    {"wait_all", py_wait_all, METH_VARARGS,
     "wait_all(addrs, target, abort_addrs, pids, waiters_addrs, timeout_s) -> (status, idx)"},
    {"reduce", py_reduce, METH_VARARGS, "reduce(dst, srcs, count, dtype, op)"},
    {"reduce2", py_reduce2, METH_VARARGS, "reduce2(dst, dst2, srcs, count, dtype, op)"},
    {"scale", py_scale, METH_VARARGS, "scale(dst, src, count, dtype, factor)"},
    {"copy", py_copy, METH_VARARGS, "copy(dst, src, nbytes)"},
    {"ring_reduce_g", py_ring_reduce_g, METH_VARARGS, "see comms/kernels/reference.py:ring_reduce_g"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "comms.kernels._native",
                                    "topocomm C helpers (see native/include/topocomm.h)", -1, methods};

/* Method tables of the C files that own their bindings (one owner per file):
 * tcp.c (socket loops between hosts), moe.c (MoE pack/unpack). */
extern PyMethodDef tc_tcp_methods[];
extern PyMethodDef tc_moe_methods[];

/* The codes of tc_internal.h by name, for Python to check against comms/core/status.py:
 * STATUS (enum tc_status) and A2A_ALGORITHMS (enum tc_a2a_algorithm). */
typedef struct { const char *name; int value; } named_code;
static const named_code g_statuses[] = {
    {"READ_FAILED", TC_STATUS_READ_FAILED}, {"NO_MEMORY", TC_STATUS_NO_MEMORY},
    {"OK", TC_STATUS_OK}, {"TIMEOUT", TC_STATUS_TIMEOUT}, {"ABORTED", TC_STATUS_ABORTED},
    {"DEAD", TC_STATUS_DEAD}, {"MISMATCH", TC_STATUS_MISMATCH},
    {"OTHER_ALGORITHM", TC_STATUS_OTHER_ALGORITHM}, {"CLOSED", TC_STATUS_CLOSED},
    {"ERRNO", TC_STATUS_ERRNO}, {"INTERRUPTED", TC_STATUS_INTERRUPTED}, {NULL, 0}};
static const named_code g_a2a_algorithms[] = {
    {"PAIRWISE", TC_A2A_PAIRWISE}, {"DIRECT", TC_A2A_DIRECT}, {"STAGED", TC_A2A_STAGED},
    {"PAIRWISE_STREAMED", TC_A2A_PAIRWISE_STREAMED}, {"PAIRED", TC_A2A_PAIRED}, {NULL, 0}};

static int add_codes(PyObject *m, const char *attr, const named_code *codes) {
    PyObject *d = PyDict_New();
    if (!d) return -1;
    for (const named_code *c = codes; c->name; c++) {
        PyObject *v = PyLong_FromLong(c->value);
        if (!v || PyDict_SetItemString(d, c->name, v) < 0) { Py_XDECREF(v); Py_DECREF(d); return -1; }
        Py_DECREF(v);
    }
    if (PyModule_AddObject(m, attr, d) < 0) { Py_DECREF(d); return -1; }
    return 0;
}

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    /* the thread Python runs signal handlers on */
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *main = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    if (ident && PyLong_Check(ident)) {
        g_main_thread = PyLong_AsUnsignedLong(ident);
        tc_set_interrupt_check(check_signals);
    }
    Py_XDECREF(ident); Py_XDECREF(main); Py_XDECREF(threading);
    PyErr_Clear();
    if (PyModule_AddFunctions(m, tc_tcp_methods) < 0 || PyModule_AddFunctions(m, tc_moe_methods) < 0 ||
        add_codes(m, "STATUS", g_statuses) < 0 || add_codes(m, "A2A_ALGORITHMS", g_a2a_algorithms) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

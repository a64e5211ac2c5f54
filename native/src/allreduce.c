/* The all-reduce hot loops, one call per collective with the GIL released.
 * Protocols: comms/algorithms/host/allreduce.py; Python twins: comms/kernels/reference.py. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tc_internal.h"

#define TAG(op_id, step) (((uint64_t)(op_id) << 32) | (uint64_t)(step))
#define MAX_STACK_RANKS 64

typedef struct {
    uint64_t *buf[5 * MAX_STACK_RANKS];
    uint64_t **heap;
} ptrs_t;

static uint64_t **alloc_ptrs(ptrs_t *p, int count) {
    p->heap = NULL;
    if (count <= 5 * MAX_STACK_RANKS) return p->buf;
    p->heap = (uint64_t **)calloc((size_t)count, sizeof(uint64_t *));
    return p->heap;
}

static void fill(uint64_t **dst, const tc_group *g, uint64_t off, int skip_self) {
    for (int q = 0; q < g->n; q++)
        dst[q] = (skip_self && q == g->rank) ? NULL : (uint64_t *)(uintptr_t)(g->seg[q] + off);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* After an arrival every rank has seen: count who came last and how long the first one
 * waited for it (tc_stats). */
static void count_arrival(const tc_group *g, uint64_t header_off, int64_t coll) {
    tc_stats *S = g->stats;
    const int n = g->n;
    int last = 0;
    int64_t t_first = INT64_MAX, t_last = INT64_MIN;
    for (int q = 0; q < n; q++) {
        int64_t t = ((const int64_t *)(uintptr_t)(g->seg[q] + header_off))[TC_H_TIME];
        if (t > t_last) { t_last = t; last = q; }
        if (t < t_first) t_first = t;
    }
    uint64_t wait_ns = t_last > t_first ? (uint64_t)(t_last - t_first) : 0;
    uint64_t us = wait_ns / 1000;
    int b = 0;
    while (us && b < TC_WAIT_BUCKETS - 1) { us >>= 1; b++; }
    if (coll < 0 || coll >= TC_NUM_COLL) coll = 0;
    S->last[(size_t)coll * (size_t)n + (size_t)last]++;
    S->waits[(size_t)last * TC_WAIT_BUCKETS + (size_t)b]++;
    if (S->warn_ns && wait_ns > S->warn_ns && last != g->rank) {
        uint64_t now = now_ns();
        if (now - S->warned_at_ns > 1000000000ull) {
            S->warned_at_ns = now;
            S->warn_rank = last;
            S->warn_wait_ns = wait_ns;
        }
    }
}

/* The arrival every collective starts with: wait until peers are past op k-2 (so the
 * header and meta slots of this parity are free), publish the header words and `meta`
 * bytes, post ARRIVED = k, wait for every rank's ARRIVED, check that no peer has aborted
 * meanwhile, then that the headers agree on the fields in cmp_mask (bit f = header word f)
 * and that no rank flagged an error. */
int tc_arrive(const tc_group *g, uint64_t arrived_off, uint64_t abort_off, uint64_t waiters_off,
              uint64_t header_off, uint64_t op_id, const int64_t words[9], int cmp_mask,
              uint64_t meta_off, const void *meta, size_t meta_bytes, int *idx_out) {
    const int n = g->n, me = g->rank;
    ptrs_t P;
    uint64_t **mem = alloc_ptrs(&P, 3 * n);
    if (!mem) return TC_STATUS_NO_MEMORY;
    uint64_t **arrived = mem, **aborts = mem + n, **waiters = mem + 2 * n;
    fill(arrived, g, arrived_off, 1);
    fill(aborts, g, abort_off, 1);
    fill(waiters, g, waiters_off, 0);
    tc_waitset ws = {n, arrived, aborts, waiters, g->pids, g->timeout_s};
    int st = TC_STATUS_OK;
    if (op_id > 1 && (st = tc_wait_all(&ws, op_id - 1, idx_out)) != TC_STATUS_OK) goto done;
    int64_t *h = (int64_t *)(uintptr_t)(g->seg[me] + header_off);
    h[0] = (int64_t)op_id;
    for (int i = 1; i < 9; i++) h[i] = words[i];
    h[TC_H_TIME] = (int64_t)now_ns();
    if (meta_bytes) memcpy((void *)(uintptr_t)(g->seg[me] + meta_off), meta, meta_bytes);
    tc_post((void *)(uintptr_t)(g->seg[me] + arrived_off), op_id, waiters[me]);
    if ((st = tc_wait_all(&ws, op_id, idx_out)) != TC_STATUS_OK) goto done;
    /* A peer that arrived, then gave up waiting for us (timeout, abort) left its arrival
     * standing: the counters alone would let a late rank go on as if nothing happened. */
    for (int q = 0; q < n; q++) {
        if (aborts[q] && __atomic_load_n(aborts[q], __ATOMIC_ACQUIRE)) {
            *idx_out = q; st = TC_STATUS_ABORTED; goto done;
        }
    }
    const int64_t *ref = (const int64_t *)(uintptr_t)(g->seg[0] + header_off);
    for (int q = 0; q < n; q++) {
        const int64_t *hq = (const int64_t *)(uintptr_t)(g->seg[q] + header_off);
        int bad = hq[7] != 0;
        for (int f = 1; f <= 5; f++) bad |= ((cmp_mask >> f) & 1) && hq[f] != ref[f];
        if (bad) { *idx_out = q; st = TC_STATUS_MISMATCH; goto done; }
    }
    if (g->stats) count_arrival(g, header_off, words[1]);
done:
    free(P.heap);
    return st;
}

/* Latency path: the input travels as the arrival's meta into this parity's small slot;
 * then every rank reduces all slots in rank order (so every rank gets the same bits). */
int tc_allreduce_small(const tc_group *g, uint64_t arrived_off, uint64_t abort_off,
                       uint64_t waiters_off, uint64_t header_off, uint64_t small_off,
                       uint64_t op_id, int64_t coll, int64_t root, void *in, void *out,
                       size_t count, int dtype, int op, int avg_n, int *idx_out) {
    const int n = g->n;
    const size_t es = tc_dtype_size(dtype);
    const int64_t words[9] = {(int64_t)op_id, coll, (int64_t)count, dtype, op, root, 0, 0, 0};
    int st = tc_arrive(g, arrived_off, abort_off, waiters_off, header_off, op_id, words,
                       0x3e /* coll, count, dtype, op, root */, small_off, in, count * es, idx_out);
    if (st != TC_STATUS_OK) return st;
    const void **srcs = (const void **)malloc(sizeof(void *) * (size_t)n);
    if (!srcs) return TC_STATUS_NO_MEMORY;
    for (int q = 0; q < n; q++) srcs[q] = (const void *)(uintptr_t)(g->seg[q] + small_off);
    tc_reduce(out, srcs, n, count, dtype, op);
    if (avg_n) tc_scale(out, out, count, dtype, 1.0 / avg_n);
    free(srcs);
    return TC_STATUS_OK;
}

int tc_ring_reduce(const tc_group *g, const uint64_t ctrl[5], uint64_t data_off, uint64_t op_id,
                   const char *in, char *out, size_t count, size_t block_elems, int dtype, int op,
                   size_t chunk_elems, int num_slots, size_t slot_stride, size_t block_stride,
                   const int64_t *pads, int do_gather, int avg_n, int *idx_out) {
    const int n = g->n, me = g->rank;
    const size_t es = tc_dtype_size(dtype);
    ptrs_t P;
    uint64_t **mem = alloc_ptrs(&P, 5 * n);
    const void **srcs = (const void **)malloc(sizeof(void *) * (size_t)n);
    if (!mem || !srcs) { free(P.heap); free(srcs); return TC_STATUS_NO_MEMORY; }
    uint64_t **posted = mem, **reduced = mem + n, **donep = mem + 2 * n, **aborts = mem + 3 * n,
             **waiters = mem + 4 * n;
    fill(posted, g, ctrl[0], 1);
    fill(reduced, g, ctrl[1], 1);
    fill(donep, g, ctrl[2], 1);
    fill(aborts, g, ctrl[3], 1);
    fill(waiters, g, ctrl[4], 0);
    tc_waitset wposted = {n, posted, aborts, waiters, g->pids, g->timeout_s};
    tc_waitset wreduced = {n, reduced, aborts, waiters, g->pids, g->timeout_s};
    tc_waitset wdone = {n, donep, aborts, waiters, g->pids, g->timeout_s};
    void *my_posted = (void *)(uintptr_t)(g->seg[me] + ctrl[0]);
    void *my_reduced = (void *)(uintptr_t)(g->seg[me] + ctrl[1]);
    void *my_done = (void *)(uintptr_t)(g->seg[me] + ctrl[2]);
    int st = TC_STATUS_OK;
    size_t num_chunks = 0;
    if (count) {
        num_chunks = (block_elems + chunk_elems - 1) / chunk_elems;
        if (!num_chunks) num_chunks = 1;
    }
    char *my_out = out + (do_gather ? (size_t)me * block_elems * es : 0);
    /* an output larger than the cache is written around it */
    void (*copy_out)(void *, const void *, size_t) = count * es >= ((size_t)16 << 20) ? tc_copy_stream : tc_copy;
#define BLEN(p) ((size_t)(p) * block_elems >= count ? 0 : \
                 (count - (size_t)(p) * block_elems < block_elems ? count - (size_t)(p) * block_elems : block_elems))
#define POS(q, s, p, c) ((char *)(uintptr_t)(g->seg[q] + data_off + (size_t)(s) * slot_stride + \
                 (size_t)(p) * block_stride + \
                 (((uint64_t)pads[q] + ((size_t)(p) * block_elems + (size_t)(c) * chunk_elems) * es) % 4096)))
    /* Three stages per chunk, each run as soon as its inputs are there, so a rank never
     * waits while it has other work: copy-in may run num_slots chunks ahead of the peers'
     * gathers; a rank blocks only when no stage can move. */
    size_t c_in = 0, c_red = 0, c_gat = 0;
    const size_t c_end_red = num_chunks, c_end_gat = do_gather ? num_chunks : 0;
    while (c_red < c_end_red || c_gat < c_end_gat) {
        int moved = 0;
        /* stage 1: copy the peers' parts of chunk c_in into my slot */
        if (c_in < num_chunks &&
            (c_in < (size_t)num_slots || tc_all_ge(&wdone, TAG(op_id, c_in - num_slots + 1)))) {
            const size_t c = c_in, lo = c * chunk_elems;
            const int s = (int)(c % (size_t)num_slots);
            for (int p = 0; p < n; p++) {
                if (p == me) continue;
                size_t bl = BLEN(p);
                if (bl > lo) {
                    size_t m = bl - lo < chunk_elems ? bl - lo : chunk_elems;
                    tc_copy(POS(me, s, p, c), in + ((size_t)p * block_elems + lo) * es, m * es);
                }
            }
            tc_post(my_posted, TAG(op_id, c + 1), waiters[me]);
            c_in++;
            moved = 1;
        }
        /* stage 2: reduce my block's part of chunk c_red from the peers' slots */
        if (c_red < c_in && tc_all_ge(&wposted, TAG(op_id, c_red + 1))) {
            const size_t c = c_red, lo = c * chunk_elems;
            const int s = (int)(c % (size_t)num_slots);
            size_t bl = BLEN(me);
            if (bl > lo) {
                size_t m = bl - lo < chunk_elems ? bl - lo : chunk_elems;
                for (int q = 0; q < n; q++)
                    srcs[q] = q == me ? (const void *)(in + ((size_t)me * block_elems + lo) * es)
                                      : (const void *)POS(q, s, me, c);
                char *dst = my_out + lo * es;
                if (avg_n) {
                    tc_reduce(dst, srcs, n, m, dtype, op);
                    tc_scale(dst, dst, m, dtype, 1.0 / avg_n);
                    if (do_gather) tc_copy(POS(me, s, me, c), dst, m * es);
                } else {
                    tc_reduce2(dst, do_gather ? POS(me, s, me, c) : NULL, srcs, n, m, dtype, op);
                }
            }
            tc_post(do_gather ? my_reduced : my_done, TAG(op_id, c + 1), waiters[me]);
            c_red++;
            moved = 1;
        }
        /* stage 3: copy the peers' reduced parts of chunk c_gat into my output */
        if (c_gat < c_end_gat && c_gat < c_red && tc_all_ge(&wreduced, TAG(op_id, c_gat + 1))) {
            const size_t c = c_gat, lo = c * chunk_elems;
            const int s = (int)(c % (size_t)num_slots);
            for (int p = 0; p < n; p++) {
                if (p == me) continue;
                size_t blp = BLEN(p);
                if (blp > lo) {
                    size_t m = blp - lo < chunk_elems ? blp - lo : chunk_elems;
                    copy_out(out + ((size_t)p * block_elems + lo) * es, POS(p, s, p, c), m * es);
                }
            }
            tc_post(my_done, TAG(op_id, c + 1), waiters[me]);
            c_gat++;
            moved = 1;
        }
        if (moved) continue;
        /* nothing can move: sleep on the most urgent missing input */
        if (c_gat < c_end_gat && c_gat < c_red)
            st = tc_wait_all(&wreduced, TAG(op_id, c_gat + 1), idx_out);
        else if (c_red < c_in)
            st = tc_wait_all(&wposted, TAG(op_id, c_red + 1), idx_out);
        else
            st = tc_wait_all(&wdone, TAG(op_id, c_in - num_slots + 1), idx_out);
        if (st != TC_STATUS_OK) goto done;
    }
#undef BLEN
#undef POS
done:
    free(P.heap);
    free(srcs);
    return st;
}

/* The ring in one call (comms/algorithms/host/allreduce.py ring_reduce): the arrival, whose
 * extra word carries my input's page offset, then tc_ring_reduce with every rank's offset from
 * the headers; do_gather: all-reduce, else reduce-scatter. Same header words as the two-call
 * path, so ranks on either path meet in one arrival. */
int tc_ring_once(const tc_group *g, uint64_t arrived_off, uint64_t abort_off, uint64_t waiters_off,
                 uint64_t header_off, const uint64_t ctrl[5], uint64_t data_off, uint64_t op_id,
                 int64_t coll, const char *in, char *out, size_t count, size_t block_elems,
                 int dtype, int op, size_t chunk_elems, int num_slots, size_t slot_stride,
                 size_t block_stride, int do_gather, int avg_n, int *idx_out) {
    const int n = g->n;
    const int64_t words[9] = {(int64_t)op_id, coll, (int64_t)count, dtype, op, -1, 0, 0,
                              (int64_t)((uintptr_t)in % 4096)};
    int st = tc_arrive(g, arrived_off, abort_off, waiters_off, header_off, op_id, words,
                       0x3e /* coll, count, dtype, op, root */, 0, NULL, 0, idx_out);
    if (st != TC_STATUS_OK) return st;
    int64_t stack_pads[MAX_STACK_RANKS];
    int64_t *pads = n <= MAX_STACK_RANKS ? stack_pads : (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    if (!pads) return TC_STATUS_NO_MEMORY;
    for (int q = 0; q < n; q++)
        pads[q] = ((const int64_t *)(uintptr_t)(g->seg[q] + header_off))[8] & 4095;
    st = tc_ring_reduce(g, ctrl, data_off, op_id, in, out, count, block_elems, dtype, op,
                        chunk_elems, num_slots, slot_stride, block_stride, pads, do_gather, avg_n,
                        idx_out);
    if (pads != stack_pads) free(pads);
    return st;
}

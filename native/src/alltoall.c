/* Pairwise all-to-all through the shared data areas, one call with the GIL released.
 * Protocol: comms/algorithms/host/pairwise.py; Python twin: comms/kernels/reference.py. */
#include <stdlib.h>
#include <string.h>

#include "tc_internal.h"

/* counter value: op id, round (10 bits: n <= 1024), chunk index in the round (22 bits) */
#define TAG3(op_id, round, j) (((uint64_t)(op_id) << 32) | ((uint64_t)(round) << 22) | (uint64_t)(j))

/* Paired rounds (n even): the round-robin tournament (circle method). Rank n-1 stays put,
 * the others rotate; in round r (0 .. n-2) every rank has exactly one partner, the relation
 * is symmetric, and over the n-1 rounds every pair meets once. */
static int pair_partner(int me, int r, int n) {
    const int m = n - 1;
    if (me == m) return (int)(((long)r * ((m + 1) / 2)) % m);  /* i with 2i = r (mod m) */
    const int p = ((r - me) % m + m) % m;
    return p == me ? m : p;
}

int tc_alltoall_pairwise(const tc_group *g, const uint64_t ctrl[4], uint64_t data_off, uint64_t op_id,
                         const char *send, char *recv, const uint64_t *sdispl, const uint64_t *sbytes,
                         const uint64_t *rdispl, const uint64_t *rbytes, size_t chunk, int num_slots,
                         int flags, int *idx_out) {
    const int n = g->n, me = g->rank;
    const int stream_in = (flags & TC_A2A_FLAG_STREAM_IN) != 0;
    /* paired: round r's partner is both the rank I send to and the one I receive from, so
     * a received chunk lands where the block sent to the same partner was: it is written only
     * once that chunk was copied into my slots (send may be recv: in place) */
    const int paired = (flags & TC_A2A_FLAG_PAIRED) != 0 && n % 2 == 0;
    if ((flags & TC_A2A_FLAG_PAIRED) && !paired) return TC_STATUS_MISMATCH;
    uint64_t **mem = (uint64_t **)calloc((size_t)(5 * n), sizeof(uint64_t *));
    if (!mem) return TC_STATUS_NO_MEMORY;
    uint64_t **aborts = mem, **waiters = mem + n, **one = mem + 2 * n, **one2 = mem + 3 * n,
             **prevd = mem + 4 * n;
    for (int q = 0; q < n; q++) {
        aborts[q] = q == me ? NULL : (uint64_t *)(uintptr_t)(g->seg[q] + ctrl[2]);
        waiters[q] = (uint64_t *)(uintptr_t)(g->seg[q] + ctrl[3]);
    }
    void *my_posted = (void *)(uintptr_t)(g->seg[me] + ctrl[0]);
    void *my_done = (void *)(uintptr_t)(g->seg[me] + ctrl[1]);
    char *my_area = (char *)(uintptr_t)(g->seg[me] + data_off);
    int st = TC_STATUS_OK;
    size_t total_recv = 0;
    for (int q = 0; q < n; q++) total_recv += rbytes[q];
    /* a receive buffer larger than the cache is written around it */
    void (*copy_out)(void *, const void *, size_t) = total_recv >= ((size_t)16 << 20) ? tc_copy_stream : tc_copy;
    /* stream_in: my slots are written around the cache (non-temporal stores), so the peer
     * reads them from memory instead of from my core's cache. Where the two cores sit far
     * apart (separate L3s: a VM's vCPUs on different CCXs) a line handed over through the
     * cache costs ~3x a line from memory; close together it is the other way round. The
     * caller measures both (comms/plan/select.py Measured). */
    void (*copy_in)(void *, const void *, size_t) = stream_in ? tc_copy_stream : tc_copy;
    /* my own block is copied while waiting for the first round's peer (below), not before:
     * the peer can start reading my first chunk while I do it */
    int self_copied = sbytes[me] == 0 || recv + rdispl[me] == send + sdispl[me];
    for (int r = 1; r < n; r++) {
        const int dst = paired ? pair_partner(me, r - 1, n) : (me + r) % n;
        const int src = paired ? dst : (me - r + n) % n;
        /* dst reads my slots this round: watch its DONE; I read src's slots: watch its POSTED */
        memset(one, 0, sizeof(uint64_t *) * (size_t)n);
        memset(one2, 0, sizeof(uint64_t *) * (size_t)n);
        one[dst] = (uint64_t *)(uintptr_t)(g->seg[dst] + ctrl[1]);
        one2[src] = (uint64_t *)(uintptr_t)(g->seg[src] + ctrl[0]);
        tc_waitset wdone = {n, one, aborts, waiters, g->pids, g->timeout_s};
        tc_waitset wposted = {n, one2, aborts, waiters, g->pids, g->timeout_s};
        const char *src_area = (const char *)(uintptr_t)(g->seg[src] + data_off);
        if (r > 1) {
            /* last round's reader must have emptied my slots before I refill them */
            const int prev = paired ? pair_partner(me, r - 2, n) : (me + r - 1) % n;
            uint64_t last = (sbytes[prev] + chunk - 1) / chunk;
            if (last) {
                memset(prevd, 0, sizeof(uint64_t *) * (size_t)n);
                prevd[prev] = (uint64_t *)(uintptr_t)(g->seg[prev] + ctrl[1]);
                tc_waitset wprev = {n, prevd, aborts, waiters, g->pids, g->timeout_s};
                if ((st = tc_wait_all(&wprev, TAG3(op_id, r - 1, last), idx_out)) != TC_STATUS_OK) goto done;
            }
        }
        const size_t ns = (sbytes[dst] + chunk - 1) / chunk, nr = (rbytes[src] + chunk - 1) / chunk;
        size_t js = 0, jr = 0;
        while (js < ns || jr < nr) {
            int moved = 0;
            if (js < ns && (js < (size_t)num_slots || tc_all_ge(&wdone, TAG3(op_id, r, js - num_slots + 1)))) {
                size_t lo = js * chunk, m = sbytes[dst] - lo < chunk ? sbytes[dst] - lo : chunk;
                copy_in(my_area + (js % (size_t)num_slots) * chunk, send + sdispl[dst] + lo, m);
                tc_post(my_posted, TAG3(op_id, r, js + 1), waiters[me]);
                js++;
                moved = 1;
            }
            if (jr < nr && (!paired || jr < js || js == ns) &&
                tc_all_ge(&wposted, TAG3(op_id, r, jr + 1))) {
                size_t lo = jr * chunk, m = rbytes[src] - lo < chunk ? rbytes[src] - lo : chunk;
                copy_out(recv + rdispl[src] + lo, src_area + (jr % (size_t)num_slots) * chunk, m);
                tc_post(my_done, TAG3(op_id, r, jr + 1), waiters[me]);
                jr++;
                moved = 1;
            }
            if (moved) continue;
            if (!self_copied) {
                tc_copy(recv + rdispl[me], send + sdispl[me], sbytes[me]);
                self_copied = 1;
                continue;
            }
            if (jr < nr && (!paired || jr < js || js == ns))
                st = tc_wait_all(&wposted, TAG3(op_id, r, jr + 1), idx_out);
            else
                st = tc_wait_all(&wdone, TAG3(op_id, r, js - num_slots + 1), idx_out);
            if (st != TC_STATUS_OK) goto done;
        }
    }
    if (!self_copied) tc_copy(recv + rdispl[me], send + sdispl[me], sbytes[me]);
done:
    free(mem);
    return st;
}

/* Direct all-to-all, even split, one call (comms/algorithms/host/direct.py): after arrival every
 * rank reads its block out of each peer's send buffer (its address is in the peer's header,
 * word 8), posts DONE, copies its own block while the peers finish, then waits for the
 * DONE of everyone who reads its buffer. via_cma: process_vm_readv (processes), else memcpy
 * (threads of one process). */
int tc_alltoall_direct(const tc_group *g, const uint64_t ctrl[4], uint64_t header_off, uint64_t op_id,
                       const char *send, char *recv, size_t block, int via_cma, int *idx_out) {
    const int n = g->n, me = g->rank;
    if (block == 0 || n == 1) {
        tc_copy(recv + (size_t)me * block, send + (size_t)me * block, block);
        return TC_STATUS_OK;
    }
    uint64_t **mem = (uint64_t **)calloc((size_t)(3 * n), sizeof(uint64_t *));
    if (!mem) return TC_STATUS_NO_MEMORY;
    uint64_t **aborts = mem, **waiters = mem + n, **done = mem + 2 * n;
    for (int q = 0; q < n; q++) {
        aborts[q] = q == me ? NULL : (uint64_t *)(uintptr_t)(g->seg[q] + ctrl[2]);
        waiters[q] = (uint64_t *)(uintptr_t)(g->seg[q] + ctrl[3]);
        done[q] = q == me ? NULL : (uint64_t *)(uintptr_t)(g->seg[q] + ctrl[1]);
    }
    int st = TC_STATUS_OK;
    for (int r = 1; r < n; r++) {
        const int q = (me + r) % n;
        const int64_t *hq = (const int64_t *)(uintptr_t)(g->seg[q] + header_off);
        const uint64_t their = (uint64_t)hq[8] + (uint64_t)me * block;
        char *mine = recv + (size_t)q * block;
        if (!via_cma) {
            tc_copy(mine, (const char *)(uintptr_t)their, block);
        } else {
            int err = tc_cma_read(g->pids[q], mine, their, block);
            if (err) {
                *idx_out = q;
                st = TC_STATUS_READ_FAILED - err; /* the caller reads errno TC_STATUS_READ_FAILED - st */
                goto done;
            }
        }
    }
    tc_post((void *)(uintptr_t)(g->seg[me] + ctrl[1]), ((uint64_t)op_id << 32) | 1, waiters[me]);
    tc_copy(recv + (size_t)me * block, send + (size_t)me * block, block);
    tc_waitset ws = {n, done, aborts, waiters, g->pids, g->timeout_s};
    st = tc_wait_all(&ws, ((uint64_t)op_id << 32) | 1, idx_out);
done:
    free(mem);
    return st;
}

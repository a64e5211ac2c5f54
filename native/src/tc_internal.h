/* Internal declarations shared by the C files of the extension (not part of the ABI). */
#ifndef TC_INTERNAL_H
#define TC_INTERNAL_H
#include <stdint.h>
#include "topocomm.h"

/* What the waits, arrivals and transfers return: the same names and numbers as
 * comms/core/status.py Status (tests/unit/test_status.py checks they agree; module.c
 * exposes them as comms.kernels._native.STATUS). */
enum tc_status {
    TC_STATUS_READ_FAILED = -2,     /* a direct read failed: st <= this carries errno READ_FAILED - st */
    TC_STATUS_NO_MEMORY = -1,       /* an allocation failed (the bindings raise MemoryError) */
    TC_STATUS_OK = 0,               /* done */
    TC_STATUS_TIMEOUT = 1,          /* a peer did not respond within the timeout */
    TC_STATUS_ABORTED = 2,          /* a peer set its abort flag */
    TC_STATUS_DEAD = 3,             /* a peer's process is gone */
    TC_STATUS_MISMATCH = 4,         /* arrival headers or a TCP frame header disagree */
    TC_STATUS_OTHER_ALGORITHM = 5,  /* even all-to-all: rank 0 proposed an algorithm the call does not run */
    TC_STATUS_CLOSED = 6,           /* a TCP peer closed or reset its socket */
    TC_STATUS_ERRNO = 7,            /* a socket call failed (errno returned with it) */
    TC_STATUS_INTERRUPTED = 9       /* SIGINT arrived during a wait (module.c check_signals) */
};

/* The even all-to-all's algorithms by the number a rank proposes in its arrival header:
 * comms/core/status.py AllToAllAlgorithm (comms.kernels._native.A2A_ALGORITHMS). */
enum tc_a2a_algorithm {
    TC_A2A_PAIRWISE = 0,            /* pairwise rounds through the slots */
    TC_A2A_DIRECT = 1,              /* reads from the peers' buffers */
    TC_A2A_STAGED = 2,              /* through the data areas (Python only) */
    TC_A2A_PAIRWISE_STREAMED = 3,   /* pairwise rounds, streamed slot writes */
    TC_A2A_PAIRED = 4               /* pairwise rounds in pairs (n even): in place without a copy */
};

/* tc_alltoall_pairwise flags: streamed slot writes; paired rounds (n even) */
#define TC_A2A_FLAG_STREAM_IN 1
#define TC_A2A_FLAG_PAIRED 2

typedef struct {
    int n;
    uint64_t **addrs;     /* counters to wait on (NULL = skip) */
    uint64_t **aborts;    /* peers' abort flags (NULL entries = skip) */
    uint64_t **waiters;   /* owners' WAITERS words */
    const int64_t *pids;  /* pids to watch (0 = skip) */
    double timeout_s;
} tc_waitset;

void tc_post(void *addr, uint64_t value, void *waiters);
int tc_pid_alive(int64_t pid);
void tc_set_spin(double spin_s, double yield_s);
int tc_cma_read(int64_t pid, void *local, uint64_t remote, size_t nbytes);
int tc_wait_all(const tc_waitset *ws, uint64_t target, int *idx_out);
int tc_all_ge(const tc_waitset *ws, uint64_t target); /* no wait */
/* Long waits ask this every ~20-50 ms: nonzero when SIGINT arrived on the main thread
 * (module.c sets the check). */
void tc_set_interrupt_check(int (*check)(void));
int tc_interrupted(void);

/* Who arrived last at each collective, and how long the others waited for it: every
 * arrival writes its CLOCK_MONOTONIC time into its header (word TC_H_TIME), so once all have
 * arrived each rank sees the same order. Counted per collective code (1..TC_NUM_COLL-1)
 * and last rank, with the wait it caused (first arrival to last) in power-of-two
 * microsecond buckets per last rank. comms/api/host.py HostGroup.stats reads them. */
#define TC_NUM_COLL 10
#define TC_WAIT_BUCKETS 40
#define TC_H_TIME 6
typedef struct {
    uint64_t *last;           /* [TC_NUM_COLL][n] arrivals at which rank q was last */
    uint64_t *waits;          /* [n][TC_WAIT_BUCKETS] waits caused by rank q, bucket b: < 2^b us */
    uint64_t warn_ns;         /* log when a wait exceeds this (0: never) ... */
    uint64_t warned_at_ns;    /* ... at most once a second */
    int warn_rank;            /* -1, or the rank to name in the pending warning */
    uint64_t warn_wait_ns;
} tc_stats;

typedef struct {
    int rank, n;
    const uint64_t *seg;      /* segment base address per rank */
    const int64_t *pids;
    double timeout_s;
    tc_stats *stats;          /* NULL: not counted */
} tc_group;

int tc_allreduce_small(const tc_group *g, uint64_t arrived_off, uint64_t abort_off,
                       uint64_t waiters_off, uint64_t header_off, uint64_t small_off,
                       uint64_t op_id, int64_t coll, int64_t root, void *in, void *out,
                       size_t count, int dtype, int op, int avg_n, int *idx_out);

int tc_arrive(const tc_group *g, uint64_t arrived_off, uint64_t abort_off, uint64_t waiters_off,
              uint64_t header_off, uint64_t op_id, const int64_t words[9], int cmp_mask,
              uint64_t meta_off, const void *meta, size_t meta_bytes, int *idx_out);

int tc_ring_reduce(const tc_group *g, const uint64_t ctrl[5], uint64_t data_off, uint64_t op_id,
                   const char *in, char *out, size_t count, size_t block_elems, int dtype, int op,
                   size_t chunk_elems, int num_slots, size_t slot_stride, size_t block_stride,
                   const int64_t *pads, int do_gather, int avg_n, int *idx_out);
int tc_ring_once(const tc_group *g, uint64_t arrived_off, uint64_t abort_off, uint64_t waiters_off,
                 uint64_t header_off, const uint64_t ctrl[5], uint64_t data_off, uint64_t op_id,
                 int64_t coll, const char *in, char *out, size_t count, size_t block_elems,
                 int dtype, int op, size_t chunk_elems, int num_slots, size_t slot_stride,
                 size_t block_stride, int do_gather, int avg_n, int *idx_out);
int tc_alltoall_pairwise(const tc_group *g, const uint64_t ctrl[4], uint64_t data_off, uint64_t op_id,
                         const char *send, char *recv, const uint64_t *sdispl, const uint64_t *sbytes,
                         const uint64_t *rdispl, const uint64_t *rbytes, size_t chunk, int num_slots,
                         int flags, int *idx_out);
int tc_alltoall_direct(const tc_group *g, const uint64_t ctrl[4], uint64_t header_off, uint64_t op_id,
                       const char *send, char *recv, size_t block, int via_cma, int *idx_out);
#endif

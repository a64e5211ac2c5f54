/* Internal declarations shared by the C files of the extension (not part of the ABI). */
#ifndef TC_INTERNAL_H
#define TC_INTERNAL_H
#include <stdint.h>
#include "topocomm.h"

enum { TC_OK = 0, TC_TIMEOUT = 1, TC_ABORTED = 2, TC_DEAD = 3, TC_MISMATCH = 4 };
/* a wait gave up because SIGINT arrived (Ctrl-C; native/src/module.c check_signals) */
#define TC_INTERRUPTED 9

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

typedef struct {
    int rank, n;
    const uint64_t *seg;      /* segment base address per rank */
    const int64_t *pids;
    double timeout_s;
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
int tc_alltoall_pairwise(const tc_group *g, const uint64_t ctrl[4], uint64_t data_off, uint64_t op_id,
                         const char *send, char *recv, const uint64_t *sdispl, const uint64_t *sbytes,
                         const uint64_t *rdispl, const uint64_t *rbytes, size_t chunk, int num_slots,
                         int stream_in, int *idx_out);
int tc_alltoall_direct(const tc_group *g, const uint64_t ctrl[4], uint64_t header_off, uint64_t op_id,
                       const char *send, char *recv, size_t block, int via_cma, int *idx_out);
#endif

/* Counter synchronization between ranks through shared memory.
 *
 * A counter is a monotonic uint64 in its owner's segment. Waiting spins briefly, then
 * yields, then sleeps on a futex (the low 32 bits of the counter) with a short timeout,
 * so that with more ranks than cores a waiting rank leaves the core to the rank it waits
 * for. Posters wake sleepers only when the owner's WAITERS word says someone sleeps.
 * While sleeping, peers' abort flags and liveness are checked every ~20 ms, and so is
 * SIGINT (Ctrl-C ends the wait there, not at the timeout).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "tc_internal.h"

static long futex_op(void *addr, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* How long a waiter spins before yielding and then sleeping. Long enough to catch a peer
 * running on another core (a round trip is well under a microsecond), short enough not to
 * steal the core from a peer that shares it (more ranks than cores): set per process by
 * the Communicator (tc_set_spin) from ranks-per-host vs usable cores. */
static double g_spin_s = 20e-6;
static double g_yield_s = 200e-6;

void tc_set_spin(double spin_s, double yield_s) {
    g_spin_s = spin_s;
    g_yield_s = yield_s;
}

/* Sleepers do not futex-wait on the 64-bit counters themselves: the futex compares only
 * their low 32 bits, which repeat from one op to the next ((op << 32) | step), so a post
 * could land unseen and cost a full sleep slice. Every post bumps the owner's 32-bit wake
 * sequence (the cache line after WAITERS, comms/core/layout.py WAKE_SEQ) and sleepers wait on
 * that: an eventcount, no lost wake-ups. */
#define WAKE_SEQ_OF(waiters) ((uint32_t *)((char *)(waiters) + 64))

void tc_post(void *addr, uint64_t value, void *waiters) {
    __atomic_store_n((uint64_t *)addr, value, __ATOMIC_SEQ_CST);
    if (!waiters) return;
    __atomic_add_fetch(WAKE_SEQ_OF(waiters), 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n((uint64_t *)waiters, __ATOMIC_SEQ_CST))
        futex_op(WAKE_SEQ_OF(waiters), FUTEX_WAKE, INT_MAX, NULL);
}

int tc_pid_alive(int64_t pid) {
    if (pid <= 0 || pid == (int64_t)getpid()) return 1;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) return 0;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p || p[1] == 0 || p[2] == 0) return 1;
    return !(p[2] == 'Z' || p[2] == 'X');
}

int tc_all_ge(const tc_waitset *ws, uint64_t target) {
    for (int i = 0; i < ws->n; i++)
        if (ws->addrs[i] && __atomic_load_n(ws->addrs[i], __ATOMIC_ACQUIRE) < target) return 0;
    return 1;
}

static int (*g_interrupt_check)(void) = NULL;

void tc_set_interrupt_check(int (*check)(void)) { g_interrupt_check = check; }

int tc_interrupted(void) { return g_interrupt_check && g_interrupt_check(); }

int tc_wait_all(const tc_waitset *ws, uint64_t target, int *idx_out) {
    const int n = ws->n;
    const double start = now_s();
    double next_check = start + 0.02;
    const double deadline = start + ws->timeout_s;
    long iter = 0;
    int phase = 0; /* 0 spin, 1 yield, 2 sleep */
    double t_phase = start + g_spin_s;
    for (;;) {
        int pending = -1;
        for (int i = 0; i < n; i++) {
            if (!ws->addrs[i]) continue;
            if (__atomic_load_n(ws->addrs[i], __ATOMIC_ACQUIRE) < target) { pending = i; break; }
        }
        if (pending < 0) return TC_STATUS_OK;
        iter++;
        if (phase == 0) {
            cpu_relax();
            if ((iter & 31) == 0 && now_s() >= t_phase) { phase = 1; t_phase = now_s() + g_yield_s; }
            continue;
        }
        if (phase == 1) {
            sched_yield();
            if ((iter & 7) == 0 && now_s() >= t_phase) phase = 2;
            continue;
        }
        /* sleep on the lagging counter, at most 1 ms at a time */
        uint64_t *addr = ws->addrs[pending];
        uint64_t *w = ws->waiters ? ws->waiters[pending] : NULL;
        struct timespec ts = {0, 1000000};
        if (w) {
            __atomic_add_fetch(w, 1, __ATOMIC_SEQ_CST);
            uint32_t seq = __atomic_load_n(WAKE_SEQ_OF(w), __ATOMIC_SEQ_CST);
            if (__atomic_load_n(addr, __ATOMIC_SEQ_CST) < target)
                futex_op(WAKE_SEQ_OF(w), FUTEX_WAIT, seq, &ts);
            __atomic_sub_fetch(w, 1, __ATOMIC_SEQ_CST);
        } else {
            uint64_t v = __atomic_load_n(addr, __ATOMIC_SEQ_CST);
            if (v < target) nanosleep(&ts, NULL);
        }
        double t = now_s();
        if (t >= next_check) {
            next_check = t + 0.02;
            for (int i = 0; i < n; i++) {
                if (!ws->addrs[i]) continue;
                if (__atomic_load_n(ws->addrs[i], __ATOMIC_ACQUIRE) >= target) continue;
                if (ws->aborts && ws->aborts[i] && __atomic_load_n(ws->aborts[i], __ATOMIC_ACQUIRE)) {
                    *idx_out = i; return TC_STATUS_ABORTED;
                }
                if (ws->pids && !tc_pid_alive(ws->pids[i])) { *idx_out = i; return TC_STATUS_DEAD; }
            }
            if (t >= deadline) { *idx_out = pending; return TC_STATUS_TIMEOUT; }
            if (tc_interrupted()) { *idx_out = pending; return TC_STATUS_INTERRUPTED; }
        }
    }
}

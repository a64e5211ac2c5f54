/* Cross-memory attach: copy straight out of a peer process's buffer (process_vm_readv),
 * one copy instead of two through a shared staging area. Needs ptrace permission on the
 * peer (same user; Yama scope 0, or CAP_SYS_PTRACE); groups probe it at creation and fall
 * back to staged copies when the kernel says no. */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>

#include "tc_internal.h"

#define CMA_PIECE (1u << 20) /* per syscall: pages are pinned piecewise, cache-friendly */

int tc_cma_read(int64_t pid, void *local, uint64_t remote, size_t nbytes) {
    char *dst = (char *)local;
    size_t done = 0;
    while (done < nbytes) {
        size_t m = nbytes - done < CMA_PIECE ? nbytes - done : CMA_PIECE;
        struct iovec l = {dst + done, m};
        struct iovec r = {(void *)(uintptr_t)(remote + done), m};
        ssize_t got = process_vm_readv((pid_t)pid, &l, 1, &r, 1, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            return errno ? errno : EIO;
        }
        if (got == 0) return EFAULT;
        done += (size_t)got;
    }
    return 0;
}

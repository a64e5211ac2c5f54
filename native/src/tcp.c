/* Socket progress engine for transfers between hosts (comms/transport/tcp.py).
 *
 * One call moves a whole list of framed transfers over already-connected TCP sockets with
 * the GIL released: every send and receive of an algorithm step progresses at once under
 * one poll() loop, so a rank talking to several peers keeps every link busy. Transfers on
 * one socket and direction run in list order (the byte stream is ordered).
 *
 * Frame: a 24-byte header {magic, flags, tag, nbytes} then the payload. The receiver checks
 * the header against what it expects (tag = op id and step, nbytes), so ranks that disagree
 * get an error instead of reading each other's bytes as data. Python twin: comms/kernels/reference_tcp.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "tc_internal.h"

#define TC_FRAME_MAGIC 0x54434d31u /* "TCM1" */
#define HDR_BYTES 24
#define MAX_OPS 65536
#define SLICE_MS 50 /* how often a blocked loop looks at the deadline and the abort flags */

/* statuses: enum tc_status in tc_internal.h */

typedef struct {
    int fd, is_recv;
    char *addr;
    uint64_t nbytes, tag;
    uint64_t done;          /* bytes of header + payload moved so far */
    unsigned char hdr[HDR_BYTES];
} xop;

typedef struct {
    int fd;
    int send_next, recv_next; /* index into the per-fd op order, -1 when none left */
} xfd;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void put_hdr(unsigned char *h, uint64_t tag, uint64_t nbytes) {
    uint32_t magic = TC_FRAME_MAGIC, flags = 0;
    memcpy(h, &magic, 4);
    memcpy(h + 4, &flags, 4);
    memcpy(h + 8, &tag, 8);
    memcpy(h + 16, &nbytes, 8);
}

/* next op index after `i` on the same fd and direction, or -1 */
static int next_same(const xop *ops, int n, int i) {
    for (int j = i + 1; j < n; j++)
        if (ops[j].fd == ops[i].fd && ops[j].is_recv == ops[i].is_recv) return j;
    return -1;
}

static int first_same(const xop *ops, int n, int fd, int is_recv) {
    for (int j = 0; j < n; j++)
        if (ops[j].fd == fd && ops[j].is_recv == is_recv) return j;
    return -1;
}

/* Move bytes of op o until it is done or the socket would block.
 * Returns 1 when done, 0 when blocked, or -(status) on failure. */
static int progress(xop *o, int *err_out, uint64_t *got) {
    const uint64_t total = HDR_BYTES + o->nbytes;
    while (o->done < total) {
        char *p;
        size_t len;
        if (o->done < HDR_BYTES) {
            p = (char *)o->hdr + o->done;
            len = HDR_BYTES - o->done;
            /* send header and payload in one syscall when we can */
        } else {
            p = o->addr + (o->done - HDR_BYTES);
            len = (size_t)(total - o->done);
        }
        ssize_t k;
        if (o->is_recv) {
            k = recv(o->fd, p, len, MSG_DONTWAIT);
            if (k == 0) return -TC_STATUS_CLOSED;
        } else if (o->done < HDR_BYTES && o->nbytes) {
            struct iovec iov[2] = {{p, len}, {o->addr, (size_t)o->nbytes}};
            struct msghdr mh;
            memset(&mh, 0, sizeof mh);
            mh.msg_iov = iov;
            mh.msg_iovlen = 2;
            k = sendmsg(o->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        } else {
            k = send(o->fd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
        if (k < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            if (errno == EINTR) continue;
            *err_out = errno;
            return (errno == ECONNRESET || errno == EPIPE || errno == ENOTCONN) ? -TC_STATUS_CLOSED : -TC_STATUS_ERRNO;
        }
        uint64_t before = o->done;
        o->done += (uint64_t)k;
        if (o->is_recv && before < HDR_BYTES && o->done >= HDR_BYTES) {
            uint32_t magic;
            uint64_t tag, nb;
            memcpy(&magic, o->hdr, 4);
            memcpy(&tag, o->hdr + 8, 8);
            memcpy(&nb, o->hdr + 16, 8);
            got[0] = tag;
            got[1] = nb;
            /* checked before any payload byte lands in the user's buffer; a bad magic is
             * told apart (errno EPROTO) from a well-formed frame of another tag or size */
            if (magic != TC_FRAME_MAGIC) { *err_out = EPROTO; return -TC_STATUS_MISMATCH; }
            if (tag != o->tag || nb != o->nbytes) return -TC_STATUS_MISMATCH;
        }
    }
    return 1;
}

/* Runs every op to completion. Returns a status; *idx_out = the failing op. */
static int exchange(xop *ops, int n, double timeout_s, uint64_t *const *aborts, int num_aborts,
                    int *idx_out, int *err_out, uint64_t *got) {
    xfd *fds = (xfd *)calloc((size_t)(n ? n : 1), sizeof(xfd));
    struct pollfd *pfd = (struct pollfd *)calloc((size_t)(n ? n : 1), sizeof(struct pollfd));
    int *pmap = (int *)calloc((size_t)(n ? n : 1), sizeof(int));
    if (!fds || !pfd || !pmap) { free(fds); free(pfd); free(pmap); *err_out = ENOMEM; return TC_STATUS_ERRNO; }
    int nf = 0;
    for (int i = 0; i < n; i++) {
        int k = 0;
        while (k < nf && fds[k].fd != ops[i].fd) k++;
        if (k == nf) {
            fds[nf].fd = ops[i].fd;
            fds[nf].send_next = first_same(ops, n, ops[i].fd, 0);
            fds[nf].recv_next = first_same(ops, n, ops[i].fd, 1);
            nf++;
        }
        if (!ops[i].is_recv) put_hdr(ops[i].hdr, ops[i].tag, ops[i].nbytes);
    }
    int remaining = n, st = TC_STATUS_OK;
    const double deadline = now_s() + timeout_s;
    double next_signal_check = now_s() + SLICE_MS * 1e-3;
    while (remaining > 0) {
        int moved = 0;
        /* move what can move without waiting */
        for (int k = 0; k < nf; k++) {
            for (int dir = 0; dir < 2; dir++) {
                int *cur = dir ? &fds[k].recv_next : &fds[k].send_next;
                while (*cur >= 0) {
                    int r = progress(&ops[*cur], err_out, got);
                    if (r < 0) { *idx_out = *cur; st = -r; goto out; }
                    if (r == 0) break;
                    remaining--;
                    moved = 1;
                    *cur = next_same(ops, n, *cur);
                }
            }
        }
        if (remaining == 0) break;
        if (moved) continue;
        for (int a = 0; a < num_aborts; a++)
            if (aborts[a] && __atomic_load_n(aborts[a], __ATOMIC_ACQUIRE)) {
                *idx_out = a;
                st = TC_STATUS_ABORTED;
                goto out;
            }
        const double t = now_s();
        if (t >= next_signal_check) {
            next_signal_check = t + SLICE_MS * 1e-3;
            if (tc_interrupted()) { *idx_out = -1; st = TC_STATUS_INTERRUPTED; goto out; }
        }
        double left = deadline - t;
        if (left <= 0) {
            for (int k = 0; k < nf; k++) {
                int cur = fds[k].recv_next >= 0 ? fds[k].recv_next : fds[k].send_next;
                if (cur >= 0) { *idx_out = cur; break; }
            }
            st = TC_STATUS_TIMEOUT;
            goto out;
        }
        int np = 0;
        for (int k = 0; k < nf; k++) {
            short ev = (short)((fds[k].send_next >= 0 ? POLLOUT : 0) | (fds[k].recv_next >= 0 ? POLLIN : 0));
            if (!ev) continue;
            pfd[np].fd = fds[k].fd;
            pfd[np].events = ev;
            pfd[np].revents = 0;
            pmap[np++] = k;
        }
        int ms = left * 1000.0 < SLICE_MS ? (int)(left * 1000.0) + 1 : SLICE_MS;
        int pr = poll(pfd, (nfds_t)np, ms);
        if (pr < 0 && errno != EINTR) { *err_out = errno; *idx_out = -1; st = TC_STATUS_ERRNO; goto out; }
        /* POLLHUP / POLLERR: the next progress() call reports what happened */
    }
out:
    free(fds); free(pfd); free(pmap);
    return st;
}

static PyObject *py_tcp_exchange(PyObject *self, PyObject *args) {
    PyObject *a_ops, *a_aborts;
    double timeout_s;
    if (!PyArg_ParseTuple(args, "OdO", &a_ops, &timeout_s, &a_aborts)) return NULL;
    PyObject *fast = PySequence_Fast(a_ops, "ops: a sequence of (fd, is_recv, addr, nbytes, tag)");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject *fab = PySequence_Fast(a_aborts, "abort_addrs: a sequence of addresses");
    if (!fab) { Py_DECREF(fast); return NULL; }
    Py_ssize_t na = PySequence_Fast_GET_SIZE(fab);
    if (n > MAX_OPS) {
        Py_DECREF(fast); Py_DECREF(fab);
        return PyErr_Format(PyExc_ValueError, "ops: at most %d per call", MAX_OPS);
    }
    xop *ops = (xop *)calloc((size_t)(n ? n : 1), sizeof(xop));
    uint64_t **aborts = (uint64_t **)calloc((size_t)(na ? na : 1), sizeof(uint64_t *));
    PyObject *res = NULL;
    if (!ops || !aborts) { PyErr_NoMemory(); goto out; }
    for (Py_ssize_t i = 0; i < n; i++) {
        int fd, is_recv;
        unsigned long long addr, nbytes, tag;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iiKKK;ops: (fd, is_recv, addr, nbytes, tag)",
                              &fd, &is_recv, &addr, &nbytes, &tag))
            goto out;
        ops[i].fd = fd;
        ops[i].is_recv = is_recv != 0;
        ops[i].addr = (char *)(uintptr_t)addr;
        ops[i].nbytes = nbytes;
        ops[i].tag = tag;
    }
    for (Py_ssize_t a = 0; a < na; a++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fab, a));
        if (PyErr_Occurred()) goto out;
        aborts[a] = (uint64_t *)(uintptr_t)v;
    }
    {
        int idx = -1, err = 0, st;
        uint64_t got[2] = {0, 0};
        Py_BEGIN_ALLOW_THREADS
        st = exchange(ops, (int)n, timeout_s, aborts, (int)na, &idx, &err, got);
        Py_END_ALLOW_THREADS
        if (st == TC_STATUS_INTERRUPTED && PyErr_CheckSignals() < 0) goto out;  /* see module.c */
        res = Py_BuildValue("(iiiKK)", st, idx, err, (unsigned long long)got[0], (unsigned long long)got[1]);
    }
out:
    free(ops);
    free(aborts);
    Py_DECREF(fast);
    Py_DECREF(fab);
    return res;
}

PyMethodDef tc_tcp_methods[] = {
    {"tcp_exchange", py_tcp_exchange, METH_VARARGS,
     "tcp_exchange(ops, timeout_s, abort_addrs) -> (status, op_idx, errno, got_tag, got_nbytes);\n"
     "MISMATCH with errno EPROTO: the bytes received are not a frame (bad magic)\n"
     "ops: (fd, is_recv, addr, nbytes, tag) framed transfers, all progressed at once"},
    {NULL, NULL, 0, NULL}};

"""Shared-memory transport for ranks on one host.

Each rank creates one POSIX shared-memory segment (/dev/shm, mode 0600, a name with 128
random bits), publishes the name through the store, maps every peer's segment, and, once
every rank reports it has mapped all of them, unlinks its own name. From then on nothing
is left in /dev/shm even if a rank is SIGKILLed: the memory lives only as long as some
process maps it. Names carry the creator's pid, so a segment orphaned by a crash during
set-up is removed by the next group created on the host (sweep_orphans).

Direct reads (process_vm_readv of a peer's buffer, "cma") are probed at creation. Under
Yama ptrace_scope 1 (Ubuntu's default) a process may read only its descendants, so ranks
started side by side (torchrun, mpiexec, Slurm) are refused; each rank then declares that
any process may read it (prctl PR_SET_PTRACER_ANY, what UCX and tensorpipe do for the same
reason) before the probe, and takes that back when its last group closes. TOPOCOMM_CMA=0
turns direct reads off and leaves Yama's rule alone: the group uses staged copies through
shared memory only.
"""
from __future__ import annotations

import mmap
import os
import secrets
import threading

import numpy as np

from comms.core.errors import CommError
from comms.core.store import everyones
from comms.transport.base import Transport
from topology import env as settings

SHM_DIR = "/dev/shm"
PREFIX = "topocomm-"
YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"
PR_SET_PTRACER = 0x59616D61            # "Yama"
PR_SET_PTRACER_ANY = (1 << 64) - 1     # (unsigned long) -1


def cma_wanted(env=None) -> bool:
    """TOPOCOMM_CMA: "auto" (default) probes direct reads, "0" / "off" never uses them."""
    return settings.get("TOPOCOMM_CMA", env) == "auto"


def allow_peer_reads(scope_path=YAMA_SCOPE, prctl=None) -> bool:
    """Let same-user processes read this one's memory where Yama's ptrace_scope 1 would
    refuse them (they are not our ancestors); True when it declared so. Scope 0 (or no
    Yama): nothing to do. Scopes 2-3 need CAP_SYS_PTRACE, which a prctl cannot grant."""
    try:
        with open(scope_path) as f:
            scope = f.read().strip()
    except OSError:
        return False
    if scope != "1":
        return False
    return (prctl or _libc_prctl())(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0) == 0


_readers_lock = threading.Lock()
_groups_declared = 0  # open groups of this process that declared PR_SET_PTRACER_ANY


def _libc_prctl():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    return libc.prctl


def hold_peer_reads(scope_path=YAMA_SCOPE, prctl=None) -> bool:
    """allow_peer_reads() for one group; True when the group must release_peer_reads()."""
    global _groups_declared
    with _readers_lock:
        if not allow_peer_reads(scope_path, prctl):
            return False
        _groups_declared += 1
        return True


def release_peer_reads(prctl=None) -> None:
    """A group that declared is closing: the last one restores Yama's rule (no tracer)."""
    global _groups_declared
    with _readers_lock:
        _groups_declared -= 1
        if _groups_declared == 0:
            (prctl or _libc_prctl())(PR_SET_PTRACER, 0, 0, 0, 0)


def sweep_orphans() -> int:
    """Remove topocomm segments whose creating process is gone; returns how many."""
    from comms.kernels.reference import pid_alive
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except OSError:
                pass
    return removed


class ShmTransport(Transport):
    """direct: "cma" when every rank can read every peer's memory with process_vm_readv
    (one copy for all-to-all, gathers, broadcast), else None (staged copies)."""
    name = "shm"

    def __init__(self, rank, size, store, prefix, layout):
        sweep_orphans()
        use_cma = cma_wanted()
        # before the peers probe us (after the "mapped" step below); released by close()
        self._holds_peer_reads = use_cma and hold_peer_reads()
        self._maps, self._views, self._own_path = [], [], None
        try:
            self._connect(rank, size, store, prefix, layout, use_cma)
        except BaseException:
            self.close()
            raise

    def _connect(self, rank, size, store, prefix, layout, use_cma):
        nbytes = layout.total_bytes
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        self._own_path = path
        try:
            os.ftruncate(fd, nbytes)
            own = self._map(fd, nbytes)
        finally:
            os.close(fd)
        try:
            store.set(f"{prefix}/shm/{rank}", f"{name}:{os.getpid()}:{own}".encode())
            self.seg_bases, self.pids, remote_bases = [], [], []
            for q in range(size):
                if q == rank:
                    self.seg_bases.append(own)
                    self.pids.append(os.getpid())
                    remote_bases.append(own)
                    continue
                peer_name, peer_pid, peer_base = store.get(f"{prefix}/shm/{q}").decode().split(":")
                remote_bases.append(int(peer_base))
                try:
                    fd = os.open(os.path.join(SHM_DIR, peer_name), os.O_RDWR)
                except FileNotFoundError:   # it gave up (a peer died) and unlinked it
                    raise CommError(f"rank {q} left the group's creation: its shared segment "
                                    f"{peer_name} is gone") from None
                try:
                    self.seg_bases.append(self._map(fd, nbytes))
                finally:
                    os.close(fd)
                self.pids.append(int(peer_pid))
            # every rank must have mapped every segment before we drop our name
            everyones(store, f"{prefix}/shm/mapped", rank, size)
            self.direct = self._probe_cma(rank, size, store, prefix, remote_bases, use_cma)
        finally:
            self._unlink_own()

    def _probe_cma(self, rank, size, store, prefix, remote_bases, use_cma=True):
        """Can we read peers' memory directly (process_vm_readv)? All ranks must agree."""
        import ctypes
        from comms.kernels import native
        nat = native.impl()
        ok = use_cma
        probe = ctypes.c_uint64(0)
        for q in range(size if ok else 0):
            if q == rank:
                continue
            # any word of the peer's segment, at the address it has in the peer's process
            err = nat.cma_read_many([self.pids[q]], [ctypes.addressof(probe)],
                                    [remote_bases[q] + 4096 - 8], [8])
            if err:
                ok = False
                break
        agreed = all(v == b"1" for v in everyones(store, f"{prefix}/shm/cma", rank, size,
                                                  b"1" if ok else b"0"))
        return "cma" if agreed else None

    def _map(self, fd, nbytes):
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        m = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        view = np.frombuffer(m, dtype=np.uint8)
        self._maps.append(m)
        self._views.append(view)
        return view.ctypes.data

    def _unlink_own(self):
        if self._own_path:
            try:
                os.unlink(self._own_path)
            except FileNotFoundError:
                pass
            self._own_path = None

    def close(self):
        if self._holds_peer_reads:
            self._holds_peer_reads = False
            release_peer_reads()
        self._unlink_own()
        self._views.clear()
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a numpy view still alive elsewhere: the mapping goes with the process
        self._maps.clear()


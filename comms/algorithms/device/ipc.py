"""Collectives on device (CUDA) buffers of one host by CUDA IPC: every rank's buffers are
read and written in place by the ranks' kernels (comms/transport/cuda_ipc.py maps them,
comms/kernels/cuda.py computes); the bytes never leave device memory.

one call, every collective:
    1. on this rank's stream (the buffer's: the caller's current stream), after the work
       already queued there: record this rank's "ready" event.
    2. exchange one record per rank through the host group (an all-gather in shared
       memory): the arguments (checked to agree, as any collective's are), the memory
       handles and offsets of send and recv, the GPU, the events' handles, the split
       counts. Every rank then derives the same plan from the same records.
    3. the ranks with work (the plan's tasks) make their stream wait on every peer's ready
       event, queue their kernels and copies, and record their "done" event.
    4. a host arrival (every rank has queued its work and recorded done), then every rank
       makes its stream wait on the done events of the ranks that worked.
    The caller's stream thus holds the whole collective in order: the call returns as soon
    as the work is queued, and the result is there for whatever the caller queues next (the
    CPU never waits for the GPU). No kernel waits on memory another process writes.

who works (placed by topology):
    one GPU (every rank's buffers on the same GPU, by UUID): one rank queues everything
        (rank 0, or the root): all-reduce is ONE kernel that reads every input once and
        writes every output once, the HBM limit; copies are cudaMemcpyAsync calls. Splitting
        the work across the processes would gain no bandwidth (one HBM) and add context
        switches (their kernels are time-sliced unless MPS runs). Under MPS (every rank a
        client) each rank queues the copies into its own buffer, which then run at once;
        reductions stay one kernel.
    several GPUs: each rank reduces its block of the elements from every input and writes
        it into every output (all-reduce, reduce), reduces its own block (reduce-scatter), or
        pulls what lands in its own buffer (the copies), over peer access.
bytes: each input read once and each output written once, by one kernel or copy.
in place: an all-reduce's kernel reads element i of every input before it writes element i
    of any output, so send = recv is safe; so are the in-place forms of all-gather, gather,
    scatter and reduce-scatter (this rank's block of the larger buffer). Any other overlap
    of send and recv (an in-place all-to-all) first copies send into a device scratch
    buffer of the group.
applies: one host, at most comms/kernels/cuda.py MAX_SOURCES ranks, every rank able to map
    its buffers (an allocation that cannot be exported, e.g. torch's expandable segments,
    makes that call run staged on every rank: comms/algorithms/device/staged.py).
failure: a rank whose arguments disagree or whose setup fails makes every rank raise
    before data moves (step 2); a rank whose step 3 fails is flagged at step 4's arrival,
    so every rank raises instead of waiting, and later calls run staged.
repeated calls: a call whose records equal an earlier one's (the same buffers, sizes and
    arguments on every rank) reuses what step 3 prepared (addresses resolved, peers'
    handles and events opened), least recently used first out of PLAN_CACHE.
torch's fallback kernels view a peer's memory only on its own GPU: with several GPUs and
    any rank on them, the call runs staged.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections import OrderedDict

import numpy as np

from comms.core import dtypes as dt
from comms.core.buffers import Buf
from comms.core.context import COLL_CODES
from comms.core.errors import ArgumentMismatch, CommError
from comms.kernels.cuda import MAX_SOURCES
from topology.detect import gpu as gpu_detect

# record words (int64)
(R_MAGIC, R_COLL, R_COUNT, R_DTYPE, R_OP, R_ROOT, R_STATE, R_PID, R_GPU, R_SOFF, R_ROFF,
 R_SBASE, R_RBASE, R_TOKEN, R_FLAGS) = range(15)
R_SH, R_RH, R_READY, R_DONE, R_SPLITS = 16, 24, 32, 40, 48     # handles: 8 words each
_MAGIC = 0x7C1DA
OK, REJECTED, CANNOT, CANNOT_NOW = 0, 1, 2, 3     # R_STATE
_FIELDS = ((R_COLL, "collective"), (R_COUNT, "count"), (R_DTYPE, "dtype"), (R_OP, "op"),
           (R_ROOT, "root"))
_COLL_NAMES = {v: k for k, v in COLL_CODES.items()}
_REGION_ALIGN = 64          # elements: split blocks start 16-byte aligned for every dtype
PLAN_CACHE = 64             # prepared calls kept per group (a training loop repeats a few)
F_TORCH_KERNELS = 1         # R_FLAGS: this rank's kernels are the torch fallback
F_MPS = 2                   # R_FLAGS: an MPS daemon serves this rank (topology/detect/gpu.py)
# this process, with its pid (a forked child has another pid): ranks of one process use
# each other's addresses and events directly (CUDA refuses to open a process's own handles)
_TOKEN = int.from_bytes(os.urandom(7), "little")


class Task:
    """One kernel or copy of the plan. refs: (rank, "s" | "r", byte offset)."""
    __slots__ = ("kind", "outs", "ins", "count", "nbytes")

    def __init__(self, kind, outs, ins, count=0, nbytes=0):
        self.kind, self.outs, self.ins, self.count, self.nbytes = kind, outs, ins, count, nbytes

    def __repr__(self):
        return f"Task({self.kind}, outs={self.outs}, ins={self.ins}, n={self.count or self.nbytes})"


def _gpu_word(gpu_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(gpu_id.encode(), digest_size=7).digest(), "little")


def _handle_words(handle: bytes) -> np.ndarray:
    """A 64-byte handle as the 8 record words that carry it."""
    return np.frombuffer(handle.ljust(64, b"\0")[:64], np.int64)


def _overlap(a: Buf | None, b: Buf | None) -> bool:
    return a is not None and b is not None and a.nbytes > 0 and b.nbytes > 0 and \
        a.addr < b.addr + b.nbytes and b.addr < a.addr + a.nbytes


class IpcGroup:
    """Runs collectives on CUDA Bufs of one host (see the module text), with the host
    group's method names and arguments; each returns False when the call must run staged
    instead (every rank then gets False)."""

    COLLECTIVES = ("allreduce", "reduce", "reduce_scatter", "broadcast", "allgather",
                   "gather", "scatter", "all_to_all")

    def __init__(self, host, ipc, kernels, why_not: str = ""):
        """ipc, kernels: this process's (comms/transport/cuda_ipc.py, comms/kernels/cuda.py);
        None, with why_not, where this rank cannot use them: it still takes part in each
        call's exchange, and every rank then runs staged."""
        self.host, self.ipc, self.kernels = host, ipc, kernels
        self.rank, self.size = host.rank, host.size
        self.why_not = why_not if (ipc is None or kernels is None) else ""
        self.off = ""               # why no call runs here any more (the same on every rank)
        self.width = R_SPLITS + 2 * self.size
        self._rec = np.zeros(self.width, np.int64)
        self._all = np.zeros(self.size * self.width, np.int64)
        self._rec_buf = Buf(self._rec.ctypes.data, self.width, dt.I64, None)
        self._all_buf = Buf(self._all.ctypes.data, self.size * self.width, dt.I64, None)
        self._templates: dict = {}  # device -> this rank's unchanging record words
        # every rank's records (bytes) -> _prepare's result, least recently used first
        self._plans: OrderedDict = OrderedDict()
        self._plans_generation = 0
        self._events: dict = {}     # device -> (ready, ready handle, done, done handle)
        self._peer_events: dict = {}    # (device, handle bytes) -> a peer's event, opened
        self._scratch: dict = {}    # device -> (owner, addr, nbytes)
        self._retired: list = []    # scratch outgrown: kept until close (peers may read it)
        self.last = ""              # how the last call ran ("one GPU" / "several GPUs")
        self.closed = False

    @staticmethod
    def applies(host) -> bool:
        """One host (a host group, not a multi-host one) of at most MAX_SOURCES ranks."""
        return getattr(host, "hosts", None) is None and host.size <= MAX_SOURCES

    # ---- the record ---------------------------------------------------------------------
    def _device(self, b: Buf) -> int:
        return b.device if b.device is not None else self.ipc.device_of(b.addr)


    @staticmethod
    def _handle(rec, at: int) -> bytes:
        return rec[at:at + 8].tobytes()

    def _events_of(self, device: int):
        ev = self._events.get(device)
        if ev is None:
            ready, ready_h = self.ipc.new_event()
            try:
                done, done_h = self.ipc.new_event()
            except BaseException:
                self.ipc.destroy_event(ready)
                raise
            ev = self._events[device] = (ready, ready_h, done, done_h)
        return ev

    def _peer_event(self, rec, at: int, device: int) -> int:
        if self._same_process(rec):
            return self.ipc.local_event(self._handle(rec, at))
        key = (device, self._handle(rec, at))
        ev = self._peer_events.get(key)
        if ev is None:
            ev = self._peer_events[key] = self.ipc.open_event(key[1])
        return ev

    def _scratch_of(self, device: int, nbytes: int, stream: int) -> int:
        have = self._scratch.get(device)
        if have is None or have[2] < nbytes:
            if have is not None:
                self._retired.append(have)
            size = max(nbytes, 2 * have[2] if have else 0, 256)
            owner, addr = self.kernels.alloc(size, device, stream)
            have = self._scratch[device] = (owner, addr, size)
        return have[1]

    def _template(self, device):
        """The words of this rank's record that stay the same from call to call on
        `device` (None: this rank cannot map device memory)."""
        t = self._templates.get(device)
        if t is None:
            t = np.zeros(self.width, np.int64)
            t[R_MAGIC], t[R_PID], t[R_TOKEN] = _MAGIC, os.getpid(), _TOKEN
            if device is None:
                t[R_STATE] = CANNOT
            else:
                _, ready_h, _, done_h = self._events_of(device)
                t[R_GPU] = _gpu_word(self.ipc.gpu_id(device))
                t[R_FLAGS] = (F_TORCH_KERNELS if self.kernels.name == "torch" else 0) | \
                    (F_MPS if gpu_detect.mps_active() else 0)
                t[R_READY:R_READY + 8] = _handle_words(ready_h)
                t[R_DONE:R_DONE + 8] = _handle_words(done_h)
            self._templates[device] = t
        return t

    def _fill(self, coll, sb, rb, count, dtype, op, root, splits, benign):
        """This rank's record; returns (device, stream)."""
        rec = self._rec
        device = stream = None
        if not self.why_not:
            one = sb if sb is not None else rb
            device = self._device(one)
            stream = one.stream if one.stream is not None else \
                self.kernels.current_stream(device)
        with self.ipc.on(device) if device is not None else contextlib.nullcontext():
            rec[:] = self._template(device)
            rec[R_COLL], rec[R_COUNT] = COLL_CODES[coll], count
            rec[R_DTYPE], rec[R_OP], rec[R_ROOT] = dtype, op, root
            if splits is not None:
                rec[R_SPLITS:R_SPLITS + 2 * self.size] = splits
            if device is None:
                return device, stream
            ready = self._events[device][0]
            saddr = sb.addr if sb is not None else 0
            if _overlap(sb, rb) and not benign:
                saddr = self._scratch_of(device, sb.nbytes, stream)
                self.kernels.copy(saddr, sb.addr, sb.nbytes, stream, device)
            for buf, addr, h, off, base in ((sb, saddr, R_SH, R_SOFF, R_SBASE),
                                            (rb, rb.addr if rb is not None else 0, R_RH,
                                             R_ROFF, R_RBASE)):
                if buf is None or not buf.nbytes:
                    continue
                try:
                    handle, offset = self.ipc.export(addr)
                except Exception:   # noqa: BLE001 - this allocation cannot be shared
                    rec[R_STATE] = CANNOT_NOW
                    return device, stream
                rec[h:h + 8] = _handle_words(handle)
                rec[off], rec[base] = offset, addr - offset
            self.ipc.record(ready, stream)
        return device, stream

    def _agree(self, coll, recs, mine_error):
        """The same decision on every rank from the same records: raise, False (staged), or
        True (go on)."""
        name = coll
        states = recs[:, R_STATE]
        for q in range(self.size):
            if states[q] == REJECTED:
                if q == self.rank and mine_error is not None:
                    raise mine_error
                raise ArgumentMismatch(f"{name}: rank {q} could not prepare its device "
                                       f"buffers (see the error on rank {q}); no data was moved")
        for col, field in _FIELDS:
            for q in range(1, self.size):
                if recs[q, col] != recs[0, col]:
                    if col == R_COLL:
                        raise ArgumentMismatch(
                            f"{name}: rank {q} called "
                            f"{_COLL_NAMES.get(int(recs[q, col]), '?')} while rank 0 called "
                            f"{_COLL_NAMES.get(int(recs[0, col]), '?')}; no data was moved")
                    raise ArgumentMismatch(f"{name}: ranks disagree on {field}: rank 0 has "
                                           f"{int(recs[0, col])}, rank {q} has "
                                           f"{int(recs[q, col])}; no data was moved")
        if coll == "all_to_all":
            n = self.size
            for q in range(n):
                for j in range(n):
                    sent = recs[q, R_SPLITS + j]
                    expected = recs[j, R_SPLITS + n + q]
                    if sent != expected:
                        raise ArgumentMismatch(
                            f"{name}: rank {q} sends {int(sent)} elements to rank {j}, which "
                            f"expects {int(expected)} from it; no data was moved")
        if (states == CANNOT).any():
            q = int(np.flatnonzero(states == CANNOT)[0])
            self.off = f"rank {q} cannot map device memory"
            return False
        return not (states == CANNOT_NOW).any()

    # ---- the plan -----------------------------------------------------------------------
    def plan(self, coll, recs, one_gpu: bool, mps: bool = False) -> list:
        """[tasks of rank q for q in ranks], the same on every rank. mps: every rank is an
        MPS client (their kernels and copies run at once): on one GPU each rank then queues
        the copies into its own buffer, as across GPUs, instead of one rank queuing all."""
        n = self.size
        count, dtype, op, root = (int(recs[0, R_COUNT]), int(recs[0, R_DTYPE]),
                                  int(recs[0, R_OP]), int(recs[0, R_ROOT]))
        es = dt.DTYPE_SIZES[dtype]
        tasks = [[] for _ in range(n)]
        leader = root if root >= 0 else 0
        if coll in ("allreduce", "reduce"):
            outs_of = (lambda off: [(j, "r", off) for j in range(n)]) if coll == "allreduce" \
                else (lambda off: [(root, "r", off)])
            if one_gpu and count:
                tasks[0].append(Task("reduce", outs_of(0), [(j, "s", 0) for j in range(n)],
                                     count))
            else:
                block = -(-count // n)
                block = -(-block // _REGION_ALIGN) * _REGION_ALIGN
                for q in range(n):
                    lo, hi = min(count, q * block), min(count, (q + 1) * block)
                    if hi > lo:
                        tasks[q].append(Task("reduce", outs_of(lo * es),
                                             [(j, "s", lo * es) for j in range(n)], hi - lo))
            return tasks
        if coll == "reduce_scatter":
            for j in range(n if count else 0):
                tasks[0 if one_gpu else j].append(
                    Task("reduce", [(j, "r", 0)], [(q, "s", j * count * es) for q in range(n)],
                         count))
            return tasks
        copies = []        # (dst ref, src ref, nbytes)
        nb = count * es
        if coll == "broadcast":
            copies = [((q, "r", 0), (root, "s", 0), nb) for q in range(n) if q != root]
        elif coll == "allgather":
            copies = [((j, "r", q * nb), (q, "s", 0), nb) for j in range(n) for q in range(n)]
        elif coll == "gather":
            copies = [((root, "r", q * nb), (q, "s", 0), nb) for q in range(n)]
        elif coll == "scatter":
            copies = [((q, "r", 0), (root, "s", q * nb), nb) for q in range(n)]
        elif coll == "all_to_all":
            sc = recs[:, R_SPLITS:R_SPLITS + n]
            soff = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(sc, 1)], 1)
            rc = recs[:, R_SPLITS + n:R_SPLITS + 2 * n]
            roff = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(rc, 1)], 1)
            copies = [((j, "r", int(roff[j, q]) * es), (q, "s", int(soff[q, j]) * es),
                       int(sc[q, j]) * es) for j in range(n) for q in range(n)]
        for dst, src, size in copies:
            if size:
                tasks[leader if one_gpu and not mps else dst[0]].append(
                    Task("copy", [dst], [src], nbytes=size))
        return tasks

    # ---- one call -----------------------------------------------------------------------
    @staticmethod
    def _same_process(rec) -> bool:
        return rec[R_PID] == os.getpid() and rec[R_TOKEN] == _TOKEN

    def _address(self, ref, recs, device, mine, mapped):
        """The address of ref in this process; adds (device, handle) to mapped when it is a
        peer's mapping."""
        q, kind, off = ref
        if q == self.rank:
            return mine[kind] + off
        rec = recs[q]
        at, offset, base = (R_SH, R_SOFF, R_SBASE) if kind == "s" else (R_RH, R_ROFF, R_RBASE)
        if self._same_process(rec):          # a rank in this process: its own address
            return int(rec[base]) + int(rec[offset]) + off
        handle = self._handle(rec, at)
        mapped.add((device, handle))
        return self.ipc.open(handle, device) + int(rec[offset]) + off

    def _prepare(self, coll, recs, device, dtype, opc):
        """What this rank does for these records: (ready events to wait for, work, done
        events to wait for, dtype, op, scale, how it ran, the peers' mappings it uses), or
        None when the call runs staged. Resolving opens peers' handles (a failure raises:
        the caller flags it at the arrival)."""
        one_gpu = len(set(recs[:, R_GPU].tolist())) == 1
        if not one_gpu and (recs[:, R_FLAGS] & F_TORCH_KERNELS).any():
            # torch views a peer's memory only on that peer's GPU: cupy's kernels read any
            return None
        op, scale = opc, None
        if opc == dt.AVG:       # as the host path: float16 pre-scales each input
            op, scale = dt.SUM, 1.0 / self.size
        mps = bool((recs[:, R_FLAGS] & F_MPS).all())
        tasks = self.plan(coll, recs, one_gpu, mps)
        mine = {"s": int(recs[self.rank, R_SBASE] + recs[self.rank, R_SOFF]),
                "r": int(recs[self.rank, R_RBASE] + recs[self.rank, R_ROFF])}
        work, mapped = [], set()
        for t in tasks[self.rank]:
            outs = [self._address(r, recs, device, mine, mapped) for r in t.outs]
            ins = [self._address(r, recs, device, mine, mapped) for r in t.ins]
            work.append((t.kind, outs, ins, t.count if t.kind == "reduce" else t.nbytes))
        ready = [self._peer_event(recs[q], R_READY, device)
                 for q in range(self.size) if q != self.rank] if work else []
        done = [self._peer_event(recs[q], R_DONE, device)
                for q in range(self.size) if q != self.rank and tasks[q]]
        how = ("one GPU" + (", MPS" if mps else "")) if one_gpu else "several GPUs"
        return ready, work, done, dtype, op, scale, how, tuple(mapped)

    def _run(self, coll, sb, rb, count, dtype, opc, root=-1, splits=None, benign=False):
        """True once the collective is queued on this rank's stream; False: run it staged."""
        if self.off or self.closed:
            return False
        error = device = stream = None
        try:
            device, stream = self._fill(coll, sb, rb, count, dtype, opc, root, splits, benign)
        except Exception as exc:  # noqa: BLE001 - flagged to every rank, raised here
            self._rec[R_STATE], error = REJECTED, exc
        self.host.allgather(self._rec_buf, self._all_buf)
        # the same records as a call before: the same decision and the same plan (while
        # no opened mapping was closed since)
        key = self._all.tobytes()
        generation = getattr(self.ipc, "generation", 0)
        if generation != self._plans_generation:
            self._plans.clear()
            self._plans_generation = generation
        entry = self._plans.get(key)
        failed = None
        if entry is not None:
            self._plans.move_to_end(key)
            if entry[7]:
                self.ipc.touch(entry[7])        # keep its mappings the recently used ones
        if entry is None:
            recs = self._all.reshape(self.size, self.width)
            if not self._agree(coll, recs, error):
                return False
            try:
                entry = self._prepare(coll, recs, device, dtype, opc)
            except Exception as exc:  # noqa: BLE001 - flagged at the arrival below
                failed = exc
            else:
                if entry is None:
                    return False
                if len(self._plans) >= PLAN_CACHE:
                    self._plans.popitem(last=False)
                self._plans[key] = entry
        if failed is None:
            ready, work, done_peers, dtype, op, scale, self.last, _ = entry
            try:
                with self.ipc.on(device):
                    done = self._events[device][2]
                    for ev in ready:
                        self.ipc.wait(stream, ev)
                    for kind, outs, ins, n in work:
                        if kind == "reduce":
                            self.kernels.reduce(outs, ins, n, dtype, op, stream, device,
                                                scale=scale, premul=dtype == dt.F16)
                        else:
                            self.kernels.copy(outs[0], ins[0], n, stream, device)
                    self.ipc.record(done, stream)
            except Exception as exc:  # noqa: BLE001 - flagged at the arrival below
                failed = exc
        try:
            self.host.arrive("barrier", error=int(failed is not None))
        except ArgumentMismatch as exc:
            # some rank could not queue its part (a peer's memory it cannot map, a kernel
            # that failed to launch): this call fails on every rank and the later ones run
            # staged, on every rank alike
            self.off = "a rank failed to queue its device work; staged from here on"
            if failed is not None:
                raise failed from None
            raise CommError(f"{coll}: another rank failed while queuing its device work (see "
                            "the error there); this rank's output is not complete") from exc
        if failed is not None:      # this rank failed: its own flag does not raise here
            self.off = "this rank failed to queue its device work; staged from here on"
            raise failed
        if done_peers:
            with self.ipc.on(device):
                for ev in done_peers:
                    self.ipc.wait(stream, ev)
        return True

    # ---- collectives (the host group's signatures) ---------------------------------------
    def allreduce(self, sb, rb, opc, op=None):
        return self._run("allreduce", sb, rb, sb.count, sb.dtype, opc,
                         benign=sb.addr == rb.addr)

    def reduce(self, sb, rb, opc, root):
        return self._run("reduce", sb, rb, sb.count, sb.dtype, opc, root,
                         benign=sb.addr == rb.addr)

    def reduce_scatter(self, sb, rb, opc, op=None):
        return self._run("reduce_scatter", sb, rb, rb.count, rb.dtype, opc,
                         benign=sb.addr + self.rank * rb.nbytes == rb.addr)

    def broadcast(self, b, root):
        return self._run("broadcast", b, b, b.count, b.dtype, 0, root, benign=True)

    def allgather(self, sb, rb):
        return self._run("allgather", sb, rb, sb.count, sb.dtype, 0,
                         benign=rb.addr + self.rank * sb.nbytes == sb.addr)

    def gather(self, root, sb, rb):
        return self._run("gather", sb, rb, sb.count, sb.dtype, 0, root,
                         benign=rb is not None and rb.addr + root * sb.nbytes == sb.addr)

    def scatter(self, root, sb, rb):
        return self._run("scatter", sb, rb, rb.count, rb.dtype, 0, root,
                         benign=sb is not None and sb.addr + root * rb.nbytes == rb.addr)

    def all_to_all(self, sb, rb, sc, rc, even):
        n = self.size
        if even:
            sc = rc = [sb.count // n] * n
        # the counts may differ per rank: the split counts are what must agree
        return self._run("all_to_all", sb, rb, 0, sb.dtype, 0, splits=list(sc) + list(rc))

    def close(self):
        """Destroy this group's events and drop its scratch (the process keeps the opened
        memory handles: comms/transport/cuda_ipc.py)."""
        self.closed = True
        if self.ipc is None:
            return
        for device, (ready, _, done, _) in self._events.items():
            # this rank's last work has run (peers' waits on these events are then met)
            # before its events and scratch go
            with contextlib.suppress(Exception), self.ipc.on(device):
                self.ipc.synchronize_event(done)
        self._scratch.clear()
        self._retired.clear()
        for ev in list(self._peer_events.values()) + \
                [e for ready, _, done, _ in self._events.values() for e in (ready, done)]:
            with contextlib.suppress(Exception):
                self.ipc.destroy_event(ev)
        self._peer_events.clear()
        self._events.clear()

"""Communicator: the framework-free API (numpy arrays, torch tensors), in place.

Every collective follows the same shape:
  1. check the arguments locally (naming the bad one; the plan says whether any algorithm
     can run on the memory they name),
  2. hand them to the group, which agrees (every rank's request must match: a rank whose
     arguments were rejected still takes part, flagged, so every rank raises instead of
     waiting for it; nothing has moved yet, and the group stays usable), plans and runs.
The group is composed at creation: a HostGroup (comms/api/host.py) when every rank shares
this host, a MultiHostGroup (comms/api/multihost.py: a HostGroup plus TCP between hosts)
otherwise. An error while data moves (dead, aborted or silent peer) breaks the group: later
calls raise.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref

import numpy as np

from comms.api.buffers import as_buf
from comms.api.host import HostGroup
from comms.api.multihost import MultiHostGroup
from comms.core import dtypes as dt
from comms.core import layout as L
from comms.core.errors import ArgumentMismatch, CommError, NoAlgorithm, PeerDeadError, check_tag
from comms.core.log import configure as log_setup
from comms.core.log import log, tracing
from comms.core.store import WatchedStore, everyones, has_key
from comms.kernels import native
from comms.kernels.reference import pid_alive
from comms.plan import select
from topology import env

DEFAULT_TIMEOUT_S = 300.0

_seq_lock = threading.Lock()
_seq_weak: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_seq_by_id: dict = {}


def _next_seq(store, name, rank, size=None):
    """This new group's key namespace on the store, the same on all its ranks and fresh on
    the store's server: every rank adds 1 to a counter of joins for (name, size), so the
    k-th group of that name and size gets number k whatever store object wraps the server
    (torch puts a new PrefixStore around the same TCPStore each time a world is made, and
    names groups from "0" again after destroy_process_group). Stores without add: counted
    per store object and rank."""
    add = getattr(store, "add", None)
    if add is not None and size:
        joined = int(add(f"topocomm/{name}/joined/{size}", 1))
        return f"{size}x{(joined - 1) // size + 1}"
    with _seq_lock:
        try:
            counts = _seq_weak.setdefault(store, {})
        except TypeError:  # not weak-referenceable: count by id (kept alive by the caller)
            counts = _seq_by_id.setdefault(id(store), {})
        counts[(name, rank)] = counts.get((name, rank), 0) + 1
        return counts[(name, rank)]


def default_timeout() -> float:
    """TOPOCOMM_TIMEOUT in seconds (an invalid value is a ValueError naming it), else 300."""
    value = env.get("TOPOCOMM_TIMEOUT")
    return DEFAULT_TIMEOUT_S if value is None else value


def _seconds(value, default: float) -> float:
    """A store's timeout in seconds (ours: a float; torch's: a timedelta)."""
    if value is None:
        return default
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


class _CreationWatch:
    """Peers' liveness while a group is made: every rank first says which machine and
    process it is, then beats (adds 1 to a counter on the store every BEAT_S) until the
    group is made. check() (called between polls of the store) raises PeerDeadError naming
    a peer on this machine whose process is gone, or a peer on another machine whose beat
    stopped for STALE_S before it said it was done. Ranks that died before saying who they
    are are left to the store's timeout."""

    INTERVAL_S = 0.05
    BEAT_S = 0.25
    STALE_S = 3.5

    def __init__(self, store, prefix, rank, size, name):
        from topology.host import host_id
        self.store, self.prefix, self.rank, self.name = store, prefix, rank, name
        self.machine = host_id()
        store.set(f"{prefix}/pid/{rank}", f"{self.machine}|{os.getpid()}".encode())
        self.unknown = [q for q in range(size) if q != rank]
        self.pids = {}
        self.beats = {}              # peer elsewhere -> [last count seen, when it changed]
        self.next_at = 0.0
        self._stop = threading.Event()
        self._beat = None
        if size > 1:
            self._beat = threading.Thread(target=self._beating, daemon=True,
                                          name=f"topocomm-beat-{name}")
            self._beat.start()

    def _beating(self):
        key = f"{self.prefix}/beat/{self.rank}"
        while True:
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone: creation fails anyway
                return
            if self._stop.wait(self.BEAT_S):
                return

    def stop(self):
        """The group is made (or failed): stop beating; the thread ends within a beat."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(5.0)
            self._beat = None

    def check(self, now_or_never=False):
        """Raise PeerDeadError if a known peer is gone (at most every INTERVAL_S, unless
        now_or_never)."""
        now = time.monotonic()
        if now < self.next_at and not now_or_never:
            return
        self.next_at = now + self.INTERVAL_S
        for q in list(self.unknown):
            key = f"{self.prefix}/pid/{q}"
            if has_key(self.store, key):
                self.unknown.remove(q)
                machine, _, pid = bytes(self.store.get(key)).decode().rpartition("|")
                if machine == self.machine and pid.isdigit() and int(pid) != os.getpid():
                    self.pids[q] = int(pid)
                elif machine != self.machine:
                    self.beats[q] = [-1, now]
        gone = [(q, pid) for q, pid in self.pids.items() if not pid_alive(pid)]
        for q, pid in gone:
            if not has_key(self.store, f"{self.prefix}/cause/{q}"):
                self._dead((q,), f"rank {q} (pid {pid}) died while group {self.name!r} "
                                 "was being created")
        for q, pid in gone:
            # every process gone gave up on a death it saw first: name that death
            ranks, _, why = bytes(self.store.get(f"{self.prefix}/cause/{q}")).decode(
                errors="replace").partition("\n")
            self._dead(tuple(int(r) for r in ranks.split(",") if r.isdigit()),
                       f"{why} (seen by rank {q}, which has exited since)")
        for q, seen in list(self.beats.items()):
            count = self.store.add(f"{self.prefix}/beat/{q}", 0)
            if count != seen[0]:
                seen[0], seen[1] = count, now
            elif now - seen[1] > self.STALE_S:
                if has_key(self.store, f"{self.prefix}/created/{q}"):
                    del self.beats[q]           # it is done: it stopped beating on purpose
                    continue
                self._dead((q,), f"rank {q} (on another host) stopped answering while group "
                              f"{self.name!r} was being created: no sign of life for "
                              f"{now - seen[1]:.1f}s")

    def gave_up(self, exc):
        """This rank's creation failed on a peer's death: leave the cause on the store, so
        that a peer which finds this process gone names the death, not this exit."""
        ranks = getattr(exc, "dead_ranks", None)
        if ranks:
            self.store.set(f"{self.prefix}/cause/{self.rank}",
                           f"{','.join(map(str, ranks))}\n{exc}".encode())

    @staticmethod
    def _dead(ranks, message):
        exc = PeerDeadError(message)
        exc.dead_ranks = ranks   # comms.init's store server need not wait for them
        raise exc


class Communicator:
    """A group of `size` ranks; this object is rank `rank`.

    store: set(key, bytes) / get(key) -> bytes (blocking) / add(key, n); a torch Store works.
    transport: None (detect), "shm" or "threads": how ranks on one host talk. Ranks on
        different hosts talk over tcp (comms/api/multihost.py).
    host: this rank's host key (default: topology.host.host_id(): hostname, boot id and
        network namespace; TOPOCOMM_HOST_ID overrides). Tests give threads different keys
        to emulate hosts.
    timeout: seconds a rank waits for a peer before raising CommError (TOPOCOMM_TIMEOUT).
    """

    def __init__(self, rank: int, size: int, store, *, timeout: float | None = None,
                 name: str = "world", transport: str | None = None,
                 layout: L.SegmentLayout | None = None, host: str | None = None):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size: must be a positive int, got {size!r}")
        if not isinstance(rank, int) or not 0 <= rank < size:
            raise ValueError(f"rank: must be in [0, {size}), got {rank!r}")
        self.rank, self.size = rank, size
        self.timeout = float(timeout) if timeout is not None else default_timeout()
        self.name = name
        log_setup()
        self._closed = False
        self._kept: dict = {}
        self._memory_groups: dict = {}   # memory kind -> its group (select.MEMORY_GROUPS)
        self._own_store = None
        self._store = store
        self._made_with = {"transport": transport, "host": host}
        self.ranks_before = None     # a shrunk group: the old rank of each new rank
        prefix = f"topocomm/{name}/{_next_seq(store, name, rank, size)}"
        self._prefix = prefix
        # while the group is made, every wait on the store also watches the peers that said
        # who they are: one that dies makes the others raise at once, not at the timeout
        watch = _CreationWatch(store, prefix, rank, size, name)
        store = WatchedStore(store, watch.check, _seconds(getattr(store, "timeout", None),
                                                          self.timeout))
        try:
            try:
                try:
                    self.group = self._create(store, prefix, transport, layout, host)
                except CommError as exc:
                    # a peer giving up (its segment gone, its socket closed) may be the echo
                    # of another peer's death: name the cause when one is known
                    try:
                        watch.check(now_or_never=True)
                    except PeerDeadError as dead:
                        raise dead from exc
                    raise
            except BaseException as exc:
                # tell the peers, so that none keeps a group this rank does not have
                try:
                    watch.gave_up(exc)
                    store.set(f"{prefix}/created/{rank}",
                              f"{type(exc).__name__}: {exc}".encode())
                except Exception:  # noqa: BLE001 - the store itself may be what failed
                    pass
                raise
            self._agree_created(store, prefix)
        finally:
            watch.stop()
        self._bind()
        if size > 1:
            self._calibrate()
        if log.isEnabledFor(logging.INFO):
            log.info("group %r rank %d of %d created: %s", name, rank, size, self._summary())

    @classmethod
    def over(cls, group, name: str, timeout: float) -> "Communicator":
        """A Communicator over an existing group (the host group of a multi-host one):
        its collectives run on that group; closing it does not close the group."""
        self = cls.__new__(cls)
        self.rank, self.size, self.name, self.timeout = group.rank, group.size, name, timeout
        self._closed, self._kept, self._own_store, self._store = False, {}, None, None
        self._memory_groups = {}
        self._prefix, self._made_with, self.ranks_before = None, None, None
        self.group = group
        self._bind()
        self._borrowed = True
        return self

    def _bind(self):
        """The group's latency paths, looked up once (a multi-host group has none; under
        TOPOCOMM_DEBUG=TRACE every call takes the logged path)."""
        self._allreduce_fast = getattr(self.group, "allreduce_fast", None)
        self._all_to_all_fast = getattr(self.group, "all_to_all_fast", None)
        self._reduce_scatter_fast = getattr(self.group, "reduce_scatter_fast", None)
        if tracing():
            self._allreduce_fast = self._all_to_all_fast = self._reduce_scatter_fast = None

    def _summary(self) -> str:
        """What TOPOCOMM_DEBUG=INFO says about a new group (no keys, secrets or addresses
        of the store)."""
        g = self.group
        if self.is_multihost:
            tr = g.local.transport
            return (f"{len(g.hosts)} hosts {g.hosts}, this one host {g.host_index} with "
                    f"{g.local.size} rank(s) over {type(tr).__name__} (direct reads: "
                    f"{getattr(tr, 'direct', None)}); tcp from {g.mesh.address} "
                    f"({g.mesh.address_why}), {g.mesh.num_streams} stream(s) per peer; "
                    f"{'C helpers' if native.is_native else 'numpy fallback'}")
        return (f"one host, {type(g.transport).__name__} (direct reads: "
                f"{getattr(g.transport, 'direct', None)}); "
                f"{'C helpers' if native.is_native else 'numpy fallback'}")

    def _create(self, store, prefix, transport, layout, host):
        rank, size = self.rank, self.size
        hosts = None
        if transport is None or host is not None:
            if host is None:
                from topology.host import host_id
                host = host_id()
            keys = [k.decode() for k in everyones(store, f"{prefix}/host", rank, size,
                                                  str(host).encode())]
            if len(set(keys)) > 1:
                first = {}
                for q, k in enumerate(keys):
                    first.setdefault(k, []).append(q)
                hosts = list(first.values())
            transport = transport or "shm"
        if hosts is not None:
            group = MultiHostGroup(rank, size, store, prefix, self.name, hosts,
                                   timeout=self.timeout, local_transport=transport,
                                   layout=layout)
        else:
            group = HostGroup(rank, size, store, prefix, timeout=self.timeout,
                              transport=transport, layout=layout)
        return group

    def _agree_created(self, store, prefix):
        """Every rank says whether it created the group, and with which settings. A rank
        whose peer failed raises CommError now (and closes its side) rather than at its
        first collective's timeout. Every rank must then make the same choices (the
        algorithms, chunk sizes and pieces the ranks run together follow from the
        selector's settings): a setting given to one rank only (TOPOCOMM_ALGO in an MPMD
        launch, or os.environ set on one rank) is an ArgumentMismatch naming it on every
        rank, before any data moves, instead of ranks running different algorithms."""
        group = self.group
        multi = isinstance(group, MultiHostGroup)
        try:
            mine = select.settings_text(
                [group.selector] + ([group.local.selector] if multi else []),
                group.host_index if multi else None)
        except BaseException as exc:
            mine = None
            failure = exc
        said = everyones(store, f"{prefix}/created", self.rank, self.size,
                         b"ok\n" + mine.encode() if mine is not None else
                         f"{type(failure).__name__}: {failure}".encode())
        try:
            if mine is None:
                raise failure
            for q, text in enumerate(said):
                if not text.startswith(b"ok\n"):
                    raise CommError(f"rank {q} failed to create group {self.name!r}: "
                                    f"{text.decode(errors='replace')}")
            select.check_settings([text[3:] for text in said])
        except BaseException:
            group.close()
            self._closed = True
            raise

    def _calibrate(self):
        """TOPOCOMM_PROBE=1: measure this group's links (topology/probe.py, a short
        ping-pong per link class, cached per machine) and rebuild the choices from them."""
        from topology import probe
        if not probe.is_enabled():
            return
        from topology.model import PathKind
        g = self.group
        if isinstance(g, MultiHostGroup):
            if g.local.size > 1:
                host = Communicator.over(g.local, f"{self.name}.host{g.host_index}", self.timeout)
                corrections = probe.measure(host)
                g.local.use_links(corrections.get(PathKind.SAME_SOCKET)
                                  or corrections.get(PathKind.SAME_HOST))
            g.use_topology(probe.apply(g.topology, probe.measure(self, g.topology)))
            return
        corrections = probe.measure(self)
        g.use_links(corrections.get(PathKind.SAME_SOCKET) or corrections.get(PathKind.SAME_HOST))

    # ---- what the group is --------------------------------------------------------------
    @property
    def is_multihost(self) -> bool:
        return isinstance(self.group, MultiHostGroup)

    @property
    def hosts(self):
        """The group's hosts (lists of ranks) when it spans several, else None."""
        return self.group.hosts if self.is_multihost else None

    @property
    def host_index(self):
        return self.group.host_index if self.is_multihost else 0

    @property
    def local_rank(self):
        return self.group.local_rank if self.is_multihost else self.rank

    @property
    def host_of(self):
        """{rank: host index} when the group spans hosts, else None."""
        return self.group.host_of if self.is_multihost else None

    @property
    def transport_kind(self) -> str:
        """How this host's ranks share memory: "shm" (processes) or "threads" (tests)."""
        tr = self.group.local.transport if self.is_multihost else self.group.transport
        return "threads" if getattr(tr, "direct", None) == "memcpy" else "shm"

    @property
    def topology(self):
        """The group's gathered Topology (multi-host groups), else None."""
        return getattr(self.group, "topology", None)

    @property
    def is_native(self) -> bool:
        return native.is_native

    def host_communicator(self) -> "Communicator":
        """The Communicator of this rank's host: its collectives run among the ranks of
        this host only (on a one-host group, this Communicator)."""
        if not self.is_multihost:
            return self
        sub = self._kept.get("host communicator")
        if sub is None:
            sub = self._kept["host communicator"] = Communicator.over(
                self.group.local, f"{self.name}.host{self.group.host_index}", self.timeout)
        return sub

    def explain(self, collective: str, nbytes: int, dtype: str = "float32") -> str:
        return self.group.explain(collective, int(nbytes), dtype)

    def stats(self) -> dict:
        """Who kept the others waiting: for every rank of this rank's host (the whole group
        on one host), how often it arrived last at a collective and the waits that caused,
        per collective kind (HostGroup.stats). Counted by every arrival at no measurable
        cost; multi-host groups count the arrivals inside each host ("where" names it)."""
        return self.group.local.stats() if self.is_multihost else self.group.stats()

    def estimate_us(self, collective, nbytes):
        return self.group.estimate_us(collective, nbytes)

    def kept(self, owner: str) -> dict:
        """A dict for a layer above (MoE's scratch buffers) to keep things in for the life
        of the group: close() drops it."""
        return self._kept.setdefault(("kept", owner), {})

    def adopt_store(self, store):
        """close() also closes `store` (the one comms.init() made for this group), after
        every rank has checked out of it."""
        self._own_store = store

    def reject(self, coll):
        """A layer above refused this rank's arguments for `coll` (the torch seam's checks):
        take part in that collective flagged, so every rank raises ArgumentMismatch before
        data moves and the group stays usable."""
        if coll not in COLLECTIVES:
            raise ValueError(f"coll: unknown collective {coll!r}; known: {', '.join(COLLECTIVES)}")
        self.group.reject(coll)

    # ---- argument checks, shared by one-host and multi-host groups ---------------------
    # Each returns the normalized arguments or raises TypeError/ValueError naming the bad one.
    @staticmethod
    def _op(op, dtype, name="op"):
        code = dt.op_code(op)
        if not dt.op_supported(dtype, code):
            raise TypeError(f"{name}: {dt.OP_NAMES[code]} is not supported for "
                            f"{dt.DTYPE_NAMES[dtype]}")
        return code

    def _check_blocks(self, sb, rb, whole):
        """send and recv of one dtype, the `whole` one holding size x the other."""
        if sb.dtype != rb.dtype:
            raise TypeError("recv: dtype must match send")
        big, small, part = (sb, rb, "recv") if whole == "send" else (rb, sb, "send")
        if big.count != self.size * small.count:
            raise ValueError(f"{whole}: must hold size x {part} = {self.size} x {small.count} "
                             f"elements, got {big.count}")

    def _root(self, root):
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"root: must be in [0, {self.size}), got {root!r}")
        return int(root)

    # ---- argument checks, shared by one-host and multi-host groups ---------------------
    # Each returns the normalized arguments or raises TypeError/ValueError naming the bad one.
    def _args_reduce(self, buf, op, out, root=None):
        """buf (written in place when out is None, on the root only for reduce), out, op."""
        writable = out is None and (root is None or self.rank == root)
        sb = as_buf(buf, "buf", writable=writable)
        rb = sb if out is None else as_buf(out, "out", writable=True)
        if rb.count != sb.count or rb.dtype != sb.dtype:
            raise ValueError(f"out: must match buf ({sb.count} x {dt.DTYPE_NAMES[sb.dtype]}), "
                             f"got {rb.count} x {dt.DTYPE_NAMES[rb.dtype]}")
        return sb, rb, self._op(op, sb.dtype)

    def _args_reduce_scatter(self, send, recv, op):
        sb, rb = as_buf(send, "send"), as_buf(recv, "recv", writable=True)
        self._check_blocks(sb, rb, whole="send")
        return sb, rb, self._op(op, sb.dtype)

    def _args_allgather(self, send, recv):
        sb, rb = as_buf(send, "send"), as_buf(recv, "recv", writable=True)
        self._check_blocks(sb, rb, whole="recv")
        return sb, rb

    def _args_gather(self, send, recv, root):
        """(root, send, recv or None off the root)."""
        root = self._root(root)
        sb, rb = as_buf(send, "send"), None
        if self.rank == root:
            if recv is None:
                raise ValueError("recv: required on the root")
            rb = as_buf(recv, "recv", writable=True)
            self._check_blocks(sb, rb, whole="recv")
        return root, sb, rb

    def _args_scatter(self, send, recv, root):
        """(root, send or None off the root, recv)."""
        root = self._root(root)
        rb, sb = as_buf(recv, "recv", writable=True), None
        if self.rank == root:
            if send is None:
                raise ValueError("send: required on the root")
            sb = as_buf(send, "send")
            self._check_blocks(sb, rb, whole="send")
        return root, sb, rb

    def _args_all_to_all(self, send, recv, send_counts, recv_counts):
        """(send, recv, elements to each rank, elements from each rank)."""
        sb, rb = as_buf(send, "send"), as_buf(recv, "recv", writable=True)
        if sb.dtype != rb.dtype:
            raise TypeError("recv: dtype must match send")
        return (sb, rb, self._counts(send_counts, sb.count, "send_counts", "send"),
                self._counts(recv_counts, rb.count, "recv_counts", "recv"))

    def _counts(self, counts, total, name, bufname):
        n = self.size
        if counts is None:
            if total % n:
                raise ValueError(f"{bufname}: {total} elements do not split evenly over {n} "
                                 f"ranks; pass {name}")
            return [total // n] * n
        try:
            c = [int(x) for x in counts]
            if any(int(x) != x for x in counts):
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"{name}: must be {n} integers (one per rank), got {counts!r}") from None
        if len(c) != n:
            raise ValueError(f"{name}: must be {n} integers (one per rank), got {len(c)}: {c}")
        if min(c, default=0) < 0:
            raise ValueError(f"{name}: negative count in {c}")
        if sum(c) != total:
            raise ValueError(f"{name}: counts sum to {sum(c)} but {bufname} holds {total} elements")
        return c

    def _group_for(self, coll, *named):
        """The group that runs `coll` on these buffers: this Communicator's own for host
        memory, else the one the plan names for their memory kind (select.MEMORY_GROUPS,
        made on first use). NoAlgorithm (a TypeError) naming the argument when no algorithm
        runs `coll` on that memory or the buffers are in different kinds of memory."""
        kind = None
        for name, b in named:
            if b is None:
                continue
            if b.kind != "host":
                select.check_memory(coll, name, b)
            if kind is not None and b.kind != kind:
                raise NoAlgorithm(f"{name}: a {b.where()} buffer where the other is in "
                                  f"{kind} memory; one kind of memory per call")
            kind = b.kind
        if kind in (None, "host"):
            return self.group
        group = self._memory_groups.get(kind)
        if group is None:
            group = self._memory_groups[kind] = select.memory_group_class(kind)(
                self.group, self._store, self._prefix, self.timeout)
        return group

    # ---- collectives ------------------------------------------------------------------
    def allreduce(self, buf, op="sum", out=None):
        """Reduce `buf` across ranks; the result goes to `out` (or `buf` when out is None)."""
        if self._allreduce_fast is not None:
            done = self._allreduce_fast(buf, op, out)
            if done is not None:
                return done
        try:
            sb, rb, opc = self._args_reduce(buf, op, out)
            group = self._group_for("allreduce", ("buf", sb), ("out", rb))
        except (TypeError, ValueError):
            self.group.reject("allreduce")
            raise
        return group.allreduce(sb, rb, opc, op)

    def reduce(self, buf, root=0, op="sum", out=None):
        """Reduce to `root` (into `out` or `buf` there); other ranks' buffers are unchanged."""
        try:
            root = self._root(root)
            sb, rb, opc = self._args_reduce(buf, op, out, root)
            group = self._group_for("reduce", ("buf", sb), ("out", rb))
        except (TypeError, ValueError):
            self.group.reject("reduce")
            raise
        return group.reduce(sb, rb, opc, root)

    def reduce_scatter(self, send, recv, op="sum"):
        """recv (on rank r) = reduction of block r of every rank's send (send = size blocks)."""
        if self._reduce_scatter_fast is not None:
            done = self._reduce_scatter_fast(send, recv, op)
            if done is not None:
                return done
        try:
            sb, rb, opc = self._args_reduce_scatter(send, recv, op)
            group = self._group_for("reduce_scatter", ("send", sb), ("recv", rb))
        except (TypeError, ValueError):
            self.group.reject("reduce_scatter")
            raise
        return group.reduce_scatter(sb, rb, opc, op)

    def broadcast(self, buf, root=0):
        try:
            root = self._root(root)
            b = as_buf(buf, "buf", writable=self.rank != root)
            group = self._group_for("broadcast", ("buf", b))
        except (TypeError, ValueError):
            self.group.reject("broadcast")
            raise
        return group.broadcast(b, root)

    def allgather(self, send, recv):
        """recv = every rank's send, rank-major (recv holds size x send elements)."""
        try:
            sb, rb = self._args_allgather(send, recv)
            group = self._group_for("allgather", ("send", sb), ("recv", rb))
        except (TypeError, ValueError):
            self.group.reject("allgather")
            raise
        return group.allgather(sb, rb)

    def gather(self, send, recv=None, root=0):
        try:
            root, sb, rb = self._args_gather(send, recv, root)
            group = self._group_for("gather", ("send", sb), ("recv", rb))
        except (TypeError, ValueError):
            self.group.reject("gather")
            raise
        group.gather(root, sb, rb)
        return recv

    def scatter(self, send=None, recv=None, root=0):
        try:
            root, sb, rb = self._args_scatter(send, recv, root)
            group = self._group_for("scatter", ("send", sb), ("recv", rb))
        except (TypeError, ValueError):
            self.group.reject("scatter")
            raise
        return group.scatter(root, sb, rb)

    def all_to_all(self, send, recv, send_counts=None, recv_counts=None):
        """Block q of send goes to rank q; block p of recv comes from rank p.

        send_counts[q] / recv_counts[p]: elements per peer (None: even split).
        """
        even = send_counts is None and recv_counts is None
        if even and self._all_to_all_fast is not None:
            done = self._all_to_all_fast(send, recv)
            if done is not None:
                return done
        try:
            sb, rb, sc, rc = self._args_all_to_all(send, recv, send_counts, recv_counts)
            group = self._group_for("all_to_all", ("send", sb), ("recv", rb))
        except (TypeError, ValueError):
            self.group.reject("all_to_all")
            raise
        return group.all_to_all(sb, rb, sc, rc, even)

    def all_to_all_known(self, send, recv, send_addr, recv_addr):
        """The torch seam's even all-to-all of contiguous CPU tensors at these addresses:
        done in one call when this (type, dtype, size) was seen and checked before (returns
        recv), else None with nothing done (use all_to_all)."""
        group = self.group
        if self._all_to_all_fast is None or recv.nbytes != send.nbytes:
            return None
        hit = group.all_to_all_hit(type(send), send.dtype, send.nbytes)
        if hit is None:
            return None
        return group.all_to_all_known(recv, send_addr, recv_addr, hit)

    def barrier(self):
        self.group.barrier()

    def _peer(self, peer, name):
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size or \
                peer == self.rank:
            raise ValueError(f"{name}: must be another rank in [0, {self.size}), got {peer!r}")
        return int(peer)

    def send(self, buf, dst, tag=0):
        if self._closed:
            raise CommError("communicator is closed")
        b = as_buf(buf, "buf")
        dst = self._peer(dst, "dst")
        self._group_for("send", ("buf", b)).send(b, dst, check_tag(tag))

    def recv(self, buf, src, tag=0):
        if self._closed:
            raise CommError("communicator is closed")
        b = as_buf(buf, "buf", writable=True)
        src = self._peer(src, "src")
        self._group_for("recv", ("buf", b)).recv(b, src, check_tag(tag))
        return b.obj

    # ---- going on without the dead -----------------------------------------------------
    def shrink(self, exclude=None, timeout: float | None = None) -> "Communicator":
        """After a CommError from a dead or aborted peer: a new Communicator of the ranks
        that go on, numbered densely in their old order (comms/api/shrink.py says how they
        agree). This group is closed first: nothing of it is left.

        exclude: old ranks to leave out although they may live (every caller must pass
            the same); None: leave out the dead and those silent for `timeout`.
        timeout: how long to wait for a rank that is neither checked in nor known dead
            (default: the group's timeout). A rank on this machine whose process is gone is
            known dead at once.
        The new group's `ranks_before[new rank]` is the old rank and `rank_map` maps old
        ranks to new ones. Ranks that checked in too late raise CommError.
        """
        from comms.api import shrink
        from topology.host import host_id
        if self._store is None or self._prefix is None:
            raise ValueError("shrink: this Communicator borrows another's group "
                             "(host_communicator()); shrink the group it came from")
        if exclude is not None:
            try:
                exclude = sorted({int(q) for q in exclude})
            except (TypeError, ValueError):
                raise TypeError(f"exclude: must be ranks (ints), got {exclude!r}") from None
            if any(not 0 <= q < self.size for q in exclude):
                raise ValueError(f"exclude: ranks must be in [0, {self.size}), got {exclude}")
            if self.rank in exclude:
                raise ValueError(f"exclude: names this rank ({self.rank}); a rank left out "
                                 "does not call shrink")
        window = self.timeout if timeout is None else float(timeout)
        if window < 0:
            raise ValueError(f"timeout: must be >= 0 seconds, got {timeout!r}")
        store, own_store = self._store, self._own_store
        self._own_store = None          # it serves the new group: this close() keeps it
        self.close()
        try:
            survivors = shrink.agree(store, self._prefix, self.rank, self.size, host_id(),
                                     exclude=exclude, window=window, timeout=self.timeout)
            new = Communicator(survivors.index(self.rank), len(survivors), store,
                               timeout=self.timeout, name=f"{self.name}.shrunk",
                               transport=self._made_with["transport"],
                               host=self._made_with["host"])
        except BaseException:
            self._own_store = own_store
            self._close_own_store()
            raise
        new.ranks_before = survivors
        new.adopt_store(own_store)
        log.info("group %r rank %d: shrunk to %d rank(s) %s as %r rank %d", self.name,
                 self.rank, new.size, survivors, new.name, new.rank)
        return new

    @property
    def rank_map(self) -> dict | None:
        """A shrunk group: {old rank: new rank} of its ranks; else None."""
        if self.ranks_before is None:
            return None
        return {old: new for new, old in enumerate(self.ranks_before)}

    # ----------------------------------------------------------------------------------
    def close(self):
        if self._closed:
            return
        self._closed = True
        # a signal handler closing the group between the steps of one of its operations
        # (which still reads the segments) aborts it and leaves the mappings to the object
        during = inside_own_operation(self)
        groups, self._memory_groups = list(self._memory_groups.values()), {}
        for group in groups:
            group.close(during_operation=during)
        self._kept = {}
        if getattr(self, "_borrowed", False):   # over(): the group belongs to another
            return
        self.group.close(during_operation=during)
        self._close_own_store()

    def _close_own_store(self):
        """Close the store comms.init() made for this group (comms/bootstrap/, adopt_store), if any."""
        store, self._own_store = self._own_store, None
        if store is None or not hasattr(store, "close"):
            return
        try:
            # rank 0 serves the store. It stops accepting first (a rank that goes on to a
            # new comms.init() must reach the next server, not this one) and says so; the
            # others wait for that, then everyone checks out and rank 0 stops it. Each wait
            # is bounded: a dead peer or server costs close() at most 5 s.
            pre = f"{self._prefix}/closing"
            deadline = time.monotonic() + min(self.timeout, 5.0)
            if self.rank == 0:
                if hasattr(store, "stop_accepting"):
                    store.stop_accepting()
                store.add(f"{pre}/server", 1)
            else:
                while not store.add(f"{pre}/server", 0) and time.monotonic() < deadline:
                    time.sleep(0.002)
            left = store.add(f"{pre}/ranks", 1)
            if self.rank == 0:
                while left < self.size and time.monotonic() < deadline:
                    time.sleep(0.002)
                    left = store.add(f"{pre}/ranks", 0)
        except Exception:  # a dead peer or server: nothing left to say goodbye to
            pass
        finally:
            store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


COLLECTIVES = ("allreduce", "broadcast", "reduce", "allgather", "reduce_scatter", "all_to_all",
               "gather", "scatter", "barrier")


def inside_own_operation(comm) -> bool:
    """Whether this thread is inside one of comm's operations (close() called from a signal
    handler that ran between its steps): a frame below the caller's belongs to comm or to
    its group."""
    mine = {id(comm), id(comm.group)}
    if isinstance(comm.group, MultiHostGroup):
        mine.add(id(comm.group.local))
    f = sys._getframe(2)
    while f is not None:
        owner = f.f_locals.get("self")
        if owner is not None and id(owner) in mine:
            return True
        f = f.f_back
    return False

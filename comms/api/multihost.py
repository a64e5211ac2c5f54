"""The Communicator of a group that spans hosts: the host's own Communicator (shm) for the
ranks beside this one, TCP (comms/transport/tcp.py) to the ranks on other hosts, and the
algorithms of comms/algorithms/hier.py that combine them.

Every collective first *agrees* across the whole group before any data moves: the host's
ranks arrive through shared memory (checking each other's arguments), then every rank sends
each remote rank a small digest of its request (collective, count, dtype, op, root, split
counts, and whether its host rejected the call) and checks the digests it receives. A
rank with bad arguments thus makes every rank raise the same ValueError, and the group
stays usable. An error while data moves (a peer died, timed out or aborted) breaks the
group: this rank shuts its sockets and raises its shm abort flag, so every other rank
fails within the timeout instead of waiting.
"""
from __future__ import annotations

import os

import numpy as np

from comms.core import dtypes as dt
from comms.algorithms import hier
from comms.api.buffers import as_buf
from comms.core.context import COLL_CODES, ArgumentMismatch
from comms.core.errors import CommError, check_tag
from comms.core.memory import BlockCache
from comms.plan.select import MultiHostSelector
from comms.transport.tcp import DEFAULT_STREAMS

_DIGEST_WORDS = 9  # coll, count, dtype, op, root, mode, rejected, sends_to_you, expects_from_you
_FIELDS = ("collective", "count", "dtype", "op", "root", "split mode")
_PAIRS_STEP = 0xFFFF  # tag step of _agree_pairs (data steps count up from 1)
_P2P_TAG = 1 << 62
TEMP_CACHE_BYTES = 512 << 20    # temporaries kept free per group, for the next call


class MultiHostMixin:
    """Methods of a Communicator whose ranks sit on several hosts (see the module text).
    comms.communicator.Communicator turns itself into MultiHostCommunicator when the
    host exchange at creation finds more than one host."""

    def _init_multihost(self, store, hosts, local_transport, layout):
        from comms.api.communicator import Communicator
        from comms.kernels import native
        self.nat = native.impl()
        self._nat = self.nat
        self.hosts = hosts
        self.host_of = {q: j for j, hs in enumerate(hosts) for q in hs}
        self.host_index = self.host_of[self.rank]
        mine = hosts[self.host_index]
        self.local_rank = mine.index(self.rank)
        self.is_uniform = len({len(hs) for hs in hosts}) == 1
        self.broken = None
        self._closed = False
        self._op_seq = 0
        self.temps = BlockCache(TEMP_CACHE_BYTES)   # the algorithms' temporaries
        if layout is not None:  # the same area sizes, for this host's ranks
            from comms.core.layout import SegmentLayout
            layout = SegmentLayout(len(mine), small_bytes=layout.small_bytes,
                                   p2p_bytes=layout.p2p_bytes, data_bytes=layout.data_bytes)
        self.local = Communicator(self.local_rank, len(mine), store, timeout=self.timeout,
                                  name=f"{self.name}.host{self.host_index}",
                                  transport=local_transport or "shm", layout=layout)
        try:
            self._connect_hosts(store, hosts, mine)
        except BaseException:
            # this rank gives up: its host group (its segment, its Yama declaration) goes now
            mesh = self.__dict__.get("mesh")
            if mesh is not None:
                mesh.close()
            self.local.close()
            raise

    def _connect_hosts(self, store, hosts, mine):
        from comms.transport.tcp import TcpMesh
        self.transport = self.local.transport
        self.local._ctx.names = list(mine)  # errors from the host's steps name group ranks
        # what every rank sees (NICs, sockets, link rates): for the address to listen on
        # and for the choices; TOPOCOMM_TOPO_FILE replaces detection
        import topology
        self.topology = topology.gather(store, f"{self._prefix}", self.rank, self.size,
                                        self.timeout)
        remote = [q for q in range(self.size) if self.host_of[q] != self.host_index]
        streams = int(os.environ.get("TOPOCOMM_SOCKET_NSTREAMS", "") or DEFAULT_STREAMS)
        self.mesh = TcpMesh(self.rank, self.size, store, self._prefix, remote, self.timeout,
                            address=self.topology.address_of(self.rank), num_streams=streams)
        self._local_aborts = tuple(a for a in self.local._ctx.aborts if a)
        self._selector = MultiHostSelector(hosts, self.topology, num_streams=self.mesh.num_streams)
        self._net_thread = None
        from topology import probe
        if probe.is_enabled():  # TOPOCOMM_PROBE=1: measured links correct the tables
            self._selector = MultiHostSelector(
                hosts, probe.apply(self.topology, probe.measure(self, self.topology)),
                num_streams=self.mesh.num_streams)

    # ---- plumbing ------------------------------------------------------------------------
    is_multihost = True

    def background(self, fn, *args):
        """Run fn(*args) on this group's network thread (in submission order): TCP steps
        overlap the host's shm steps. Returns a Future."""
        if self._net_thread is None:
            from concurrent.futures import ThreadPoolExecutor
            self._net_thread = ThreadPoolExecutor(1, thread_name_prefix=f"topocomm-net-{self.name}")
        self._last_background = self._net_thread.submit(fn, *args)
        return self._last_background

    def tag(self, step):
        return (self._op_seq << 16) | step

    def exchange(self, ops, what, p2p=False):
        self.mesh.exchange(self.nat, ops, self._local_aborts, what, p2p)

    def _check_open(self):
        if self._closed:
            raise CommError("communicator is closed")
        if self.broken:
            raise CommError(f"group is broken after an earlier error: {self.broken}")

    def _fail(self, exc):
        if not self.broken:
            self.broken = f"{type(exc).__name__}: {exc}"
        # a transfer cut short may still land in a temporary: never hand those out again
        old_temps, self.temps = self.temps, BlockCache(0)
        self.mesh.abort()
        if not self.local._ctx.broken:
            self.local._ctx.abort(self.broken)
        self._settle_background(old_temps)

    def _settle_background(self, old_temps):
        """After a failure on the caller's thread (an error, Ctrl-C) the network thread may
        still be writing into a temporary or the caller's buffer: wait for its last task (it
        ends at once: the sockets are shut and the host aborted), bounded; if it does not
        end, the temporaries stay alive with the group rather than be freed under it."""
        import threading
        fut = self.__dict__.get("_last_background")
        if fut is None or fut.done() or \
                threading.current_thread().name.startswith(f"topocomm-net-{self.name}"):
            return
        try:
            fut.exception(timeout=min(self.timeout, 10.0))
        except BaseException:  # noqa: BLE001 - its own error is the caller's error's echo
            pass
        if not fut.done():
            self.__dict__.setdefault("_kept_temps", []).append(old_temps)

    def _go(self, fn, *args):
        try:
            return fn(*args)
        except BaseException as exc:
            self._fail(exc)
            raise

    def _agree(self, coll, count=0, dtype=0, op=0, root=-1, mode=0, error=0, sends=None,
               expects=None, local_meta=None):
        """Check the whole group's requests agree, before data moves (see the module text).
        sends[q] / expects[q]: bytes for / from every rank (all-to-all)."""
        self._check_open()
        self._op_seq += 1
        ctx = self.local._ctx
        local_err = None
        try:
            self.local._begin(coll)
            ctx.arrive(COLL_CODES[coll], count, dtype, op, root, error=error, meta=local_meta)
            if local_meta is not None:
                local_err = self._check_local_counts(coll)
        except ArgumentMismatch as exc:
            local_err = exc
        except BaseException as exc:
            self._fail(exc)
            raise
        remote = self.mesh.peers
        mine = np.zeros((max(len(remote), 1), _DIGEST_WORDS), np.int64)
        theirs = np.zeros_like(mine)
        mine[:, :7] = (COLL_CODES[coll], count, dtype, op, root, mode,
                       1 if (error or local_err) else 0)
        if sends is not None:
            mine[:len(remote), 7] = [sends[q] for q in remote]
            mine[:len(remote), 8] = [expects[q] for q in remote]
        self._swap_words(mine, theirs, 0, f"{coll} (agreeing on the arguments)")
        if local_err is not None:
            raise local_err
        pair_err = None
        for i, q in enumerate(remote):
            if theirs[i, 6]:
                raise ArgumentMismatch(
                    f"{coll}: a rank on rank {q}'s host rejected its arguments or disagrees "
                    "with its host; no data was moved")
            for f, name in enumerate(_FIELDS):
                if theirs[i, f] != mine[i, f]:
                    raise ArgumentMismatch(
                        f"{coll}: ranks disagree on the {name}: rank {self.rank} has "
                        f"{mine[i, f]}, rank {q} has {theirs[i, f]}; no data was moved")
            if sends is not None and pair_err is None and (
                    theirs[i, 7] != mine[i, 8] or theirs[i, 8] != mine[i, 7]):
                pair_err = ArgumentMismatch(
                    f"{coll}: split counts disagree: rank {q} sends {theirs[i, 7]} bytes to rank "
                    f"{self.rank}, which expects {mine[i, 8]}; rank {self.rank} sends "
                    f"{mine[i, 7]} bytes to rank {q}, which expects {theirs[i, 8]} "
                    "(send_counts / recv_counts); no data was moved")
        # Everything above is seen alike by every rank (each compares its request with
        # every other rank's, the host's through the arrival); counts between two ranks
        # of different hosts are seen by those two only. With counts (op 0: not even),
        # every rank then says whether it saw such a mismatch, so all raise or none.
        if sends is not None and op == 0 and self._agree_pairs(coll, pair_err is not None):
            raise pair_err or ArgumentMismatch(
                f"{coll}: split counts disagree between other ranks of the group "
                "(send_counts / recv_counts); no data was moved")
        if pair_err is not None:
            raise pair_err

    def _agree_pairs(self, coll, seen) -> bool:
        """Second round of an all-to-all with counts: True when any rank saw its counts
        disagree with a peer's (`seen`: this one did). A host arrival plus one word to and
        from every remote peer."""
        ctx = self.local._ctx
        flagged = False
        try:
            self.local._begin(coll)
            ctx.arrive(COLL_CODES[coll], error=1 if seen else 0)
        except ArgumentMismatch:
            flagged = True
        except BaseException as exc:
            self._fail(exc)
            raise
        mine = np.full((max(len(self.mesh.peers), 1), 1), 1 if (seen or flagged) else 0,
                       np.int64)
        theirs = np.zeros_like(mine)
        self._swap_words(mine, theirs, _PAIRS_STEP, f"{coll} (agreeing on the split counts)")
        return bool(seen or flagged or theirs.any())

    def _swap_words(self, mine, theirs, step, what):
        """Row i of mine [peers, W] int64 to the i-th remote peer, its row into theirs[i]."""
        nb = mine.shape[1] * 8
        ops = []
        for i, q in enumerate(self.mesh.peers):
            ops.append((q, 0, mine[i].ctypes.data, nb, self.tag(step)))
            ops.append((q, 1, theirs[i].ctypes.data, nb, self.tag(step)))
        self._go(self.exchange, ops, what)

    def _check_local_counts(self, coll):
        """The host's ranks published [sends to, expects from] each host rank as meta."""
        rows = self.local._meta_rows[self.local._ctx.op_id % 2]
        L = self.local.size
        mats = [row[:] for row in rows]
        for p in range(L):
            for q in range(L):
                if mats[p][q] != mats[q][L + p]:
                    g = self.hosts[self.host_index]
                    return ArgumentMismatch(
                        f"{coll}: split counts disagree: rank {g[p]} sends {mats[p][q]} bytes to "
                        f"rank {g[q]}, which expects {mats[q][L + p]} (send_counts / "
                        "recv_counts); no data was moved")
        return None

    def reject(self, coll):
        """See Communicator.reject."""
        self._reject(coll)

    def _reject(self, coll):
        """Our arguments are bad: take part in the agreement flagged, so every rank raises."""
        try:
            self._agree(coll, error=1)
        except (ArgumentMismatch, CommError):
            pass

    def choose(self, coll, nbytes):
        return self._selector.choose(coll, nbytes)

    def net_method(self, nbytes):
        """How one rank per host all-reduces nbytes over TCP: "ring" or "halving_doubling"
        (the selector's choice, from the cost model; TOPOCOMM_NET_ALGO overrides)."""
        return self._selector.net_method(nbytes)

    def estimate_us(self, collective, nbytes): return self._selector.estimate_us(collective, nbytes)

    def explain(self, collective: str, nbytes: int, dtype: str = "float32") -> str:
        return "\n".join([
            self._selector.explain(collective, nbytes, dtype),
            f"  network: tcp from {self.mesh.address} ({self.mesh.address_why}), "
            f"{self.mesh.num_streams} stream(s) per peer",
            "  inside each host: " + self.local.explain(collective, nbytes, dtype).splitlines()[0]])

    # ---- collectives ---------------------------------------------------------------------
    def allreduce(self, buf, op="sum", out=None):
        try:
            sb, rb, opc = self._args_reduce(buf, op, out)
        except (TypeError, ValueError):
            self._reject("allreduce")
            raise
        self._agree("allreduce", sb.count, sb.dtype, opc)
        in_addr, opr, keep = self._reduce_source(sb, rb, opc, 0)
        self._go(self._allreduce_mh, in_addr, rb.addr, sb.count, sb.dtype, opr)
        return rb.obj

    def _allreduce_mh(self, in_addr, out_addr, count, dtype, opc):
        cop = dt.SUM if opc == dt.AVG else opc
        nbytes = count * dt.DTYPE_SIZES[dtype]
        if self.choose("allreduce", nbytes).algorithm == "hierarchical":
            hier.allreduce_hierarchical(self, in_addr, out_addr, count, dtype, cop)
        else:
            hier.allreduce_leaders(self, in_addr, out_addr, count, dtype, cop)
        if opc == dt.AVG:
            self.nat.scale(out_addr, out_addr, count, dtype, 1.0 / self.size)

    def reduce(self, buf, root=0, op="sum", out=None):
        try:
            root = self._root(root)
            sb, rb, opc = self._args_reduce(buf, op, out, root)
        except (TypeError, ValueError):
            self._reject("reduce")
            raise
        self._agree("reduce", sb.count, sb.dtype, opc, root)

        in_addr, opc, keep = self._reduce_source(sb, rb if self.rank == root else None, opc, 0)

        def go():
            cop = dt.SUM if opc == dt.AVG else opc
            hier.reduce(self, in_addr, rb.addr, sb.count, sb.dtype, cop, root)
            if opc == dt.AVG and self.rank == root:
                self.nat.scale(rb.addr, rb.addr, sb.count, sb.dtype, 1.0 / self.size)
        self._go(go)
        return rb.obj

    def reduce_scatter(self, send, recv, op="sum"):
        try:
            sb, rb, opc = self._args_reduce_scatter(send, recv, op)
        except (TypeError, ValueError):
            self._reject("reduce_scatter")
            raise
        self._agree("reduce_scatter", sb.count, sb.dtype, opc)

        saddr, opr, keep = self._reduce_source(sb, None, opc, 0)   # reduces into a temporary

        def go():
            es = dt.DTYPE_SIZES[sb.dtype]
            tmp = self._scratch("reduce_scatter", sb.nbytes)
            self._allreduce_mh(saddr, tmp.ctypes.data, sb.count, sb.dtype, opr)
            self.nat.copy(rb.addr, tmp.ctypes.data + self.rank * rb.count * es, rb.nbytes)
        self._go(go)
        return rb.obj

    def broadcast(self, buf, root=0):
        try:
            root = self._root(root)
            b = as_buf(buf, "buf", writable=self.rank != root)
        except (TypeError, ValueError):
            self._reject("broadcast")
            raise
        self._agree("broadcast", b.count, b.dtype, 0, root)
        self._go(hier.broadcast, self, b.addr, b.count, b.dtype, root)
        return b.obj

    def allgather(self, send, recv):
        try:
            sb, rb = self._args_allgather(send, recv)
        except (TypeError, ValueError):
            self._reject("allgather")
            raise
        self._agree("allgather", sb.count, sb.dtype)
        saddr, keep = self._unaliased(sb, rb)
        self._go(hier.allgather, self, saddr, rb.addr, sb.nbytes)
        return rb.obj

    def gather(self, send, recv=None, root=0):
        try:
            root, sb, rb = self._args_gather(send, recv, root)
        except (TypeError, ValueError):
            self._reject("gather")
            raise
        raddr = rb.addr if rb is not None else 0
        self._agree("gather", sb.count, sb.dtype, 0, root)
        keep = None
        if self.rank == root:
            saddr, keep = self._unaliased(sb, rb)
        else:
            saddr = sb.addr
        self._go(hier.gather, self, saddr, raddr, sb.nbytes, root)
        return recv

    def scatter(self, send=None, recv=None, root=0):
        try:
            root, sb, rb = self._args_scatter(send, recv, root)
        except (TypeError, ValueError):
            self._reject("scatter")
            raise
        saddr = sb.addr if sb is not None else 0
        self._agree("scatter", rb.count, rb.dtype, 0, root)
        keep = None
        if self.rank == root:
            saddr, keep = self._unaliased(sb, rb)
        self._go(hier.scatter, self, saddr, rb.addr, rb.nbytes, root)
        return rb.obj

    def all_to_all(self, send, recv, send_counts=None, recv_counts=None):
        try:
            sb, rb, sc, rc = self._args_all_to_all(send, recv, send_counts, recv_counts)
        except (TypeError, ValueError):
            self._reject("all_to_all")
            raise
        es = dt.DTYPE_SIZES[sb.dtype]
        sends = [c * es for c in sc]
        expects = [c * es for c in rc]
        mine = self.hosts[self.host_index]
        meta = [sends[q] for q in mine] + [expects[q] for q in mine]
        even = send_counts is None and recv_counts is None
        # every rank must run the same algorithm: with even splits the size is the same
        # everywhere (checked in the agreement), with counts only TOPOCOMM_ALGO decides
        algo = self.choose("all_to_all", sb.nbytes).algorithm if even else \
            self._selector.forced.get("all_to_all", "pairwise")
        self._agree("all_to_all", sb.count if even else 0, sb.dtype, 1 if even else 0,
                    sends=sends, expects=expects, local_meta=meta)
        saddr, keep = self._unaliased(sb, rb)
        fn = hier.all_to_all_2d if algo == "hierarchical" else hier.all_to_all_pairwise
        self._go(fn, self, saddr, rb.addr, sends, expects)
        return rb.obj

    def barrier(self):
        self._agree("barrier")

    def send(self, buf, dst, tag=0):
        self._check_open()
        b = as_buf(buf, "buf")
        if not isinstance(dst, (int, np.integer)) or not 0 <= dst < self.size or dst == self.rank:
            raise ValueError(f"dst: must be another rank in [0, {self.size}), got {dst!r}")
        dst = int(dst)
        if self.host_of[dst] == self.host_index:
            return self.local.send(b, self.hosts[self.host_index].index(dst), tag)
        tag = check_tag(tag)
        self._go(self.exchange, [(dst, 0, b.addr, b.nbytes, _P2P_TAG | (tag & 0xFFFFFFFF))],
                 "send", True)

    def recv(self, buf, src, tag=0):
        self._check_open()
        b = as_buf(buf, "buf", writable=True)
        if not isinstance(src, (int, np.integer)) or not 0 <= src < self.size or src == self.rank:
            raise ValueError(f"src: must be another rank in [0, {self.size}), got {src!r}")
        src = int(src)
        if self.host_of[src] == self.host_index:
            self.local.recv(b, self.hosts[self.host_index].index(src), tag)
            return b.obj
        tag = check_tag(tag)
        self._go(self.exchange, [(src, 1, b.addr, b.nbytes, _P2P_TAG | (tag & 0xFFFFFFFF))],
                 "recv", True)
        return b.obj

    def close(self):
        if self._closed:
            return
        self._closed = True
        from comms.api.communicator import inside_own_operation
        if inside_own_operation(self):  # see Communicator.close
            self._fail(CommError("closed during one of its operations (by a signal handler)"))
            self._release_kept()
            return
        if self._net_thread is not None:
            self._net_thread.shutdown(wait=True)
        self.mesh.close()
        self.local.close()
        self.temps = BlockCache(0)              # the temporaries' memory goes with the group
        self._release_kept()


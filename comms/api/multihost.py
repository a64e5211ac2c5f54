"""MultiHostGroup: a group that spans hosts: the host's own HostGroup (shm, comms/api/host.py)
for the ranks beside this one, TCP (comms/transport/tcp.py) to the ranks on other hosts, and the
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

import threading

import numpy as np

import topology
from topology import env
from comms.algorithms import hier
from comms.api.host import HostGroup
from comms.api.staging import Staging
from comms.core import dtypes as dt
from comms.core.context import COLL_CODES
from comms.core.errors import ArgumentMismatch, CommError
from comms.core.layout import SegmentLayout
from comms.core.log import log
from comms.core.memory import BlockCache
from comms.kernels import native
from comms.plan.select import MultiHostSelector
from comms.transport.tcp import DEFAULT_STREAMS, TcpMesh

_DIGEST_WORDS = 9  # coll, count, dtype, op, root, mode, rejected, sends_to_you, expects_from_you
_FIELDS = ("collective", "count", "dtype", "op", "root", "split mode")
_PAIRS_STEP = 0xFFFF  # tag step of _agree_pairs (data steps count up from 1)
_P2P_TAG = 1 << 62
TEMP_CACHE_BYTES = 512 << 20    # temporaries kept free per group, for the next call


class MultiHostGroup:
    """A group whose ranks sit on several hosts (see the module text): `local`, the host's
    own HostGroup, plus `mesh`, TCP to every rank on another host. hosts: lists of group
    ranks, one per host; prefix: this group's key namespace on the store."""

    def __init__(self, rank, size, store, prefix, name, hosts, *, timeout, local_transport,
                 layout):
        self.rank, self.size, self.name, self.timeout = rank, size, name, timeout
        self._prefix = prefix
        self.nat = native.impl()
        self.hosts = hosts
        self.host_of = {q: j for j, hs in enumerate(hosts) for q in hs}
        self.host_index = self.host_of[self.rank]
        mine = hosts[self.host_index]
        self.local_rank = mine.index(self.rank)
        self.is_uniform = len({len(hs) for hs in hosts}) == 1
        self.broken = None
        self.closed = False
        self._op_seq = 0
        self._net_thread = None
        self.mesh = None
        self.temps = BlockCache(TEMP_CACHE_BYTES)   # the algorithms' temporaries
        self.staging = Staging(self.nat, size)
        if layout is not None:  # the same area sizes, for this host's ranks
            layout = SegmentLayout(len(mine), small_bytes=layout.small_bytes,
                                   p2p_bytes=layout.p2p_bytes, data_bytes=layout.data_bytes)
        # errors from the host's steps name group ranks (names)
        self.local = HostGroup(self.local_rank, len(mine), store,
                               f"{prefix}/host{self.host_index}", timeout=timeout,
                               transport=local_transport or "shm", layout=layout, names=mine,
                               where=f"host {self.host_index} of {len(hosts)}")
        try:
            self._connect_hosts(store, hosts, mine)
        except BaseException:
            # this rank gives up: its host group (its segment, its Yama declaration) goes now
            if self.mesh is not None:
                self.mesh.close()
            self.local.close()
            raise

    def _connect_hosts(self, store, hosts, mine):
        self.transport = self.local.transport
        # what every rank sees (NICs, sockets, link rates): for the address to listen on
        # and for the choices; TOPOCOMM_TOPO_FILE replaces detection
        self.topology = topology.gather(store, f"{self._prefix}", self.rank, self.size,
                                        self.timeout)
        remote = [q for q in range(self.size) if self.host_of[q] != self.host_index]
        streams = env.get("TOPOCOMM_SOCKET_NSTREAMS") or DEFAULT_STREAMS
        self.mesh = TcpMesh(self.rank, self.size, store, self._prefix, remote, self.timeout,
                            address=self.topology.address_of(self.rank), num_streams=streams)
        self._local_aborts = self.local.abort_flags
        self.use_topology(self.topology)

    def use_topology(self, topo):
        """Build the choices from `topo` (detected, or corrected by measured links)."""
        self.selector = MultiHostSelector(self.hosts, topo, num_streams=self.mesh.num_streams)

    # ---- plumbing ------------------------------------------------------------------------
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
        if self.closed:
            raise CommError("communicator is closed")
        if self.broken:
            raise CommError(f"group is broken after an earlier error: {self.broken}")

    def abort(self, reason):
        """Break the group on purpose: every peer's next wait on this rank fails at once."""
        self._fail(CommError(reason))

    def _fail(self, exc):
        if not self.broken:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.info("group %r rank %d: broken: %s", self.name, self.rank, self.broken)
        # a transfer cut short may still land in a temporary: never hand those out again
        old_temps, self.temps = self.temps, BlockCache(0)
        self.mesh.abort()
        if not self.local.broken:
            self.local.abort(self.broken)
        self._settle_background(old_temps)

    def _settle_background(self, old_temps):
        """After a failure on the caller's thread (an error, Ctrl-C) the network thread may
        still be writing into a temporary or the caller's buffer: wait for its last task (it
        ends at once: the sockets are shut and the host aborted), bounded; if it does not
        end, the temporaries stay alive with the group rather than be freed under it."""
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
        local_err = None
        try:
            self.local.arrive(coll, count, dtype, op, root, error=error, meta=local_meta)
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
        flagged = False
        try:
            self.local.arrive(coll, error=1 if seen else 0)
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
        L = self.local.size
        mats = self.local.published_counts()
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
        """Our arguments are bad: take part in the agreement flagged, so every rank raises."""
        try:
            self._agree(coll, error=1)
        except (ArgumentMismatch, CommError):
            pass

    def choose(self, coll, nbytes):
        return self.selector.choose(coll, nbytes)

    def net_method(self, nbytes):
        """How one rank per host all-reduces nbytes over TCP: "ring" or "halving_doubling"
        (the selector's choice, from the cost model)."""
        return self.selector.net_method(nbytes)

    def estimate_us(self, collective, nbytes):
        return self.selector.estimate_us(collective, nbytes)

    def explain(self, collective: str, nbytes: int, dtype: str = "float32") -> str:
        return "\n".join([
            self.selector.explain(collective, nbytes, dtype),
            f"  network: tcp from {self.mesh.address} ({self.mesh.address_why}), "
            f"{self.mesh.num_streams} stream(s) per peer",
            "  inside each host: " + self.local.explain(collective, nbytes, dtype).splitlines()[0]])

    # ---- collectives: arguments checked by the Communicator ------------------------------
    def allreduce(self, sb, rb, opc, op=None):
        self._agree("allreduce", sb.count, sb.dtype, opc)
        in_addr, opr, keep = self.staging.reduce_source(sb, rb, opc, 0)
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

    def reduce(self, sb, rb, opc, root):
        self._agree("reduce", sb.count, sb.dtype, opc, root)
        in_addr, opc, keep = self.staging.reduce_source(
            sb, rb if self.rank == root else None, opc, 0)

        def go():
            cop = dt.SUM if opc == dt.AVG else opc
            hier.reduce(self, in_addr, rb.addr, sb.count, sb.dtype, cop, root)
            if opc == dt.AVG and self.rank == root:
                self.nat.scale(rb.addr, rb.addr, sb.count, sb.dtype, 1.0 / self.size)
        self._go(go)
        return rb.obj

    def reduce_scatter(self, sb, rb, opc, op=None):
        self._agree("reduce_scatter", sb.count, sb.dtype, opc)
        saddr, opr, keep = self.staging.reduce_source(sb, None, opc, 0)  # into a temporary

        def go():
            es = dt.DTYPE_SIZES[sb.dtype]
            tmp = self.staging.scratch("reduce_scatter", sb.nbytes)
            self._allreduce_mh(saddr, tmp.ctypes.data, sb.count, sb.dtype, opr)
            self.nat.copy(rb.addr, tmp.ctypes.data + self.rank * rb.count * es, rb.nbytes)
        self._go(go)
        return rb.obj

    def broadcast(self, b, root):
        self._agree("broadcast", b.count, b.dtype, 0, root)
        self._go(hier.broadcast, self, b.addr, b.count, b.dtype, root)
        return b.obj

    def allgather(self, sb, rb):
        self._agree("allgather", sb.count, sb.dtype)
        saddr, keep = self.staging.unaliased(sb, rb)
        self._go(hier.allgather, self, saddr, rb.addr, sb.nbytes)
        return rb.obj

    def gather(self, root, sb, rb):
        raddr = rb.addr if rb is not None else 0
        self._agree("gather", sb.count, sb.dtype, 0, root)
        keep = None
        if self.rank == root:
            saddr, keep = self.staging.unaliased(sb, rb)
        else:
            saddr = sb.addr
        self._go(hier.gather, self, saddr, raddr, sb.nbytes, root)
        return rb.obj if rb is not None else None

    def scatter(self, root, sb, rb):
        saddr = sb.addr if sb is not None else 0
        self._agree("scatter", rb.count, rb.dtype, 0, root)
        keep = None
        if self.rank == root:
            saddr, keep = self.staging.unaliased(sb, rb)
        self._go(hier.scatter, self, saddr, rb.addr, rb.nbytes, root)
        return rb.obj

    def all_to_all(self, sb, rb, sc, rc, even):
        es = dt.DTYPE_SIZES[sb.dtype]
        sends = [c * es for c in sc]
        expects = [c * es for c in rc]
        mine = self.hosts[self.host_index]
        meta = [sends[q] for q in mine] + [expects[q] for q in mine]
        # every rank must run the same algorithm: with even splits the size is the same
        # everywhere (checked in the agreement), with counts only TOPOCOMM_ALGO decides
        algo = self.choose("all_to_all", sb.nbytes).algorithm if even else \
            self.selector.forced.get("all_to_all", "pairwise")
        self._agree("all_to_all", sb.count if even else 0, sb.dtype, 1 if even else 0,
                    sends=sends, expects=expects, local_meta=meta)
        saddr, keep = self.staging.unaliased(sb, rb)
        fn = hier.all_to_all_2d if algo == "hierarchical" else hier.all_to_all_pairwise
        self._go(fn, self, saddr, rb.addr, sends, expects)
        return rb.obj

    def barrier(self):
        self._agree("barrier")

    def send(self, b, dst, tag):
        self._check_open()
        if self.host_of[dst] == self.host_index:
            return self.local.send(b, self.hosts[self.host_index].index(dst), tag)
        self._go(self.exchange, [(dst, 0, b.addr, b.nbytes, _P2P_TAG | (tag & 0xFFFFFFFF))],
                 "send", True)

    def recv(self, b, src, tag):
        self._check_open()
        if self.host_of[src] == self.host_index:
            return self.local.recv(b, self.hosts[self.host_index].index(src), tag)
        self._go(self.exchange, [(src, 1, b.addr, b.nbytes, _P2P_TAG | (tag & 0xFFFFFFFF))],
                 "recv", True)
        return b.obj

    def close(self, during_operation=False):
        """Close the sockets, the host group and the temporaries. during_operation: see
        HostGroup.close (abort, and leave what the operation still uses)."""
        if self.closed:
            return
        self.closed = True
        self.staging.release()
        if during_operation:
            self._fail(CommError("closed during one of its operations (by a signal handler)"))
            return
        if self._net_thread is not None:
            self._net_thread.shutdown(wait=True)
        if self.mesh is not None:
            self.mesh.close()
        self.local.close()
        self.temps = BlockCache(0)              # the temporaries' memory goes with the group

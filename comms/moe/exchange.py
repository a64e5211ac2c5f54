"""The one place MoE rows move between ranks, and how a group is turned into a Communicator.

Every transfer of dispatch and combine is an uneven all-to-all of whole rows through
`Communicator.all_to_all` (bytes; counts are rows x row bytes), with this rank's own block
always empty: own tokens are copied locally by the caller and never touch a transport.

Multi-host (comms/moe/hier.py): rows for every rank of a remote host cross the network once,
to the peer with the same local index there, which forwards them inside its host
(`rows_local`: an all-to-all among one host's ranks, on the host's own Communicator).

Bad arguments on one rank: that rank takes part, flagged, in the collectives its peers are in
(`reject`), so they raise ValueError too, at once, and the group stays usable. A step that
raised so on a host's ranks is followed by the group-wide step flagged, so the other hosts,
waiting in that one, raise as well.

torch groups: the group's ProcessGroupTopocomm runs its operations in issue order (inline
when nothing is queued, else on its progress thread). MoE transfers go through that same
order, so that they never run beside a queued asynchronous collective of the group (DDP's
bucket all-reduces during backward).
"""
from __future__ import annotations


import numpy as np

from comms.api.communicator import Communicator
from comms.core.context import ArgumentMismatch

# Scratch buffers per Communicator, reused across calls: a fresh 64 MiB buffer costs more in
# page faults than the copy into it on this class of machine. A buffer is used within one
# call only (pack -> all-to-all -> fold), never held by a handle, so reuse is safe for any
# interleaving of dispatches and combines on the group (a Communicator runs one call at a time).
# They live in the Communicator (Communicator.kept), so close() releases them with its own.
MOE_SCRATCH_OWNER = "moe scratch"


def _torch_backend_of(group):
    """(Communicator, ProcessGroupTopocomm) of a torch group (None = the default group)."""
    from comms.torch import backend
    try:
        return backend.communicator_of(group)
    except TypeError as exc:
        if "is not topocomm" not in str(exc):
            raise
        raise TypeError(f"{exc}; comms.moe dispatch/combine need a group created with backend "
                        "'topocomm' (the reference pipeline for any backend is comms.moe.refs)") \
            from None


class Exchange:
    """All-to-all of rows over one group, in the group's order."""

    def __init__(self, group):
        if isinstance(group, Communicator):
            self.comm, self._pg = group, None
        else:
            self.comm, self._pg = _torch_backend_of(group)
        self.rank, self.size = self.comm.rank, self.comm.size

    def scratch(self, name, shape, dtype) -> np.ndarray:
        """A reusable C-contiguous array (contents undefined) for use within one call."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        pool = self.comm.kept(MOE_SCRATCH_OWNER)
        buf = pool.get(name)
        if buf is None or buf.size < nbytes:
            buf = pool[name] = np.empty(max(nbytes, 64), np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)

    def _ordered(self, fn):
        if self._pg is None:
            return fn()
        from comms.torch.backend import run_in_order
        return run_in_order(self._pg, fn)

    def _a2a(self, what, send, recv, send_counts, recv_counts, stream=None):
        def run():
            if stream is None:
                return self.comm.all_to_all(send, recv, send_counts, recv_counts)
            import torch
            # on the caller's stream even where the group's progress thread runs it
            with torch.cuda.stream(stream):
                return self.comm.all_to_all(send, recv, send_counts, recv_counts)
        try:
            self._ordered(run)
        except ArgumentMismatch as exc:
            raise ValueError(f"moe.{what}: {exc}") from None

    def rows_bytes(self, what, send, recv, send_counts, recv_counts, stream=None) -> None:
        """rows() on flat byte buffers of any memory the group moves (numpy arrays, torch
        tensors on the CPU or a GPU); counts in bytes, own counts 0. stream: the CUDA
        stream the caller queued the buffers' producers on (torch.cuda.Stream)."""
        self._a2a(what, send, recv, send_counts, recv_counts, stream)

    def words(self, what, rows: np.ndarray) -> np.ndarray:
        """Even all-to-all of int64 words: rows [n, W] (row q to rank q) -> [n, W]."""
        out = np.empty_like(rows)
        self._a2a(what, rows.reshape(-1), out.reshape(-1), None, None)
        return out

    def rows(self, what, send: np.ndarray, send_rows, recv: np.ndarray, recv_rows, row_bytes):
        """send [S, ...] rows in rank order (send_rows[q] to rank q) -> recv [R, ...] rows
        (recv_rows[p] from rank p), both C-contiguous; own counts are 0."""
        s = send.reshape(-1).view(np.uint8) if send.size else np.empty(0, np.uint8)
        r = recv.reshape(-1).view(np.uint8) if recv.size else np.empty(0, np.uint8)
        self._a2a(what, s, r, [int(c) * row_bytes for c in send_rows],
                  [int(c) * row_bytes for c in recv_rows])

    @property
    def hosts(self):
        """The group's hosts (lists of ranks): the Communicator's topology, else one host."""
        hosts = getattr(self.comm, "hosts", None)
        return [sorted(h) for h in hosts] if hosts else [list(range(self.size))]

    def _local_comm(self, local):
        """The Communicator of rows_local among the ranks `local`: the host's own one when
        the group has one for exactly these ranks, else None (the group's, with counts to
        other hosts 0)."""
        hosts = getattr(self.comm, "hosts", None)
        if hosts is not None and list(local) in [list(h) for h in hosts]:
            return self.comm.host_communicator()
        return None

    def rows_local(self, what, send, send_rows, recv, recv_rows, row_bytes, local):
        """rows() among the ranks `local` (this rank's host, ascending; counts by global rank,
        0 outside it): through the host's own Communicator when the group has one for exactly
        these ranks, else through the group's (counts to other hosts are 0)."""
        sub = self._local_comm(local)
        if sub is not None:
            s = send.reshape(-1).view(np.uint8) if send.size else np.empty(0, np.uint8)
            r = recv.reshape(-1).view(np.uint8) if recv.size else np.empty(0, np.uint8)
            sc = [int(send_rows[q]) * row_bytes for q in local]
            rc = [int(recv_rows[q]) * row_bytes for q in local]
            try:
                self._ordered(lambda: sub.all_to_all(s, r, sc, rc))
            except ArgumentMismatch as exc:
                raise ValueError(f"moe.{what}: {exc}") from None
            return
        self.rows(what, send, send_rows, recv, recv_rows, row_bytes)

    def local_then_group(self, step, local):
        """Run `step` (a rows_local among `local`). When it raises ValueError (a rank of this
        host rejected its arguments) on the host's own Communicator, reject the group-wide
        step that follows, where the other hosts' ranks wait, then raise. (Without one, the
        step ran on the group: every rank has raised already.)"""
        try:
            step()
        except ValueError:
            if self._local_comm(local) is not None:
                self.reject()
            raise

    def reject(self, local=None):
        """This rank's arguments are bad: make the peers' pending all-to-all raise too
        (Communicator.reject: this rank arrives flagged; no data moves, the group stays
        usable). local: the ranks of
        this rank's host, when the peers' first step is a rows_local among them (a
        two-stage combine): on the host's own Communicator that step is rejected first,
        then the group's (local_then_group)."""
        sub = self._local_comm(local) if local is not None else None
        if sub is not None:
            self._flagged(sub)
        self._flagged(self.comm)

    def _flagged(self, comm):
        """Take part in the peers' pending all-to-all flagged (Communicator.reject): they
        raise ArgumentMismatch, no data moves."""
        try:
            self._ordered(lambda: comm.reject("all_to_all"))
        except ValueError:
            pass

"""Where a collective reads its input from, and the group's reusable temporaries.

Shared by the one-host and the multi-host group: an input that overlaps the output other
than in the layout an algorithm supports is read from a copy, float16 AVG is pre-scaled,
and temporaries up to KEEP_MAX_BYTES stay with the group for the next call.
"""
from __future__ import annotations

import numpy as np

from comms.core import dtypes as dt


class Staging:
    """Temporaries of one group (nat: the kernels, size: the group's size)."""

    KEEP_MAX_BYTES = 256 << 20

    def __init__(self, nat, size):
        self.nat, self.size = nat, size
        self.kept: dict = {}

    def scratch(self, name, nbytes):
        """A uint8 buffer of at least nbytes for use within one call. Buffers up to
        KEEP_MAX_BYTES stay with the group and serve the next call: fresh memory costs page
        faults on every call (and on a VM that returns freed memory to its host, a host
        fault per page: ~2.5 ms per MiB on the 2-vCPU CI machine)."""
        buf = self.kept.get(name)
        if buf is not None and buf.nbytes >= nbytes:
            return buf
        buf = np.empty(max(int(nbytes), 64), np.uint8)
        if nbytes <= self.KEEP_MAX_BYTES:
            self.kept[name] = buf
        return buf

    def release(self):
        self.kept = {}

    def reduce_source(self, sb, rb, opc, inplace_at):
        """(address to reduce from, op to run, keep-alive or None) for a reduction of sb
        into rb: float16 AVG reads a pre-scaled copy (premul_avg), anything else reads sb
        unless it overlaps rb other than in place (unaliased; rb None: no overlap check)."""
        addr, opr, keep = self.premul_avg(sb.addr, sb.count, sb.dtype, opc)
        if keep is None and rb is not None:
            addr, keep = self.unaliased(sb, rb, inplace_at)
        return addr, opr, keep

    def premul_avg(self, addr, count, dtype, opc):
        """AVG of float16, whose sums overflow at 65504 long before its means do: every rank
        contributes its input times 1/size to a SUM (NCCL's PreMulSum for float AVG), read
        from a copy. Other dtypes sum, then divide once (the more precise rounding).
        (address to reduce from, op to run, keep-alive or None)."""
        if opc != dt.AVG or dtype != dt.F16 or not count:
            return addr, opc, None
        keep = self.scratch("avg", count * dt.DTYPE_SIZES[dtype])
        self.nat.scale(keep.ctypes.data, addr, count, dtype, 1.0 / self.size)
        return keep.ctypes.data, dt.SUM, keep

    def unaliased(self, sb, rb, inplace_at=None):
        """Where to read sb from in a collective that writes rb: sb itself unless the two
        overlap other than in the in-place layout the algorithms support (sb starts at
        rb's byte offset `inplace_at`: allreduce 0, allgather rank x block, ...; None: no
        overlap is safe); else a copy of it (kept with the group). (address, keep-alive or
        None)."""
        if not (sb.nbytes and rb.nbytes and sb.addr < rb.addr + rb.nbytes
                and rb.addr < sb.addr + sb.nbytes) or (
                    inplace_at is not None and sb.addr == rb.addr + inplace_at):
            return sb.addr, None
        keep = self.scratch("aside", sb.nbytes)
        self.nat.copy(keep.ctypes.data, sb.addr, sb.nbytes)
        return keep.ctypes.data, keep

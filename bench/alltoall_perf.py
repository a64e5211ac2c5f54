#!/usr/bin/env python3
"""alltoall_perf: nccl-tests style all-to-all benchmark (topocomm vs gloo vs MPI).

    python bench/alltoall_perf.py -b 8 -e 64M -f 4 --np 2 --vs gloo,mpi

Even splits: count (aligned down to a multiple of n) / n elements per peer. Block d of rank
r's send buffer holds v(r, d, k) = (k + 3(r n + d)) mod m + 1, so after the exchange block s
of rank r's receive buffer must hold v(s, r, k): a misplaced block or element is counted.
torch: all_to_all_single; Communicator: all_to_all (None counts = even); MPI: Alltoall.
busbw = algbw x (n-1)/n.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


class AllToAllSpec(harness.CollSpec):
    name = "alltoall"
    script = __file__
    has_op = False
    model_collective = "all_to_all"
    model_mode = "oop"

    def busbw_factor(self, nranks):
        return (nranks - 1) / nranks if nranks > 0 else 0.0

    def align_count(self, count, nranks):
        return (count // nranks) * nranks

    @staticmethod
    def _pattern(dt, nranks):
        m = harness.value_range(dt, nranks, "none")
        return np.arange(1, m + 1, dtype=np.int64).astype(dt.gen_np)

    def _blocks(self, count, nranks, dt, shift_of_block):
        pattern = self._pattern(dt, nranks)
        per_peer = count // nranks
        out = np.empty(count, dtype=dt.gen_np)
        for b in range(nranks):
            out[b * per_peer:(b + 1) * per_peer] = harness.periodic(pattern, shift_of_block(b),
                                                                    per_peer)
        return out

    def inputs(self, rank, nranks, count, dt, op):
        return self._blocks(count, nranks, dt, lambda dst: 3 * (rank * nranks + dst))

    def expected(self, rank, nranks, count, dt, op):
        return self._blocks(count, nranks, dt, lambda src: 3 * (src * nranks + rank))

    def run(self, be, send, recv, op, in_place):
        be.all_to_all(send, None if in_place else recv)


SPEC = AllToAllSpec()

if __name__ == "__main__":
    sys.exit(harness.main(SPEC))

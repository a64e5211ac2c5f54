#!/usr/bin/env python3
"""all_reduce_perf: nccl-tests style all-reduce benchmark (topocomm vs gloo vs MPI).

    python bench/all_reduce_perf.py -b 8 -e 256M -f 4 --np 2 --vs gloo,mpi

Inputs: rank r, element i holds v(r, i) = (i + 7r) mod m + 1 with m chosen so that the sum
over ranks stays exact in the datatype (for prod: 2 when (i + r) mod 4 == 0, else 1), so
the expected result is a closed form checked element by element.
busbw = algbw x 2(n-1)/n.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


class AllReduceSpec(harness.CollSpec):
    name = "all_reduce"
    script = __file__
    has_op = True
    model_collective = "allreduce"
    model_mode = "ip"

    def busbw_factor(self, nranks):
        return 2.0 * (nranks - 1) / nranks if nranks > 0 else 0.0

    @staticmethod
    def _period(rank, nranks, dt, op):
        """One period of rank's input (its length divides into every rank's period)."""
        if op == "prod":
            base = np.array([2, 1, 1, 1], dtype=dt.gen_np)
            return np.roll(base, -(rank % 4))
        m = harness.value_range(dt, nranks, op)
        base = np.arange(1, m + 1, dtype=np.int64).astype(dt.gen_np)
        return np.roll(base, -((7 * rank) % m))

    def inputs(self, rank, nranks, count, dt, op):
        return np.resize(self._period(rank, nranks, dt, op), count)

    def expected(self, rank, nranks, count, dt, op):
        periods = np.stack([self._period(r, nranks, dt, op).astype(np.float64)
                            for r in range(nranks)])
        if op in ("sum", "avg"):
            per = periods.sum(axis=0)
            if op == "avg":
                return np.resize(per / nranks, count)
        elif op == "prod":
            per = periods.prod(axis=0)
        elif op == "min":
            per = periods.min(axis=0)
        elif op == "max":
            per = periods.max(axis=0)
        else:
            raise ValueError(f"op: {op!r}")
        return np.resize(per.astype(dt.gen_np), count)

    def run(self, be, send, recv, op, in_place):
        be.all_reduce(send, None if in_place else recv, op)


SPEC = AllReduceSpec()

if __name__ == "__main__":
    sys.exit(harness.main(SPEC))

#!/usr/bin/env python3
"""alltoall_algos: every one-host all-to-all algorithm, forced, side by side with MPICH.

    .venv/bin/mpiexec -n 2 .venv/bin/python bench/alltoall_algos.py [-b 256K] [-e 4M] [-t 7]

Why: between processes the all-to-all is pairwise (blocks handed through shared-memory
slots) or direct (process_vm_readv from the peer's buffer), picked by measurement
(comms/select.py Measured). Which one wins depends on what a cache line written on one core
costs to read on the other, and on a VM that changes with where the host runs the vCPUs:
on the 2-vCPU CI machine pairwise takes 50 us or 140 us at 1 MiB, for minutes at a time,
while direct and MPICH stay near 70-77 (README). This prints, per size, the median time of
each algorithm through Communicator.all_to_all on numpy (one group per algorithm, forced
with TOPOCOMM_ALGO) and of mpi4py's Alltoall, every trial taken on each in turn in the same
processes, so one run shows which state the machine is in. Every result is checked after
the timed trials (#wrong: elements that differ; exit status 1).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

ALGOS = ("pairwise", "direct", "staged")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-b", "--minbytes", default="256K")
    p.add_argument("-e", "--maxbytes", default="4M")
    p.add_argument("-f", "--stepfactor", type=float, default=4)
    p.add_argument("-t", "--trials", type=int, default=7)
    args = p.parse_args(argv)
    try:
        from mpi4py import MPI
    except ImportError:
        print("alltoall_algos: needs mpi4py; run under mpiexec", file=sys.stderr)
        return 2
    import harness
    import comms
    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), world.Get_size()
    groups = {}
    saved = os.environ.get("TOPOCOMM_ALGO")
    try:
        for algo in ALGOS:
            os.environ["TOPOCOMM_ALGO"] = f"alltoall:{algo}"
            groups[algo] = comms.init()        # bootstraps from mpi4py's COMM_WORLD
    finally:
        if saved is None:
            os.environ.pop("TOPOCOMM_ALGO", None)
        else:
            os.environ["TOPOCOMM_ALGO"] = saved
    sizes = harness.size_list(harness.parse_size(args.minbytes),
                              harness.parse_size(args.maxbytes), args.stepfactor)
    names = list(ALGOS) + ["mpi"]
    total_wrong = 0
    if rank == 0:
        print(f"# all-to-all, {n} ranks, float32, Communicator.all_to_all (numpy) per forced "
              "algorithm vs MPI Alltoall; median (min) us over "
              f"{args.trials} interleaved trials")
        print("# %10s" % "size" + "".join("%20s" % a for a in names))
    for size in sizes:
        count = max(n, size // 4 // n * n)
        send = (np.arange(count, dtype=np.float32) + rank)
        recv = np.empty_like(send)
        iters = harness.auto_iters(count * 4)

        def run(name):
            if name == "mpi":
                world.Alltoall(send, recv)
            else:
                groups[name].all_to_all(send, recv)
        times = {a: [] for a in names}
        for a in names:
            for _ in range(max(3, iters // 5)):
                run(a)
        for trial in range(args.trials):
            k = trial % len(names)
            for a in names[k:] + names[:k]:
                world.Barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    run(a)
                dt = world.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX)
                times[a].append(dt * 1e6)
        block = count // n
        want = np.concatenate([np.arange(rank * block, (rank + 1) * block, dtype=np.float32) + p
                               for p in range(n)])
        wrong = 0
        for a in names:
            recv[:] = -1
            run(a)
            wrong += int((recv != want).sum())
        wrong = world.allreduce(wrong, op=MPI.SUM)
        total_wrong += wrong
        if rank == 0:
            cells = "".join("%20s" % ("%.1f (%.1f)" % (sorted(times[a])[len(times[a]) // 2],
                                                      min(times[a]))) for a in names)
            print("  %10d" % (count * 4) + cells + ("" if not wrong else f"  #wrong {wrong}"),
                  flush=True)
    for g in groups.values():
        g.close()
    return 1 if total_wrong else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""alltoall_algos: every one-host all-to-all algorithm, forced, side by side with MPICH.

    .venv/bin/mpiexec -n 2 .venv/bin/python bench/alltoall_algos.py [-b 256K] [-e 4M] [-t 7]

Why: between processes the all-to-all is pairwise (blocks handed through shared-memory
slots) or direct (process_vm_readv from the peer's buffer), picked by measurement
(comms/plan/select.py Measured). Which one wins depends on what a cache line written on one core
costs to read on the other, and on a VM that changes with where the host runs the vCPUs:
on the 2-vCPU CI machine pairwise takes 50 us or 140 us at 1 MiB, for minutes at a time,
while direct and MPICH stay near 70-77 (README). This prints, per size, the median time of
each algorithm through Communicator.all_to_all on numpy (one group per algorithm, forced
with TOPOCOMM_ALGO; "chosen": nothing forced, what users get; direct is left out where the
group cannot read peers' buffers, e.g. TOPOCOMM_CMA=0) and of mpi4py's Alltoall, through the harness's interleaved sweep
(bench/harness.py run_sweeps: every trial taken on each in turn in the same processes), so
one run shows which state the machine is in. Every result is checked after the timed trials,
out of place and in place (#wrong: elements that differ; exit status 1).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

ALGOS = ("pairwise", "direct", "staged")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-b", "--minbytes", default="256K")
    p.add_argument("-e", "--maxbytes", default="4M")
    p.add_argument("-f", "--stepfactor", type=float, default=4)
    p.add_argument("-t", "--trials", type=int, default=7)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits")
    args = p.parse_args(argv)
    if importlib.util.find_spec("mpi4py") is None:
        print("alltoall_algos: needs mpi4py; run under mpiexec", file=sys.stderr)
        return 2
    import alltoall_perf
    import harness
    # the harness's sweep, interleaved over one Communicator per forced algorithm + MPICH
    args.datatype, args.op, args.iters, args.warmup_iters, args.check = "float", "none", \
        None, None, 1
    bes = []
    saved = os.environ.get("TOPOCOMM_ALGO")
    try:
        # "chosen": nothing forced, what users get (from 512 KiB rank 0 measures pairwise
        # against direct, or, without direct reads, against pairwise with streamed writes)
        for algo in ALGOS + ("chosen",):
            if algo == "chosen":
                os.environ.pop("TOPOCOMM_ALGO", None)
            else:
                os.environ["TOPOCOMM_ALGO"] = f"alltoall:{algo}"
            be = harness.CommBackend(args.timeout)  # bootstraps from mpi4py
            be.name = algo
            if algo == "direct" and not getattr(be.comm.group, "direct_mode", 1):
                be.close()                  # TOPOCOMM_CMA=0 or process_vm_readv refused
                continue
            bes.append(be)
    finally:
        if saved is None:
            os.environ.pop("TOPOCOMM_ALGO", None)
        else:
            os.environ["TOPOCOMM_ALGO"] = saved
    bes.append(harness.MPIBackend(args.timeout))
    results = harness.run_sweeps(alltoall_perf.SPEC, args, bes,
                                 outs=[lambda line: None] * len(bes))
    names = [be.name for be in bes]
    total_wrong = sum(results[a]["wrong_total"] for a in names)
    if bes[0].rank == 0:
        print(f"# all-to-all, {bes[0].size} ranks, float32, Communicator.all_to_all (numpy) per "
              "forced algorithm and as chosen, vs MPI Alltoall; median (min) us over "
              f"{args.trials} interleaved trials")
        print("# %10s" % "size" + "".join("%20s" % a for a in names))
        for i, row in enumerate(results[names[0]]["rows"]):
            cells = []
            for a in names:
                trials = results[a]["rows"][i]["oop"]["trials_us"]
                cells.append("%20s" % ("%.1f (%.1f)" % (sorted(trials)[len(trials) // 2],
                                                       min(trials))))
            wrong = sum(results[a]["rows"][i][m]["wrong"] or 0 for a in names
                        for m in ("oop", "ip"))
            print("  %10d" % row["size"] + "".join(cells) + (f"  #wrong {wrong}" if wrong
                                                              else ""), flush=True)
    for be in bes:
        be.close()
    return 1 if total_wrong else 0


if __name__ == "__main__":
    sys.exit(main())

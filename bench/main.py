#!/usr/bin/env python3
"""The benchmark job `make bench` runs: all-reduce 8 B..256 MiB and all-to-all 8 B..64 MiB on
2 local ranks, topocomm (torch backend) side by side with torch gloo and MPICH.

    python bench/main.py                 # full sweep (-f 2), a few minutes on 2 cores
    python bench/main.py --quick         # -f 16, for a smoke run
    python bench/main.py --np 4 --out /tmp/bench --backend topocomm-numpy

Writes <out>/all_reduce.json, all_reduce.png, alltoall.json, alltoall.png, moe.json (default
bench/out/) and prints the nccl-tests tables and the side-by-side summaries; between the
all-to-all sweep and the MoE rows, bench/alltoall_algos.py at 1 MiB (each algorithm forced,
with MPICH) says which vCPU-placement state the machine was in.
Exit status: 0 when every backend that ran returned correct values and topocomm ran,
else the largest of the per-collective statuses (1 wrong values, 2 topocomm failed).
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import all_reduce_perf  # noqa: E402
import alltoall_perf  # noqa: E402
import harness  # noqa: E402
import moe_perf  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    p.add_argument("--vs", default="gloo,mpi")
    p.add_argument("--backend", default="topocomm", choices=harness.BACKENDS)
    p.add_argument("--quick", action="store_true", help="step factor 16 instead of 2")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per backend run")
    p.add_argument("-d", "--datatype", default="float")
    p.add_argument("-t", "--trials", type=int, default=5,
                   help="median over this many trials (the machine is shared and noisy)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step = "16" if args.quick else "2"
    common = ["-f", step, "-t", str(args.trials), "--np", str(args.np), "--backend",
              args.backend, "-d", args.datatype, "--timeout", str(args.timeout)]
    if args.vs:
        common += ["--vs", args.vs]
    jobs = [
        (all_reduce_perf.SPEC, ["-b", "8", "-e", "256M", "-o", "sum"]),
        (alltoall_perf.SPEC, ["-b", "8", "-e", "64M"]),
    ]
    t0 = time.monotonic()
    status = 0
    for spec, extra in jobs:
        argv_job = extra + common + ["--json", str(out / f"{spec.name}.json"),
                                     "--plot", str(out / f"{spec.name}.png")]
        print(f"# ##### {spec.name}: {' '.join(argv_job)}", flush=True)
        rc = harness.main(spec, argv_job)
        print(f"# ##### {spec.name}: exit status {rc}, {time.monotonic() - t0:.0f} s so far",
              flush=True)
        status = max(status, rc)
    # which state the host is in for the one-host all-to-all (bench/alltoall_algos.py):
    # every algorithm forced, with MPICH, at the size where pairwise and direct trade places
    if "mpi" in (args.vs or "").split(",") and not args.quick:
        status = max(status, _alltoall_algos(args))
    # MoE dispatch/combine vs the per-expert reference on gloo and on topocomm's all_to_all
    # (its own launcher; float32 or bfloat16 only)
    moe_argv = ["--np", str(args.np), "-t", str(args.trials), "--timeout", str(args.timeout * 3),
                "--json", str(out / "moe.json")]
    if args.quick:
        moe_argv += ["--config", "1024:1024:8:64"]
    if args.datatype in ("bfloat16", "bf16"):
        moe_argv += ["-d", "bfloat16"]
    print(f"# ##### moe: {' '.join(moe_argv)}", flush=True)
    rc = moe_perf.main(moe_argv)
    print(f"# ##### moe: exit status {rc}, {time.monotonic() - t0:.0f} s so far", flush=True)
    status = max(status, rc)
    print(f"# bench done in {time.monotonic() - t0:.0f} s; results in {out}/", flush=True)
    return status


def _alltoall_algos(args) -> int:
    why = harness._mpi_missing()
    if why:
        print(f"# ##### alltoall algorithms: not run: {why}", flush=True)
        return 0
    cmd = [harness.find_mpiexec(), "-n", str(args.np), sys.executable,
           str(Path(__file__).resolve().parent / "alltoall_algos.py"), "-b", "1M", "-e", "1M",
           "-t", str(args.trials)]
    print(f"# ##### alltoall algorithms: {' '.join(cmd[4:])}", flush=True)
    try:
        rc = subprocess.run(cmd, timeout=args.timeout, cwd=str(harness.REPO_ROOT)).returncode
    except subprocess.TimeoutExpired:
        print("# ##### alltoall algorithms: TIMEOUT", flush=True)
        return 0
    print(f"# ##### alltoall algorithms: exit status {rc}", flush=True)
    return 1 if rc == 1 else 0


if __name__ == "__main__":
    sys.exit(main())

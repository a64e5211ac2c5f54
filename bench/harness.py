"""Generic nccl-tests style benchmark loop for topocomm and its baselines (gloo, MPI), and its
command line.

A collective is described by a small spec (bench/all_reduce_perf.py, bench/alltoall_perf.py):
how to fill inputs from (rank, index), the closed-form expected output, how to call the
backend out-of-place and in-place, and the bus-bandwidth factor. This module owns:

- the command line (nccl-tests flags: -b -e -f -n -w -c -d -o, plus -t trials, --np, --vs,
  --backend, --json, --plot, --timeout): with `--np N` it starts the ranks, under torchrun /
  mpiexec / Slurm (or as a rank it started) it runs as that rank;
- the timed loop (methodology of /work/shared/BASELINES.md): barrier, time `iters` ops,
  per-op mean on each rank, max over ranks through the backend, median over trials, then
  the check iteration.

The rest is beside it: bench/launcher.py (starting the ranks: N local subprocesses with a
torchrun-style env, or `mpiexec -n N`), bench/adapters.py (one adapter per backend),
bench/checks.py (#wrong: a real count of wrong elements against closed-form expected values)
and bench/output.py (the exact nccl-tests table, footer, a side-by-side summary with --vs,
JSON, PNG). The bench scripts and tests use some of their names as harness.<name>: those are
imported here.

Units: size = one rank's buffer in bytes, time in us, algbw = size / time in GB/s (1e9),
busbw = algbw x factor (all-reduce 2(n-1)/n, all-to-all (n-1)/n).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

# some of these are not used here: the bench scripts and tests use them as harness.<name>
from adapters import BACKENDS, CommBackend, MPIBackend, NumpyBackend, make_backend  # noqa: F401
from checks import DTYPES, DType, check_once, count_wrong, periodic, value_range  # noqa: F401
from launcher import (BENCH_DIR, REPO_ROOT, _LAUNCH_ENVS, _mpi_missing,  # noqa: F401
                      child_args, exit_on_sigterm, find_mpiexec, free_port, launch_backends,
                      run_procs, world_from_env)
from output import (Rank0Printer, footer_lines, format_row, format_time, stats_line,  # noqa: F401
                    header_lines, model_check, summary_records, summary_table, sweep_footer,
                    sweep_header, write_json, write_report)

# --------------------------------------------------------------------------------------------
# Pure helpers (unit-tested in tests/unit/test_bench_harness.py)
# --------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text) -> int:
    """'8' -> 8, '64K' -> 65536, '256M' -> 268435456, '1G' -> 2**30 (also 'KB', 'KiB')."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size: must be >= 0, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"size: cannot parse {text!r}; use an integer with optional K, M, G suffix")
    value = float(m.group(1)) * _SIZE_MULT[m.group(2).lower()]
    if value != int(value):
        raise ValueError(f"size: {text!r} is not a whole number of bytes")
    return int(value)


DTYPE_ALIASES = {"float32": "float", "float16": "half", "fp16": "half", "bf16": "bfloat16",
                 "float64": "double", "int": "int32"}
OPS = ("sum", "prod", "min", "max", "avg")


def parse_dtype(text: str) -> DType:
    key = DTYPE_ALIASES.get(text.lower(), text.lower())
    if key not in DTYPES:
        raise ValueError(f"datatype: unknown {text!r}; use one of "
                         f"{sorted(set(DTYPES) | set(DTYPE_ALIASES))}")
    return DTYPES[key]


def parse_ops(text: str) -> list:
    text = text.lower()
    if text == "all":
        return list(OPS)
    ops = [o.strip() for o in text.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            raise ValueError(f"op: unknown {o!r}; use one of {list(OPS)} or 'all'")
    return ops


def size_list(minbytes: int, maxbytes: int, stepfactor: float) -> list:
    """Sizes minbytes, minbytes*f, ... <= maxbytes (nccl-tests -b/-e/-f)."""
    if stepfactor <= 1:
        raise ValueError(f"stepfactor: must be > 1, got {stepfactor}")
    if maxbytes < minbytes:
        raise ValueError(f"maxbytes ({maxbytes}) < minbytes ({minbytes})")
    sizes, size = [], minbytes
    while size <= maxbytes:
        sizes.append(int(size))
        size = size * stepfactor if size > 0 else 1
    return sizes


def auto_iters(size_bytes: int) -> int:
    """Iterations per trial when -n is not given: 50 for small ops, ~128 MiB of buffer traffic
    per trial for big ones, never fewer than 2."""
    return max(2, min(50, (1 << 27) // max(size_bytes, 1)))


def auto_warmup(iters: int) -> int:
    return max(1, min(5, iters // 4))


def algbw_gbs(size_bytes: int, time_us: float) -> float:
    if time_us <= 0 or not math.isfinite(time_us):
        return 0.0
    return size_bytes / (time_us * 1e-6) / 1e9


def make_result(size_bytes: int, time_us: float, factor: float, wrong) -> dict:
    alg = algbw_gbs(size_bytes, time_us)
    return {"time_us": time_us, "algbw_gbs": alg, "busbw_gbs": alg * factor, "wrong": wrong}


# --------------------------------------------------------------------------------------------
# Collective spec protocol (implemented in all_reduce_perf.py / alltoall_perf.py)
# --------------------------------------------------------------------------------------------

class CollSpec:
    name = "collective"
    script = __file__          # the per-collective script spawned ranks run
    has_op = True
    # the topocomm cost model's name for it, and the mode whose time is one collective call
    # (torch's out-of-place all-reduce adds a copy; its in-place all-to-all adds one too)
    model_collective = None
    model_mode = "oop"

    def busbw_factor(self, nranks: int) -> float:
        raise NotImplementedError

    def align_count(self, count: int, nranks: int) -> int:
        return count

    def inputs(self, rank: int, nranks: int, count: int, dt: DType, op: str) -> np.ndarray:
        raise NotImplementedError

    def expected(self, rank: int, nranks: int, count: int, dt: DType, op: str) -> np.ndarray:
        raise NotImplementedError

    def run(self, be, send, recv, op: str, in_place: bool) -> None:
        raise NotImplementedError

    def supported(self, be, dt: DType, op: str):
        """None when the backend can run it, else a reason string."""
        return be.unsupported(dt, op if self.has_op else None)


# --------------------------------------------------------------------------------------------
# One rank: the sweep
# --------------------------------------------------------------------------------------------

def one_trial(be, spec: CollSpec, send, recv, op, in_place, iters) -> float:
    """One trial: barrier, `iters` ops timed; the max over ranks of the per-op mean (us)."""
    be.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        spec.run(be, send, recv, op, in_place)
    be.sync()
    per_op = (time.perf_counter() - t0) / iters
    return be.reduce_scalar(per_op, "max") * 1e6


def run_sweeps(spec: CollSpec, args, bes, outs=None, on_row=None) -> dict:
    """The sweep on one or more backends living in the same processes, {name: result}.

    With several backends (an interleaved run) every trial of a size and mode is taken on
    each backend in turn, so all of them meet the same noise of this shared machine and the
    speed-ups compare like with like; each backend has its own buffers, warm-up and check.
    outs: one printer per backend (default: rank 0 prints); on_row(results) after each row.
    """
    n = bes[0].size
    outs = outs or [Rank0Printer(be.rank) for be in bes]
    dt = parse_dtype(args.datatype)
    ops = parse_ops(args.op) if spec.has_op else ["none"]
    factor = spec.busbw_factor(n)
    minbytes, maxbytes = parse_size(args.minbytes), parse_size(args.maxbytes)
    counts = []
    for size in size_list(minbytes, maxbytes, args.stepfactor):
        count = spec.align_count(size // dt.itemsize, n)
        if count not in counts:
            counts.append(count)
    results = {}
    for be, out in zip(bes, outs):
        sweep_header(out, spec, args, be, n, minbytes, maxbytes)
        results[be.name] = {"collective": spec.name, "backend": be.name, "nranks": n,
                            "type": dt.name, "busbw_factor": factor, "notes": be.notes,
                            "rows": [], "skipped": []}
        if len(bes) > 1:
            results[be.name]["interleaved_with"] = [b.name for b in bes if b is not be]
    for count in counts:
        size = count * dt.itemsize
        iters = args.iters if args.iters is not None else auto_iters(size)
        warmup = args.warmup_iters if args.warmup_iters is not None else auto_warmup(iters)
        bufs = [(be.alloc(count, dt), be.alloc(count, dt)) for be in bes]
        for op in ops:
            inputs = spec.inputs(bes[0].rank, n, count, dt, op)
            expected = spec.expected(bes[0].rank, n, count, dt, op) if args.check else None
            live = []
            for i, (be, out) in enumerate(zip(bes, outs)):
                why = spec.supported(be, dt, op)
                if why:
                    msg = f"{spec.name} {dt.name} {op}: skipped on {be.name}: {why}"
                    if msg not in results[be.name]["skipped"]:
                        results[be.name]["skipped"].append(msg)
                        out("# " + msg)
                    continue
                live.append(i)
            rows = {i: {"size": size, "count": count, "type": dt.name, "redop": op, "root": -1,
                        "iters": iters, "warmup": warmup} for i in live}
            for mode, in_place in (("oop", False), ("ip", True)):
                args_of = {}
                for i in live:
                    send, recv = bufs[i]
                    args_of[i] = (bes[i], send, None if in_place else recv, op, in_place)
                    bes[i].fill(send, inputs)
                    for _ in range(warmup):
                        spec.run(*args_of[i])
                trials = {i: [] for i in live}
                for t in range(args.trials):
                    k = t % len(live) if live else 0     # rotate who goes first
                    for i in live[k:] + live[:k]:
                        be, *rest = args_of[i]
                        trials[i].append(one_trial(be, spec, *rest, iters))
                for i in live:
                    be, send, recv, _, _ = args_of[i]
                    wrong = None
                    if args.check:
                        wrong = check_once(be, spec, send, recv, op, in_place, inputs,
                                           expected, dt)
                    rows[i][mode] = make_result(size, statistics.median(trials[i]), factor,
                                                wrong)
                    rows[i][mode]["trials_us"] = trials[i]
            for i in live:
                results[bes[i].name]["rows"].append(rows[i])
                outs[i](format_row(rows[i]))
            if on_row is not None:
                on_row(results)
        del bufs
        for be in bes:
            be.release()
    for be, out in zip(bes, outs):
        sweep_footer(out, spec, be, results[be.name], bool(args.check))
    return results


def run_sweep(spec: CollSpec, args, be, out=None) -> dict:
    return run_sweeps(spec, args, [be], [out] if out else None)[be.name]


def _report_error(args, rank, what: str, exc: BaseException) -> None:
    """Print the error; rank 0 also leaves it in the result file for the launcher's summary."""
    msg = f"{what}: {type(exc).__name__}: {exc}".strip()
    if rank in (0, None):
        import traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"# rank {rank}: {msg}", file=sys.stderr, flush=True)
    if args.result_file and rank in (0, None):
        try:
            old = json.loads(Path(args.result_file).read_text())
        except (OSError, ValueError):
            old = {"rows": []}
        old["error"] = msg[:2000]
        write_json(args.result_file, old)


def run_as_rank(spec: CollSpec, args) -> int:
    env_world = world_from_env(required=False)
    names = [args.backend] + [b for b in args.cohost.split(",") if b and b != args.backend]
    bes = []
    try:
        for name in names:
            bes.append(make_backend(name, args.timeout, args.device))
    except Exception as e:
        _report_error(args, env_world[0] if env_world else None,
                      f"backend {name} unavailable", e)
        for be in bes:
            be.close()
        return 3
    rank = bes[0].rank
    multi = len(bes) > 1

    def save(results):
        if args.result_file and rank == 0:
            write_json(args.result_file, {"cohosted": results} if multi
                       else results[bes[0].name])
    # the primary's table prints as it goes, the others' after it (same trials, interleaved)
    outs = [Rank0Printer(rank, hold=i > 0) for i in range(len(bes))]
    try:
        try:
            results = run_sweeps(spec, args, bes, outs, on_row=save)
        finally:
            for be, out in zip(bes[1:], outs[1:]):
                if rank == 0:
                    print(f"\n# ----- {spec.name}: backend {be.name}, its trials interleaved "
                          f"with {names[0]}'s in the same ranks -----", flush=True)
                out.flush()
        save(results)
        for be in bes:      # who kept the others waiting, by the library's own counts
            stats = be.report()
            if stats is not None and rank == 0:
                print(f"# slow-rank report, {be.name}: {stats_line(stats)}", flush=True)
        wrong = any(r["wrong_total"] for r in results.values())
        return 1 if (args.check and wrong) else 0
    except Exception as e:
        _report_error(args, rank, f"{spec.name} on {'+'.join(names)} failed", e)
        return 4
    finally:
        for be in reversed(bes):
            be.close()


# --------------------------------------------------------------------------------------------
# The command line: start the ranks (--np) or run as one
# --------------------------------------------------------------------------------------------

def orchestrate(spec: CollSpec, args) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_on_sigterm)
    nranks = args.np or 1
    vs = [b.strip() for b in (args.vs or "").split(",") if b.strip()]
    for b in vs:
        if b not in BACKENDS:
            raise SystemExit(f"--vs: unknown backend {b!r}; use names from {BACKENDS}")
    names = [args.backend] + [b for b in vs if b != args.backend]
    t_start = time.monotonic()
    backends = launch_backends(spec, args, names, nranks)
    write_report(spec, args, backends, nranks, parse_dtype(args.datatype).name, vs, t_start)
    primary = backends[args.backend]
    wrong = any((b.get("wrong_total") or 0) for b in backends.values())
    if primary["status"] != "ok":
        return 2
    return 1 if wrong else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="nccl-tests style benchmark for topocomm "
                                            "with gloo / MPI baselines")
    p.add_argument("-b", "--minbytes", default="32M", help="smallest size per rank (K/M/G ok)")
    p.add_argument("-e", "--maxbytes", default="32M", help="largest size per rank (K/M/G ok)")
    p.add_argument("-f", "--stepfactor", type=float, default=2.0)
    p.add_argument("-n", "--iters", type=int, default=None,
                   help="timed iterations per trial (default: scaled down by size, <= 50)")
    p.add_argument("-w", "--warmup_iters", type=int, default=None,
                   help="untimed iterations per size and mode (default: 1..5 by size)")
    p.add_argument("-c", "--check", type=int, choices=(0, 1), default=1)
    p.add_argument("-d", "--datatype", default="float")
    p.add_argument("-o", "--op", default="sum", help="sum, prod, min, max, avg, or all")
    p.add_argument("-t", "--trials", type=int, default=3, help="median over this many trials")
    p.add_argument("--np", type=int, default=None, help="spawn N local ranks")
    p.add_argument("--vs", default="", help="baselines to run after, e.g. gloo,mpi")
    p.add_argument("--backend", default="topocomm", choices=BACKENDS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the torch backends' tensors live (cuda: every rank on GPU "
                        "LOCAL_RANK %% the GPU count; mpi and topocomm-numpy stay on cpu)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--plot", default=None, help="write a busbw-vs-size PNG here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per backend run")
    p.add_argument("--separate", action="store_true",
                   help="run each --vs backend in its own launch, one after the other (default: "
                        "all backends in the same ranks, every trial taken on each in turn)")
    p.add_argument("--result-file", dest="result_file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cohost", default="", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    # validate early, with the argument's name
    parse_size(args.minbytes)
    parse_size(args.maxbytes)
    parse_dtype(args.datatype)
    parse_ops(args.op)
    size_list(parse_size(args.minbytes), parse_size(args.maxbytes), args.stepfactor)
    if args.iters is not None and args.iters < 1:
        raise SystemExit("--iters must be >= 1")
    if args.trials < 1:
        raise SystemExit("--trials must be >= 1")
    return args


def main(spec: CollSpec, argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launched = world_from_env(required=False)
    if args.result_file or launched:
        if args.vs and not args.result_file and launched[0] == 0:
            print("# --vs ignored: running as a rank of an external launcher "
                  "(torchrun/mpiexec/Slurm); use --np N for side-by-side baselines",
                  file=sys.stderr, flush=True)
        return run_as_rank(spec, args)
    return orchestrate(spec, args)

"""Generic nccl-tests style benchmark loop for topocomm and its baselines (gloo, MPI).

A collective is described by a small spec (bench/all_reduce_perf.py, bench/alltoall_perf.py):
how to fill inputs from (rank, index), the closed-form expected output, how to call the
backend out-of-place and in-place, and the bus-bandwidth factor. This module owns the rest:

- the command line (nccl-tests flags: -b -e -f -n -w -c -d -o, plus -t trials, --np, --vs,
  --backend, --json, --plot, --timeout);
- launching ranks: `--np N` spawns N local ranks as subprocesses (torchrun-style env) or,
  for `--backend mpi`, `mpiexec -n N`; under torchrun / mpiexec / Slurm it runs as that rank;
- the timed loop (methodology of /work/shared/BASELINES.md): barrier, time `iters` ops,
  per-op mean on each rank, max over ranks through the backend, median over trials;
- the check iteration after the timed loop: #wrong is a real count of wrong elements;
- output: the exact nccl-tests table, footer, a side-by-side summary with --vs, JSON, PNG.

Units: size = one rank's buffer in bytes, time in us, algbw = size / time in GB/s (1e9),
busbw = algbw x factor (all-reduce 2(n-1)/n, all-to-all (n-1)/n).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Benchmark the working tree this script sits in (comms/ may not be pip-installed).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))

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


@dataclass(frozen=True)
class DType:
    name: str          # nccl-tests column name
    torch_name: str    # attribute of torch
    np_name: str | None  # numpy dtype name; None when numpy has none (bfloat16)
    itemsize: int
    exact_limit: int   # largest integer all values up to which are exact in this type
    is_float: bool

    @property
    def gen_np(self):
        """numpy dtype used to generate values (float32 stands in for bfloat16)."""
        return np.dtype(self.np_name or "float32")


DTYPES = {
    "float": DType("float", "float32", "float32", 4, 1 << 24, True),
    "half": DType("half", "float16", "float16", 2, 2048, True),
    "bfloat16": DType("bfloat16", "bfloat16", None, 2, 256, True),
    "double": DType("double", "float64", "float64", 8, 1 << 53, True),
    "int32": DType("int32", "int32", "int32", 4, (1 << 31) - 1, False),
    "int64": DType("int64", "int64", "int64", 8, (1 << 63) - 1, False),
    "int8": DType("int8", "int8", "int8", 1, 127, False),
    "uint8": DType("uint8", "uint8", "uint8", 1, 255, False),
}
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


def format_time(time_us: float) -> str:
    """nccl-tests: %7.0f above 10 ms, %7.1f above 100 us, else %7.2f."""
    if time_us >= 10000.0:
        return "%7.0f" % time_us
    if time_us >= 100.0:
        return "%7.1f" % time_us
    return "%7.2f" % time_us


HEADER_TITLE = ("# %10s  %12s  %8s  %6s  %6s" % ("", "", "", "", "")
                + "           out-of-place                       in-place")
HEADER_NAMES = ("# %10s  %12s  %8s  %6s  %6s" % ("size", "count", "type", "redop", "root")
                + ("  %7s  %6s  %6s %6s" % ("time", "algbw", "busbw", "#wrong")) * 2)
HEADER_UNITS = ("# %10s  %12s  %8s  %6s  %6s" % ("(B)", "(elements)", "", "", "")
                + ("  %7s  %6s  %6s %6s" % ("(us)", "(GB/s)", "(GB/s)", "")) * 2).rstrip()


def header_lines() -> list:
    return [HEADER_TITLE, HEADER_NAMES, HEADER_UNITS]


def _format_half(res) -> str:
    if res is None:
        return "  %7s  %6s  %6s %6s" % ("N/A", "N/A", "N/A", "N/A")
    wrong = "N/A" if res.get("wrong") is None else str(res["wrong"])
    return "  %7s  %6.2f  %6.2f %6s" % (format_time(res["time_us"]), res["algbw_gbs"],
                                        res["busbw_gbs"], wrong)


def format_row(row: dict) -> str:
    return ("%12d  %12d  %8s  %6s  %6d" % (row["size"], row["count"], row["type"], row["redop"],
                                             row["root"])
            + _format_half(row.get("oop")) + _format_half(row.get("ip")))


def footer_lines(rows: list, check: bool) -> list:
    wrong = sum((r[m].get("wrong") or 0) for r in rows for m in ("oop", "ip") if r.get(m))
    bws = [r[m]["busbw_gbs"] for r in rows for m in ("oop", "ip") if r.get(m)]
    avg = sum(bws) / len(bws) if bws else 0.0
    status = ("OK" if wrong == 0 else "FAILED") if check else "(not checked)"
    return ["# Out of bounds values : %d %s" % (wrong, status),
            "# Avg bus bandwidth    : %g " % avg, "#"]


MODEL_MIN_BYTES = 1 << 20
MODEL_TOLERANCE = 0.30


def model_check(points: list) -> dict | None:
    """points: [(size, estimate_us, measured_us)] -> the cost model's accuracy over the sizes
    >= MODEL_MIN_BYTES: median |estimate - measured| / measured, and the footer lines."""
    pts = [(s, e, m) for s, e, m in points if s >= MODEL_MIN_BYTES and e and m and m > 0]
    if not pts:
        return None
    errs = [(e - m) / m for _, e, m in pts]
    med = statistics.median(abs(x) for x in errs)
    detail = "  ".join("%s %s/%s us %+.0f%%" % (_short_size(s), format_time(e).strip(),
                                                format_time(m).strip(), 100 * x)
                       for (s, e, m), x in zip(pts, errs))
    return {"median_abs_error": med, "num_sizes": len(pts), "within": med <= MODEL_TOLERANCE,
            "points": [{"size": s, "estimate_us": e, "measured_us": m} for s, e, m in pts],
            "lines": ["# Model estimate per size (estimate/measured): " + detail,
                      "# Model estimate vs measured: median |error| %.0f%% over %d sizes >= 1 MiB "
                      "(within %d%%: %s)" % (100 * med, len(pts), 100 * MODEL_TOLERANCE,
                                             "yes" if med <= MODEL_TOLERANCE else "no")]}


def _short_size(nbytes: int) -> str:
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return "%d%s" % (nbytes >> shift, unit)
    return str(nbytes)


def make_result(size_bytes: int, time_us: float, factor: float, wrong) -> dict:
    alg = algbw_gbs(size_bytes, time_us)
    return {"time_us": time_us, "algbw_gbs": alg, "busbw_gbs": alg * factor, "wrong": wrong}


def count_wrong(result: np.ndarray, expected: np.ndarray, dt: DType, op: str) -> int:
    """Elements of `result` that differ from `expected` (exact, except avg on floats)."""
    result = np.asarray(result).reshape(-1)
    expected = np.asarray(expected).reshape(-1)
    if result.size != expected.size:
        return max(result.size, expected.size)
    if op == "avg" and dt.is_float:
        rtol = {"half": 2e-3, "bfloat16": 1e-2, "float": 1e-6, "double": 1e-12}[dt.name]
        ok = np.isclose(result.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=0)
        return int(result.size - np.count_nonzero(ok))
    return int(np.count_nonzero(result != expected))


def value_range(dt: DType, nranks: int, op: str) -> int:
    """Inputs are 1..m so that reducing nranks of them stays exact in dt."""
    limit = min(dt.exact_limit, 1 << 16)
    if op in ("sum", "avg"):
        return max(1, limit // max(nranks, 1))
    return limit


def periodic(period_values: np.ndarray, shift: int, count: int) -> np.ndarray:
    """v[k] = period_values[(k + shift) % len(period_values)] for k < count (vectorized)."""
    base = np.roll(period_values, -(shift % len(period_values)))
    return np.resize(base, count) if count else base[:0].copy()


def summary_table(primary: str, backends: dict, mode: str = "oop") -> list:
    """Side-by-side lines: size | time per backend | busbw per backend | speed-up vs each.

    backends: name -> {"status", "rows"}; speed-up = baseline time / primary time.
    """
    names = [primary] + [b for b in backends if b != primary]
    others = names[1:]
    index = {}
    keys = []
    for name in names:
        for row in (backends.get(name) or {}).get("rows", []):
            key = (row["size"], row["redop"], row["type"])
            if key not in index:
                index[key] = {}
                keys.append(key)
            index[key][name] = row.get(mode)
    keys.sort(key=lambda k: (k[1], k[2], k[0]))
    width = max(10, max(len(n) for n in names) + 3)
    head = "# %10s  %6s" % ("size", "redop")
    head += "".join("  %*s" % (width, n + " us") for n in names)
    head += "".join("  %*s" % (width, n + " GB/s") for n in names)
    head += "".join("  %*s" % (max(9, len(o) + 3), "vs " + o) for o in others)
    lines = [head]
    for key in keys:
        cells = index[key]
        line = "  %10d  %6s" % (key[0], key[1])
        line += "".join("  %*s" % (width, format_time(cells[n]["time_us"]).strip()
                                  if cells.get(n) else "-") for n in names)
        line += "".join("  %*s" % (width, "%.3f" % cells[n]["busbw_gbs"] if cells.get(n) else "-")
                        for n in names)
        for o in others:
            p, b = cells.get(primary), cells.get(o)
            if p and b and p["time_us"] > 0:
                txt = "%.2fx" % (b["time_us"] / p["time_us"])
            else:
                txt = "-"
            line += "  %*s" % (max(9, len(o) + 3), txt)
        lines.append(line)
    for name in names:
        info = backends.get(name) or {"status": "missing", "reason": "not run"}
        if info.get("status") != "ok":
            lines.append("# %s: %s%s" % (name, info.get("status", "missing").upper(),
                                         (" - " + info["reason"]) if info.get("reason") else ""))
    return lines


def summary_records(primary: str, backends: dict) -> list:
    """The side-by-side table as JSON records (both modes)."""
    out = {}
    for name, info in backends.items():
        for row in (info or {}).get("rows", []):
            key = (row["size"], row["redop"], row["type"])
            rec = out.setdefault(key, {"size": key[0], "redop": key[1], "type": key[2]})
            for mode in ("oop", "ip"):
                if row.get(mode):
                    rec[f"{name}_{mode}_time_us"] = row[mode]["time_us"]
                    rec[f"{name}_{mode}_busbw_gbs"] = row[mode]["busbw_gbs"]
    for rec in out.values():
        for name in backends:
            if name == primary:
                continue
            for mode in ("oop", "ip"):
                p, b = rec.get(f"{primary}_{mode}_time_us"), rec.get(f"{name}_{mode}_time_us")
                rec[f"speedup_vs_{name}_{mode}"] = (b / p) if (p and b) else None
    return [out[k] for k in sorted(out, key=lambda k: (k[1], k[2], k[0]))]


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
# Backends: what one rank measures
# --------------------------------------------------------------------------------------------

class TorchBackend:
    """torch.distributed with backend 'gloo' or 'topocomm' on CPU tensors.

    torch has no out-of-place all_reduce and no aliasing-safe in-place all_to_all_single
    (gloo returns wrong data when input is output), so out-of-place all-reduce is
    `recv.copy_(send); all_reduce(recv)` and in-place all-to-all is
    `all_to_all_single(scratch, buf); buf.copy_(scratch)`: what a torch user writes.
    """

    def __init__(self, pg_backend: str, timeout_s: float):
        import datetime
        import torch
        import torch.distributed as dist
        if pg_backend == "topocomm":
            import comms  # noqa: F401  registers the backend
        self.torch, self.dist = torch, dist
        self.name = "topocomm" if pg_backend == "topocomm" else pg_backend
        timeout = datetime.timedelta(seconds=timeout_s)
        # the first torch backend of a process makes the default group; another one in the
        # same processes (interleaved runs) gets its own group over all ranks
        self.group = None
        if dist.is_initialized():
            self.group = dist.new_group(backend=pg_backend, timeout=timeout)
        else:
            rank, size = world_from_env()
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise RuntimeError(f"backend {pg_backend}: MASTER_ADDR/MASTER_PORT are not "
                                   "set; launch with --np N or torchrun")
            dist.init_process_group(pg_backend, rank=rank, world_size=size, timeout=timeout)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self._ops = {"sum": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT,
                     "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.AVG}
        self._scratch = None
        self.notes = ("out-of-place all_reduce = copy + in-place all_reduce; in-place "
                      "all_to_all = all_to_all_single into scratch + copy back")

    def unsupported(self, dt: DType, op):
        if op == "avg" and not dt.is_float:
            return "avg on integers is not defined here"
        return None

    def alloc(self, count: int, dt: DType):
        return self.torch.empty(count, dtype=getattr(self.torch, dt.torch_name))

    def fill(self, buf, values: np.ndarray) -> None:
        buf.copy_(self.torch.from_numpy(np.ascontiguousarray(values)))

    def zero(self, buf) -> None:
        buf.zero_()

    def to_numpy(self, buf) -> np.ndarray:
        if buf.dtype == self.torch.bfloat16:
            return buf.float().numpy()
        return buf.numpy()

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)

    def reduce_scalar(self, value: float, op: str) -> float:
        t = self.torch.tensor([value], dtype=self.torch.float64)
        self.dist.all_reduce(t, op=self._ops[op], group=self.group)
        return float(t.item())

    def all_reduce(self, send, recv, op: str) -> None:
        if recv is None:
            self.dist.all_reduce(send, op=self._ops[op], group=self.group)
        else:
            recv.copy_(send)
            self.dist.all_reduce(recv, op=self._ops[op], group=self.group)

    def all_to_all(self, send, recv) -> None:
        if recv is None:
            s = self._scratch
            if s is None or s.numel() != send.numel() or s.dtype != send.dtype:
                s = self._scratch = self.torch.empty_like(send)
            self.dist.all_to_all_single(s, send, group=self.group)
            send.copy_(s)
        else:
            self.dist.all_to_all_single(recv, send, group=self.group)

    def release(self) -> None:
        self._scratch = None

    def estimate_us(self, collective: str, nbytes: int):
        """topocomm's cost-model estimate for this group (None for other backends)."""
        if self.name != "topocomm":
            return None
        from comms.torch import backend
        comm = backend.communicator_of(self.group)[0]
        fn = getattr(comm, "estimate_us", None)
        return fn(collective, nbytes) if fn else None

    def close(self) -> None:
        try:
            self.dist.destroy_process_group(self.group)
        except Exception:
            pass


class NumpyBackend:
    """Shared by MPI and the topocomm Communicator: numpy buffers (no bfloat16)."""

    notes = ""

    def unsupported(self, dt: DType, op):
        if dt.np_name is None:
            return f"{dt.name} has no numpy dtype"
        if op == "avg" and not dt.is_float:
            return "avg on integers is not defined here"
        return None

    def alloc(self, count: int, dt: DType):
        return np.empty(count, dtype=dt.np_name)

    def fill(self, buf, values: np.ndarray) -> None:
        buf[...] = values

    def zero(self, buf) -> None:
        buf.fill(0)

    def to_numpy(self, buf) -> np.ndarray:
        return buf

    def release(self) -> None:
        pass


class MPIBackend(NumpyBackend):
    """mpi4py on numpy arrays: Allreduce / Alltoall, MPI.IN_PLACE for in-place."""

    name = "mpi"

    def __init__(self, timeout_s: float):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        launched = world_from_env(required=False)
        if launched and launched[1] != self.size:
            raise RuntimeError(f"mpi: COMM_WORLD has {self.size} ranks but the environment says "
                               f"{launched[1]}; launch the mpi backend with mpiexec -n N")
        self._ops = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX}
        self.notes = "%s; mpi4py %s" % (MPI.Get_library_version().splitlines()[0].strip(),
                                        __import__("mpi4py").__version__)

    def unsupported(self, dt: DType, op):
        if op == "avg":
            return "MPI has no AVG reduction"
        return super().unsupported(dt, op)

    def barrier(self) -> None:
        self.comm.Barrier()

    def reduce_scalar(self, value: float, op: str) -> float:
        return float(self.comm.allreduce(float(value), op=self._ops[op]))

    def all_reduce(self, send, recv, op: str) -> None:
        if recv is None:
            self.comm.Allreduce(self.MPI.IN_PLACE, send, op=self._ops[op])
        else:
            self.comm.Allreduce(send, recv, op=self._ops[op])

    def all_to_all(self, send, recv) -> None:
        if recv is None:
            self.comm.Alltoall(self.MPI.IN_PLACE, send)
        else:
            self.comm.Alltoall(send, recv)

    def close(self) -> None:
        pass


class CommBackend(NumpyBackend):
    """topocomm's framework-free Communicator (comms.init()) on numpy arrays."""

    name = "topocomm-numpy"

    def __init__(self, timeout_s: float):
        import comms
        self.comm = comms.init()
        self.rank, self.size = self.comm.rank, self.comm.size
        self.notes = "comms.init() Communicator; in-place all_to_all passes send is recv"

    def barrier(self) -> None:
        self.comm.barrier()

    def reduce_scalar(self, value: float, op: str) -> float:
        a = np.array([value], dtype=np.float64)
        self.comm.allreduce(a, op=op)
        return float(a[0])

    def all_reduce(self, send, recv, op: str) -> None:
        if recv is None:
            self.comm.allreduce(send, op=op)
        else:
            self.comm.allreduce(send, op=op, out=recv)

    def all_to_all(self, send, recv) -> None:
        self.comm.all_to_all(send, send if recv is None else recv)

    def estimate_us(self, collective: str, nbytes: int):
        fn = getattr(self.comm, "estimate_us", None)
        return fn(collective, nbytes) if fn else None

    def close(self) -> None:
        self.comm.close()


BACKENDS = ("topocomm", "topocomm-numpy", "gloo", "mpi")


def make_backend(name: str, timeout_s: float):
    if name == "gloo":
        return TorchBackend("gloo", timeout_s)
    if name == "topocomm":
        return TorchBackend("topocomm", timeout_s)
    if name == "topocomm-numpy":
        return CommBackend(timeout_s)
    if name == "mpi":
        return MPIBackend(timeout_s)
    raise ValueError(f"backend: unknown {name!r}; use one of {BACKENDS}")


# --------------------------------------------------------------------------------------------
# Environment: are we a launched rank?
# --------------------------------------------------------------------------------------------

_LAUNCH_ENVS = (("RANK", "WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def world_from_env(env=None, required: bool = True):
    """(rank, size) from torchrun, mpiexec (MPICH / Open MPI) or Slurm variables."""
    env = os.environ if env is None else env
    for rank_key, size_key in _LAUNCH_ENVS:
        if rank_key in env and size_key in env:
            return int(env[rank_key]), int(env[size_key])
    if required:
        raise RuntimeError("no rank/size in the environment (RANK/WORLD_SIZE, PMI_*, OMPI_*, "
                           "SLURM_*); use --np N")
    return None


# --------------------------------------------------------------------------------------------
# One rank: the sweep
# --------------------------------------------------------------------------------------------

class Rank0Printer:
    def __init__(self, rank: int, hold: bool = False):
        self.rank, self.held = rank, [] if hold else None

    def __call__(self, line: str = "") -> None:
        if self.rank != 0:
            return
        if self.held is not None:
            self.held.append(line)
        else:
            print(line, flush=True)

    def flush(self) -> None:
        """Print what was held (the tables of the backends measured beside the primary)."""
        for line in self.held or ():
            print(line, flush=True)
        self.held = None


def one_trial(be, spec: CollSpec, send, recv, op, in_place, iters) -> float:
    """One trial: barrier, `iters` ops timed; the max over ranks of the per-op mean (us)."""
    be.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        spec.run(be, send, recv, op, in_place)
    per_op = (time.perf_counter() - t0) / iters
    return be.reduce_scalar(per_op, "max") * 1e6


def check_once(be, spec: CollSpec, send, recv, op, in_place, inputs, expected, dt) -> int:
    be.fill(send, inputs)
    if recv is not None:
        be.zero(recv)       # every expected value is >= 1, so a skipped element counts
    be.barrier()
    spec.run(be, send, recv, op, in_place)
    result = be.to_numpy(send if in_place else recv)
    wrong = count_wrong(result, expected, dt, op)
    return int(round(be.reduce_scalar(float(wrong), "sum")))


def _sweep_header(out, spec, args, be, n) -> None:
    out("# topocomm bench: %s  backend: %s  nranks: %d" % (spec.name, be.name, n))
    out("# nThread 1 nGpus 0 minBytes %d maxBytes %d step: %g(factor) warmup iters: %s "
        "iters: %s trials: %d validation: %d" % (
            parse_size(args.minbytes), parse_size(args.maxbytes), args.stepfactor,
            args.warmup_iters if args.warmup_iters is not None else "auto",
            args.iters if args.iters is not None else "auto", args.trials, args.check))
    out("#")
    out("# Rank %2d Pid %6d on %10s device cpu (%s)" % (be.rank, os.getpid(),
                                                      platform.node(), be.name))
    if be.notes:
        out("# notes: %s" % be.notes)
    out("#")
    for line in header_lines():
        out(line)


def _sweep_footer(out, spec, be, result, check: bool) -> None:
    rows = result["rows"]
    for line in footer_lines(rows, check):
        out(line)
    estimate = getattr(be, "estimate_us", None)
    if estimate is not None and spec.model_collective and rows:
        first_op = rows[0]["redop"]
        model = model_check([(r["size"], estimate(spec.model_collective, r["size"]),
                              r[spec.model_mode]["time_us"])
                             for r in rows if r["redop"] == first_op and r.get(spec.model_mode)])
        if model:
            model["mode"] = spec.model_mode
            result["model"] = model
            for line in model["lines"]:
                out(line)
    wrong_total = sum((r[m]["wrong"] or 0) for r in rows for m in ("oop", "ip"))
    bws = [r[m]["busbw_gbs"] for r in rows for m in ("oop", "ip")]
    result["wrong_total"] = wrong_total
    result["avg_busbw_gbs"] = sum(bws) / len(bws) if bws else 0.0
    result["complete"] = True


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
    counts = []
    for size in size_list(parse_size(args.minbytes), parse_size(args.maxbytes), args.stepfactor):
        count = spec.align_count(size // dt.itemsize, n)
        if count not in counts:
            counts.append(count)
    results = {}
    for be, out in zip(bes, outs):
        _sweep_header(out, spec, args, be, n)
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
        _sweep_footer(out, spec, be, results[be.name], bool(args.check))
    return results


def run_sweep(spec: CollSpec, args, be, out=None) -> dict:
    return run_sweeps(spec, args, [be], [out] if out else None)[be.name]


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


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
            bes.append(make_backend(name, args.timeout))
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
        wrong = any(r["wrong_total"] for r in results.values())
        return 1 if (args.check and wrong) else 0
    except Exception as e:
        _report_error(args, rank, f"{spec.name} on {'+'.join(names)} failed", e)
        return 4
    finally:
        for be in reversed(bes):
            be.close()


# --------------------------------------------------------------------------------------------
# Launching ranks (--np) and the --vs comparison
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mpiexec():
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


def child_args(args, backend: str, result_file: str, cohost=()) -> list:
    out = ["-b", str(args.minbytes), "-e", str(args.maxbytes), "-f", repr(args.stepfactor),
           "-c", str(args.check), "-d", args.datatype, "-o", args.op, "-t", str(args.trials),
           "--timeout", repr(args.timeout), "--backend", backend, "--result-file", result_file]
    if cohost:
        out += ["--cohost", ",".join(cohost)]
    if args.iters is not None:
        out += ["-n", str(args.iters)]
    if args.warmup_iters is not None:
        out += ["-w", str(args.warmup_iters)]
    return out


_LIVE = set()          # Popen objects to kill if we exit early


def _kill(proc) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    _LIVE.discard(proc)


def _kill_all_live() -> None:
    for proc in list(_LIVE):
        _kill(proc)


import atexit  # noqa: E402
atexit.register(_kill_all_live)


def run_procs(cmds_envs, timeout_s: float, grace_s: float = 15.0):
    """Start the commands (each its own process group), wait for all with a deadline.

    Returns (status, reason). When one exits non-zero the rest get grace_s, then are killed.
    """
    events = queue.Queue()
    procs = []
    try:
        for cmd, env in cmds_envs:
            p = subprocess.Popen(cmd, env=env, start_new_session=True, cwd=str(REPO_ROOT))
            _LIVE.add(p)
            procs.append(p)
            threading.Thread(target=lambda p=p: events.put((p, p.wait())), daemon=True).start()
    except OSError as e:
        for p in procs:
            _kill(p)
        return "failed", f"could not start {cmds_envs[0][0][0]}: {e}"
    deadline = time.monotonic() + timeout_s
    pending, failures = set(procs), []
    status, reason = "ok", ""
    while pending:
        remaining = deadline - time.monotonic()
        if failures:
            remaining = min(remaining, grace_s)
        try:
            p, rc = events.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            if failures:
                status = "failed"
                reason = (f"rank exited with {failures[0]}; the other ranks did not finish "
                          f"within {grace_s:.0f} s and were killed")
            else:
                status, reason = "timeout", f"did not finish within {timeout_s:.0f} s; killed"
            break
        pending.discard(p)
        if rc != 0:
            failures.append(rc)
    for p in procs:
        _kill(p)
    if status == "ok" and failures:
        wrong_only = all(rc == 1 for rc in failures)
        status = "wrong" if wrong_only else "failed"
        reason = ("ranks reported wrong values" if wrong_only
                  else f"process exit codes {sorted(set(failures))}")
    return status, reason


def launch(spec: CollSpec, args, backend: str, nranks: int, cohost=()) -> dict:
    """Run one backend's sweep on nranks local ranks; return its result dict with status.
    cohost: more backends measured in the same processes, trials interleaved (then the
    return value is {name: result dict with status}, one per backend)."""
    t0 = time.monotonic()
    names = [backend] + [b for b in cohost if b != backend]
    fd, result_file = tempfile.mkstemp(prefix=f"topocomm-bench-{backend}-", suffix=".json")
    os.close(fd)
    os.unlink(result_file)
    script = str(Path(spec.script).resolve())
    base_env = dict(os.environ)
    for keys in _LAUNCH_ENVS:
        for k in keys:
            base_env.pop(k, None)
    base_env.setdefault("OMP_NUM_THREADS", "1")       # as torchrun does for several ranks
    # numpy gives arrays of 4 MiB and more transparent huge pages (madvise), torch's CPU
    # allocator only with this set: without it the torch ranks (topocomm, gloo) move their
    # big buffers through 4 KiB pages while MPI's numpy buffers use 2 MiB ones, which made
    # every 64 MiB copy 20-30% slower on the torch side of the comparison (README's bench notes)
    base_env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    base_env["PYTHONUNBUFFERED"] = "1"
    argv = child_args(args, backend, result_file, names[1:])
    if "mpi" in names:
        why = _mpi_missing()
        if why:
            return _missing(names, why)
        mpiexec = find_mpiexec()
        if names != ["mpi"]:           # torch groups beside MPI in the same ranks
            base_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cmds = [([mpiexec, "-n", str(nranks), sys.executable, script] + argv, base_env)]
    else:
        port = free_port()
        cmds = []
        for r in range(nranks):
            env = dict(base_env, RANK=str(r), WORLD_SIZE=str(nranks), LOCAL_RANK=str(r),
                       LOCAL_WORLD_SIZE=str(nranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
            cmds.append(([sys.executable, script] + argv, env))
    status, reason = run_procs(cmds, args.timeout * len(names))
    result = {"rows": []}
    try:
        result = json.loads(Path(result_file).read_text())
        os.unlink(result_file)
    except (OSError, ValueError):
        if status == "ok":
            status, reason = "failed", "rank 0 wrote no result"
    if len(names) > 1:
        parts = result.get("cohosted") or {}
        out = {}
        for name in names:
            part = dict(parts.get(name) or {"rows": []})
            if result.get("error"):
                part["error"] = result["error"]
            out[name] = _finish(part, status, reason, name, cmds, t0)
        return out
    return _finish(result, status, reason, backend, cmds, t0)


def _missing(names, reason):
    res = {"status": "missing", "reason": reason, "rows": []}
    return res if len(names) == 1 else {name: dict(res) for name in names}


def _finish(result, status, reason, backend, cmds, t0):
    if status in ("ok", "wrong") and not result.get("complete"):
        status, reason = "failed", "sweep incomplete"
    if result.get("error") and status != "ok":
        reason = f"{reason}; rank 0: {result['error']}"
    if status == "failed" and backend == "mpi":
        reason += f" (launched with {cmds[0][0][0]})"
    result["status"] = "ok" if status == "wrong" else status
    if status != "ok":
        result["reason"] = reason
    result["wall_s"] = time.monotonic() - t0
    return result


def plot(path, spec: CollSpec, backends: dict, nranks: int, dt_name: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib unavailable ({e})"
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for name, info in backends.items():
        rows = (info or {}).get("rows") or []
        for op in sorted({r["redop"] for r in rows}):
            pts = [(r["size"], r["oop"]["busbw_gbs"]) for r in rows
                   if r["redop"] == op and r["size"] > 0 and r.get("oop")]
            if not pts:
                continue
            label = name if op in ("none", "sum") and len({r["redop"] for r in rows}) == 1 \
                else f"{name} {op}"
            if info.get("status") != "ok":
                label += f" ({info.get('status')}, partial)"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
            drawn += 1
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size per rank (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s), out-of-place")
    ax.set_title(f"{spec.name}, {nranks} ranks, {dt_name}, {platform.node()}")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def _print_status(spec, name, res) -> None:
    if res["status"] != "ok":
        print(f"# {spec.name}: backend {name} {res['status'].upper()}: "
              f"{res.get('reason', '')}", flush=True)
    elif res.get("reason"):
        print(f"# {spec.name}: backend {name}: {res['reason']}", flush=True)
    print(flush=True)


def _mpi_missing():
    """None when MPI baselines can run here, else why not."""
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        return f"mpi4py is not importable ({e})"
    return None if find_mpiexec() else "mpiexec not found (venv bin or PATH)"


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)      # runs atexit, which kills the spawned ranks


def orchestrate(spec: CollSpec, args) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    nranks = args.np or 1
    vs = [b.strip() for b in (args.vs or "").split(",") if b.strip()]
    for b in vs:
        if b not in BACKENDS:
            raise SystemExit(f"--vs: unknown backend {b!r}; use names from {BACKENDS}")
    names = [args.backend] + [b for b in vs if b != args.backend]
    backends = {}
    t_start = time.monotonic()
    if args.separate or len(names) == 1:
        for name in names:
            print(f"# ===== {spec.name}: backend {name}, {nranks} local ranks "
                  f"(timeout {args.timeout:.0f} s) =====", flush=True)
            backends[name] = launch(spec, args, name, nranks)
            _print_status(spec, name, backends[name])
    else:
        together = list(names)
        if "mpi" in together and args.backend != "mpi":
            why = _mpi_missing()
            if why:                               # the others still run, side by side
                backends["mpi"] = {"status": "missing", "reason": why, "rows": []}
                together.remove("mpi")
        # comms.init() bootstraps from MASTER_ADDR/PORT like torch does: it cannot share the
        # ranks with a torch group on the same port, so it runs in its own launch
        alone = [b for b in together if b == "topocomm-numpy" and
                 {"topocomm", "gloo"} & set(together)]
        for name in alone:
            together.remove(name)
            print(f"# ===== {spec.name}: backend {name}, {nranks} local ranks, its own launch "
                  f"(timeout {args.timeout:.0f} s) =====", flush=True)
            backends[name] = launch(spec, args, name, nranks)
        print(f"# ===== {spec.name}: backends {', '.join(together)} in the same {nranks} local "
              f"ranks, trials interleaved (timeout {args.timeout * len(together):.0f} s) =====",
              flush=True)
        res = launch(spec, args, together[0], nranks, together[1:])
        backends.update(res if len(together) > 1 else {together[0]: res})
        backends = {name: backends[name] for name in names}
        for name in names:
            _print_status(spec, name, backends[name])
    if vs:
        print(f"# ===== side by side: {spec.name}, {nranks} ranks, {args.datatype}, "
              f"out-of-place; speed-up = baseline time / {args.backend} time =====")
        for line in summary_table(args.backend, backends, "oop"):
            print(line)
        print(flush=True)
    report = {"collective": spec.name, "nranks": nranks, "datatype": parse_dtype(args.datatype).name,
              "primary": args.backend, "host": platform.node(), "cpus": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "methodology": "size = one rank's buffer (B); time = median over trials of max over "
                             "ranks of per-op mean (us); algbw = size/time (GB/s, 1e9); "
                             f"busbw = algbw x {spec.name} factor; " + (
                                 "backends run one after the other, each in its own launch"
                                 if args.separate or not vs else
                                 "backends share the same ranks (mpiexec) and every trial of a "
                                 "size and mode is taken on each backend in turn (rotating who "
                                 "goes first), so the speed-ups compare the same noise window"),
              "args": {k: v for k, v in vars(args).items() if k != "result_file"},
              "backends": backends, "summary": summary_records(args.backend, backends),
              "wall_s": time.monotonic() - t_start}
    if args.json:
        write_json(args.json, report)
        print(f"# wrote {args.json}")
    if args.plot:
        err = plot(args.plot, spec, backends, nranks, report["datatype"])
        print(f"# plot not written: {err}" if err else f"# wrote {args.plot}", flush=True)
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

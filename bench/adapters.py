"""The backend adapters, one per backend a rank measures: topocomm through torch.distributed
and torch's gloo (TorchBackend), topocomm's framework-free numpy Communicator (CommBackend) and
mpi4py on MPICH (MPIBackend). Each allocates and fills its buffers, runs all_reduce /
all_to_all out of place or in place, and reduces a scalar over the ranks; make_backend builds
one from its --backend name."""
from __future__ import annotations

import os
import sys

import numpy as np

from checks import DType
from launcher import REPO_ROOT, world_from_env

# Benchmark the working tree this script sits in (comms/ may not be pip-installed).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))


class TorchBackend:
    """torch.distributed with backend 'gloo' or 'topocomm' on CPU tensors, or on CUDA
    tensors with device "cuda" (rank r on GPU LOCAL_RANK mod the GPU count; a trial ends
    with a device synchronize, so the time includes the GPU work).

    torch has no out-of-place all_reduce, so out-of-place all-reduce is
    `recv.copy_(send); all_reduce(recv)`. gloo's all_to_all_single returns wrong data when
    input is output, so its in-place all-to-all is `all_to_all_single(scratch, buf);
    buf.copy_(scratch)`, what a gloo user writes; topocomm's runs in place as documented,
    `all_to_all_single(buf, buf)`.
    """

    def __init__(self, pg_backend: str, timeout_s: float, device: str = "cpu"):
        import datetime
        import torch
        import torch.distributed as dist
        self.device = torch.device("cpu")
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda: torch sees no GPU")
            index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
            torch.cuda.set_device(index)
            self.device = torch.device("cuda", index)
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
        self._a2a_in_place = self.name == "topocomm"
        self.notes = "out-of-place all_reduce = copy + in-place all_reduce; in-place " + (
            "all_to_all = all_to_all_single(buf, buf)" if self._a2a_in_place else
            "all_to_all = all_to_all_single into scratch + copy back")

    def unsupported(self, dt: DType, op):
        if op == "avg" and not dt.is_float:
            return "avg on integers is not defined here"
        return None

    def alloc(self, count: int, dt: DType):
        return self.torch.empty(count, dtype=getattr(self.torch, dt.torch_name),
                                device=self.device)

    def fill(self, buf, values: np.ndarray) -> None:
        buf.copy_(self.torch.from_numpy(np.ascontiguousarray(values)))

    def zero(self, buf) -> None:
        buf.zero_()

    def to_numpy(self, buf) -> np.ndarray:
        buf = buf.cpu()
        if buf.dtype == self.torch.bfloat16:
            return buf.float().numpy()
        return buf.numpy()

    def sync(self) -> None:
        """The queued device work is done (CPU tensors: nothing to wait for)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

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
        if recv is None and self._a2a_in_place:
            self.dist.all_to_all_single(send, send, group=self.group)
        elif recv is None:
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

    def report(self):
        """The slow-rank report of a topocomm group (comms.stats), else None."""
        if self.name != "topocomm":
            return None
        import comms
        return comms.stats(self.group)

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

    def sync(self) -> None:
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

    def report(self):
        return None

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

    def report(self):
        return self.comm.stats()

    def close(self) -> None:
        self.comm.close()


BACKENDS = ("topocomm", "topocomm-numpy", "gloo", "mpi")


def make_backend(name: str, timeout_s: float, device: str = "cpu"):
    if name == "gloo":
        return TorchBackend("gloo", timeout_s, device)
    if name == "topocomm":
        return TorchBackend("topocomm", timeout_s, device)
    if name in ("topocomm-numpy", "mpi") and device != "cpu":
        raise ValueError(f"backend {name}: numpy buffers only; --device {device} is for the "
                         "torch backends (topocomm, gloo)")
    if name == "topocomm-numpy":
        return CommBackend(timeout_s)
    if name == "mpi":
        return MPIBackend(timeout_s)
    raise ValueError(f"backend: unknown {name!r}; use one of {BACKENDS}")

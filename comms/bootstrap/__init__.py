"""Where rank, size and the rendezvous come from, for comms.init().

    torchrun / torch.distributed env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    mpiexec: MPICH/Hydra (PMI_RANK, PMI_SIZE), Open MPI (OMPI_COMM_WORLD_RANK/SIZE), or
             mpi4py's COMM_WORLD when it is already imported
    Slurm: SLURM_PROCID, SLURM_NTASKS (+ MASTER_ADDR/PORT, or the first node of the job)
The store: a TCPStore served by rank 0 at MASTER_ADDR:MASTER_PORT, or, under MPI with no
MASTER_ADDR, a store whose address rank 0 broadcasts through mpi4py.
"""
from __future__ import annotations

import os
import socket
import sys

from comms.api.communicator import Communicator, default_timeout
from comms.core.store import TCPStore

DEFAULT_PORT = 29500


def _env_int(*names):
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v), n
    return None, None


def discover():
    """(rank, size, source) from the environment; raises RuntimeError naming what is missing."""
    for rank_var, size_var, source in (("RANK", "WORLD_SIZE", "torchrun"),
                                       ("PMI_RANK", "PMI_SIZE", "mpiexec (PMI)"),
                                       ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI"),
                                       ("PMIX_RANK", "PMIX_SIZE", "PMIx"),
                                       ("SLURM_PROCID", "SLURM_NTASKS", "Slurm")):
        r, _ = _env_int(rank_var)
        s, _ = _env_int(size_var)
        if r is not None and s is not None:
            return r, s, source
    if "mpi4py.MPI" in sys.modules:
        w = sys.modules["mpi4py.MPI"].COMM_WORLD
        return w.Get_rank(), w.Get_size(), "mpi4py"
    return 0, 1, "single process (no launcher environment found)"


def init(rank=None, size=None, store=None, timeout=None, name="world", transport=None):
    """A Communicator for this process. Arguments override what the environment says."""
    r, s, source = discover()
    rank = r if rank is None else rank
    size = s if size is None else size
    timeout = default_timeout() if timeout is None else timeout
    own = store is None
    if own:
        if size == 1:
            from comms.core.store import HashStore
            store = HashStore(timeout)
        else:
            host, port = _rendezvous_address(rank, size, source)
            store = TCPStore(host, port, rank == 0, timeout)
    try:
        comm = Communicator(rank, size, store, timeout=timeout, name=name, transport=transport)
    except BaseException:
        if own and hasattr(store, "close"):
            store.close()
        raise
    comm._store = store  # keep the server (rank 0) alive as long as the communicator
    if own:
        comm._own_store = store  # made here: close() closes it (rank 0: stops its server)
    return comm


def _rendezvous_address(rank, size, source):
    host = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if host and port:
        return host, int(port)
    if source.startswith(("mpiexec", "Open MPI", "PMIx", "mpi4py")):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise RuntimeError("comms.init(): launched by MPI without MASTER_ADDR/MASTER_PORT; "
                               "install mpi4py or set MASTER_ADDR and MASTER_PORT") from exc
        addr = None
        if rank == 0:
            with socket.socket() as sk:
                sk.bind(("127.0.0.1", 0))
                addr = ("127.0.0.1", sk.getsockname()[1])
        return MPI.COMM_WORLD.bcast(addr, root=0)
    if source == "Slurm":
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST", "")
        first = nodes.split(",")[0].split("[")[0] if nodes else "127.0.0.1"
        return host or first, int(port or DEFAULT_PORT)
    raise RuntimeError(f"comms.init(): {source} set rank {rank} of {size} but MASTER_ADDR and "
                       "MASTER_PORT are not set")

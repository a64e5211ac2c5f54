"""Where rank, size and the rendezvous come from, for comms.init().

    torchrun / torch.distributed env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    mpiexec: MPICH/Hydra (PMI_RANK, PMI_SIZE), Open MPI (OMPI_COMM_WORLD_RANK/SIZE), or
             mpi4py's COMM_WORLD when it is already imported
    Slurm: SLURM_PROCID, SLURM_NTASKS (+ MASTER_ADDR/PORT, or the first node of the job)
The store:
    torchrun (TORCHELASTIC_USE_AGENT_STORE=True): every rank is a client of the store the
        torchrun agent serves at MASTER_ADDR:MASTER_PORT, under its own key prefix
        (bootstrap/torchelastic.py)
    MASTER_ADDR and MASTER_PORT set: a TCPStore that rank 0 serves there
    MPI without them: MPI rank 0 serves a TCPStore on a free port, at loopback when every
        rank is on its host, else at the address the topology picks for the network, and
        broadcasts it through mpi4py (bootstrap/mpi.py, bootstrap/netaddr.py)
    Slurm without them: rank 0 serves at the first host of the job's node list
        (bootstrap/slurm.py), port MASTER_PORT or DEFAULT_PORT
    one process: an in-process HashStore
"""
from __future__ import annotations

import os
import time
import sys

from comms.api.communicator import Communicator, default_timeout
from comms.core.store import HashStore, TCPStore

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
    """A Communicator for this process; arguments override what the environment says.

    rank, size: this process's rank and the group's size (default: discover()).
    store: a store to rendezvous through (default: one made here, see the module docstring;
        close() of the Communicator then closes it). timeout: seconds (default
        TOPOCOMM_TIMEOUT, else 300). name, transport: as Communicator's.
    Returns the Communicator."""
    r, s, source = discover()
    rank = r if rank is None else rank
    size = s if size is None else size
    timeout = default_timeout() if timeout is None else timeout
    own = store is None
    if own:
        store = _make_store(rank, size, source, timeout)
    try:
        comm = Communicator(rank, size, store, timeout=timeout, name=name, transport=transport)
    except BaseException as exc:
        if own:
            _abandon(store, rank, size - len(getattr(exc, "dead_ranks", ())), timeout)
        raise
    if own:
        comm.adopt_store(store)  # made here: close() closes it (rank 0: stops its server)
    return comm


def _abandon(store, rank, alive, timeout):
    """Close the store this init made, after the group's creation failed. Rank 0 serves it:
    it waits (at most 5 s) until the `alive` ranks have said they are done with it, so that
    a peer still reading the creation keys (to raise the same error) does not lose the
    server."""
    key = "topocomm/init/abandoned"
    try:
        done = store.add(key, 1)
        deadline = time.monotonic() + min(timeout, 5.0)
        while rank == 0 and done < alive and time.monotonic() < deadline:
            time.sleep(0.002)
            done = store.add(key, 0)
    except Exception:  # noqa: BLE001 - a dead peer or server: nothing to wait for
        pass
    finally:
        if hasattr(store, "close"):
            store.close()


def _make_store(rank, size, source, timeout):
    """The rendezvous store for rank `rank` of `size` (see the module docstring)."""
    if size == 1:
        return HashStore(timeout)
    from .torchelastic import agent_store, uses_agent_store
    if uses_agent_store():
        return agent_store(timeout)
    host = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if host and port:
        return TCPStore(host, int(port), rank == 0, timeout)
    if source.startswith(("mpiexec", "Open MPI", "PMIx", "mpi4py")):
        from .mpi import mpi_store
        return mpi_store(timeout)
    if source == "Slurm":
        from .slurm import first_host
        for var in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
            nodes = os.environ.get(var)
            if nodes:
                first = first_host(nodes, var)
                break
        else:
            first = "127.0.0.1"
        return TCPStore(host or first, int(port or DEFAULT_PORT), rank == 0, timeout)
    raise RuntimeError(f"comms.init(): {source} set rank {rank} of {size} but MASTER_ADDR and "
                       "MASTER_PORT are not set")

"""The rendezvous under mpiexec without MASTER_ADDR/MASTER_PORT: MPI rank 0 serves the
store on a free port at an address every rank can reach (bootstrap/netaddr.py) and
broadcasts it through mpi4py; the others connect."""
from __future__ import annotations

import logging
import os

from comms.core.store import TCPStore
from topology import env

_log = logging.getLogger("topocomm")


def mpi_store(timeout: float) -> TCPStore:
    """A TCPStore for every process of MPI_COMM_WORLD (collective: every process calls it);
    MPI rank 0 serves it. `timeout`: the store's timeout in seconds. Raises RuntimeError
    when mpi4py is missing, or (on every rank) when rank 0 could not serve."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError("comms.init(): launched by MPI without MASTER_ADDR/MASTER_PORT; "
                           "install mpi4py or set MASTER_ADDR and MASTER_PORT") from exc
    from topology.detect.net import probe_nics
    from topology.host import host_id

    from .netaddr import rendezvous_host

    world = MPI.COMM_WORLD
    root = world.Get_rank() == 0
    mine = host_id()
    root_host = world.bcast(mine if root else None, root=0)
    # the interfaces matter only on hosts other than rank 0's
    gathered = world.gather((mine, probe_nics() if mine != root_host else None), root=0)
    store, failure, reply = None, None, None
    if root:
        try:
            hosts = [h for h, _ in gathered]
            host_nics = {h: nics for h, nics in gathered if nics is not None}
            if len(set(hosts)) > 1:
                host_nics[mine] = probe_nics()
            address, why = rendezvous_host(hosts, host_nics,
                                           env.get("TOPOCOMM_SOCKET_IFNAME"))
            store = TCPStore(address, 0, True, timeout)
            _log.debug("topocomm: rendezvous store at %s:%d (%s)", address, store.port, why)
            reply = ("ok", address, store.port)
        except Exception as exc:  # tell the others, so none waits for a store never served
            failure = exc
            reply = ("error", f"{type(exc).__name__}: {exc}", 0)
    status, address, port = world.bcast(reply, root=0)
    if root:
        if failure is not None:
            raise failure
        return store
    if status != "ok":
        raise RuntimeError(f"comms.init(): rank 0 could not serve the rendezvous store: {address}")
    return TCPStore(address, port, False, timeout)

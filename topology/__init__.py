"""What is connected to what, and how fast.

    detect/     one probe per source (sysfs cpu/numa, netdevs, infiniband, NVML), local_view()
    fuse.py     merge every rank's view into the group's Topology
    model.py    Topology, PathKind, LinkClass: paths between ranks, link table, JSON
    describe.py the text `topocomm topo` prints
    fixtures/   canned machines for tests (fixture(), fixture_names())

gather() is what a communicator calls at group creation: every rank publishes its view
through the store and fuses all of them. Nothing is read or written at import time.
"""
from __future__ import annotations

import os

from . import env
from .fuse import fuse
from .host import host_id, local_facts
from .model import DEFAULT_LINKS, LinkClass, PathKind, Topology

__all__ = ["DEFAULT_LINKS", "LinkClass", "PathKind", "Topology", "fixture", "fixture_names",
           "fuse", "gather", "host_id", "local_facts"]

_FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fixture_names() -> list:
    """Names of the canned machines in topology/fixtures (without .json)."""
    return sorted(f[:-5] for f in os.listdir(_FIXTURE_DIR) if f.endswith(".json"))


def fixture(name: str) -> Topology:
    """A canned machine by name, e.g. fixture("2hosts_2ranks")."""
    name = name[:-5] if name.endswith(".json") else name
    if name not in fixture_names():
        raise ValueError(f"fixture: unknown {name!r}; known: {', '.join(fixture_names())}")
    return Topology.load(os.path.join(_FIXTURE_DIR, name + ".json"))


def _get(store, key: str, timeout: float) -> bytes:
    """store.get with a bound where the store supports wait(keys, timedelta) (torch
    stores); comms.core.store stores bound every get by their own timeout."""
    wait = getattr(store, "wait", None)
    if wait is not None:
        import datetime
        wait([key], datetime.timedelta(seconds=timeout))
    return store.get(key)


def gather(store, prefix: str, rank: int, size: int, timeout: float = 300.0) -> Topology:
    """The group's Topology: each rank sets `{prefix}/topo/{rank}` to its local view (JSON),
    reads every rank's view and fuses them; all ranks get the same Topology.

    TOPOCOMM_TOPO_FILE: load the topology from that file instead (no detection, no store
    traffic); ValueError if its size is not `size`. TOPOCOMM_TOPO_DUMP_FILE: rank 0 writes
    the topology there as JSON."""
    import json

    from .detect import local_view
    path = env.get("TOPOCOMM_TOPO_FILE")
    if path:
        topo = Topology.load(path)
        if topo.size != size:
            raise ValueError(f"TOPOCOMM_TOPO_FILE={path} describes {topo.size} ranks but this "
                             f"group has {size}")
    else:
        store.set(f"{prefix}/topo/{rank}", json.dumps(local_view(rank)).encode())
        views = []
        for peer in range(size):
            key = f"{prefix}/topo/{peer}"
            try:
                views.append(json.loads(_get(store, key, timeout)))
            except Exception as exc:
                if isinstance(exc, TimeoutError) or "timeout" in str(exc).lower():
                    raise TimeoutError(f"topology.gather: rank {rank} got no view from rank "
                                       f"{peer} (key {key!r}) within the timeout: {exc}") from exc
                raise
        topo = fuse(views)
    dump = env.get("TOPOCOMM_TOPO_DUMP_FILE")
    if dump and rank == 0:
        tmp = f"{dump}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(topo.to_json())
        os.replace(tmp, dump)
    return topo

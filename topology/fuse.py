"""Fuse every rank's local view (topology/detect) into the group's Topology.

Ranks whose views carry the same host id (hostname + boot id + netns inode, or
TOPOCOMM_HOST_ID) are one host; hosts are numbered by their lowest rank. The machine facts
of a host (sockets, NUMA nodes, NICs, InfiniBand, GPUs) come from its lowest rank's view,
since every process on a host reads the same sysfs; the placement (cores, socket, NUMA
node, GPU, TOPOCOMM_SOCKET_IFNAME) is each rank's own. A rank on a host with GPUs gets
visible GPU local_rank % num_visible unless its view names one ("gpu_idx").

Views may be partial (hand-written in tests): only "rank" and "host": {"host_id"} are
required.
"""
from __future__ import annotations

from .detect import VIEW_FORMAT
from .model import Gpu, Host, IbDevice, Nic, NumaNode, RankPlace, Socket, Topology, _build


def _host_from_view(view: dict, where: str) -> Host:
    ident = view["host"]
    cpu = view.get("cpu") or {}
    return Host(
        host_id=str(ident["host_id"]),
        hostname=str(ident.get("hostname") or "?"),
        sockets=[_build(Socket, s, f"{where}.cpu.sockets[{i}]")
                 for i, s in enumerate(cpu.get("sockets") or [])],
        numa_nodes=[_build(NumaNode, n, f"{where}.cpu.numa_nodes[{i}]")
                    for i, n in enumerate(cpu.get("numa_nodes") or [])],
        nics=[_build(Nic, n, f"{where}.nics[{i}]") for i, n in enumerate(view.get("nics") or [])],
        ib_devices=[_build(IbDevice, d, f"{where}.infiniband[{i}]")
                    for i, d in enumerate(view.get("infiniband") or [])],
        gpus=[_build(Gpu, g, f"{where}.gpus[{i}]") for i, g in enumerate(view.get("gpus") or [])],
    )


def fuse(views: list) -> Topology:
    """views: one local_view dict per rank (any order; ranks 0..n-1 each exactly once)."""
    if not views:
        raise ValueError("fuse: no views")
    by_rank: dict = {}
    for i, view in enumerate(views):
        if not isinstance(view, dict) or "rank" not in view or "host" not in view:
            raise ValueError(f"fuse: views[{i}] needs 'rank' and 'host'")
        if view.get("format", VIEW_FORMAT) != VIEW_FORMAT:
            raise ValueError(f"fuse: views[{i}] has format {view.get('format')!r}, "
                             f"expected {VIEW_FORMAT!r} (ranks running different topocomm versions?)")
        rank = view["rank"]
        if rank in by_rank:
            raise ValueError(f"fuse: rank {rank} has two views")
        by_rank[rank] = view
    if sorted(by_rank) != list(range(len(views))):
        raise ValueError(f"fuse: ranks must be 0..{len(views) - 1}, got {sorted(by_rank)}")

    host_idx_of: dict = {}
    hosts: list = []
    members: list = []
    for rank in range(len(views)):
        view = by_rank[rank]
        host_id = str(view["host"]["host_id"])
        if host_id not in host_idx_of:
            host_idx_of[host_id] = len(hosts)
            hosts.append(_host_from_view(view, f"views[rank {rank}]"))
            members.append([])
        members[host_idx_of[host_id]].append(rank)

    places = []
    for rank in range(len(views)):
        view = by_rank[rank]
        h = host_idx_of[str(view["host"]["host_id"])]
        gpu_idx = view.get("gpu_idx")
        if gpu_idx is None and hosts[h].gpus:
            visible = view.get("visible_gpus")
            if visible is None:
                visible = [g.gpu_idx for g in hosts[h].gpus]
            if visible:
                gpu_idx = visible[members[h].index(rank) % len(visible)]
        places.append(RankPlace(rank=rank, host_idx=h, cpus=str(view.get("cpus") or ""),
                                socket_idx=view.get("socket_idx"), numa_idx=view.get("numa_idx"),
                                gpu_idx=gpu_idx, pid=view.get("pid"),
                                socket_ifname=view.get("socket_ifname")))
    return Topology(hosts, places)

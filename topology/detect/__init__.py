"""Detection: what this process can see of its own machine, as one JSON-able dict.

One probe per source, each returning facts or nothing and never raising:
  host identity  topology/host.py        hostname, boot id, netns inode (TOPOCOMM_HOST_ID)
  cpu            detect/cpu.py           sockets, NUMA nodes, this process's cores
  net            detect/net.py           interfaces: IPv4, speed, up, loopback, NUMA, shaping
  infiniband     detect/infiniband.py    IB / RoCE adapters, port state and rate
  gpu            detect/gpu.py           NVML: GPUs, NVLink peers, PCIe distance
Every rank calls local_view(); topology/fuse.py merges the views of a group into a
Topology. Probes read paths under `root` ("/" normally) so tests can fake a machine.
"""
from __future__ import annotations

import os

from ..host import host_identity
from .. import env
from .cpu import affinity, placement, probe_cpus
from .gpu import probe_gpus, visible_gpus
from .infiniband import probe_infiniband
from .net import probe_nics
from .sysfs import format_cpulist, parse_cpulist

VIEW_FORMAT = "topocomm-view/1"


def _safe(fn, default, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception:  # belt and braces: the probes already swallow their own failures
        return default


def local_view(rank: int, root: str = "/", *, cpus: list[int] | None = None,
               addresses: dict | None = None, nvml=None) -> dict:
    """This process's view of its machine, as rank `rank` of a group.

    Keys: format, rank, host {host_id, hostname, boot_id, netns, is_host_id_forced}, pid,
    cpus (cpulist string of the cores this process may run on), socket_idx, numa_idx
    (holding all those cores, else None), cpu (probe_cpus or None), nics, infiniband, gpus,
    visible_gpus (CUDA_VISIBLE_DEVICES applied), socket_ifname (TOPOCOMM_SOCKET_IFNAME).
    Tests pass a fake `root` and may give `cpus`, `addresses` and a fake `nvml`."""
    is_real = root == "/"
    if cpus is None:
        cpus = _safe(affinity, []) if is_real else []
    cpu_facts = _safe(probe_cpus, None, root)
    if not cpus and cpu_facts and not is_real:  # a fake machine: the process may run anywhere
        cpus = sorted(c for s in cpu_facts["sockets"] for c in _cpus_of(s))
    socket_idx, numa_idx = _safe(placement, (None, None), cpus, cpu_facts)
    gpus = _safe(probe_gpus, [], root, nvml)
    return {
        "format": VIEW_FORMAT,
        "rank": int(rank),
        "host": _safe(host_identity, {"host_id": "?", "hostname": "?"}, root),
        "pid": os.getpid() if is_real else None,
        "cpus": format_cpulist(cpus),
        "socket_idx": socket_idx,
        "numa_idx": numa_idx,
        "cpu": cpu_facts,
        "nics": _safe(probe_nics, [], root, addresses),
        "infiniband": _safe(probe_infiniband, [], root),
        "gpus": gpus,
        "visible_gpus": _safe(visible_gpus, [], gpus, os.environ.get("CUDA_VISIBLE_DEVICES")),
        "socket_ifname": env.get("TOPOCOMM_SOCKET_IFNAME"),
    }


def _cpus_of(item: dict) -> list[int]:
    return parse_cpulist(item.get("cpus")) or []

"""CPU sockets and NUMA nodes from sysfs, and where this process may run.

Sources: /sys/devices/system/cpu/online and cpuN/topology/physical_package_id (socket of
each core), /sys/devices/system/node/nodeN/cpulist and meminfo (NUMA nodes), and
os.sched_getaffinity (the cores this process is bound to). A rank sits on a socket (or a
NUMA node) only when every core it may run on belongs to it; an unbound process on a
two-socket machine sits on neither, and the model then assumes the slower path.
"""
from __future__ import annotations

import os
import re

from .sysfs import format_cpulist, list_dir, parse_cpulist, read_int, read_text

_CPU_DIR = "/sys/devices/system/cpu"
_NODE_DIR = "/sys/devices/system/node"


def _online_cpus(root: str) -> list[int]:
    cpus = parse_cpulist(read_text(root, f"{_CPU_DIR}/online"))
    if cpus is None:
        cpus = sorted(int(m.group(1)) for name in list_dir(root, _CPU_DIR)
                      if (m := re.fullmatch(r"cpu(\d+)", name)))
    return cpus


def probe_cpus(root: str = "/") -> dict | None:
    """{"sockets": [{"socket_idx", "cpus", "numa_idxs"}], "numa_nodes": [{"numa_idx",
    "cpus", "mem_mib"}]} with cpus in cpulist form ("0-3,8"); None when sysfs says nothing."""
    socket_cpus: dict[int, list[int]] = {}
    for cpu in _online_cpus(root):
        package = read_int(root, f"{_CPU_DIR}/cpu{cpu}/topology/physical_package_id")
        if package is not None and package >= 0:
            socket_cpus.setdefault(package, []).append(cpu)
    numa_nodes = []
    for name in list_dir(root, _NODE_DIR):
        m = re.fullmatch(r"node(\d+)", name)
        if not m:
            continue
        cpus = parse_cpulist(read_text(root, f"{_NODE_DIR}/{name}/cpulist"))
        if cpus is None:
            continue
        numa_nodes.append({"numa_idx": int(m.group(1)), "cpus": format_cpulist(cpus),
                           "mem_mib": _node_mem_mib(root, name)})
    numa_nodes.sort(key=lambda n: n["numa_idx"])
    if not socket_cpus and not numa_nodes:
        return None
    sockets = []
    for idx in sorted(socket_cpus):
        mine = set(socket_cpus[idx])
        numa_idxs = [n["numa_idx"] for n in numa_nodes
                     if mine & set(parse_cpulist(n["cpus"]) or [])]
        sockets.append({"socket_idx": idx, "cpus": format_cpulist(mine), "numa_idxs": numa_idxs})
    return {"sockets": sockets, "numa_nodes": numa_nodes}


def _node_mem_mib(root: str, node: str) -> int | None:
    text = read_text(root, f"{_NODE_DIR}/{node}/meminfo") or ""
    m = re.search(r"MemTotal:\s*(\d+)\s*kB", text)
    return int(m.group(1)) // 1024 if m else None


def affinity() -> list[int]:
    """The cores this process may run on (empty when the platform cannot say)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def placement(cpus: list[int], cpu_facts: dict | None) -> tuple[int | None, int | None]:
    """(socket_idx, numa_idx) holding every one of `cpus`, each None when they span
    several or nothing is known."""
    if not cpus or not cpu_facts:
        return None, None
    wanted = set(cpus)

    def holder(items, key):
        for item in items:
            if wanted <= set(parse_cpulist(item.get("cpus")) or []):
                return item[key]
        return None
    return (holder(cpu_facts.get("sockets", []), "socket_idx"),
            holder(cpu_facts.get("numa_nodes", []), "numa_idx"))

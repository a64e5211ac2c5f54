"""Topology.describe(): the text `topocomm topo` prints.

Three parts: a rank x rank matrix of path kinds with short labels and a legend (in the
manner of `nvidia-smi topo -m`), the hosts with their ranks, sockets, NUMA nodes, NICs,
InfiniBand ports and GPUs, and the link classes in use with GB/s, us and their source.
"""
from __future__ import annotations

from .kinds import LABELS, LEGEND, PathKind


def _cell(topo, a: int, b: int) -> str:
    kind = topo.path_kind(a, b)
    if kind == PathKind.NVLINK:
        return f"NV{topo._nvlinks(topo.gpu_of(a), topo.gpu_of(b))}"
    return LABELS[kind]


def _rate(mbps) -> str:
    if not mbps:
        return "speed ?"
    return f"{mbps / 1000:g} Gbit/s" if mbps >= 1000 else f"{mbps} Mbit/s"


def describe(topo) -> str:
    n = topo.size
    shape = (f"{len(topo.hosts[0])} per host" if topo.is_uniform
             else "uneven: " + "+".join(str(len(h)) for h in topo.hosts))
    lines = [f"topology: {n} rank{'s' * (n != 1)} on {topo.num_hosts} host"
             f"{'s' * (topo.num_hosts != 1)} ({shape})", ""]

    cells = [[_cell(topo, a, b) for b in range(n)] for a in range(n)]
    width = max(4, max(len(c) for row in cells for c in row) + 1, len(f"r{n - 1}") + 1)
    lines.append("path kinds" + "".join(f"r{b}".rjust(width) for b in range(n)))
    for a in range(n):
        lines.append(f"  r{a}".ljust(10) + "".join(c.rjust(width) for c in cells[a]))
    used = {topo.path_kind(a, b) for a in range(n) for b in range(n)}
    lines.append("legend:")
    for kind in PathKind:
        if kind in used:
            label = "NV#" if kind == PathKind.NVLINK else LABELS[kind]
            lines.append(f"  {label:<5} {LEGEND[kind]}")
    lines.append("")

    for h, host in enumerate(topo.host_nodes):
        ranks = topo.hosts[h]
        lines.append(f"host {h}: {host.hostname}  id {host.host_id}  ranks "
                     + ",".join(map(str, ranks)))
        for s in host.sockets:
            numa = ",".join(map(str, s.numa_idxs)) or "?"
            lines.append(f"  socket {s.socket_idx}: cpus {s.cpus or '?'}  numa {numa}")
        for m in host.numa_nodes:
            mem = f"{m.mem_mib} MiB" if m.mem_mib is not None else "memory ?"
            lines.append(f"  numa {m.numa_idx}: cpus {m.cpus or '?'}  {mem}")
        for r in ranks:
            place = topo.ranks[r]
            where = [f"cpus {place.cpus or '?'}",
                     f"socket {'-' if place.socket_idx is None else place.socket_idx}",
                     f"numa {'-' if place.numa_idx is None else place.numa_idx}"]
            if place.gpu_idx is not None:
                where.append(f"gpu {place.gpu_idx}")
            nic = topo.nic_of(r)
            where.append(f"nic {nic['name']} {topo.address_of(r)}" if nic else "nic none")
            if place.pid is not None:
                where.append(f"pid {place.pid}")
            lines.append(f"  rank {r} (local {topo.local_rank(r)}): " + "  ".join(where))
        for nic in host.nics:
            bits = [f"  nic {nic.name}", ",".join(nic.addresses) or "no IPv4",
                    _rate(topo._nic_rate(host, nic)[0]), "up" if nic.is_up else "down"]
            if nic.shaped_mbps:
                bits.append(f"(tbf {_rate(nic.shaped_mbps)}, sysfs {_rate(nic.speed_mbps)})")
            if nic.is_loopback:
                bits.append("loopback")
            if nic.is_default_route:
                bits.append("default route")
            if nic.numa_idx is not None:
                bits.append(f"numa {nic.numa_idx}")
            lines.append("  ".join(bits))
        for dev in host.ib_devices:
            ports = "; ".join(f"port {p.port} {p.state or '?'} "
                              f"{'?' if p.rate_gbps is None else f'{p.rate_gbps:g}'} Gb/s "
                              f"{p.link_layer or ''}".rstrip() for p in dev.ports) or "no ports"
            netdevs = ",".join(dev.netdevs) or "-"
            lines.append(f"  ib {dev.name}: {ports}  netdevs {netdevs}  numa "
                         f"{'-' if dev.numa_idx is None else dev.numa_idx}")
        for g in host.gpus:
            links = ", ".join(f"{'gpu ' + k if k.isdigit() else k} x{v}"
                              for k, v in sorted(g.nvlinks.items())) or "none"
            lines.append(f"  gpu {g.gpu_idx}: {g.name or '?'}  bus {g.bus_id or '?'}  numa "
                         f"{'-' if g.numa_idx is None else g.numa_idx}  nvlink {links}")
    lines.append("")

    classes = {}
    for a in range(n):
        for b in range(a + 1, n):
            link = topo.link(a, b)
            classes.setdefault((link.kind, link.gbs, link.us, link.source), []).append((a, b))
    if n == 1:
        link = topo.link(0, 0)
        classes[(link.kind, link.gbs, link.us, link.source)] = [(0, 0)]
    lines.append("link classes (GB/s one direction, us one-way small message)")
    for (kind, gbs, us, source), pairs in sorted(classes.items()):
        count = "self" if n == 1 else f"{len(pairs)} pair{'s' * (len(pairs) != 1)}"
        lines.append(f"  {LABELS[kind]:<5}{gbs:>9.3f} GB/s {us:>7.1f} us  {count}  source: {source}")
    return "\n".join(lines) + "\n"

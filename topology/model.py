"""The Topology of a group: typed nodes (host, socket, numa, nic, gpu), where each rank sits,
the kind of path between any two ranks and a link class (GB/s, us, where the number comes
from) for each path. It is plain data: to_json / from_json round-trip exactly, so a
topology can be dumped (TOPOCOMM_TOPO_DUMP_FILE), edited, diffed and loaded back
(TOPOCOMM_TOPO_FILE), and tests run on canned machines (topology/fixtures/*.json).

Path kinds are ordered, smaller = closer; a collective should keep as much traffic as it
can on the small kinds:

  SELF         the same rank
  SAME_GPU     two ranks on one GPU (CUDA IPC: the data never leaves device memory)
  NVLINK       GPUs joined by NVLink, directly or through an NVSwitch
  PCIE         GPUs on one PCIe tree below one CPU root port (NVML level hostbridge or closer)
  SAME_SOCKET  host memory, both ranks' cores on one socket; for GPUs: one NUMA node,
               across host bridges (NVML level "node")
  SAME_HOST    one host, across sockets, or placement unknown (NVML level "system")
  SAME_SWITCH  different hosts whose chosen NICs share an IPv4 subnet (one L2 segment)
  NETWORK      different hosts, routed (another subnet, or no NIC known)

The GPU kinds rank below SAME_SOCKET because a GPU-to-GPU copy over NVLink or a PCIe switch
never touches host memory; they apply only when both ranks have a GPU and the caller asks
for device paths (path_kind(a, b, gpu=True), the default). Host-memory transports ask with
gpu=False and get the CPU kinds only.

A rank on a host with GPUs uses visible GPU local_rank % num_visible (torchrun's
convention), unless its view names one.
"""
from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import os
from dataclasses import dataclass, field

from .kinds import LABELS, LEGEND, PathKind  # noqa: F401  (re-exported)
from . import env

TOPO_FORMAT = "topocomm-topology/1"


@dataclass(frozen=True)
class LinkClass:
    """What a path of `kind` delivers: `gbs` GB/s (1e9 bytes/s, one direction), `us`
    one-way latency of a small message, and `source`: where the numbers come from."""
    kind: PathKind
    gbs: float
    us: float
    source: str


# GB/s of one NVLink lane group ("link"), one direction: NVLink 2, 3 and 4 all carry
# 25 GB/s per link per direction (NVIDIA V100/A100/H100 datasheets: 6, 12, 18 links =
# 300, 600, 900 GB/s counted in both directions).
NVLINK_GBS_PER_LINK = 25.0

# The machine the host-side defaults (and comms/plan/cost.py's constants) were measured on;
# docs/MEASUREMENTS.md has the values and how to measure them again.
CI_MACHINE = "2-vCPU AMD EPYC (Zen 3) KVM guest, the CI machine kind"

# Defaults per path kind. Network kinds are replaced per pair by the NIC rate when known.
DEFAULT_LINKS = {
    PathKind.SELF: LinkClass(
        PathKind.SELF, 31.0, 0.0,
        f"numpy copy on one core, 31 GB/s (the copy-rate loop of docs/MEASUREMENTS.md; "
        f"{CI_MACHINE}); no hop"),
    PathKind.SAME_GPU: LinkClass(
        PathKind.SAME_GPU, 1374.0, 5.0,
        "H100 80GB HBM3 device-to-device copy 2748 GB/s read+write = 1374 GB/s copied (no "
        "bench/ script; docs/MEASUREMENTS.md); 5 us is the order of a CUDA launch + IPC event "
        "wait, not measured here"),
    PathKind.NVLINK: LinkClass(
        PathKind.NVLINK, 18 * NVLINK_GBS_PER_LINK, 5.0,
        "18 NVLink4 links x 25 GB/s (H100 SXM datasheet, 900 GB/s both directions); "
        "replaced by the detected link count; 5 us not measured here"),
    PathKind.PCIE: LinkClass(
        PathKind.PCIE, 31.5, 5.0,
        "PCIe 4.0 x16 line rate: 16 GT/s x 16 lanes x 128/130 / 8 = 31.5 GB/s (spec; P2P "
        "copies reach less); 5 us not measured here"),
    PathKind.SAME_SOCKET: LinkClass(
        PathKind.SAME_SOCKET, 14.8, 1.3,
        "one memcpy out of a shared segment 14.8 GB/s (the copy-rate loop of "
        "docs/MEASUREMENTS.md); 1.3 us = half of topocomm's 2.6 us 8-byte 2-rank all-reduce "
        "(TOPOCOMM_ALGO=allreduce:small python bench/all_reduce_perf.py -b 8 -e 8 --np 2 "
        f"--backend topocomm-numpy); {CI_MACHINE}"),
    PathKind.SAME_HOST: LinkClass(
        PathKind.SAME_HOST, 14.8, 1.3,
        "no two-socket machine measured: taken equal to SAME_SOCKET"),
    PathKind.SAME_SWITCH: LinkClass(
        PathKind.SAME_SWITCH, 0.12, 60.0,
        "NIC rate unknown: one TCP stream over the emulated 1 Gbit/s tbf link, 0.957 Gbit/s "
        "(sudo .venv/bin/python bench/cluster.py --hosts 2 --ranks-per-host 1 --rate 1gbit "
        "--tcp-probe 64M); 60 us = half the 120 us round trip of an 8-byte Python TCP "
        "ping-pong between two processes over loopback (no bench/ script; "
        f"docs/MEASUREMENTS.md); {CI_MACHINE}"),
    PathKind.NETWORK: LinkClass(
        PathKind.NETWORK, 0.12, 60.0,
        "as SAME_SWITCH: no routed network measured; a switch hop adds under 1 us (switch "
        "datasheets quote 0.3-1 us port to port), small next to the TCP stack's 60 us"),
}


# ------------------------------------------------------------------------------ nodes
@dataclass
class Socket:
    socket_idx: int
    cpus: str = ""                    # cpulist, e.g. "0-27,56-83"
    numa_idxs: list = field(default_factory=list)


@dataclass
class NumaNode:
    numa_idx: int
    cpus: str = ""
    mem_mib: int | None = None


@dataclass
class Nic:
    name: str
    kind: str = "ethernet"            # ethernet, infiniband, loopback, other
    addresses: list = field(default_factory=list)   # ["198.18.0.1/24"]
    speed_mbps: int | None = None     # sysfs speed; None when unknown
    shaped_mbps: int | None = None    # rate of a tbf root qdisc, when shaped
    is_up: bool = True
    is_loopback: bool = False
    is_default_route: bool = False
    numa_idx: int | None = None
    pci_path: str | None = None


@dataclass
class IbPort:
    port: int
    state: str | None = None          # ACTIVE, DOWN, ...
    rate_gbps: float | None = None
    link_layer: str | None = None     # InfiniBand or Ethernet (RoCE)


@dataclass
class IbDevice:
    name: str
    numa_idx: int | None = None
    pci_path: str | None = None
    netdevs: list = field(default_factory=list)
    ports: list = field(default_factory=list)       # [IbPort]


@dataclass
class Gpu:
    gpu_idx: int
    name: str | None = None
    uuid: str | None = None
    bus_id: str | None = None
    numa_idx: int | None = None
    pci_path: str | None = None
    nvlinks: dict = field(default_factory=dict)     # {"<peer gpu_idx>" | "nvswitch": links}
    pcie: dict = field(default_factory=dict)        # {"<peer gpu_idx>": NVML level name}


@dataclass
class Host:
    host_id: str
    hostname: str = "?"
    sockets: list = field(default_factory=list)     # [Socket]
    numa_nodes: list = field(default_factory=list)  # [NumaNode]
    nics: list = field(default_factory=list)        # [Nic]
    ib_devices: list = field(default_factory=list)  # [IbDevice]
    gpus: list = field(default_factory=list)        # [Gpu]


@dataclass
class RankPlace:
    """Where one rank runs."""
    rank: int
    host_idx: int
    cpus: str = ""
    socket_idx: int | None = None
    numa_idx: int | None = None
    gpu_idx: int | None = None
    pid: int | None = None
    socket_ifname: str | None = None  # TOPOCOMM_SOCKET_IFNAME as that rank saw it


_NESTED = {Host: {"sockets": Socket, "numa_nodes": NumaNode, "nics": Nic,
                  "ib_devices": IbDevice, "gpus": Gpu},
           IbDevice: {"ports": IbPort}}


def _build(cls, data, where: str):
    """cls(**data) with nested lists built too; a clear ValueError for a malformed file."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing {name!r}")
            continue
        value = data[name]
        sub = _NESTED.get(cls, {}).get(name)
        if sub is not None:
            if not isinstance(value, list):
                raise ValueError(f"{where}.{name}: expected a list")
            value = [_build(sub, item, f"{where}.{name}[{i}]") for i, item in enumerate(value)]
        kwargs[name] = value
    return cls(**kwargs)


def networks_of(nic: Nic) -> list:
    """(address, network) of each valid IPv4 address of a NIC."""
    out = []
    for text in nic.addresses:
        try:
            iface = ipaddress.IPv4Interface(text)
        except ValueError:
            continue
        out.append((iface.ip, iface.network))
    return out


def _shares_subnet(x: Nic, y: Nic) -> bool:
    """One IPv4 subnet with different addresses. Equal addresses on two hosts (every
    host's docker0 is 172.17.0.1/16) are not a link between them."""
    return any(nx == ny and ax != ay for ax, nx in networks_of(x) for ay, ny in networks_of(y))


def _ifname_matches(name: str, spec: str) -> bool:
    """TOPOCOMM_SOCKET_IFNAME: comma-separated names or prefixes ("eth0", "ib,eth")."""
    return any(name == p or (p and name.startswith(p)) for p in (s.strip() for s in spec.split(",")))


# --------------------------------------------------------------------------- topology
class Topology:
    """The group's hosts (ordered by their lowest rank) and where each rank sits.

    host_nodes: [Host]; ranks: [RankPlace] indexed by rank; links: {PathKind: LinkClass}
    overrides of the default link table (e.g. measured), kept in the JSON."""

    def __init__(self, host_nodes: list, ranks: list, links: dict | None = None):
        if not ranks:
            raise ValueError("topology: no ranks")
        for i, place in enumerate(ranks):
            if place.rank != i:
                raise ValueError(f"topology: ranks[{i}] is rank {place.rank}; ranks must be "
                                 f"0..{len(ranks) - 1} in order")
            if not 0 <= place.host_idx < len(host_nodes):
                raise ValueError(f"topology: rank {i} is on host {place.host_idx}, but there are "
                                 f"{len(host_nodes)} hosts")
        members = [[p.rank for p in ranks if p.host_idx == h] for h in range(len(host_nodes))]
        empty = [h for h, m in enumerate(members) if not m]
        if empty:
            raise ValueError(f"topology: hosts {empty} have no ranks")
        order = sorted(range(len(host_nodes)), key=lambda h: members[h][0])
        new_idx = {old: new for new, old in enumerate(order)}
        self.host_nodes = [host_nodes[h] for h in order]
        self.ranks = [dataclasses.replace(p, host_idx=new_idx[p.host_idx]) for p in ranks]
        self.hosts = [members[h] for h in order]
        self.size = len(ranks)
        self.link_overrides = dict(links or {})
        self._local_rank = {r: i for host in self.hosts for i, r in enumerate(host)}
        self._nic_cache: dict = {}

    # ---- placement -----------------------------------------------------------------
    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    @property
    def is_uniform(self) -> bool:
        """The same number of ranks on every host."""
        return len({len(h) for h in self.hosts}) == 1

    def host_of(self, rank: int) -> int:
        return self.ranks[rank].host_idx

    def local_rank(self, rank: int) -> int:
        return self._local_rank[rank]

    def gpu_of(self, rank: int) -> Gpu | None:
        place = self.ranks[rank]
        if place.gpu_idx is None:
            return None
        for gpu in self.host_nodes[place.host_idx].gpus:
            if gpu.gpu_idx == place.gpu_idx:
                return gpu
        return None

    # ---- NICs ----------------------------------------------------------------------
    def nic_of(self, rank: int) -> dict | None:
        """The NIC rank `rank` should use to reach other hosts, as a dict (Nic fields), or
        None. TOPOCOMM_SOCKET_IFNAME (as that rank saw it, else this process's) picks by
        name or prefix, "^a,b" excludes; otherwise among NICs that are up with an IPv4
        address, the best by: most other hosts on one of its subnets, closest on the PCIe
        tree to the rank's GPU, same NUMA node as the rank, fastest, default route, name.
        Loopback only when the group is one host and nothing else has an address."""
        nic = self._chosen_nic(rank)
        return dataclasses.asdict(nic) if nic is not None else None

    def _chosen_nic(self, rank: int) -> Nic | None:
        spec = self.ranks[rank].socket_ifname or env.get("TOPOCOMM_SOCKET_IFNAME") or ""
        key = (rank, spec)
        if key not in self._nic_cache:
            self._nic_cache[key] = self._choose_nic(rank, spec)
        return self._nic_cache[key]

    def _choose_nic(self, rank: int, spec: str) -> Nic | None:
        place = self.ranks[rank]
        host = self.host_nodes[place.host_idx]
        with_address = [n for n in host.nics if networks_of(n)]
        if spec:
            if spec.startswith("^"):
                with_address = [n for n in with_address if not _ifname_matches(n.name, spec[1:])]
            else:
                for pattern in spec.split(","):
                    for n in sorted(with_address, key=lambda n: n.name):
                        if _ifname_matches(n.name, pattern):
                            return n
                return None
        usable = [n for n in with_address if n.is_up and not n.is_loopback]
        if not usable:
            if self.num_hosts > 1:
                return None
            usable = [n for n in with_address if n.is_loopback]
        if not usable:
            return None
        others = [h for i, h in enumerate(self.host_nodes) if i != place.host_idx]
        gpu = self.gpu_of(rank)
        gpu_path = (gpu.pci_path or "").split("/") if gpu is not None else []
        numa = gpu.numa_idx if gpu is not None and gpu.numa_idx is not None else place.numa_idx

        def score(n: Nic):
            reach = sum(1 for h in others
                        if any(_shares_subnet(n, m) for m in h.nics if m.is_up and not m.is_loopback))
            closeness = 0
            if gpu_path and n.pci_path:
                for x, y in zip(gpu_path, n.pci_path.split("/")):
                    if x != y:
                        break
                    closeness += 1
            return (reach, closeness, numa is not None and n.numa_idx == numa,
                    self._nic_rate(host, n)[0] or 0, n.is_default_route)
        return max(sorted(usable, key=lambda n: n.name), key=score)

    def address_of(self, rank: int) -> str | None:
        """The IPv4 address rank `rank` binds to / is reached at over TCP, or None."""
        nic = self._chosen_nic(rank)
        pairs = networks_of(nic) if nic is not None else []
        others = [h for i, h in enumerate(self.host_nodes) if i != self.host_of(rank)]

        def reach(pair):
            probe = Nic(name="", addresses=[f"{pair[0]}/{pair[1].prefixlen}"])
            return sum(1 for h in others if any(_shares_subnet(probe, m) for m in h.nics))
        return str(max(pairs, key=reach)[0]) if pairs else None

    @staticmethod
    def _nic_rate(host: Host, nic: Nic) -> tuple:
        """(Mbit/s or None, where from) of a NIC: the tbf shaping if any (it is what a
        transfer gets), else its sysfs speed, else the rate of its InfiniBand port."""
        if nic.shaped_mbps and (not nic.speed_mbps or nic.shaped_mbps <= nic.speed_mbps):
            return nic.shaped_mbps, "tbf qdisc rate"
        if nic.speed_mbps:
            return nic.speed_mbps, "sysfs speed"
        for dev in host.ib_devices:
            if nic.name in dev.netdevs:
                port_rates = [p.rate_gbps for p in dev.ports if p.rate_gbps]
                if port_rates:
                    return int(max(port_rates) * 1000), "InfiniBand port rate"
        return None, "unknown"

    # ---- paths ---------------------------------------------------------------------
    def path_kind(self, a: int, b: int, gpu: bool = True) -> PathKind:
        """How ranks a and b are connected (gpu=False: as host-memory transports see it)."""
        if a == b:
            return PathKind.SELF
        pa, pb = self.ranks[a], self.ranks[b]
        if pa.host_idx != pb.host_idx:
            na, nb = self._chosen_nic(a), self._chosen_nic(b)
            if na is not None and nb is not None and _shares_subnet(na, nb):
                return PathKind.SAME_SWITCH
            return PathKind.NETWORK
        ga, gb = (self.gpu_of(a), self.gpu_of(b)) if gpu else (None, None)
        if ga is not None and gb is not None:
            if ga.gpu_idx == gb.gpu_idx:
                return PathKind.SAME_GPU
            if self._nvlinks(ga, gb):
                return PathKind.NVLINK
            level = ga.pcie.get(str(gb.gpu_idx)) or gb.pcie.get(str(ga.gpu_idx))
            if level in ("internal", "single", "multiple", "hostbridge"):
                return PathKind.PCIE
            if level == "node" or (level is None and ga.numa_idx is not None
                                   and ga.numa_idx == gb.numa_idx):
                return PathKind.SAME_SOCKET
            return PathKind.SAME_HOST
        if pa.socket_idx is not None and pa.socket_idx == pb.socket_idx:
            return PathKind.SAME_SOCKET
        return PathKind.SAME_HOST

    @staticmethod
    def _nvlinks(ga: Gpu, gb: Gpu) -> int:
        """Links between two GPUs: direct ones, else through a shared NVSwitch fabric."""
        direct = ga.nvlinks.get(str(gb.gpu_idx), 0) or gb.nvlinks.get(str(ga.gpu_idx), 0)
        if direct:
            return int(direct)
        return int(min(ga.nvlinks.get("nvswitch", 0), gb.nvlinks.get("nvswitch", 0)))

    def link(self, a: int, b: int, gpu: bool = True) -> LinkClass:
        """GB/s and latency of the path between a and b: an override from the file if any,
        the NIC rate for network paths, the NVLink count for NVLink, else the defaults."""
        kind = self.path_kind(a, b, gpu)
        if kind in self.link_overrides:
            return self.link_overrides[kind]
        base = DEFAULT_LINKS[kind]
        if kind in (PathKind.SAME_SWITCH, PathKind.NETWORK):
            rates = []
            for r in (a, b):
                nic = self._chosen_nic(r)
                if nic is not None:
                    mbps, how = self._nic_rate(self.host_nodes[self.host_of(r)], nic)
                    if mbps:
                        rates.append((mbps, how))
            if rates:
                mbps, how = min(rates)
                return LinkClass(kind, mbps / 8000.0, base.us,
                                 f"NIC rate of the slower end, {mbps} Mbit/s ({how}); latency: "
                                 f"{base.us:g} us, the measured TCP default")
        if kind == PathKind.NVLINK:
            num_links = self._nvlinks(self.gpu_of(a), self.gpu_of(b))
            return LinkClass(kind, num_links * NVLINK_GBS_PER_LINK, base.us,
                             f"{num_links} NVLink links x {NVLINK_GBS_PER_LINK:g} GB/s "
                             "(NVIDIA datasheets, per link per direction)")
        return base

    # ---- JSON ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": TOPO_FORMAT, "size": self.size,
                "hosts": [dataclasses.asdict(h) for h in self.host_nodes],
                "ranks": [dataclasses.asdict(p) for p in self.ranks],
                "links": {k.name: {"gbs": v.gbs, "us": v.us, "source": v.source}
                          for k, v in sorted(self.link_overrides.items())}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, data) -> "Topology":
        if not isinstance(data, dict):
            raise ValueError("topology: expected a JSON object")
        if data.get("format") != TOPO_FORMAT:
            raise ValueError(f"topology: format must be {TOPO_FORMAT!r}, got {data.get('format')!r}")
        unknown = sorted(set(data) - {"format", "size", "hosts", "ranks", "links"})
        if unknown:
            raise ValueError(f"topology: unknown keys {unknown}")
        hosts = [_build(Host, h, f"hosts[{i}]") for i, h in enumerate(data.get("hosts") or [])]
        ranks = [_build(RankPlace, p, f"ranks[{i}]") for i, p in enumerate(data.get("ranks") or [])]
        if data.get("size") != len(ranks):
            raise ValueError(f"topology: size is {data.get('size')!r} but {len(ranks)} ranks are listed")
        links = {}
        for name, value in (data.get("links") or {}).items():
            if name not in PathKind.__members__:
                raise ValueError(f"topology: links: unknown path kind {name!r} "
                                 f"(known: {list(PathKind.__members__)})")
            try:
                links[PathKind[name]] = LinkClass(PathKind[name], float(value["gbs"]),
                                                  float(value["us"]), str(value.get("source", "file")))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"topology: links.{name}: needs gbs and us ({exc})") from None
        return cls(hosts, ranks, links)

    @classmethod
    def from_json(cls, text: str) -> "Topology":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"topology: not JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str) -> "Topology":
        with open(path) as f:
            try:
                return cls.from_json(f.read())
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, Topology) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"<Topology {self.size} ranks on {self.num_hosts} hosts {self.hosts}>"

    # ---- text ----------------------------------------------------------------------
    def describe(self) -> str:
        from .describe import describe
        return describe(self)

"""A synthetic cluster for the cost model: `topocomm explain --cluster SPEC` (comms/cli.py).

The spec names hosts, ranks per host and link classes; from it this module builds the same
models a real group builds from its Topology (comms/plan/cost.py NetModel over one ShmModel
per host) and asks a MultiHostSelector (comms/plan/select.py) for its choices, without a
Topology: fusing one with 100k ranks and comparing every pair of hosts' link would be
quadratic. Building is linear in the ranks (the hosts' rank lists), each estimate is a few
closed forms (a log2(hosts) sum at most), so 12500 hosts x 8 ranks take well under a second.

SPEC: comma-separated FIELD=VALUE items, hosts and ranks required:

  hosts=H          hosts, 2 or more; several as H1/H2/... (one cluster each, e.g. 128/1250/12500)
  ranks=R          ranks per host (every host holds R)
  intra=KIND[:RATE[:LATENCY]]
                   the link class between two ranks of a host, KIND one of socket, host,
                   nvlink, pcie (socket: one socket's shared memory, host: across sockets);
                   RATE and LATENCY default to the kind's DEFAULT_LINKS entry
                   (topology/model.py); default socket (what a real group's host-memory model
                   gets)
  nics=[Kx]RATE    K NICs per host of RATE each (K defaults to 1); the model has one network
                   link per host and gives it the aggregate K x RATE; default: the library's
                   link when it knows no NIC rate (DEFAULT_LINKS[NETWORK], 0.12 GB/s)
  net_us=US        one-way latency of the network link in microseconds (default 60, the
                   measured TCP one-way latency of DEFAULT_LINKS[NETWORK])
  cores=C          CPU cores per host the ranks run on (default R: one core per rank)
  streams=S        TCP connections per remote peer (default TOPOCOMM_SOCKET_NSTREAMS, else 2)

  RATE: a number and a unit: GB/s, MB/s, TB/s (bytes: capital B) or Gbit, Mbit, Tbit (bits;
  also Gbit/s, Gbps, Gb/s: a small b); LATENCY: a number with us, ns or ms (bare: us).

  e.g. hosts=12500,ranks=8,intra=nvlink:900GB/s:2us,nics=4x200gbit,net_us=5

A bad spec raises SpecError (a ValueError) whose text starts with the field's name.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from comms.plan import cost
from comms.plan.select import MULTIHOST_ALGORITHMS, MultiHostSelector, estimate_table, fmt_us
from topology.model import DEFAULT_LINKS, LinkClass, PathKind

FIELDS = ("hosts", "ranks", "intra", "nics", "net_us", "cores", "streams")
# the collectives `explain ... all` shows
COLLECTIVES = ("allreduce", "reduce_scatter", "allgather", "broadcast", "all_to_all")
INTRA_KINDS = {"socket": PathKind.SAME_SOCKET, "host": PathKind.SAME_HOST,
               "nvlink": PathKind.NVLINK, "pcie": PathKind.PCIE}
# the hosts' rank lists are built in memory: bound them
MAX_RANKS = 1_000_000

# rate units -> GB/s per unit; bytes units are case-sensitive (GB vs Gb), bit units are not
_BYTE_UNITS = {"TB/s": 1e3, "GB/s": 1.0, "MB/s": 1e-3, "TBps": 1e3, "GBps": 1.0, "MBps": 1e-3}
_BIT_UNITS = {"t": 1e3 / 8, "g": 1.0 / 8, "m": 1e-3 / 8}
_LAT_UNITS = {"": 1.0, "us": 1.0, "µs": 1.0, "ns": 1e-3, "ms": 1e3}
_NUMBER = r"([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)"


class SpecError(ValueError):
    """A bad --cluster spec; `field` is the field at fault (the text starts with it)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"--cluster: {field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ClusterSpec:
    """One synthetic cluster: `hosts` x `ranks`, `intra` the link class inside a host,
    `nics` NICs of `nic_gbs` GB/s each, `net_us` the network latency, `cores` per host,
    `streams` TCP connections per peer (None: TOPOCOMM_SOCKET_NSTREAMS or the default)."""
    hosts: int
    ranks: int
    intra: LinkClass
    nics: int
    nic_gbs: float
    net_us: float
    cores: int
    streams: int | None
    nics_given: bool
    text: str

    @property
    def size(self) -> int:
        return self.hosts * self.ranks

    @property
    def net_link(self) -> LinkClass:
        """The model's one network link per host: the NICs' aggregate rate."""
        if self.nics_given:
            source = (f"--cluster nics={self.nics}x{_fmt_gbs(self.nic_gbs)}: one link per host "
                      f"at the NICs' aggregate rate, net_us={self.net_us:g}")
        else:
            source = (f"no NIC rate given: {DEFAULT_LINKS[PathKind.NETWORK].gbs:g} GB/s as "
                      f"DEFAULT_LINKS[NETWORK] (the library's assumption), net_us={self.net_us:g}")
        return LinkClass(PathKind.NETWORK, self.nics * self.nic_gbs, self.net_us, source)


def _int(field: str, value: str, lo: int) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise SpecError(field, f"{value!r} is not a whole number")
    n = int(value)
    if n < lo:
        raise SpecError(field, f"{n} is below {lo}")
    return n


def parse_rate(field: str, text: str) -> float:
    """GB/s of a rate such as 900GB/s, 200gbit, 25 GB/s, 400Gbps."""
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-zµ/]*)", text.strip())
    if not m:
        raise SpecError(field, f"rate {text!r} is not a number with a unit (e.g. 900GB/s, 200gbit)")
    value, unit = float(m.group(1)), m.group(2)
    bits = re.fullmatch(r"([tgmTGM])(?:bit(?:/s|s)?|bps|b/s)", unit, re.I)
    if unit in _BYTE_UNITS:
        gbs = value * _BYTE_UNITS[unit]
    elif bits is not None and ("bit" in unit.lower() or "B" not in unit):
        gbs = value * _BIT_UNITS[bits.group(1).lower()]
    else:
        said = f"unit {unit!r} is not" if unit else "has no unit, give"
        raise SpecError(field, f"rate {text!r}: {said} one of GB/s, MB/s, TB/s (bytes: B) "
                        "or Gbit, Mbit, Tbit, Gbit/s, Gbps, Gb/s (bits: b or bit)")
    if not gbs > 0 or math.isinf(gbs):
        raise SpecError(field, f"rate {text!r} must be above 0")
    return gbs


def parse_latency(field: str, text: str) -> float:
    """Microseconds of a latency such as 2us, 500ns, 0.01ms or 5 (us)."""
    m = re.fullmatch(_NUMBER + r"\s*([a-zµ]*)", text.strip())
    if not m or m.group(2) not in _LAT_UNITS:
        raise SpecError(field, f"latency {text!r} is not a number with us, ns or ms (e.g. 2us)")
    return float(m.group(1)) * _LAT_UNITS[m.group(2)]


def _intra(text: str) -> LinkClass:
    parts = [p.strip() for p in text.split(":")]
    kind_name = parts[0].lower()
    if kind_name not in INTRA_KINDS or len(parts) > 3:
        raise SpecError("intra", f"{text!r} is not KIND[:RATE[:LATENCY]] with KIND one of "
                        f"{', '.join(INTRA_KINDS)} (e.g. nvlink:900GB/s:2us)")
    kind = INTRA_KINDS[kind_name]
    if len(parts) == 1:
        return DEFAULT_LINKS[kind]
    gbs = parse_rate("intra", parts[1])
    us = parse_latency("intra", parts[2]) if len(parts) == 3 else DEFAULT_LINKS[kind].us
    return LinkClass(kind, gbs, us, f"--cluster intra={text}")


def _nics(text: str) -> tuple:
    m = re.fullmatch(r"\s*([0-9]+)\s*[xX*]\s*(.+)", text)
    count = _int("nics", m.group(1), 1) if m else 1
    return count, parse_rate("nics", m.group(2) if m else text)


def parse_clusters(text: str) -> list:
    """[ClusterSpec] of a spec (one per value of hosts=H1/H2/...); SpecError names the
    field at fault."""
    if not text or not text.strip():
        raise SpecError("spec", "empty; give at least hosts=H,ranks=R")
    items = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq:
            raise SpecError(key or "spec", f"{part.strip()!r} is not FIELD=VALUE (fields: "
                            f"{', '.join(FIELDS)})")
        if key not in FIELDS:
            raise SpecError(key, f"unknown field (known: {', '.join(FIELDS)})")
        if key in items:
            raise SpecError(key, "given twice")
        items[key] = value.strip()
    for key in ("hosts", "ranks"):
        if key not in items:
            raise SpecError(key, f"missing (e.g. hosts=1024,ranks=8)")
    host_counts = [_int("hosts", h.strip(), 2) for h in items["hosts"].split("/")]
    ranks = _int("ranks", items["ranks"], 1)
    intra = _intra(items["intra"]) if "intra" in items else DEFAULT_LINKS[PathKind.SAME_SOCKET]
    if "nics" in items:
        nics, nic_gbs = _nics(items["nics"])
    else:
        nics, nic_gbs = 1, DEFAULT_LINKS[PathKind.NETWORK].gbs
    net_us = (parse_latency("net_us", items["net_us"]) if "net_us" in items
              else DEFAULT_LINKS[PathKind.NETWORK].us)
    cores = _int("cores", items["cores"], 1) if "cores" in items else ranks
    streams = _int("streams", items["streams"], 1) if "streams" in items else None
    out = []
    for hosts in host_counts:
        if hosts * ranks > MAX_RANKS:
            raise SpecError("hosts", f"{hosts} x {ranks} ranks = {hosts * ranks} is above "
                            f"{MAX_RANKS} (the hosts' rank lists are built in memory)")
        one = ",".join(f"{k}={hosts if k == 'hosts' else items[k]}" for k in FIELDS if k in items)
        out.append(ClusterSpec(hosts, ranks, intra, nics, nic_gbs, net_us, cores, streams,
                               "nics" in items, one))
    return out


def parse_cluster(text: str) -> ClusterSpec:
    """The ClusterSpec of a spec that names one cluster (hosts=H)."""
    specs = parse_clusters(text)
    if len(specs) != 1:
        raise SpecError("hosts", "names several clusters; give one number")
    return specs[0]


# ---- the models -------------------------------------------------------------------------
def host_ranks(spec: ClusterSpec) -> list:
    """Ranks h*R .. h*R+R-1 on host h, the order a block launcher gives."""
    R = spec.ranks
    return [list(range(h * R, h * R + R)) for h in range(spec.hosts)]


def host_model(spec: ClusterSpec) -> cost.ShmModel:
    """Every host's one-host model, as cost.shm_model_for builds it from a Topology: R ranks
    on `cores` cores, the intra link class (a 1-rank host has no intra link)."""
    return cost.ShmModel(spec.ranks, spec.cores, spec.intra if spec.ranks > 1 else None)


def net_model(spec: ClusterSpec, num_streams: int) -> cost.NetModel:
    """The group model: every host the same ShmModel (one shared object), the network link
    of spec.net_link."""
    return cost.NetModel(host_ranks(spec), [host_model(spec)] * spec.hosts, spec.net_link,
                         num_streams)


def selector(spec: ClusterSpec) -> MultiHostSelector:
    """The MultiHostSelector of the cluster: built without a Topology (so with the library's
    no-topology defaults), then given this cluster's model; choices, estimates, why and
    TOPOCOMM_ALGO overrides are then the selector's own."""
    sel = MultiHostSelector(host_ranks(spec), None, num_streams=spec.streams)
    sel.model = net_model(spec, sel.model.num_streams)
    sel.link_why = ""
    return sel


# ---- text -------------------------------------------------------------------------------
def _fmt_us(us: float) -> str:
    """explain's format (select.fmt_us), with seconds for the big clusters' long times."""
    return f"{us / 1e6:.3f} s" if us >= 1e6 else fmt_us(us)


def _fmt_gbs(gbs: float) -> str:
    gbit = gbs * 8
    return f"{gbit:g}gbit" if gbit >= 1 else f"{gbit * 1000:g}mbit"


def fmt_size(nbytes: int) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def describe(spec: ClusterSpec, model: cost.NetModel) -> list:
    """The cluster and how the model sees it, as comment lines."""
    link, shm = model.link, model.host_models[0]
    eff = (cost.TCP_EFFICIENCY[2].value if model.num_streams > 1 else
           cost.TCP_EFFICIENCY[1].value)
    lines = [f"# cluster {spec.text}",
             f"#   {spec.size} ranks: {spec.hosts} hosts x {spec.ranks} rank(s), {shm.cores:g} "
             f"core(s) per host ({shm.ranks / shm.cores:.2g} rank(s) per core)"]
    if spec.nics_given:
        nic = (f"the {spec.nics} NICs' aggregate, {spec.nics} x {spec.nic_gbs * 8:g} Gbit/s = "
               f"{link.gbs:g} GB/s" if spec.nics > 1 else
               f"its NIC, {spec.nic_gbs * 8:g} Gbit/s = {link.gbs:g} GB/s")
    else:
        nic = (f"no NIC rate given: {link.gbs:g} GB/s, DEFAULT_LINKS[NETWORK] (the library's "
               "assumption when it knows no NIC rate)")
    lines.append(f"#   network: the model has one link per host, {nic} per direction, "
                 f"{link.us:g} us one way; every TCP step adds {cost.NET_STEP_US.value:g} us "
                 f"(NET_STEP_US) and carries {eff:g} of the rate ({model.num_streams} "
                 "TCP stream(s) per peer)")
    if spec.nics > 1:
        lines.append(f"#   NICs: every algorithm's traffic is spread over the {spec.nics} NICs, "
                     "a single rank's stream (leaders, a broadcast root's host) included; on a "
                     "real group the library's model takes the link of one NIC (the first "
                     "ranks' chosen NIC), 1/" f"{spec.nics} of this rate")
    if spec.ranks > 1:
        gpu = spec.intra.kind in (PathKind.NVLINK, PathKind.PCIE)
        lines.append(f"#   inside a host: {spec.intra.kind.name} {spec.intra.gbs:g} GB/s, "
                     f"{spec.intra.us:g} us, the one-host model's link class (ShmModel: the "
                     "shared-memory algorithms; its measured copy and memory rates scale by "
                     f"{spec.intra.gbs:g}/{DEFAULT_LINKS[PathKind.SAME_SOCKET].gbs:g} = "
                     f"{shm.scale:.3g}x, the CPU reduction of network data included)"
                     + ("; this build moves host memory only (no CUDA algorithm), so these are "
                        "host copies at that rate: a real group's model sees the host-memory "
                        "class (socket) between these ranks" if gpu else ""))
    else:
        lines.append("#   inside a host: 1 rank, no host-local step")
    remote = spec.size - spec.ranks
    # TcpMesh (comms/transport/tcp.py): num_streams + 1 connections to every remote rank
    sockets = remote * (model.num_streams + 1)
    lines.append(f"#   not in the model: per-peer and per-message costs: a step that talks to "
                 f"every other host or remote rank (the agreement's digest swap with each of a "
                 f"rank's {remote} remote ranks, the all-to-all's and all-gather's transfers, "
                 f"the broadcast root's {spec.hosts - 1} sends) costs one step's fixed time, "
                 f"and each rank's {sockets} TCP sockets ({model.num_streams} + 1 per remote "
                 "rank) cost nothing; the fabric: every host link runs at its full rate at once "
                 "(no oversubscription or congestion)")
    return lines


def network_note(model: cost.NetModel, collective: str, algorithm: str, nbytes: int) -> str:
    """For the all-reduce based algorithms: which network all-reduce the model takes, its
    number of steps and their fixed cost (the table's bandwidth column holds all but one)."""
    if collective not in ("allreduce", "reduce_scatter"):
        return ""
    N = float(nbytes)
    if collective == "reduce_scatter":  # the cheaper of the two all-reduces
        algorithm = min(("hierarchical", "leaders"),
                        key=lambda a: model.time("allreduce", a, nbytes).total_us)
    if algorithm == "hierarchical":
        pieces = model.pieces(N)
        methods = model.net_methods(N / pieces, model.max_local)
        what = (f"per piece ({pieces} piece(s), {model.max_local} shard(s) in parallel per "
                "host link)")
    elif algorithm == "leaders":
        pieces, methods = 1, model.net_methods(N, 1)
        what = "among the hosts' first ranks"
    else:
        return ""
    H = model.num_hosts
    steps = {"exchange": 1, "ring": 2 * (H - 1), "halving_doubling": 2 * (H.bit_length() - 1)}
    fixed = model.link.us + cost.NET_STEP_US.value
    best = min(methods, key=methods.get)
    parts = [f"{m} {steps[m]} step(s) {_fmt_us(methods[m])}" + (" *" if m == best else "")
             for m in methods]
    if "halving_doubling" not in methods and H > 2:
        parts.append(f"halving_doubling n/a ({H} hosts is not a power of 2)")
    return (f"  network all-reduce {what}: " + "; ".join(parts)
            + f"; {steps[best]} x {fixed:g} us fixed per step = "
            f"{_fmt_us(pieces * steps[best] * fixed)} over all pieces")


def explain(sel: MultiHostSelector, spec: ClusterSpec, collective: str, nbytes: int,
            dtype: str = "float32") -> str:
    """The choice for one request on the cluster: estimates with latency and bandwidth terms,
    the chosen algorithm and why (as MultiHostSelector.explain, without the rank lists)."""
    c = sel.choose(collective, int(nbytes))
    m = sel.model
    lines = [f"{c.collective} of {fmt_size(int(nbytes))} ({dtype}) on {spec.size} ranks over "
             f"{spec.hosts} hosts: {c.algorithm}, ~{_fmt_us(c.estimate_us)}",
             f"  why: {c.why}",
             f"  candidates: {', '.join(MULTIHOST_ALGORITHMS.get(c.collective, ('hierarchical',)))}"]
    lines += estimate_table(m, c, int(nbytes))
    note = network_note(m, c.collective, c.algorithm, int(nbytes))
    if note:
        lines.append(note)
    return "\n".join(lines)


def summary(rows: list) -> list:
    """rows: (spec, collective, nbytes, Choice) -> one table line each."""
    out = ["# summary: ranks = hosts x ranks per host; estimate of the chosen algorithm; others",
           "%9s %12s  %-15s %8s  %-13s %10s   %s" % ("ranks", "hosts x R", "collective", "size",
                                                   "chosen", "estimate", "others")]
    for spec, coll, nbytes, c in rows:
        others = "  ".join(f"{a} {_fmt_us(us)}" for a, us in c.estimates.items()
                           if a != c.algorithm) or "-"
        out.append("%9d %12s  %-15s %8s  %-13s %10s   %s" % (
            spec.size, f"{spec.hosts} x {spec.ranks}", c.collective, fmt_size(nbytes),
            c.algorithm, _fmt_us(c.estimate_us), others))
    return out


"""Optional measured calibration of the link classes: a short ping-pong per link class present
in a group gives latency and bandwidth that correct the cost tables (comms/plan/cost.py).

    corrections = probe.measure(comm)            # collective: every rank of comm calls it
    topo = probe.apply(topo, corrections)        # -> Topology.link_overrides (kept in JSON)

Never run at import or by default: a caller asks for it (an explicit call, or its own check
of `is_enabled()`: TOPOCOMM_PROBE=1). Results are cached per machine in
`~/.cache/topocomm/probe-<hostname>.json` (TOPOCOMM_PROBE_CACHE: another folder), keyed by the
link classes they correct, so a machine pays for the probe once.

What is measured, per link class (one pair of ranks with that path kind):
  latency   half the round trip of `small_bytes` (8 B) messages, median of `small_iters`
  bandwidth large_bytes (8 MiB) one way: (half round trip of large - latency) -> GB/s
How it corrects the tables:
  network kinds (SAME_SWITCH, NETWORK): the measured numbers ARE the link class (a TCP
      ping-pong is how the defaults were defined: DEFAULT_LINKS[NETWORK] says so).
  host kinds (SAME_SOCKET, SAME_HOST, ...): send/recv through shared mailboxes carries
      Python and two copies per byte, so the measurement is compared with REFERENCE (the
      same probe on the machine the defaults were measured on) and the default link class
      is scaled by measured / reference.
Every rank ends with the same corrections (rank 0's view is broadcast), so the cost model
gives every rank the same choice.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import time

import numpy as np

from .model import DEFAULT_LINKS, LinkClass, PathKind
from . import env

NETWORK_KINDS = (PathKind.SAME_SWITCH, PathKind.NETWORK)
# This probe on the machine the defaults were measured on (2-vCPU AMD EPYC KVM guest, the CI
# kind, quiet, 3 runs each; the command is in docs/MEASUREMENTS.md): (one-way us of 8 B, GB/s
# of 8 MiB one way), per transport: shm between processes 8.7-10.2 us, 3.7-5.5 GB/s; threads
# (tests: the GIL and Python dominate) 51-78 us, 0.69-0.88 GB/s.
REFERENCE = {
    "shm": {PathKind.SAME_SOCKET: (9.4, 4.7), PathKind.SAME_HOST: (9.4, 4.7)},
    "threads": {PathKind.SAME_SOCKET: (70.0, 0.8), PathKind.SAME_HOST: (70.0, 0.8)},
}
_TAG = 0x7052  # "pR"


def is_enabled() -> bool:
    return env.get("TOPOCOMM_PROBE")


def cache_path(hostname: str | None = None) -> str:
    folder = env.get("TOPOCOMM_PROBE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "topocomm")
    return os.path.join(folder, f"probe-{hostname or socket.gethostname()}.json")


def _key(kinds_links: dict, transport: str) -> str:
    """What a cached result corrects: the transport and the uncorrected link classes."""
    return transport + ":" + ";".join(f"{k.name}={lk.gbs:g}/{lk.us:g}"
                                      for k, lk in sorted(kinds_links.items()))


def pairs_of(comm, topo=None) -> dict:
    """{PathKind: (rank a, rank b)}: one pair of ranks per link class in the group.
    The kind comes from topo (host-memory paths); ranks that comm puts on different hosts
    while topo does not know (emulated hosts) count as NETWORK."""
    host_of = getattr(comm, "host_of", None)
    out = {}
    for b in range(1, comm.size):
        for a in range(b):
            if topo is not None and topo.size == comm.size:
                kind = topo.path_kind(a, b, gpu=False)
                if kind not in NETWORK_KINDS and host_of and host_of[a] != host_of[b]:
                    kind = PathKind.NETWORK
            elif host_of and host_of[a] != host_of[b]:
                kind = PathKind.NETWORK
            else:
                kind = PathKind.SAME_SOCKET
            out.setdefault(kind, (a, b))
    return out


def _pingpong(comm, a, b, nbytes, iters) -> float:
    """Median half round trip in us between ranks a and b (others return 0)."""
    me = comm.rank
    if me not in (a, b):
        return 0.0
    buf = np.zeros(max(nbytes, 1), np.uint8)
    peer = b if me == a else a
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        if me == a:
            comm.send(buf, peer, _TAG)
            comm.recv(buf, peer, _TAG)
        else:
            comm.recv(buf, peer, _TAG)
            comm.send(buf, peer, _TAG)
        times.append((time.perf_counter() - t0) / 2 * 1e6)
    return statistics.median(times)


def measure(comm, topo=None, *, small_bytes: int = 8, large_bytes: int = 8 << 20,
            small_iters: int = 50, large_iters: int = 3, use_cache: bool = True,
            hostname: str | None = None) -> dict:
    """Ping-pong on one pair of ranks per link class of comm's group; every rank of comm
    must call it. Returns {PathKind: LinkClass} corrections (the same on every rank).

    comm: anything with rank, size, send(buf, dst, tag), recv(buf, src, tag),
    broadcast(buf, root), barrier() (a comms Communicator). topo: the group's Topology
    (None: one host, or hosts as comm knows them). With use_cache, rank 0 reuses a cached
    result for the same link classes and writes a new one."""
    pairs = pairs_of(comm, topo)
    base = {k: (topo.link(a, b, gpu=False) if topo is not None and topo.size == comm.size
                else DEFAULT_LINKS[k]) for k, (a, b) in pairs.items()}
    transport = transport_of(comm)
    key = _key(base, transport)
    path = cache_path(hostname)
    kinds = sorted(pairs)
    # rank 0 decides whether the cache answers, for everyone
    cached = _load(path, key) if use_cache and comm.rank == 0 else None
    flag = np.array([1 if cached else 0], np.int64)
    comm.broadcast(flag, 0)
    if flag[0]:
        values = np.array([[cached[k.name]["us"], cached[k.name]["gbs"]] for k in kinds]
                          if comm.rank == 0 else np.zeros((len(kinds), 2)), np.float64)
        when = ""
    else:
        values = np.zeros((len(kinds), 2), np.float64)
        for i, k in enumerate(kinds):
            a, b = pairs[k]
            _pingpong(comm, a, b, small_bytes, 3)                    # warm the path
            lat = _pingpong(comm, a, b, small_bytes, small_iters)
            big = _pingpong(comm, a, b, large_bytes, large_iters)
            if comm.rank == a:
                row = np.array([lat, large_bytes / max(big - lat, 1e-3) / 1e3], np.float64)
                if a != 0:
                    comm.send(row, 0, _TAG + 1)
                values[i] = row
            elif comm.rank == 0:
                comm.recv(values[i], a, _TAG + 1)
        when = time.strftime("%Y-%m-%d")
    comm.broadcast(values, 0)
    out = {}
    for i, k in enumerate(kinds):
        us, gbs = float(values[i, 0]), float(values[i, 1])
        out[k] = correct(k, base[k], us, gbs, hostname or socket.gethostname(), when, transport)
    if comm.rank == 0 and use_cache and not flag[0]:
        _store(path, key, {k.name: {"us": float(values[i, 0]), "gbs": float(values[i, 1])}
                           for i, k in enumerate(kinds)})
    return out


def transport_of(comm) -> str:
    """"threads" for the threads transport (ranks are threads of one process), else "shm"
    (a multi-host group's host-local steps run on its host's transport)."""
    return "threads" if getattr(comm, "transport_kind", "shm") == "threads" else "shm"


def correct(kind, base: LinkClass, us: float, gbs: float, hostname: str = "?",
            when: str = "", transport: str = "shm") -> LinkClass:
    """The corrected link class from a measured (one-way us, GB/s) of `kind`."""
    where = f"probe on {hostname}" + (f", {when}" if when else " (cached)")
    ref = REFERENCE.get(transport, REFERENCE["shm"])
    if kind in NETWORK_KINDS or kind not in ref:
        return LinkClass(kind, round(gbs, 4), round(us, 2),
                         f"{where}: 8-byte ping-pong {us:.1f} us one way, 8 MiB one way "
                         f"{gbs:.3f} GB/s")
    ref_us, ref_gbs = ref[kind]
    r_us, r_gbs = us / ref_us, gbs / ref_gbs
    return LinkClass(kind, round(base.gbs * r_gbs, 3), round(base.us * r_us, 3),
                     f"{where}: {transport} send/recv {us:.1f} us, {gbs:.2f} GB/s = x{r_us:.2f} "
                     f"latency, x{r_gbs:.2f} bandwidth of the reference machine's probe; applied to "
                     f"{base.gbs:g} GB/s, {base.us:g} us ({base.source})")


def apply(topo, corrections: dict):
    """topo with the corrections as its link overrides (a new Topology; JSON keeps them)."""
    from .model import Topology
    links = dict(topo.link_overrides)
    links.update(corrections)
    return Topology(topo.host_nodes, topo.ranks, links)


def _load(path: str, key: str):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    entry = data.get(key) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) else None


def _store(path: str, key: str, entry: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = entry
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written costs a re-probe, nothing else

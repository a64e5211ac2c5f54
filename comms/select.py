"""Choose the algorithm for a request. For now a size table per collective on one host
(the topology-aware cost model comes with the topology work); TOPOCOMM_ALGO overrides,
e.g. TOPOCOMM_ALGO="allreduce:ring;alltoall:staged". Every Choice records why."""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import dtypes as dt

# Crossover between the small path (every rank reads and reduces all n inputs) and the
# ring: small while n x size <= SMALL_ALLREDUCE_READ_BYTES, capped by the small slot.
# Measured on the 2-vCPU CI machine with 2 and 4 ranks: at 32 KiB small 12 us vs ring 36 us
# (2 ranks), 37 vs 88 us (4 ranks); at 64 KiB 21 vs 33 us (2), 55 vs 101 us (4).
SMALL_ALLREDUCE_READ_BYTES = 256 << 10
SMALL_ALLREDUCE_MAX_BYTES = 64 << 10

# Above this (bytes sent per rank) all-to-all reads peers' buffers directly; below, the
# pairwise slots win (bench/alltoall_perf.py, 2 ranks: direct 8.1-9.9 ms vs pairwise
# 10.3-11.5 ms at 64 MiB; pairwise 115-120 us vs direct 112-159 us at 1 MiB).
DIRECT_ALLTOALL_MIN_BYTES = 16 << 20

ALGORITHMS = {
    "allreduce": ("small", "ring"),
    "reduce": ("small", "ring"),
    "reduce_scatter": ("ring",),
    "broadcast": ("direct", "staged"),
    "allgather": ("direct", "staged"),
    "gather": ("direct", "staged"),
    "scatter": ("direct", "staged"),
    "all_to_all": ("pairwise", "direct", "staged"),
    "barrier": ("arrival",),
}
# Algorithms of groups that span hosts (comms/algorithms/hierarchical.py); a name from
# this table in TOPOCOMM_ALGO steers the multi-host layer and leaves the host's own choice.
MULTIHOST_ALGORITHMS = {
    "allreduce": ("hierarchical", "leaders"),
    "all_to_all": ("pairwise",),
}
_ALIASES = {"alltoall": "all_to_all", "all_reduce": "allreduce", "bcast": "broadcast",
            "all_gather": "allgather"}


@dataclass(frozen=True)
class Choice:
    collective: str
    algorithm: str
    why: str


def _overrides() -> dict:
    spec = os.environ.get("TOPOCOMM_ALGO", "")
    out = {}
    for part in spec.replace(",", ";").split(";"):
        if ":" in part:
            coll, algo = (x.strip().lower() for x in part.split(":", 1))
            out[_ALIASES.get(coll, coll)] = algo
    return out


class Selector:
    """Built once per group; choose() is a dict lookup plus a comparison."""

    def __init__(self, world_size: int, small_limit: int, direct: str | None = "cma"):
        self.world_size = world_size
        self.direct = direct
        self.small_limit = min(small_limit, SMALL_ALLREDUCE_MAX_BYTES,
                               max(SMALL_ALLREDUCE_READ_BYTES // world_size, 4096))
        self.forced = _overrides()
        self._cache: dict = {}  # (collective, nbytes) -> Choice: decided once per size
        for coll, algo in self.forced.items():
            if coll not in ALGORITHMS:
                raise ValueError(f"TOPOCOMM_ALGO: unknown collective {coll!r}; known: "
                                 f"{', '.join(ALGORITHMS)}")
            if algo not in ALGORITHMS[coll] + MULTIHOST_ALGORITHMS.get(coll, ()):
                raise ValueError(f"TOPOCOMM_ALGO: {coll} has no algorithm {algo!r}; choose "
                                 f"from {', '.join(ALGORITHMS[coll] + MULTIHOST_ALGORITHMS.get(coll, ()))}")

    def choose(self, collective: str, nbytes: int) -> Choice:
        key = (collective, nbytes)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._choose(collective, nbytes)
            if len(self._cache) < 4096:
                self._cache[key] = hit
        return hit

    def _choose(self, collective: str, nbytes: int) -> Choice:
        collective = _ALIASES.get(collective, collective)
        if collective not in ALGORITHMS:
            raise ValueError(f"collective: unknown {collective!r}; known: {', '.join(ALGORITHMS)}")
        forced = self.forced.get(collective)
        if forced and forced in ALGORITHMS[collective]:
            if forced == "small" and nbytes > self.small_limit:
                return Choice(collective, "ring", f"TOPOCOMM_ALGO asks for small, but {nbytes} B "
                              f"exceeds the small slot ({self.small_limit} B): ring")
            return Choice(collective, forced, "forced by TOPOCOMM_ALGO")
        if collective in ("allreduce", "reduce"):
            if nbytes <= self.small_limit:
                return Choice(collective, "small", f"{nbytes} B <= {self.small_limit} B: one arrival, "
                              f"every rank reduces all {self.world_size} inputs (latency-bound)")
            return Choice(collective, "ring", f"{nbytes} B > {self.small_limit} B: each rank reduces "
                          f"1/{self.world_size} from the peers' shared slots, pipelined in chunks "
                          "(bandwidth-bound)")
        if (collective == "all_to_all" and self.direct and nbytes >= DIRECT_ALLTOALL_MIN_BYTES):
            return Choice(collective, "direct", f"{nbytes} B >= {DIRECT_ALLTOALL_MIN_BYTES} B and "
                          f"ranks can read each other's buffers ({self.direct}): one copy per "
                          "byte beats two through cache-sized slots once buffers exceed the cache")
        if collective == "all_to_all" and self.world_size <= 1024:
            return Choice(collective, "pairwise", "n-1 pairwise rounds pipelined through "
                          "cache-sized shared slots: send and receive copies overlap on both "
                          "ranks and memory traffic is one read + one write per byte")
        if ALGORITHMS[collective][0] == "direct":
            if self.direct:
                return Choice(collective, "direct", f"ranks can read each other's buffers "
                              f"({self.direct}): one copy per byte instead of two")
            return Choice(collective, "staged", "peers' buffers cannot be read directly "
                          "(process_vm_readv refused): copies staged through shared memory")
        algo = ALGORITHMS[collective][0]
        return Choice(collective, algo, f"only algorithm for {collective} on one host")

    def explain(self, collective: str, nbytes: int, dtype: str = "float32") -> str:
        c = self.choose(collective, nbytes)
        lines = [f"{c.collective} of {nbytes} B ({dtype}) on {self.world_size} ranks: {c.algorithm}",
                 f"  why: {c.why}",
                 f"  candidates: {', '.join(ALGORITHMS[c.collective])}"]
        return "\n".join(lines)


def dtype_name(code: int) -> str:
    return dt.DTYPE_NAMES.get(code, str(code))


class MultiHostSelector:
    """Choices of a group that spans hosts (comms/multihost.py), built once per group from
    its hosts (lists of ranks); TOPOCOMM_ALGO names from MULTIHOST_ALGORITHMS override."""

    def __init__(self, hosts, topo=None):
        self.hosts = hosts
        self.topo = topo
        self.is_uniform = len({len(h) for h in hosts}) == 1
        self.forced = {c: a for c, a in _overrides().items() if a in MULTIHOST_ALGORITHMS.get(c, ())}
        self._cache: dict = {}

    def choose(self, collective: str, nbytes: int) -> Choice:
        key = (collective, nbytes)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._choose(_ALIASES.get(collective, collective), nbytes)
            if len(self._cache) < 4096:
                self._cache[key] = hit
        return hit

    def _choose(self, coll, nbytes):
        forced = self.forced.get(coll)
        H = len(self.hosts)
        L = max(len(h) for h in self.hosts)
        if coll == "allreduce":
            if forced == "hierarchical" and not self.is_uniform:
                return Choice(coll, "leaders", "TOPOCOMM_ALGO asks for hierarchical, but the "
                              "hosts hold different numbers of ranks: leaders")
            if forced:
                return Choice(coll, forced, "forced by TOPOCOMM_ALGO")
            if not self.is_uniform:
                return Choice(coll, "leaders", "hosts hold different numbers of ranks "
                              f"({', '.join(str(len(h)) for h in self.hosts)}): reduce to each "
                              "host's first rank, all-reduce between them, broadcast")
            if nbytes < (64 << 10) or L == 1:
                return Choice(coll, "leaders", f"{nbytes} B < 64 KiB (latency-bound) or one rank "
                              "per host: one TCP exchange between host leaders")
            return Choice(coll, "hierarchical", f"{H} hosts x {L} ranks: reduce-scatter in each "
                          f"host (shm), the {L} shards cross the network in parallel, each once, "
                          "then all-gather in each host: 2(H-1)/H x N per host on the link, "
                          "whatever the rank placement")
        if coll == "all_to_all":
            return Choice(coll, "pairwise", "host blocks through shm, every remote block as a "
                          "direct TCP transfer, all in flight at once")
        return Choice(coll, "hierarchical", "one representative per host: shm inside each "
                      "host, one TCP transfer per host pair")

    def explain(self, collective: str, nbytes: int, dtype: str = "float32") -> str:
        coll = _ALIASES.get(collective, collective)
        c = self.choose(coll, int(nbytes))
        hosts = "; ".join(f"host {j}: ranks {hs}" for j, hs in enumerate(self.hosts))
        n = sum(len(h) for h in self.hosts)
        return "\n".join([
            f"{coll} of {nbytes} B ({dtype}) on {n} ranks over {len(self.hosts)} hosts: "
            f"{c.algorithm}",
            f"  why: {c.why}",
            f"  hosts: {hosts}",
            f"  candidates: {', '.join(MULTIHOST_ALGORITHMS.get(coll, ('hierarchical',)))}"])

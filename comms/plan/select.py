"""Choose the algorithm for a request: the applicable algorithms -> the cost model's estimate
of each (comms/plan/cost.py, tables built once per group) -> TOPOCOMM_ALGO overrides -> argmin ->
a Choice that records the estimates and why. choose() is a dict lookup once a size was seen.

    TOPOCOMM_ALGO="allreduce:ring;alltoall:staged"   force algorithms (names below)

Selector: the ranks of one host (shared memory). MultiHostSelector: a group that spans hosts
(comms/api/multihost.py); its host-local steps use the one-host model of each host.

One decision is left to measurement (Measured): the even-split all-to-all between processes
from MEASURED_ALL_TO_ALL_BYTES up to the model's switch to direct, where the model picks
pairwise but the host's state moves pairwise by 2-3x and direct not. Rank 0 times both (the
best of each one's last few calls) and proposes the faster in its arrival header; every rank
runs rank 0's proposal (comms/api/host.py HostGroup._a2a_plan, the C call alltoall_even_g)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

from comms.core.errors import ArgumentMismatch, NoAlgorithm
from comms.core.log import log
from comms.plan import cost
from topology import env

# The small all-reduce applies up to its slot (64 KiB at most). Inside that range the model
# decides (small below the crossover with the ring). Measured on the 2-vCPU CI machine kind
# with 2 and 4 ranks (TOPOCOMM_ALGO=allreduce:small, then :ring, python
# bench/all_reduce_perf.py -b 32K -e 64K --np 2, then --np 4, --backend topocomm-numpy): at
# 32 KiB small 12 us vs ring 36 us (2 ranks), 37 vs 88 us (4 ranks); at 64 KiB 21 vs 33 us
# (2), 55 vs 101 us (4); the model reproduces these crossovers (docs/MEASUREMENTS.md).
SMALL_ALLREDUCE_MAX_BYTES = 64 << 10
# Where the small path was measured to win: n x size <= 256 KiB (kept as a cap on the slot:
# larger products were never measured, so the model is not trusted there).
SMALL_ALLREDUCE_READ_BYTES = 256 << 10

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
# Algorithms of groups that span hosts (comms/algorithms/hier.py); a name from
# this table in TOPOCOMM_ALGO steers the multi-host layer and leaves the host's own choice.
MULTIHOST_ALGORITHMS = {
    "allreduce": ("hierarchical", "leaders"),
    "all_to_all": ("pairwise", "hierarchical"),
}
# which collectives have an algorithm, by the memory their buffers are in
ALGORITHMS_BY_MEMORY = {"host": tuple(ALGORITHMS) + ("send", "recv"), "cuda": ()}
# The groups that run collectives on memory other than the host's, by memory kind
# (comms/core/buffers.py): "package.module:Class" under comms/algorithms/. The Communicator
# makes one per kind on first use, with Class(host_group, store, prefix, timeout), and hands
# it the checked Bufs with the host group's method names and arguments (allreduce(send,
# recv, op code, op), broadcast(buf, root), ...); Class.COLLECTIVES names the ones it runs.
# Its constructor must not communicate (a rank may reach it alone: its peers may have passed
# host buffers); what the ranks must agree on happens inside its collectives, after the
# host group's arrival, which also makes a rank that passed host memory and one that passed
# device memory meet (or disagree) there. A kind without an entry: NoAlgorithm.
MEMORY_GROUPS: dict = {"cuda": "comms.algorithms.device.group:DeviceGroup"}
_ALIASES = {"alltoall": "all_to_all", "all_reduce": "allreduce", "bcast": "broadcast",
            "all_gather": "allgather"}
_CACHE_MAX = 4096

# what each algorithm does, for `why` (the numbers come from the model)
_WHAT = {
    ("allreduce", "small"): "one arrival, every rank reduces all n inputs (latency-bound)",
    ("allreduce", "ring"): "each rank reduces 1/n from the peers' shared slots, pipelined in "
                           "chunks (bandwidth-bound)",
    ("reduce_scatter", "ring"): "each rank reduces its block from the peers' shared slots",
    ("all_to_all", "pairwise"): "n-1 pairwise rounds through cache-sized shared slots: memory "
                                "traffic is one read + one write per byte",
    ("all_to_all", "direct"): "peers' buffers read in place: one copy per byte",
    ("all_to_all", "staged"): "copies staged through the data areas: two copies per byte",
    ("any", "direct"): "peers' buffers read in place: one copy per byte",
    ("any", "staged"): "copies staged through shared memory: two copies per byte",
    ("barrier", "arrival"): "one arrival",
    ("allreduce", "hierarchical"): "reduce-scatter in each host (shm), the L shards cross the "
                                   "network in parallel, each once, then all-gather in each "
                                   "host: 2(H-1)/H x N per host on the link, any placement",
    ("allreduce", "leaders"): "reduce to each host's first rank, all-reduce between them over "
                              "TCP, broadcast in each host",
    ("all_to_all", "mh-pairwise"): "host blocks through shm, every remote block as a direct "
                                   "TCP transfer, all in flight at once",
    ("any", "hierarchical"): "one representative per host: shm inside each host, one TCP "
                             "transfer per host pair",
}


def _what(coll, algo, multihost=False):
    if multihost and algo == "pairwise":
        algo = "mh-pairwise"
    return _WHAT.get((coll, algo)) or _WHAT.get(("any", algo), "")


@dataclass(frozen=True)
class Choice:
    """collective, algorithm, why; estimate_us of the chosen algorithm and estimates (us per
    applicable algorithm, in table order); chunk_bytes the model's chunk for it (0: n/a)."""
    collective: str
    algorithm: str
    why: str
    estimate_us: float = 0.0
    estimates: dict = field(default_factory=dict, compare=False)
    chunk_bytes: int = 0


# Even-split all-to-all from this size up to the model's switch to direct is decided by
# measurement between pairwise and direct (Measured below): on the CI VM pairwise is 1.4x
# faster than direct at 1 MiB most of the time (60 vs 87 us), but 2.3-3.5x slower in
# stretches of seconds (200 us at 1 MiB, 1029 vs 376 us at 4 MiB), while direct and MPICH
# stay put; the model cannot see which stretch the host is in (2 processes, torch buffers,
# interleaved with MPICH: TOPOCOMM_ALGO=alltoall:pairwise, then :direct, python
# bench/alltoall_perf.py -b 1M -e 4M --np 2 --vs mpi; docs/MEASUREMENTS.md).
MEASURED_ALL_TO_ALL_BYTES = 512 << 10


class Measured:
    """Rank 0's choice between two algorithms by their measured times, for one request
    kind (say the even-split all-to-all of one size). It alternates them for the first
    2 x EXPLORE calls, then proposes the faster one, and tries the other again every RETRY
    calls so that a change in the machine's state shows. Only rank 0's proposal is used
    (the others follow it through the arrival header), so the ranks always agree.

    "Faster" compares the best of each algorithm's last WINDOW times: a call's time on
    rank 0 includes waiting for the last rank to arrive, which has nothing to do with the
    algorithm (a peer descheduled for a moment), so one slow call must not flip the choice;
    the minimum of a short window is the algorithm's own cost, and the window ages out in
    WINDOW calls when the machine really changes."""
    EXPLORE = 3
    RETRY = 50
    WINDOW = 4

    def __init__(self, first: int, second: int):
        self.kinds = (first, second)
        self.recent = {}
        self.calls = 0
        self.best = first

    def propose(self) -> int:
        i = self.calls
        self.calls += 1
        if i < 2 * self.EXPLORE:
            return self.kinds[i % 2]
        if i % self.RETRY == 0:
            return self.kinds[1] if self.best == self.kinds[0] else self.kinds[0]
        return self.best

    def record(self, kind: int, seconds: float) -> None:
        times = self.recent.setdefault(kind, [])
        times.append(seconds)
        if len(times) > self.WINDOW:
            del times[0]
        if len(self.recent) == 2:
            self.best = min(self.kinds, key=lambda k: min(self.recent[k]))


def _overrides() -> dict:
    """TOPOCOMM_ALGO as {collective: algorithm} (parse_algo)."""
    return _named(env.get("TOPOCOMM_ALGO"))


def parse_algo(spec: str) -> dict:
    """{collective: algorithm} from TOPOCOMM_ALGO's text (topology/env.py checks its form:
    an item without a colon is an error naming the variable, not silently ignored)."""
    return _named(env.parse("TOPOCOMM_ALGO", spec) if spec else ())


def _named(pairs) -> dict:
    return {_ALIASES.get(coll, coll): algo for coll, algo in pairs}


# Sizes whose choices every rank of a group must share: powers of 4 from 1 B to 1 GiB.
_AGREED_SIZES = tuple(4 ** k for k in range(16))


def settings_text(selectors, host=None) -> str:
    """What decides a group's choices, as JSON, for every rank to compare at creation
    (check_settings): the environment that steers them by name, and the choices
    themselves on a grid of sizes (whatever else differs, say a probe's measurements,
    shows there). selectors: the group's, then (multi-host) its host group's, whose keys
    name the host index `host`: only the ranks of one host compare those."""
    out = {"TOPOCOMM_ALGO": ";".join(f"{c}:{a}" for c, a in sorted(_overrides().items()))}
    for i, sel in enumerate(selectors):
        where = "" if i == 0 else f" inside host {host}"
        if isinstance(sel, Selector):
            out[f"TOPOCOMM_CMA (direct reads{where})"] = str(sel.direct)
        colls = [c for c in ALGORITHMS if not isinstance(sel, MultiHostSelector)
                 or c in MULTIHOST_ALGORITHMS]
        # _choose, not choose: these are not the group's calls (nothing cached or logged)
        picks = [(c, n, sel._choose(c, n)) for c in colls for n in _AGREED_SIZES]
        grid = [f"{c}:{n}:{p.algorithm}:{p.chunk_bytes or 0}" for c, n, p in picks]
        out[f"choices{where}"] = hashlib.sha256("|".join(grid).encode()).hexdigest()[:16]
    return json.dumps(out, sort_keys=True)


def check_settings(everyone: list) -> None:
    """Raise ArgumentMismatch naming the setting when any rank's settings_text differs
    from the first rank's that has the same key (every rank compares the same list, so
    all raise alike)."""
    texts = [json.loads(t) for t in everyone]
    first: dict = {}
    for q, theirs in enumerate(texts):
        for key in sorted(theirs):
            p = first.setdefault(key, q)
            ref = texts[p][key]
            if theirs[key] == ref:
                continue
            if key.startswith("choices"):
                raise ArgumentMismatch(
                    f"ranks {p} and {q} would choose different algorithms ({key}: the cost "
                    "model's inputs differ: TOPOCOMM_PROBE, TOPOCOMM_TOPO_FILE, "
                    "TOPOCOMM_SOCKET_NSTREAMS or the machine); set them alike on every rank")
            raise ArgumentMismatch(
                f"{key.split(' ')[0]}: ranks disagree: rank {p} has {ref!r}, rank {q} has "
                f"{theirs[key]!r}; every rank must run the same algorithms, so set it alike "
                "on every rank")


_MEMORY_CLASSES: dict = {}      # MEMORY_GROUPS spec -> its class, imported once


def memory_group_class(kind: str):
    """The class MEMORY_GROUPS names for `kind`, imported; None when it names none."""
    spec = MEMORY_GROUPS.get(kind)
    if spec is None:
        return None
    cls = _MEMORY_CLASSES.get(spec)
    if cls is None:
        import importlib
        module, _, name = spec.partition(":")
        cls = _MEMORY_CLASSES[spec] = getattr(importlib.import_module(module), name)
    return cls


def check_memory(collective: str, name: str, buf) -> None:
    """Raise NoAlgorithm naming `name` when no algorithm of this build runs `collective`
    on the memory `buf` is in (comms/core/buffers.py kinds). Host memory: every
    collective. Other kinds: those their MEMORY_GROUPS class runs, where its unavailable()
    says this process can (CUDA: a copy engine, comms/kernels/device_copy.py)."""
    coll = _ALIASES.get(collective, collective)
    if buf.kind in ALGORITHMS_BY_MEMORY and coll in ALGORITHMS_BY_MEMORY[buf.kind]:
        return
    cls = memory_group_class(buf.kind)
    if cls is not None and coll in getattr(cls, "COLLECTIVES", ()):
        why = cls.unavailable() if hasattr(cls, "unavailable") else ""
        if not why:
            return
        raise NoAlgorithm(f"{name}: {buf.kind} buffers cannot be moved in this process "
                          f"({collective} of a buffer on {buf.where()}): {why}")
    raise NoAlgorithm(f"{name}: no algorithm for {buf.kind} buffers yet ({collective} of a "
                      f"buffer on {buf.where()}); this build moves host memory only (copy the "
                      "data to the CPU, or use a backend that serves this device)")


def _log_first(selector, collective, nbytes, choice) -> None:
    """TOPOCOMM_DEBUG=INFO: the first choice of each (collective, power-of-two size bucket)
    of this selector."""
    if not log.isEnabledFor(logging.INFO):
        return
    seen = selector.__dict__.setdefault("_logged", set())
    bucket = (collective, max(int(nbytes), 1).bit_length())
    if bucket not in seen:
        seen.add(bucket)
        log.info("choice: %s of %d B -> %s (%s)", collective, nbytes, choice.algorithm,
                 choice.why)


def fmt_us(us: float) -> str:
    """A time in us as explain prints it: "12.3 us", "456 us", "7.8 ms"."""
    if us >= 10000:
        return f"{us / 1000:.1f} ms"
    if us >= 100:
        return f"{us:.0f} us"
    return f"{us:.1f} us"


def _argmin(estimates: dict) -> str:
    """Lowest estimate; ties go to the earlier algorithm of the table (dicts keep order)."""
    return min(estimates, key=lambda a: (estimates[a], list(estimates).index(a)))


class Selector:
    """One host's choices, built once per group: the cost model (comms/plan/cost.py ShmModel) for
    world_size ranks on `cores` cores (default: this machine's), the host link class `link`
    (default topology DEFAULT_LINKS[SAME_SOCKET]), the segment's data area `data_bytes`;
    `direct` is how ranks read each other's buffers (None: they cannot)."""

    def __init__(self, world_size: int, small_limit: int, direct: str | None = "cma", *,
                 data_bytes: int = 32 << 20, cores: int | None = None, link=None, model=None,
                 calibration=None):
        self.world_size = world_size
        self.direct = direct
        self.forced = _overrides()
        self._check_forced()
        cap = min(small_limit, SMALL_ALLREDUCE_MAX_BYTES,
                  max(SMALL_ALLREDUCE_READ_BYTES // max(world_size, 1), 4096))
        self.model = model or cost.ShmModel(world_size, cores or os.cpu_count() or 1, link,
                                            data_bytes, direct, calibration=calibration)
        # small applies up to its slot; the model says where it stops paying off
        self.small_limit = self.model.small_crossover(cap)
        # all-to-all: one size threshold from the model (see _choose)
        self.direct_all_to_all_bytes = (
            self.model.first_win("all_to_all", "direct", "pairwise")
            if direct and world_size <= 1024 else None)
        self._cache: dict = {}  # (collective, nbytes) -> Choice: decided once per size

    @classmethod
    def for_topology(cls, topo, host_idx: int = 0, small_bytes: int = 64 << 10,
                     data_bytes: int = 32 << 20, direct: str | None = "cma") -> "Selector":
        """The Selector of one host of `topo` (its ranks, their cores, the link between
        them), as a Communicator on that host would build it."""
        ranks = topo.hosts[host_idx]
        model = cost.shm_model_for(topo, ranks, data_bytes=data_bytes, direct=direct,
                                   small_bytes=small_bytes)
        return cls(len(ranks), small_bytes, direct, data_bytes=data_bytes, model=model)

    def _check_forced(self):
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
            if len(self._cache) < _CACHE_MAX:
                self._cache[key] = hit
            _log_first(self, collective, nbytes, hit)
        return hit

    def _applicable(self, coll: str, nbytes: int) -> tuple:
        """(algorithms that can run this request, {algorithm: why not} for the others)."""
        out, skip = [], {}
        for algo in ALGORITHMS[coll]:
            if algo == "small" and nbytes > self.small_limit:
                skip[algo] = (f"{nbytes} B > {self.small_limit} B (small slot / crossover)")
            elif algo == "direct" and not self.direct:
                skip[algo] = "peers' buffers cannot be read directly (process_vm_readv refused)"
            elif algo == "pairwise" and self.world_size > 1024:
                skip[algo] = "more than 1024 ranks"
            else:
                out.append(algo)
        return out, skip

    def estimates(self, collective: str, nbytes: int) -> dict:
        """{algorithm: estimated us} for the applicable algorithms (table order)."""
        coll = _ALIASES.get(collective, collective)
        algos, _ = self._applicable(coll, nbytes)
        return {a: self.model.time(coll, a, nbytes).total_us for a in algos}

    def estimate_us(self, collective: str, nbytes: int) -> float:
        """The model's time of the algorithm choose() picks for this request."""
        c = self.choose(_ALIASES.get(collective, collective), int(nbytes))
        return c.estimate_us

    def _choose(self, collective: str, nbytes: int) -> Choice:
        coll = _ALIASES.get(collective, collective)
        if coll not in ALGORITHMS:
            raise ValueError(f"collective: unknown {coll!r}; known: {', '.join(ALGORITHMS)}")
        algos, skip = self._applicable(coll, nbytes)
        est = {a: self.model.time(coll, a, nbytes).total_us for a in algos}
        forced = self.forced.get(coll)
        if forced and forced in ALGORITHMS[coll]:
            if forced == "small" and nbytes > self.small_limit:
                return self._make(coll, "ring", est, f"TOPOCOMM_ALGO asks for small, but "
                                  f"{nbytes} B exceeds the small slot ({self.small_limit} B): ring",
                                  nbytes)
            if forced not in est:  # e.g. direct where it cannot run: the transport refuses
                est[forced] = self.model.time(coll, forced, nbytes).total_us
            return self._make(coll, forced, est, "forced by TOPOCOMM_ALGO", nbytes)
        eligible = est
        rule = ""
        if coll == "all_to_all" and "pairwise" in est:
            # With uneven splits every rank decides on its own send size, and ranks must run
            # one algorithm: so all-to-all switches at one threshold (the model's crossover),
            # never back and forth between nearby sizes.
            cut = self.direct_all_to_all_bytes
            pick = "direct" if cut is not None and nbytes >= cut and "direct" in est else "pairwise"
            eligible = {pick: est[pick]}
            rule = (f"; all-to-all switches to direct at one size, {cut} B, from which the "
                    "model keeps direct below pairwise (ranks with uneven splits decide on "
                    "their own send sizes)" if cut is not None else
                    "; all-to-all stays pairwise at every size: the model never keeps direct "
                    "below it (ranks with uneven splits decide on their own send sizes)")
        best = _argmin(eligible)
        if len(est) == 1:
            why = f"only applicable algorithm for {coll} here: {_what(coll, best)}"
        else:
            rest = sorted((a for a in est if a != best), key=lambda a: est[a])
            why = (f"{'lowest estimate' if est[best] <= min(est.values()) else 'estimate'} "
                   f"{fmt_us(est[best])} vs "
                   + ", ".join(f"{a} {fmt_us(est[a])}" for a in rest)
                   + f": {_what(coll, best)}" + rule)
        if skip:
            why += "; not applicable: " + "; ".join(f"{a}: {w}" for a, w in skip.items())
        return self._make(coll, best, est, why, nbytes)

    def _make(self, coll, algo, est, why, nbytes):
        chunk = self.model.chunk_bytes(coll, algo, nbytes)
        return Choice(coll, algo, why, est.get(algo, 0.0), est, chunk)

    def measured_all_to_all(self, nbytes: int):
        """The two even-split all-to-all algorithms rank 0 measures against each other at
        this size (Measured), or None where the model's choice stands. Between processes
        from MEASURED_ALL_TO_ALL_BYTES up, where the model picks pairwise (not forced):
        - with direct reads ("cma"), pairwise vs direct below the model's switch to direct
          (above it direct was faster in every measurement: 64 MiB, interleaved with
          pairwise and MPICH);
        - without (process_vm_readv refused, TOPOCOMM_CMA=0), pairwise with cached vs with
          streamed slot writes: at 1 MiB on the CI VM 47-58 us vs 82-94 when its vCPUs are
          close, 133-163 vs 64-72 when they are far apart (kept for seconds to minutes).
        Threads (direct "memcpy") share one cache: the model's choice stands."""
        if (nbytes < MEASURED_ALL_TO_ALL_BYTES or "all_to_all" in self.forced
                or self.choose("all_to_all", nbytes).algorithm != "pairwise"):
            return None
        if self.direct == "cma":
            return ("pairwise", "direct") if nbytes < (self.direct_all_to_all_bytes or 0) else None
        if self.direct is None:
            return ("pairwise", "pairwise-streamed")
        return None

    def explain(self, collective: str, nbytes: int, dtype: str = "float32") -> str:
        coll = _ALIASES.get(collective, collective)
        c = self.choose(coll, int(nbytes))
        m = self.model
        lines = [f"{c.collective} of {nbytes} B ({dtype}) on {self.world_size} ranks: {c.algorithm}"
                 + (f", ~{fmt_us(c.estimate_us)}" if c.estimate_us else ""),
                 f"  why: {c.why}"]
        pair = self.measured_all_to_all(int(nbytes)) if coll == "all_to_all" else None
        if pair:
            lines.append(f"  at run time (even splits): rank 0 times {pair[0]} against {pair[1]} "
                         f"(alternating {2 * Measured.EXPLORE} calls, then the other again every "
                         f"{Measured.RETRY}) and every rank runs the faster: here the host's "
                         "state (where its vCPUs sit) moves them more than the model can tell")
        lines.append(f"  candidates: {', '.join(ALGORITHMS[c.collective])}")
        lines += estimate_table(m, c, int(nbytes))
        lines.append(f"  model: one host, {m.ranks} rank(s) on {m.cores:g} core(s)"
                     + (f" ({m.oversub:.1f} ranks per core)" if m.oversub > 1 else "")
                     + f"; link {m.link.kind.name} {m.link.gbs:g} GB/s, {m.link.us:g} us "
                     f"({m.link.source})")
        lines += rates_lines(m)
        lines += memory_lines(coll)
        return "\n".join(lines)


def memory_lines(collective: str) -> list:
    """How each other memory kind runs `collective` (the MEMORY_GROUPS class's HOW)."""
    lines = []
    for kind in MEMORY_GROUPS:
        cls = memory_group_class(kind)
        if collective in getattr(cls, "COLLECTIVES", ()):
            lines.append(f"  {kind} buffers: {getattr(cls, 'HOW', cls.__name__)}")
    return lines


def rates_lines(model) -> list:
    """The one-host model's rates, each with where and when it was measured (a calibration
    of this machine, comms/plan/calibrate.py) or the written-in fallback it is."""
    lines = ["  rates:"]
    for name, (value, unit, source) in model.sources.items():
        shown = f"{value / (1 << 20):g} MiB" if unit == "B" else f"{value:g} {unit}"
        lines.append(f"    {name:<10} {shown:>10}  {source}")
    return lines


def estimate_table(model, choice: Choice, nbytes: int) -> list:
    """The estimates as table lines: algorithm, total, latency part, bandwidth part, note."""
    lines = ["  %-14s %12s %12s %12s  %s" % ("estimate", "total", "latency", "bandwidth", "")]
    for algo in choice.estimates:
        t = model.time(choice.collective, algo, nbytes)
        mark = "*" if algo == choice.algorithm else " "
        lines.append("  %s %-12s %12s %12s %12s  %s" % (
            mark, algo, fmt_us(t.total_us), fmt_us(t.latency_us), fmt_us(t.bandwidth_us),
            t.note))
    if choice.chunk_bytes:
        lines.append(f"  chunk: {choice.chunk_bytes} B")
    return lines


class MultiHostSelector:
    """Choices of a group that spans hosts (comms/api/multihost.py), built once per group from
    its hosts (lists of ranks) and its Topology (link classes, cores per host); TOPOCOMM_ALGO
    names from MULTIHOST_ALGORITHMS override. With no topology, or one that puts every
    rank on one host (threads tests emulate hosts by host keys), the network link is
    DEFAULT_LINKS[NETWORK] (an emulated 1 Gbit/s TCP link) and `why` says so."""

    def __init__(self, hosts, topo=None, *, num_streams: int | None = None):
        self.hosts = [list(h) for h in hosts]
        self.topo = topo
        self.is_uniform = len({len(h) for h in self.hosts}) == 1
        self.forced = {c: a for c, a in _overrides().items() if a in MULTIHOST_ALGORITHMS.get(c, ())}
        if num_streams is None:
            from comms.transport.tcp import DEFAULT_STREAMS
            num_streams = env.get("TOPOCOMM_SOCKET_NSTREAMS") or DEFAULT_STREAMS
        self.model, self.link_why = cost.net_model(self.hosts, topo, num_streams)
        self._cache: dict = {}

    def choose(self, collective: str, nbytes: int) -> Choice:
        key = (collective, nbytes)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._choose(_ALIASES.get(collective, collective), nbytes)
            if len(self._cache) < _CACHE_MAX:
                self._cache[key] = hit
            _log_first(self, collective, nbytes, hit)
        return hit

    def estimate_us(self, collective: str, nbytes: int) -> float:
        return self.choose(_ALIASES.get(collective, collective), int(nbytes)).estimate_us

    def net_method(self, nbytes: int) -> str:
        """The network step of an all-reduce among one rank per host (nbytes each):
        "exchange" (2 hosts), "ring" or "halving_doubling", by the model's estimate."""
        key = ("net", nbytes)
        hit = self._cache.get(key)
        if hit is None:
            hit = self.model.net_method(float(nbytes), 1)
            if len(self._cache) < _CACHE_MAX:
                self._cache[key] = hit
        return hit

    def _candidates(self, coll):
        return MULTIHOST_ALGORITHMS.get(coll, ("hierarchical",))

    def _choose(self, coll, nbytes):
        if coll not in ALGORITHMS:
            raise ValueError(f"collective: unknown {coll!r}; known: {', '.join(ALGORITHMS)}")
        forced = self.forced.get(coll)
        H = len(self.hosts)
        algos = [a for a in self._candidates(coll)
                 if a != "hierarchical" or coll != "allreduce" or self.is_uniform]
        est = {a: self.model.time(coll, a, nbytes).total_us for a in algos}
        if coll == "allreduce" and not self.is_uniform:
            sizes = ", ".join(str(len(h)) for h in self.hosts)
            if forced == "hierarchical":
                return Choice(coll, "leaders", "TOPOCOMM_ALGO asks for hierarchical, but the "
                              f"hosts hold different numbers of ranks ({sizes}): leaders",
                              est["leaders"], est)
            if not forced:
                return Choice(coll, "leaders", f"hosts hold different numbers of ranks ({sizes}): "
                              f"{_what(coll, 'leaders')}", est["leaders"], est)
        if forced:
            return Choice(coll, forced, "forced by TOPOCOMM_ALGO", est.get(forced, 0.0), est)
        best = _argmin(est)
        if len(est) == 1:
            why = f"{H} hosts: {_what(coll, best, True)}"
        else:
            rest = sorted((a for a in est if a != best), key=lambda a: est[a])
            why = (f"lowest estimate {fmt_us(est[best])} vs "
                   + ", ".join(f"{a} {fmt_us(est[a])}" for a in rest)
                   + f": {_what(coll, best, True)}")
        if self.link_why:
            why += f" ({self.link_why})"
        return Choice(coll, best, why, est[best], est)

    def explain(self, collective: str, nbytes: int, dtype: str = "float32") -> str:
        coll = _ALIASES.get(collective, collective)
        c = self.choose(coll, int(nbytes))
        hosts = "; ".join(f"host {j}: ranks {hs}" for j, hs in enumerate(self.hosts))
        n = sum(len(h) for h in self.hosts)
        m = self.model
        lines = [f"{coll} of {nbytes} B ({dtype}) on {n} ranks over {len(self.hosts)} hosts: "
                 f"{c.algorithm}" + (f", ~{fmt_us(c.estimate_us)}" if c.estimate_us else ""),
                 f"  why: {c.why}",
                 f"  hosts: {hosts}",
                 f"  candidates: {', '.join(self._candidates(coll))}"]
        lines += estimate_table(m, c, int(nbytes))
        lines.append(f"  model: network link {m.link.kind.name} {m.link.gbs:g} GB/s, "
                     f"{m.link.us:g} us ({m.link.source}); {m.num_streams} TCP stream(s) per "
                     f"peer; largest host {m.max_local} rank(s) on "
                     f"{m.host_models[m._big].cores:g} core(s)")
        lines += memory_lines(coll)
        return "\n".join(lines)

"""The cost model: how long each algorithm would take for a request, from the group's topology.

Built once per group (comms/plan/select.py builds it when a Communicator is created), from plain
numbers: the link class between the ranks of a host and between hosts (topology/model.py:
GB/s, us, and where each number comes from), the cores of each host, and the constants
below (each says where it was measured). Per call the selector evaluates a few closed forms
(arithmetic only, then cached per size), so the model never runs on the hot path.

Units: bytes, microseconds, GB/s = 1e9 B/s (bytes / GB/s / 1e3 = us).

One host (shared memory): every rank works at once, so one rank's time is a roofline

    T = call + hops x hop
        + max(host memory traffic / DRAM_GBS      (only once the buffers leave the L3),
              own traffic / CPU_GBS)               (every load and store, slots included)

  call     fixed cost of the algorithm's entry (arrival, Python, the C call), per algorithm;
  hop      one counter hand-off: the host link class's latency, plus SWITCH_US per extra
           rank per core when ranks outnumber cores (a hand-off then waits for the
           scheduler; 4 ranks on 2 cores: ring all-reduce 1-64 MiB within 12% at 1, 16
           and 64 MiB, docs/MEASUREMENTS.md), and the own-traffic term is multiplied by
           ranks per core;
  traffic  counted per algorithm from its steps (comms/algorithms/host/*.py headers): a copy of B
           bytes is B read + B written; a reduction of k inputs into B bytes reads kB and
           writes B; pipelined slots stay in cache and are not memory traffic;
  rates    measured on the CI machine kind (each constant names the bench command that
           reproduces it; docs/MEASUREMENTS.md has the values), scaled by the host
           link class's GB/s over its 14.8 GB/s reference, so a probe (topology/probe.py)
           that measures another rate scales the memory side; copies that are not pipelined
           and read another core's fresh lines run at XCORE_GBS, process_vm_readv at CMA_GBS.

Between hosts (TCP), a step that moves B bytes each way over a host link takes

    T = link_us + NET_STEP_US + B / (link_gbs x tcp_efficiency(streams))

  link     the host pair's link class (topo.link(a, b): the NIC or tbf rate, 60 us);
  streams  TCP connections carrying the step in parallel per direction (each rank's
           connections x TOPOCOMM_SOCKET_NSTREAMS stripes for transfers >= 1 MiB).

A group's time is its host's shm steps plus its network steps, with the hierarchical
all-reduce's pieces overlapping the two (comms/algorithms/hier.py).

Nothing here reads the machine: the Selector passes what it knows (world size, cores, link
classes, layout), so every rank of a group computes the same numbers and the same choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from comms.algorithms import hier
from comms.algorithms.host import allreduce as ring
from comms.algorithms.host import pairwise
from topology.model import CI_MACHINE, DEFAULT_LINKS, LinkClass, PathKind

KIB, MIB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Constant:
    """A number of the model and where it was measured."""
    value: float
    unit: str
    source: str


# Each constant's source names the command that measures it again and the machine kind;
# docs/MEASUREMENTS.md has the values and when they were measured.
_VM = CI_MACHINE


def _bench(coll: str, algo: str, sizes: str, ranks: int = 2) -> str:
    """The command that times `coll` with `algo` forced on `ranks` local processes of the numpy
    Communicator, e.g. _bench("allreduce", "ring", "-b 1M -e 4M")."""
    script = "all_reduce_perf" if coll == "allreduce" else "alltoall_perf"
    return (f"TOPOCOMM_ALGO={coll}:{algo} python bench/{script}.py {sizes} --np {ranks} "
            "--backend topocomm-numpy")


# Not covered by a bench/ script; the loops are in docs/MEASUREMENTS.md.
_ROOTED = "the broadcast / all-gather loop of docs/MEASUREMENTS.md, 2 processes under mpiexec"
_COPY = "the copy-rate loop of docs/MEASUREMENTS.md"

# ---- one host --------------------------------------------------------------------------
# Fixed cost of one call beyond its hand-offs and bytes: argument checks, the arrival,
# the Python around the C call. 8-byte requests, 2 ranks, quiet machine (best of 2-6 runs).
CALL_US = {
    "small": Constant(3.0, "us", "small all-reduce of 8 B: 2.6-3.0 us "
                      f"({_bench('allreduce', 'small', '-b 8 -e 8')}; {_VM})"),
    "ring": Constant(10.0, "us", "ring all-reduce of 8 B, two calls (arrival, then the ring): "
                     f"10.2 us ({_bench('allreduce', 'ring', '-b 8 -e 8')}; {_VM})"),
    "ring_once": Constant(6.0, "us", "ring all-reduce of 8 B of a size run before, one call: "
                          f"5.1-7.6 us ({_bench('allreduce', 'ring', '-b 8 -e 64K')}; {_VM})"),
    "pairwise": Constant(5.0, "us", "pairwise all-to-all of 8 B, even-split fast path: 4.4-7 us "
                         f"({_bench('alltoall', 'pairwise', '-b 8 -e 8')}; {_VM})"),
    "direct": Constant(31.0, "us", "direct all-to-all of 8 B: 31-48 us "
                       f"({_bench('alltoall', 'direct', '-b 8 -e 8')}; {_VM})"),
    "staged": Constant(44.0, "us", "staged all-to-all of 8 B: 44-71 us "
                       f"({_bench('alltoall', 'staged', '-b 8 -e 8')}; {_VM})"),
    "rooted": Constant(15.0, "us", "broadcast / all-gather, direct, 64 KiB: 18 / 22-37 us "
                       f"(TOPOCOMM_ALGO='broadcast:direct;allgather:direct', {_ROOTED}; {_VM})"),
    "round": Constant(4.0, "us", "one staged round (Python wait + post): broadcast staged vs "
                      "direct at 64 KiB, 19-28 vs 18 us (TOPOCOMM_ALGO='broadcast:staged', "
                      f"{_ROOTED}; {_VM})"),
}
# Traffic (bytes read + bytes written) per second.
CPU_GBS = Constant(50.0, "GB/s", "one core copying within its caches: ring all-reduce 1-4 MiB "
                   "(4N of traffic per rank: 96-112 us at 1 MiB, 302-409 us at 4 MiB) and "
                   "pairwise all-to-all 1 MiB (3N: 82-95 us), 2 ranks "
                   f"({_bench('allreduce', 'ring', '-b 1M -e 4M')}; "
                   f"{_bench('alltoall', 'pairwise', '-b 1M -e 1M')}); nat.copy of 1-4 MiB in 2 "
                   f"processes at once: 20-27 GB/s copied ({_COPY}); {_VM}")
XCORE_GBS = Constant(32.0, "GB/s", "copies that are not pipelined and read lines another core "
                     "just wrote: the small all-reduce (copy in + read n slots: 8 B 3.0 us .. "
                     "64 KiB 14.4 us, 2 ranks) and the staged copies (all-to-all 1 MiB 143 us, "
                     f"4 MiB 571 us) ({_bench('allreduce', 'small', '-b 8 -e 64K')}; "
                     f"{_bench('alltoall', 'staged', '-b 1M -e 4M')}; {_VM})")
DRAM_GBS = Constant(26.0, "GB/s", "the whole host once the working set leaves the L3: ring "
                    "all-reduce 64 / 256 MiB (2 ranks x 2N: 24-28 GB/s), pairwise all-to-all "
                    f"16-256 MiB ({_bench('allreduce', 'ring', '-b 64M -e 256M')}; "
                    f"{_bench('alltoall', 'pairwise', '-b 16M -e 256M')}); nat.copy of 256 MiB, "
                    f"1 or 2 processes: 12.7-18 GB/s copied ({_COPY}); {_VM}; scaled by the "
                    "host link class (14.8 GB/s reference)")
CMA_GBS = Constant(8.0, "GB/s", "process_vm_readv, bytes copied: broadcast direct 1 / 16 MiB "
                   f"124 / 1699 us (9.5-9.9 GB/s; {_ROOTED}); direct all-to-all 1-4 MiB minus "
                   "its local copy, 4.8-6.5 GB/s "
                   f"({_bench('alltoall', 'direct', '-b 1M -e 4M')}); 2 ranks; {_VM}")
CMA_CONTENTION = Constant(8.0, "", "process_vm_readv slows down this many times more per extra "
                          "rank per core than a plain copy: 4 ranks on 2 cores, direct all-to-all "
                          "1 / 4 / 16 MiB 1776 / 6747 / 23106 us (0.5 GB/s read per rank) vs "
                          "pairwise 527 / 2769 / 9091 us "
                          f"({_bench('alltoall', 'direct', '-b 1M -e 16M', 4)}; "
                          f"{_bench('alltoall', 'pairwise', '-b 1M -e 16M', 4)}; {_VM})")
L2_BYTES = Constant(1 * MIB, "B", f"lscpu: L2 1 MiB per core ({_VM})")
L3_BYTES = Constant(32 * MIB, "B", "lscpu: L3 32 MiB, shared with the physical host's other "
                    "tenants: buffers stay cached up to about a quarter of it (ring all-reduce "
                    "4 MiB, 8 MiB of buffers: cache-bound) and are DRAM-bound from all of it "
                    "(ring 16 MiB: 32 MiB of buffers; pairwise all-to-all 4 MiB: 16 MiB of "
                    f"buffers, half-way) ({_bench('allreduce', 'ring', '-b 4M -e 16M')}; "
                    f"{_bench('alltoall', 'pairwise', '-b 4M -e 4M')}; {_VM})")
# A store to a line that is not in cache first reads it (write-allocate): out-of-place
# outputs cost more than their bytes. Direct all-to-all 64 / 256 MiB took 2.4-2.5 N of
# traffic per rank at the ring's DRAM rate (reads N, writes N, allocations ~0.5 N).
WRITE_ALLOCATE = Constant(0.5, "", "extra traffic per byte written to a fresh output once "
                          "DRAM-bound: direct / pairwise all-to-all 64 and 256 MiB, 2 ranks, "
                          "against the in-place ring's rate "
                          f"({_bench('alltoall', 'direct', '-b 64M -e 256M')}; the same with "
                          f"pairwise; {_bench('allreduce', 'ring', '-b 64M -e 256M')}; {_VM})")
# Waiting for a peer that is not running: with more ranks than cores a hand-off waits for the
# scheduler. 4 ranks on 2 cores (the crossover measurements of comms/plan/select.py): small
# 37 / 55 us and ring 88 / 101 us at 32 / 64 KiB fit 24 us per hand-off beyond the link's
# latency.
SWITCH_US = Constant(24.0, "us", "extra per hand-off per extra rank per core: 4 ranks on 2 "
                     "cores, small and ring all-reduce at 32 and 64 KiB "
                     f"({_bench('allreduce', 'small', '-b 32K -e 64K', 4)}; the same with ring; "
                     f"{_VM})")
# The constants a calibration of the machine replaces or scales (comms/plan/calibrate.py),
# by the name the probe gives them.
CALIBRATED = {"cpu_gbs": CPU_GBS, "xcore_gbs": XCORE_GBS, "dram_gbs": DRAM_GBS,
              "cma_gbs": CMA_GBS, "l2_bytes": L2_BYTES, "l3_bytes": L3_BYTES}
# The memory side's reference: the constants above were measured where the host link class
# is DEFAULT_LINKS[SAME_SOCKET] (14.8 GB/s); a probe that measures another rate scales them.
_REF_SHM_GBS = 14.8

# ---- between hosts ---------------------------------------------------------------------
# Share of the link rate TCP delivers when both directions are busy at once, by the number of
# streams carrying a direction (the DEFAULT_STREAMS note in comms/transport/tcp.py).
_CLUSTER = ("sudo env TOPOCOMM_SOCKET_NSTREAMS=<1|2|4> .venv/bin/python bench/cluster.py "
            "--hosts 2 --ranks-per-host 2 --rate 1gbit -- python bench/all_reduce_perf.py "
            "-b 64M -e 64M --backend topocomm")
_EMULATED = "2x2 emulated hosts (network namespaces, tbf 1 Gbit/s) on " + _VM
TCP_EFFICIENCY = {
    1: Constant(0.80, "", "one stream per direction, both busy: 0.72-0.87 Gbit/s of 1 Gbit/s "
                f"({_CLUSTER}; {_EMULATED})"),
    2: Constant(0.94, "", "2+ streams per direction, both busy: 0.93-0.95 of the link rate "
                f"({_CLUSTER}; {_EMULATED})"),
}
NET_STEP_US = Constant(40.0, "us", "Python + poll-loop cost of one TCP exchange beyond the link "
                       "latency: 1 MiB hierarchical all-reduce ~10 ms against 8.9 ms of link "
                       "time (sudo .venv/bin/python bench/cluster.py --hosts 2 --ranks-per-host "
                       "2 --rate 1gbit -- python bench/all_reduce_perf.py -b 1M -e 1M "
                       f"--backend topocomm; {_EMULATED})")
THREAD_HANDOFF_US = Constant(30.0, "us", "hand-off to the group's network thread and back: a "
                             "hand-off between Python threads costs tens of us on 2 cores "
                             "(measured for the torch seam's progress thread, "
                             f"comms/torch/runner.py; no bench/ script; {_VM})")
STRIPE_MIN_BYTES = 1 * MIB  # striped over the streams from this size (comms/transport/tcp.py)

# Chunks the ring all-reduce may be given (its slots: comms/algorithms/host/allreduce.py)
CHUNK_CHOICES = (64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1 * MIB)
CHUNK_L2_SLOTS = Constant(2 * MIB, "B", "ring all-reduce, 2 ranks, by chunk (4 slots x 2 "
                          "blocks): 64 KiB (0.5 MiB of slots) 110 / 351 / 2155 / 10089 us at "
                          "1 / 4 / 16 / 64 MiB, 256 KiB (2 MiB) 110 / 318 / 2601 / 10776 us, "
                          "1 MiB (8 MiB) 376 / 1229 / 4483 / 19300 us: slots beyond two L2s "
                          f"cost 1.8-3.4x ({_bench('allreduce', 'ring', '-b 1M -e 64M')} with "
                          f"CHUNK_CHOICES narrowed to one chunk; {_VM})")


def _us(nbytes: float, gbs: float) -> float:
    return nbytes / gbs / 1e3 if gbs > 0 else math.inf


@dataclass(frozen=True)
class Terms:
    """One estimate, split so that explain() can say where the time goes."""
    total_us: float
    latency_us: float
    bandwidth_us: float
    note: str = ""


class ShmModel:
    """One host: `ranks` ranks on `cores` cores, `link` between them (SAME_SOCKET or
    SAME_HOST; default DEFAULT_LINKS[SAME_SOCKET]), a data area of `data_bytes` per rank,
    `direct` how ranks read each other's buffers ("cma": process_vm_readv; "memcpy": threads
    of one process, a test transport, modeled as processes so tests choose as production
    does; None: they cannot), a small all-reduce slot of `small_bytes`.

    Per rank, for N bytes (see the module text):
        T = call + hops x hop + bandwidth
        bandwidth = max(host memory traffic / DRAM_GBS,
                        own traffic / CPU_GBS x ranks per core)
        hop = link.us + SWITCH_US x (ranks per core - 1)
    """

    def __init__(self, ranks: int, cores: float | None = None, link: LinkClass | None = None,
                 data_bytes: int = 32 * MIB, direct: str | None = "cma",
                 small_bytes: int = 64 * KIB, calibration=None):
        self.ranks = max(1, int(ranks))
        self.cores = max(1.0, float(cores or self.ranks))
        self.link = link or DEFAULT_LINKS[PathKind.SAME_SOCKET]
        self.data_bytes = int(data_bytes)
        self.direct = direct
        self.small_bytes = int(small_bytes)
        self.oversub = max(1.0, self.ranks / self.cores)
        self.scale = self.link.gbs / _REF_SHM_GBS if self.link.gbs > 0 else 1.0
        self.calibration = calibration
        self.sources = {}
        self.cpu_gbs = self._rate("cpu_gbs", self.scale)
        self.xcore_gbs = self._rate("xcore_gbs", self.scale)
        self.dram_gbs = self._rate("dram_gbs", self.scale)
        self.cma_gbs = self._rate("cma_gbs", self.scale)
        self.l2_bytes = self._rate("l2_bytes", 1.0)
        self.l3_bytes = self._rate("l3_bytes", 1.0)
        self.hop_us = self.link.us + SWITCH_US.value * (self.oversub - 1.0)
        self.active = min(float(self.ranks), self.cores)

    def _rate(self, name: str, scale: float) -> float:
        """The constant `name` for this machine: when this machine was calibrated
        (comms/plan/calibrate.py), the measured value or the written-in one scaled by the
        probe (calibrate.DIRECT / SCALED say which); else the written-in value (fitted on
        the CI machine kind) times `scale` (the host link class). `sources` says which, for
        explain."""
        fallback = CALIBRATED[name]
        cal = self.calibration
        made = cal.model_value(name, fallback.value) if cal is not None else None
        if made is not None:
            value, how = made
            self.sources[name] = (value, fallback.unit, f"{how}; {cal.source(name)}")
            return float(value)
        what = fallback.source if len(fallback.source) <= 90 else \
            fallback.source[:87].rsplit(" ", 1)[0] + " ..."
        self.sources[name] = (fallback.value * scale, fallback.unit,
                              f"written-in fallback, no calibration of this machine (run "
                              f"topocomm calibrate); {what} (comms/plan/cost.py)"
                              + (f"; x{scale:.2f} by the host link class" if scale != 1.0 else ""))
        return fallback.value * scale

    # ---- pieces ------------------------------------------------------------------------
    def mem_us(self, host_bytes: float, working_set: float) -> float:
        """Time for the host's memory to carry host_bytes of traffic: free (the cores are the
        limit) while the working set fits a quarter of the L3, the DRAM rate once it exceeds
        the L3, time per byte log-interpolated in between (L3_BYTES says why)."""
        l3 = self.l3_bytes
        if working_set <= l3 / 4:
            return 0.0
        t = _us(host_bytes, self.dram_gbs)
        if working_set >= l3:
            return t
        return t * (math.log(working_set) - math.log(l3 / 4)) / math.log(4)

    def bandwidth_us(self, host_bytes: float, working_set: float, cpu_us: float) -> float:
        return max(self.mem_us(host_bytes, working_set), cpu_us * self.oversub)

    def cpu_us(self, nbytes: float, footprint: float = 0.0) -> float:
        """A rank's own traffic; slots beyond the L2 run at the L3's pace (nat.copy of 8 MiB
        vs 2 MiB in 2 processes: 0.85-0.95; taken as 0.9)."""
        gbs = self.cpu_gbs * (1.0 if footprint <= self.l2_bytes else 0.9)
        return _us(nbytes, gbs)

    # ---- algorithms ----------------------------------------------------------------------
    def time(self, collective: str, algorithm: str, nbytes: int) -> Terms:
        """The estimate of `algorithm` running `collective` on nbytes (SHM_COSTS)."""
        fn = SHM_COSTS.get((collective, algorithm))
        if fn is None:
            raise ValueError(f"cost model: no estimate for {collective} by {algorithm}")
        return fn(self, float(nbytes))

    def _allreduce_small(self, N: float) -> Terms:
        """copy N into my slot, one arrival, reduce n slots: (n + 3) N of traffic."""
        n = self.ranks
        lat = CALL_US["small"].value + self.hop_us
        bw = self.bandwidth_us(0.0, 0.0, _us((n + 3) * N, self.xcore_gbs))
        return Terms(lat + bw, lat, bw, "one arrival; every rank reduces all n inputs")

    def ring_time(self, N: float, chunk: int, gather: bool = True,
                  one_call: bool = False) -> Terms:
        """one_call: the all-reduce of a size run before (arrival and ring in one C call)."""
        n = self.ranks
        steps = max(1, math.ceil(N / n / chunk))
        hops = steps * (3 if gather else 2)
        part = (n - 1) / n * N
        # copy-in of what others own + reduce my block (n reads, 2 writes) + copy-out
        own = 2 * part + (N + 2 * N / n) + (2 * part if gather else 0.0)
        # user buffers: my input read once, my output written once (the slots stay in cache)
        host = n * (N + (N if gather else N / n))
        # the first chunk's copy is not overlapped (pipeline fill)
        call = CALL_US["ring_once" if one_call else "ring"].value
        lat = call + self.hop_us * hops + self.cpu_us(2 * min(chunk, N / n))
        bw = self.bandwidth_us(host, n * N, self.cpu_us(own, ring.NUM_SLOTS * n * chunk))
        return Terms(lat + bw, lat, bw, f"{steps} chunk step(s) of {chunk >> 10} KiB per block")

    def ring_chunk(self, N: float = 0.0, gather: bool = True) -> int:
        """The largest chunk whose slots (num_slots x n chunks) stay within two L2s (mine and
        the peer's that reads them) and fit the data area: 256 KiB for 2 ranks, 128 KiB for
        4, 64 KiB from 8 (CHUNK_L2_SLOTS says what was measured)."""
        fit = ring.ring_fit(self.data_bytes, self.ranks)
        fits = [c for c in CHUNK_CHOICES if c <= fit]
        if not fits:
            return max(64, fit // 64 * 64)
        ok = [c for c in fits if ring.NUM_SLOTS * self.ranks * c <= CHUNK_L2_SLOTS.value]
        return max(ok) if ok else min(fits)

    def _allreduce_ring(self, N: float, gather: bool = True, one_call: bool = True) -> Terms:
        return self.ring_time(N, self.ring_chunk(N, gather), gather, one_call)

    def _reduce_small(self, N: float) -> Terms:
        return self._allreduce_small(N)

    def _reduce_ring(self, N: float) -> Terms:
        return self._allreduce_ring(N, one_call=False)

    def _reduce_scatter_ring(self, N: float) -> Terms:
        # nbytes = the whole send buffer; each rank keeps N/n
        return self._allreduce_ring(N, gather=False)

    def pairwise_chunk(self) -> int:
        """The chunk pairwise runs with for this data area (its own rule: 256 KiB here, so
        that its slots stay in the sender's L2 while the peer reads them)."""
        return pairwise.chunk_for(self.data_bytes)

    def _all_to_all_pairwise(self, N: float) -> Terms:
        n = self.ranks
        c = self.pairwise_chunk()
        part = (n - 1) / n * N
        chunks = math.ceil(part / c) if n > 1 else 0
        # own block copied locally; the rest into my slots and out of the peer's
        own = 2 * N / n + 4 * part
        host = n * (2 + WRITE_ALLOCATE.value) * N     # send read once, receive written once
        fill = self.cpu_us(2 * min(c, part / max(n - 1, 1)))
        lat = CALL_US["pairwise"].value + self.hop_us * (chunks + n - 1) + fill
        bw = self.bandwidth_us(host, 2 * n * N, self.cpu_us(own, 2 * pairwise.NUM_SLOTS * c))
        return Terms(lat + bw, lat, bw, f"{n - 1} round(s), {chunks} chunk(s) of {c >> 10} KiB")

    def cma_us(self, nbytes: float) -> float:
        """process_vm_readv of nbytes (before the ranks-per-core factor); with more ranks
        than cores the readers contend (CMA_CONTENTION)."""
        slow = 1.0 + CMA_CONTENTION.value * (self.oversub - 1.0) / self.oversub
        return _us(nbytes, self.cma_gbs) * slow if nbytes > 0 else 0.0

    def _all_to_all_direct(self, N: float) -> Terms:
        n = self.ranks
        part = (n - 1) / n * N
        lat = CALL_US["direct"].value + self.hop_us * 2
        # my own block copied locally, the peers' blocks read with process_vm_readv
        own = self.cpu_us(2 * N / n) + self.cma_us(part)
        bw = self.bandwidth_us(n * (2 + WRITE_ALLOCATE.value) * N, 2 * n * N, own)
        return Terms(lat + bw, lat, bw, "one copy per byte, peers' buffers read in place")

    def _all_to_all_staged(self, N: float) -> Terms:
        n = self.ranks
        part = (n - 1) / n * N
        share = max(64, self.data_bytes // max(1, n - 1))
        rounds = max(1, math.ceil(N / n / share))
        # into my data area, out of the peer's: both through memory once the area is large
        # (measured: as fast as pairwise once DRAM-bound, so the area, reused by every call,
        # is not counted as memory traffic; its copies are not pipelined: XCORE_GBS)
        own = 2 * N / n + 4 * part
        host = n * (2 + WRITE_ALLOCATE.value) * N
        lat = CALL_US["staged"].value + self.hop_us * 2 * rounds
        bw = self.bandwidth_us(host, 2 * n * N, _us(own, self.xcore_gbs))
        return Terms(lat + bw, lat, bw, f"{rounds} round(s) through the data area")

    # broadcast / allgather / gather / scatter: nbytes as the Communicator passes it
    # (broadcast: the buffer; allgather, gather, scatter: the whole n-block buffer)
    def _moved(self, collective: str, N: float):
        """For the busiest rank: (bytes it pulls from peers, bytes it copies locally, bytes it
        publishes when staged), the number of ranks that pull, the host's working set."""
        n = self.ranks
        part = (n - 1) / n * N
        if collective == "broadcast":
            return N, 0.0, N, n - 1, n * N
        if collective == "allgather":
            return part, N / n, N / n, n, n * N + N
        return part, N / n, part, 1, 2 * N           # gather / scatter: the root

    def _any_direct(self, collective: str, N: float) -> Terms:
        pull, local, _, pullers, ws = self._moved(collective, N)
        lat = CALL_US["rooted"].value + self.hop_us * 2
        host = pullers * ((2 + WRITE_ALLOCATE.value) * pull + 2 * local)
        bw = self.bandwidth_us(host, ws, self.cma_us(pull) + self.cpu_us(2 * local))
        return Terms(lat + bw, lat, bw, "one copy per byte, peers' buffers read in place")

    def _any_staged(self, collective: str, N: float) -> Terms:
        pull, local, pub, pullers, ws = self._moved(collective, N)
        rounds = max(1, math.ceil(max(pull, pub) / max(64, self.data_bytes)))
        # publish into the area, then pull out of it: the two copies follow each other
        own = 2 * (pull + local + pub)
        host = pullers * 2 * (pull + local) + 2 * pub
        lat = CALL_US["rooted"].value + CALL_US["round"].value * rounds + self.hop_us * 2 * rounds
        bw = self.bandwidth_us(host, ws + min(self.data_bytes, N), self.cpu_us(own))
        return Terms(lat + bw, lat, bw, f"{rounds} round(s), two copies per byte")

    def _barrier_arrival(self, N: float) -> Terms:
        lat = CALL_US["small"].value + self.hop_us
        return Terms(lat, lat, 0.0, "one arrival")

    # ---- what the selector asks ---------------------------------------------------------
    def small_crossover(self, cap: int) -> int:
        """The largest size <= cap (the small slot) at which the small all-reduce's estimate
        is not above the ring's; 0 when the ring always wins."""
        def small_wins(nb):
            return (self._allreduce_small(float(nb)).total_us
                    <= self._allreduce_ring(float(nb)).total_us)
        if cap <= 0 or not small_wins(1):
            return 0
        if small_wins(cap):
            return int(cap)
        lo, hi = 1, int(cap)       # small wins at lo, loses at hi
        while hi - lo > 64:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if small_wins(mid) else (lo, mid)
        return lo // 64 * 64 or lo

    def first_win(self, collective: str, algorithm: str, over: str, lo: int = 4 * KIB,
                  hi: int = 1 << 34) -> int | None:
        """The smallest size (a power of 2 from lo up to hi) from which `algorithm`'s estimate
        stays below `over`'s at every larger power of 2; None if it never does."""
        sizes = []
        s = lo
        while s <= hi:
            sizes.append(s)
            s *= 2
        wins = [self.time(collective, algorithm, s).total_us < self.time(collective, over, s).total_us
                for s in sizes]
        if not wins[-1]:
            return None
        i = len(wins) - 1
        while i > 0 and wins[i - 1]:
            i -= 1
        return sizes[i]

    def chunk_bytes(self, collective: str, algorithm: str, nbytes: int = 0) -> int:
        """The chunk the pipelined algorithms should move per hand-off (0: not chunked)."""
        if algorithm == "ring":
            return self.ring_chunk(float(nbytes), collective != "reduce_scatter")
        if algorithm == "pairwise":
            return self.pairwise_chunk()
        return 0


def tcp_efficiency(streams: int) -> float:
    return TCP_EFFICIENCY[1 if streams <= 1 else 2].value


class NetModel:
    """A group over several hosts: `hosts` (lists of ranks), one ShmModel per host (in the
    order of `hosts`), `link` the slowest link class between two hosts, `num_streams` TCP
    stripes per peer for transfers >= STRIPE_MIN_BYTES (TOPOCOMM_SOCKET_NSTREAMS)."""

    def __init__(self, hosts: list, host_models: list, link: LinkClass, num_streams: int = 2):
        self.hosts = [list(h) for h in hosts]
        self.host_models = list(host_models)
        self.link = link
        self.num_streams = max(1, int(num_streams))
        self.size = sum(len(h) for h in self.hosts)
        self.num_hosts = len(self.hosts)
        self.max_local = max(len(h) for h in self.hosts)
        # the slowest host sets the pace of every shm step (the steps end together)
        self._big = max(range(len(self.hosts)), key=lambda j: (len(self.hosts[j]), -j))
        m = self.host_models[self._big]
        self._small = m.small_crossover(min(m.small_bytes, 64 * KIB,
                                            max((256 * KIB) // m.ranks, 4 * KIB)))

    # ---- pieces ------------------------------------------------------------------------
    def shm(self, collective: str, nbytes: float, algorithms=None) -> float:
        """The fastest host-local algorithm on the largest host (0 for a 1-rank host)."""
        m = self.host_models[self._big]
        if m.ranks <= 1:
            return 0.0
        algorithms = algorithms or _LOCAL.get(collective, ("ring",))
        return min(m.time(collective, a, nbytes).total_us for a in algorithms
                   if (a != "direct" or m.direct) and (a != "small" or nbytes <= self._small))

    def streams(self, connections: int, nbytes: float) -> int:
        return connections * (self.num_streams if nbytes >= STRIPE_MIN_BYTES else 1)

    def net_step(self, nbytes_each_way: float, streams: int) -> float:
        """One exchange that moves nbytes_each_way over a host's link in each direction."""
        return (self.link.us + NET_STEP_US.value
                + _us(nbytes_each_way, self.link.gbs * tcp_efficiency(streams)))

    def agree_us(self) -> float:
        """Every multi-host collective starts by agreeing: a local arrival + one digest
        exchange with every remote rank (comms/api/multihost.py _agree)."""
        return CALL_US["ring"].value + self.link.us + NET_STEP_US.value

    def net_methods(self, nbytes: float, connections: int) -> dict:
        """us per way of all-reducing nbytes among one rank per host over `connections`
        parallel groups (comms/algorithms/hier.py net_allreduce): a plain exchange
        for 2 hosts; else a ring (2(H-1) steps of N/H) and, when H is a power of two,
        recursive halving-doubling (2 log2 H steps, the same bytes: N/2, N/4, ...)."""
        H = self.num_hosts
        s = self.streams(connections, nbytes / connections)
        cpu = self.host_models[0].cpu_gbs
        if H == 2:  # one exchange of the whole buffer, then a local reduction
            return {"exchange": self.net_step(nbytes, s) + _us(3 * nbytes / connections, cpu)}
        per = nbytes / H
        reduce_us = _us(3 * per * (H - 1) / connections, cpu)
        out = {"ring": 2 * (H - 1) * self.net_step(per, s) + reduce_us}
        if H & (H - 1) == 0:
            k = H.bit_length() - 1
            steps = sum(self.net_step(nbytes / 2 ** (j + 1), s) for j in range(k))
            out["halving_doubling"] = 2 * steps + reduce_us
        return out

    def net_method(self, nbytes: float, connections: int) -> str:
        m = self.net_methods(nbytes, connections)
        return min(m, key=m.get)

    def net_allreduce(self, nbytes: float, connections: int) -> float:
        """All-reduce nbytes among one rank per host: the best of net_methods."""
        return min(self.net_methods(nbytes, connections).values())

    # ---- algorithms ----------------------------------------------------------------------
    def time(self, collective: str, algorithm: str, nbytes: int) -> Terms:
        """The estimate of `algorithm` running `collective` on nbytes across hosts
        (NET_COSTS; "hierarchical" of the other collectives: one representative per host)."""
        fn = NET_COSTS.get((collective, algorithm))
        if fn is None:
            if algorithm != "hierarchical":
                raise ValueError(f"cost model: no estimate for {collective} by {algorithm} "
                                 "across hosts")
            return self._any_hierarchical(collective, float(nbytes))
        return fn(self, float(nbytes))

    def pieces(self, N: float) -> int:
        """The hierarchical all-reduce's own rule (comms/algorithms/hier.py num_pieces)."""
        return hier.num_pieces(int(N))

    def _allreduce_hierarchical(self, N: float) -> Terms:
        L = self.max_local
        P = self.pieces(N)
        piece = N / P
        shm = (self.shm("reduce_scatter", piece, ("ring",))
               + self.shm("allgather", piece, ("direct", "staged")))
        net = self.net_allreduce(piece, L)
        body = P * max(net, shm) + min(net, shm)
        lat = self.agree_us() + THREAD_HANDOFF_US.value
        return Terms(lat + body, lat + P * (self.link.us + NET_STEP_US.value), body - P * (
            self.link.us + NET_STEP_US.value),
            (f"{P} pieces: shm steps of one overlap the network step of another; " if P > 1
             else "1 piece; ") + f"{L} shard(s) cross each link in parallel")

    def _allreduce_leaders(self, N: float) -> Terms:
        shm = self.shm("reduce", N, ("small", "ring")) + self.shm("broadcast", N, ("direct", "staged"))
        net = self.net_allreduce(N, 1)
        lat = self.agree_us()
        return Terms(lat + shm + net, lat + self.link.us + NET_STEP_US.value,
                     shm + net - self.link.us - NET_STEP_US.value,
                     "reduce to each host's first rank, one TCP all-reduce, broadcast")

    def _reduce_scatter_hierarchical(self, N: float) -> Terms:
        best = min((self._allreduce_hierarchical(N), self._allreduce_leaders(N)),
                   key=lambda t: t.total_us)
        return Terms(best.total_us, best.latency_us, best.bandwidth_us,
                     "an all-reduce, then each rank keeps its block")

    def _all_to_all_pairwise(self, N: float) -> Terms:
        n, L = self.size, self.max_local
        block = N / n
        remote = (n - L) * block            # what each rank sends to other hosts
        net = self.net_step(L * remote, self.streams(L * (n - L), block)) if n > L else 0.0
        shm = self.shm("all_to_all", L * block, ("pairwise", "direct", "staged"))
        lat = self.agree_us() + THREAD_HANDOFF_US.value
        body = max(net, shm)
        return Terms(lat + body, lat + self.link.us + NET_STEP_US.value,
                     body - self.link.us - NET_STEP_US.value,
                     "remote blocks over TCP on the network thread while the host's blocks "
                     "go through shm")

    def _all_to_all_hierarchical(self, N: float) -> Terms:
        """comms/algorithms/hier.py all_to_all_2d: counts all-gathered in the host,
        two shm all-to-alls through the leader, one TCP frame per host pair."""
        n, H, L = self.size, self.num_hosts, self.max_local
        block = N / n
        remote = (n - L) * block
        net = self.net_step(L * remote, self.streams(H - 1, L * remote / max(H - 1, 1)))
        shm = (self.shm("allgather", 16.0 * n, ("direct", "staged"))
               + 2 * self.shm("all_to_all", L * remote + L * block, ("pairwise", "direct", "staged"))
               + _us(4 * L * remote, self.host_models[0].cpu_gbs))
        lat = self.agree_us()
        body = net + shm
        return Terms(lat + body, lat + self.link.us + NET_STEP_US.value,
                     body - self.link.us - NET_STEP_US.value,
                     "one TCP frame per host pair between leaders, two shm all-to-alls around it")

    def _any_hierarchical(self, collective: str, N: float) -> Terms:
        n, H, L = self.size, self.num_hosts, self.max_local
        if collective == "barrier":
            lat = self.agree_us()
            return Terms(lat, lat, 0.0, "the agreement step is the barrier")
        if collective in ("broadcast", "reduce"):
            link_bytes = (H - 1) * N      # the root's host sends (receives) N per other host
            shm = self.shm(collective, N, ("direct", "staged") if collective == "broadcast"
                           else ("small", "ring"))
            net = self.net_step(link_bytes, self.streams(H - 1, N))
        elif collective in ("gather", "scatter"):
            block = N / n
            link_bytes = (n - L) * block
            shm = self.shm(collective, L * block, ("direct", "staged"))
            net = self.net_step(link_bytes, self.streams(H - 1, L * block))
        else:  # allgather: leaders swap their hosts' blocks, then a host broadcast
            block = N / n
            link_bytes = max((H - 1) * L * block, (n - L) * block)
            shm = (self.shm("allgather", L * block, ("direct", "staged"))
                   + self.shm("broadcast", N, ("direct", "staged")))
            net = self.net_step(link_bytes, self.streams(H - 1, L * block))
        lat = self.agree_us() + self.link.us + NET_STEP_US.value
        body = shm + net - self.link.us - NET_STEP_US.value
        return Terms(lat + body, lat, body, "one representative per host: shm inside each "
                     "host, one TCP transfer per host pair")


# Every (collective, algorithm) the selector may choose on one host, and its estimate: one
# entry per algorithm in comms/plan/select.py ALGORITHMS (tests/unit/test_cost.py checks the
# two tables and the algorithms that run them agree).
SHM_COSTS = {
    ("allreduce", "small"): ShmModel._allreduce_small,
    ("allreduce", "ring"): ShmModel._allreduce_ring,
    ("reduce", "small"): ShmModel._reduce_small,
    ("reduce", "ring"): ShmModel._reduce_ring,
    ("reduce_scatter", "ring"): ShmModel._reduce_scatter_ring,
    ("all_to_all", "pairwise"): ShmModel._all_to_all_pairwise,
    ("all_to_all", "direct"): ShmModel._all_to_all_direct,
    ("all_to_all", "staged"): ShmModel._all_to_all_staged,
    ("barrier", "arrival"): ShmModel._barrier_arrival,
}
for _coll in ("broadcast", "allgather", "gather", "scatter"):
    SHM_COSTS[(_coll, "direct")] = (lambda c: lambda m, N: m._any_direct(c, N))(_coll)
    SHM_COSTS[(_coll, "staged")] = (lambda c: lambda m, N: m._any_staged(c, N))(_coll)

# The multi-host algorithms with an estimate of their own (comms/algorithms/hier.py);
# every other collective runs through one representative per host (_any_hierarchical).
NET_COSTS = {
    ("allreduce", "hierarchical"): NetModel._allreduce_hierarchical,
    ("allreduce", "leaders"): NetModel._allreduce_leaders,
    ("reduce_scatter", "hierarchical"): NetModel._reduce_scatter_hierarchical,
    ("all_to_all", "pairwise"): NetModel._all_to_all_pairwise,
    ("all_to_all", "hierarchical"): NetModel._all_to_all_hierarchical,
}


# the host-local algorithms a multi-host step may use, per collective
_LOCAL = {"allreduce": ("small", "ring"), "reduce": ("small", "ring"),
          "reduce_scatter": ("ring",), "broadcast": ("direct", "staged"),
          "allgather": ("direct", "staged"), "gather": ("direct", "staged"),
          "scatter": ("direct", "staged"), "all_to_all": ("pairwise", "direct", "staged")}


# ---- building the models from a Topology ---------------------------------------------------
def host_cores(topo, ranks: list) -> int:
    """CPUs the ranks of one host may run on: the union of their cpulists in the topology;
    hosts that share a hostname (network namespaces of one machine, as bench/cluster.py
    builds them) share their CPUs, so their ranks count together. 0 when unknown."""
    if topo is None:
        return 0
    cpus = set()
    for r in ranks:
        for part in (topo.ranks[r].cpus or "").split(","):
            lo, _, hi = part.strip().partition("-")
            if lo.isdigit() and (hi.isdigit() or not hi):
                cpus.update(range(int(lo), int(hi or lo) + 1))
    return len(cpus)


def shm_model_for(topo, ranks: list, sharing: int | None = None, data_bytes: int = 32 * MIB,
                  direct: str | None = "cma", small_bytes: int = 64 * KIB) -> ShmModel:
    """The one-host model of `ranks` (all on one host of `topo`). sharing: ranks that run on
    those cores in all (default: len(ranks)); the cores are the ranks' cpulists' union."""
    link = topo.link(ranks[0], ranks[1], gpu=False) if topo is not None and len(ranks) > 1 else None
    cores = host_cores(topo, ranks) or len(ranks)
    sharing = sharing or len(ranks)
    # ranks beyond the host's own that share its cores slow each core down the same way
    eff_cores = max(1.0, cores * len(ranks) / sharing)
    return ShmModel(len(ranks), eff_cores, link, data_bytes, direct, small_bytes)


def net_model(hosts: list, topo, num_streams: int = 2):
    """(NetModel, note) for a group over `hosts` (lists of ranks). The network link is the
    slowest link class between two hosts' first ranks in `topo`; when `topo` is None or
    puts two of these hosts on one machine (threads tests emulate hosts by host keys), it
    is DEFAULT_LINKS[NETWORK] and the note says so."""
    note = ""
    link = None
    usable = topo is not None and topo.size == sum(len(h) for h in hosts)
    if usable:
        for a in range(len(hosts)):
            for b in range(a + 1, len(hosts)):
                ra, rb = hosts[a][0], hosts[b][0]
                if topo.host_of(ra) == topo.host_of(rb):
                    usable = False
                    break
                lk = topo.link(ra, rb, gpu=False)
                if link is None or (lk.gbs, -lk.us) < (link.gbs, -link.us):
                    link = lk
            if not usable:
                break
    if not usable or link is None:
        link = DEFAULT_LINKS[PathKind.NETWORK]
        note = ("no topology of these hosts (emulated hosts or none given): network link "
                f"assumed {link.gbs:g} GB/s, {link.us:g} us, DEFAULT_LINKS[NETWORK]")
    # emulated hosts (same hostname) share one machine's cores
    by_name = {}
    if usable:
        for j, h in enumerate(hosts):
            by_name.setdefault(topo.host_nodes[topo.host_of(h[0])].hostname, []).append(j)
    models = []
    for j, h in enumerate(hosts):
        if usable:
            name = topo.host_nodes[topo.host_of(h[0])].hostname
            sharing = sum(len(hosts[k]) for k in by_name[name])
            models.append(shm_model_for(topo, h, sharing))
        else:
            models.append(ShmModel(len(h), len(h)))
    return NetModel(hosts, models, link, num_streams), note

"""Self-calibration of the one-host cost model: a short probe (about two seconds, one
process, the C kernels on threads that release the GIL) measures the rates the model's
bandwidth terms use on THIS machine, and a cache keeps them per machine.

    topocomm calibrate            # measure now, write the cache, print the table
    topocomm explain ...          # each rate says where and when it was measured

What is measured (comms/plan/cost.py says what each rate means to the model; DIRECT and
SCALED below say whether the model takes the measurement or scales its fitted constant by it):
  cpu_gbs    one core copying within its caches: the C copy of 256 KiB, bytes read + written
  xcore_gbs  a copy reading lines another core just wrote: one thread writes 256 KiB on one
             core, another copies it on another core (both pinned), read + written
  dram_gbs   the whole host once buffers leave the caches: every core copying its own 64 MiB
             at once, read + written, summed
  cma_gbs    process_vm_readv (this process reading itself), bytes copied, 16 MiB
  l2_bytes, l3_bytes   the cache sizes sysfs reports for cpu0 (read, not timed)
Each is the median of several trials. The latency side (hand-offs, the per-call cost) is the
topology's link class and the written-in constants (TOPOCOMM_PROBE measures the links).

The cache: `calibration-<key>.json` in TOPOCOMM_PROBE_CACHE (default ~/.cache/topocomm),
where key digests what makes the numbers: the CPU model, the number of CPUs this process may
use, the kernel release and the host name. A change of any of them is another key: the probe
runs again. The model uses the cache when one exists for this machine (every rank of a host
reads the same file, written atomically; the creation agreement compares the choices it
leads to); TOPOCOMM_CALIBRATE=1 also measures on the first group made on a machine that has
none, and TOPOCOMM_CALIBRATE=0 ignores the cache (the written-in constants, marked as the
fallback in explain).
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from comms.kernels import native
from topology import env

RATES = ("cpu_gbs", "xcore_gbs", "dram_gbs", "cma_gbs")
SIZES = ("l2_bytes", "l3_bytes")
VERSION = 1
# How the model takes each measurement. DIRECT: the probe measures the model's own quantity
# (a core's copy traffic in cache, the host's copy traffic once out of the caches,
# process_vm_readv's bytes, the cache sizes), so the model uses the value as measured.
# SCALED: the written-in constant is fitted to whole algorithms' timings that a micro-probe
# does not reproduce one for one (the cross-core rate folds in the hand-offs of the small
# all-reduce and the staged copies), so the model scales it by this machine's probe over
# REFERENCE, the same probe on the machine kind it was fitted on.
DIRECT = ("cpu_gbs", "dram_gbs", "cma_gbs", "l2_bytes", "l3_bytes")
SCALED = ("xcore_gbs",)
# The median of 5 quiet runs of `topocomm calibrate --dry-run --trials 9` on the CI machine
# kind (docs/MEASUREMENTS.md lists them). Its cross-core rate is bimodal (23-24 or 43-46
# GB/s, by where the host puts the two vCPUs); the median run is in the slow mode.
REFERENCE = {"cpu_gbs": 48.0, "xcore_gbs": 24.4, "dram_gbs": 36.9, "cma_gbs": 7.76,
             "l2_bytes": float(512 << 10), "l3_bytes": float(32 << 20)}


@dataclass(frozen=True)
class Calibration:
    """Measured values by name (RATES in GB/s, SIZES in bytes), where and when."""
    values: dict
    machine: dict
    when: str
    seconds: float
    path: str = ""
    trials: dict = field(default_factory=dict)

    def ratio(self, name: str) -> float | None:
        """This machine's probe over the reference machine's, for `name`; None when either
        is missing."""
        value, ref = self.values.get(name), REFERENCE.get(name)
        return value / ref if value and ref else None

    def model_value(self, name: str, written: float):
        """(value the model uses for `name`, how it was made) or None when not measured:
        the measurement itself (DIRECT), or the written-in value scaled (SCALED)."""
        here = self.values.get(name)
        if not here:
            return None
        if name in SCALED:
            r = self.ratio(name)
            if r is None:
                return None
            return written * r, (f"written-in {written:g} x {r:.2f} (probe {here:g} here / "
                                 f"{REFERENCE[name]:g} on the CI machine kind)")
        return here, "as measured"

    def source(self, name: str) -> str:
        what = {"l2_bytes": "sysfs", "l3_bytes": "sysfs"}.get(name, "measured")
        return (f"{what} by topocomm calibrate on {self.machine.get('cpu', '?')} "
                f"({self.machine.get('cpus', '?')} CPUs, kernel {self.machine.get('kernel', '?')})"
                f" at {self.when}")

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "values": self.values, "machine": self.machine,
                           "when": self.when, "seconds": self.seconds, "trials": self.trials},
                          indent=1, sort_keys=True)


# ---- the machine ---------------------------------------------------------------------
def machine() -> dict:
    """What the numbers depend on: CPU model, usable CPUs, kernel release, host name."""
    import socket
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return {"cpu": cpu, "cpus": cpus, "kernel": os.uname().release,
            "host": socket.gethostname()}


def key(m: dict) -> str:
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(m: dict | None = None) -> str:
    folder = env.get("TOPOCOMM_PROBE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "topocomm")
    return os.path.join(folder, f"calibration-{key(m or machine())}.json")


def _cache_sizes() -> dict:
    """L2 and L3 of cpu0 from sysfs (bytes); absent levels are left out."""
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return out
    for e in entries:
        try:
            with open(os.path.join(base, e, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, e, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(base, e, "size")) as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or level not in (2, 3):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        try:
            size = int(text.rstrip("KMGkmg")) * mult
        except ValueError:
            continue
        out[f"l{level}_bytes"] = float(size)
    return out


# ---- the probe -----------------------------------------------------------------------
def _median_rate(fn, nbytes, trials, min_s=0.002):
    """Median over trials of nbytes / the time of one call of fn (calls repeated within a
    trial until it lasts min_s)."""
    rates = []
    fn()                                            # warm: pages touched, code loaded
    for _ in range(trials):
        reps, t = 0, 0.0
        t0 = time.perf_counter()
        while t < min_s:
            fn()
            reps += 1
            t = time.perf_counter() - t0
        rates.append(nbytes * reps / t / 1e9)
    return statistics.median(rates), rates


def _pin(cpu):
    try:
        os.sched_setaffinity(0, {cpu})              # this thread only (Linux: tid 0)
        return True
    except (AttributeError, OSError):
        return False


def _cpu_gbs(nat, trials):
    n = 256 << 10
    src, dst = np.ones(n, np.uint8), np.ones(n, np.uint8)
    a, b = native.addr(src), native.addr(dst)
    return _median_rate(lambda: nat.copy(b, a, n), 2 * n, trials)


def _xcore_gbs(nat, trials, cpus):
    """Thread W (on cpus[0]) writes the buffer, thread R (on cpus[1]) copies it out: the
    copy's time only, median of the rounds."""
    n = 256 << 10
    src, dst, fill = (np.ones(n, np.uint8) for _ in range(3))
    a, b, f = native.addr(src), native.addr(dst), native.addr(fill)
    rounds = max(20, trials * 10)
    times = []
    written, copied = threading.Semaphore(0), threading.Semaphore(0)

    def writer():
        _pin(cpus[0])
        for i in range(rounds):
            fill[:1] = i & 0xFF
            nat.copy(a, f, n)
            written.release()
            if not copied.acquire(timeout=10):
                return

    def reader():
        _pin(cpus[1])
        for _ in range(rounds):
            if not written.acquire(timeout=10):
                return
            t0 = time.perf_counter()
            nat.copy(b, a, n)
            times.append(time.perf_counter() - t0)
            copied.release()

    tw, tr = threading.Thread(target=writer), threading.Thread(target=reader)
    tw.start(), tr.start()
    tw.join(30), tr.join(30)
    if not times:
        return None, []
    rates = [2 * n / t / 1e9 for t in times[2:] or times]
    return statistics.median(rates), rates


def _dram_gbs(nat, trials, cpus):
    """Every usable CPU copies its own 64 MiB at once; read + written, summed."""
    n = 64 << 20
    k = max(1, len(cpus))
    bufs = [(np.ones(n, np.uint8), np.ones(n, np.uint8)) for _ in range(k)]   # pages touched
    rates = []
    for _ in range(max(3, trials // 2)):
        start = threading.Barrier(k + 1)
        spans = [0.0] * k

        def run(i):
            _pin(cpus[i % len(cpus)])
            s, d = bufs[i]
            start.wait()
            t0 = time.perf_counter()
            nat.copy(native.addr(d), native.addr(s), n)
            spans[i] = time.perf_counter() - t0
        threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        start.wait()
        for t in threads:
            t.join(60)
        rates.append(2 * n * k / max(spans) / 1e9)
    return statistics.median(rates), rates


def _cma_gbs(nat, trials):
    n = 16 << 20
    src, dst = np.ones(n, np.uint8), np.ones(n, np.uint8)
    pid, a, b = os.getpid(), native.addr(src), native.addr(dst)
    if nat.cma_read_many([pid], [b], [a], [n]) != 0:
        return None, []                               # not permitted here (ptrace scope)
    return _median_rate(lambda: nat.cma_read_many([pid], [b], [a], [n]), n, trials)


def measure(trials: int = 7) -> Calibration:
    """Run the probe (about two seconds) and return what it measured; not cached."""
    nat = native.impl()
    t0 = time.perf_counter()
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    values, seen = {}, {}
    probes = {"cpu_gbs": lambda: _cpu_gbs(nat, trials),
              "xcore_gbs": lambda: _xcore_gbs(nat, trials, cpus) if len(cpus) > 1
              else (None, []),
              "dram_gbs": lambda: _dram_gbs(nat, trials, cpus),
              "cma_gbs": lambda: _cma_gbs(nat, trials)}
    try:
        mask = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        mask = None
    try:
        for name, probe in probes.items():
            value, trial_rates = probe()
            if value:
                values[name] = round(float(value), 2)
                seen[name] = [round(float(r), 2) for r in trial_rates]
    finally:
        if mask is not None:
            os.sched_setaffinity(0, mask)
    values.update(_cache_sizes())
    return Calibration(values, machine(), time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       round(time.perf_counter() - t0, 2), trials=seen)


def save(cal: Calibration) -> str:
    """Write the cache atomically (another rank may be reading it); returns its path."""
    path = cache_path(cal.machine)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(cal.to_json())
    os.replace(tmp, path)
    return path


def load() -> Calibration | None:
    """This machine's cached calibration, or None (none, unreadable, another version)."""
    m = machine()
    path = cache_path(m)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if data.get("version") != VERSION or data.get("machine") != m:
        return None
    values = {k: float(v) for k, v in data.get("values", {}).items()
              if k in RATES + SIZES and float(v) > 0}
    return Calibration(values, m, str(data.get("when", "?")), float(data.get("seconds", 0)),
                       path, data.get("trials", {}))


_current: list = []
_lock = threading.Lock()


def current() -> Calibration | None:
    """What the model uses on this machine, decided once per process: None under
    TOPOCOMM_CALIBRATE=0; else the cache, measured and written first under
    TOPOCOMM_CALIBRATE=1 when there is none."""
    with _lock:
        if not _current:
            mode = env.get("TOPOCOMM_CALIBRATE")
            cal = None
            if mode is not False:
                cal = load()
                if cal is None and mode:
                    cal = _measure_once()
            _current.append(cal)
        return _current[0]


def _measure_once() -> Calibration | None:
    """Measure and cache, one process per machine at a time: the others (the ranks of the
    same job starting at once) wait on the lock, then read what it wrote, so every rank of
    the host uses the same numbers."""
    import fcntl
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = open(path + ".lock", "w")
    except OSError:
        return None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cal = load()
            if cal is None:
                save(measure())
                cal = load()
            return cal
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def forget() -> None:
    """Decide again at the next current() (after `topocomm calibrate` wrote a new cache)."""
    with _lock:
        _current.clear()

#!/usr/bin/env python3
"""Emulated multi-host cluster on one machine: one network namespace per host, a shaped link.

    python bench/cluster.py --hosts 2 --ranks-per-host 2 --rate 1gbit \\
        --placement interleaved [--timeout S] [--log-dir DIR] \\
        -- python bench/all_reduce_perf.py -b 64M -e 64M --backend gloo

    from cluster import Cluster
    with Cluster(hosts=2, ranks_per_host=2, rate="1gbit", placement="interleaved") as c:
        rc, outputs = c.run([sys.executable, script], env={...}, timeout=120)

Needs root, iproute2 (`ip netns`, veth, bridge) and tc's tbf; `Cluster.available()` says
whether this machine can, and why not (tests skip with that reason).

Layout (names carry the creating pid, so a later run can tell stale ones from live ones):

    tccl-<pid>-<k>-sw        switch: bridge br0; ports h0..h<H-1>; tbf on each port
                             (shapes switch -> host)
    tccl-<pid>-<k>-h<i>      host i: lo up, veth0 = 198.18.0.<i+1>/24, tbf on veth0
                             (shapes host -> switch); no default route

The switch lives in its own namespace rather than in the root namespace, and every veth
pair is created directly inside the two namespaces it joins, so nothing of the cluster ever
appears in the root namespace: it cannot be reached from eth0 and cannot leak traffic there,
root-namespace firewall or bridge-netfilter rules cannot touch it, and deleting the
namespaces deletes every veth and the bridge with them. Only addresses from 198.18.0.0/15
(the benchmarking range) are used; IPv6 is disabled in the namespaces so no link-local
chatter (DAD, router solicitations) rides the shaped links.

Ranks run as `ip netns exec <host ns> <command>` with a torchrun-style environment:
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (= host index), MASTER_ADDR
(host of rank 0), MASTER_PORT (checked free in that namespace), CLUSTER_HOST_INDEX,
CLUSTER_NUM_HOSTS, CLUSTER_HOST_ADDR, CLUSTER_IFNAME, CLUSTER_NETNS, CLUSTER_PLACEMENT,
CLUSTER_LINK_RATE_BPS, GLOO_SOCKET_IFNAME and TOPOCOMM_SOCKET_IFNAME (= veth0: the host name
resolves to an address outside the namespaces), OMP_NUM_THREADS=1 unless set,
PYTHONUNBUFFERED=1, PYTHONPATH starting with the repository, PATH starting with the venv's
bin. An `env` value of None removes that variable.

Placement: contiguous = ranks 0..k-1 on host 0, k..2k-1 on host 1, ...; interleaved = rank r
on host r % hosts. LOCAL_RANK numbers the ranks of one host in rank order.

Cleanup is guaranteed by construction plus three nets: (1) `close()` runs from the context
manager's `finally`, from `start()` when set-up fails half way, and from atexit; it kills
every process still inside the namespaces (`ip netns pids`), then deletes the namespaces;
(2) SIGTERM and SIGHUP are turned into SystemExit while a cluster is up (SIGINT already
raises KeyboardInterrupt), so the same `finally` runs; (3) SIGKILL cannot be caught, so
every `start()` first sweeps `tccl-<pid>-*` namespaces whose pid is dead (also
`python bench/cluster.py --sweep`). Every loop here is bounded in count and in time.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

PREFIX = "tccl"
IFNAME = "veth0"                 # the host's NIC inside every host namespace
BRIDGE = "br0"
SUBNET = "198.18.0"              # hosts are SUBNET.1 .. SUBNET.<hosts>, /24 (inside 198.18.0.0/15)
MAX_HOSTS = 250
MAX_RANKS = 512
CMD_TIMEOUT_S = 20.0             # one ip / tc invocation
TIMEOUT_RC = 124                 # like coreutils timeout(1)
_NAME_RE = re.compile(r"^%s-(\d+)-(\d+)-(sw|h\d+|probe)$" % PREFIX)
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "ROLE_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE",
                "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")
_seq_lock = threading.Lock()
_seq = [0]


class ClusterError(RuntimeError):
    pass


# ------------------------------------------------------------------------------- helpers
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*"
                      r"(|bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)\s*$", re.IGNORECASE)
_RATE_MULT = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              # tc's bps family is bytes per second
              "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}


def parse_rate(text) -> int:
    """tc rate syntax -> bits per second: '1gbit' -> 10**9, '500mbit', '100mbps' (bytes/s)."""
    if isinstance(text, (int, float)):
        bps = float(text)
    else:
        m = _RATE_RE.match(str(text))
        if not m:
            raise ValueError(f"rate: cannot parse {text!r}; use e.g. 1gbit, 500mbit, 100mbps")
        bps = float(m.group(1)) * _RATE_MULT[m.group(2).lower()]
    if not 8e3 <= bps <= 4e11:
        raise ValueError(f"rate: {text!r} is outside 8kbit .. 400gbit")
    return int(bps)


def placement_hosts(world: int, hosts: int, placement: str) -> list:
    """host index of every rank."""
    if placement == "contiguous":
        per = world // hosts
        return [r // per for r in range(world)]
    if placement == "interleaved":
        return [r % hosts for r in range(world)]
    raise ValueError(f"placement: unknown {placement!r}; use contiguous or interleaved")


def _sh(cmd, *, check=True, timeout=CMD_TIMEOUT_S, input=None) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{' '.join(cmd)}: no answer within {timeout:.0f} s") from None
    except OSError as e:
        raise ClusterError(f"{cmd[0]}: {e}") from None
    if check and res.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)}: exit {res.returncode}: "
                           f"{(res.stderr or res.stdout).strip()[-500:]}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_netns() -> list:
    """Names of all named network namespaces (`ip netns list`)."""
    res = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def ours(names=None) -> list:
    """The namespaces this launcher makes (any pid)."""
    return [n for n in (list_netns() if names is None else names) if _NAME_RE.match(n)]


def netns_pids(ns: str) -> list:
    res = _sh(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def _kill_netns_procs(namespaces, deadline_s: float = 5.0) -> list:
    """SIGKILL every process inside the namespaces (all started by a launcher of this file);
    return the pids still there after deadline_s."""
    left = []
    deadline = time.monotonic() + deadline_s
    for _ in range(50):
        left = [p for ns in namespaces for p in netns_pids(ns)]
        if not left or time.monotonic() > deadline:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)   # poll interval while the kernel reaps them (bounded by deadline)
    return left


def delete_netns(namespaces) -> list:
    """Kill what runs inside, delete the namespaces; return errors (never raises)."""
    namespaces = list(namespaces)
    errors = []
    if not namespaces:
        return errors
    left = _kill_netns_procs(namespaces)
    if left:
        errors.append(f"processes {left} survived SIGKILL; namespaces deleted anyway")
    # host namespaces first: their veth ends go with them, then the switch and its bridge
    namespaces.sort(key=lambda n: n.endswith("-sw"))
    for ns in namespaces:
        res = _sh(["ip", "netns", "delete", ns], check=False)
        if res.returncode != 0 and ns in list_netns():
            errors.append(f"ip netns delete {ns}: {res.stderr.strip()}")
    return errors


def sweep_stale(verbose: bool = False) -> list:
    """Delete tccl-<pid>-* namespaces whose creating pid is dead (a crashed or SIGKILLed run)."""
    stale = []
    for ns in ours():
        pid = int(_NAME_RE.match(ns).group(1))
        if not _pid_alive(pid):
            stale.append(ns)
    if stale:
        errors = delete_netns(stale)
        if verbose or errors:
            print(f"# cluster: swept stale namespaces {stale}"
                  + (f" ({'; '.join(errors)})" if errors else ""), file=sys.stderr, flush=True)
    return stale


_CLONE_NEWNET = 0x40000000


def _in_netns(ns: str, fn, timeout: float = 10.0):
    """Run fn() on a short-lived thread that has joined namespace ns (setns is per thread)."""
    out = {}

    def body():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({ns})")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as e:   # noqa: B902 - handed to the caller
            out["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise ClusterError(f"netns {ns}: helper thread did not finish in {timeout:.0f} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _port_is_free(addr: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class RunResult(tuple):
    """(rc, outputs) with details: rank_rcs, timed_out, first_failed_rank, reason, wall_s."""

    def __new__(cls, rc, outputs, **info):
        self = super().__new__(cls, (rc, outputs))
        self.__dict__.update(info)
        return self

    @property
    def rc(self):
        return self[0]

    @property
    def outputs(self):
        return self[1]


# ------------------------------------------------------------------------------- the cluster
_LIVE = []                  # clusters up in this process, closed at exit


def _close_live():
    for c in list(_LIVE):
        c.close()


atexit.register(_close_live)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


class Cluster:
    """hosts network namespaces joined by a switch through tbf-shaped veth links."""

    _available = None

    def __init__(self, hosts: int = 2, ranks_per_host: int = 2, rate="1gbit",
                 placement: str = "contiguous", burst: str = "256kb", latency: str = "50ms"):
        if not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts: must be an int in 1..{MAX_HOSTS}, got {hosts!r}")
        if not isinstance(ranks_per_host, int) or ranks_per_host < 1 \
                or hosts * ranks_per_host > MAX_RANKS:
            raise ValueError(f"ranks_per_host: must be an int >= 1 with hosts x ranks_per_host "
                             f"<= {MAX_RANKS}, got {ranks_per_host!r}")
        self.hosts, self.ranks_per_host = hosts, ranks_per_host
        self.world_size = hosts * ranks_per_host
        self.rate_bps = parse_rate(rate)
        self.rate = f"{self.rate_bps}bit"
        self.burst, self.latency = burst, latency
        self.placement = placement
        self.rank_host = placement_hosts(self.world_size, hosts, placement)
        with _seq_lock:
            _seq[0] += 1
            seq = _seq[0]
        self.name = f"{PREFIX}-{os.getpid()}-{seq}"
        self.switch_ns = f"{self.name}-sw"
        self.host_ns = [f"{self.name}-h{i}" for i in range(hosts)]
        self.ifname = IFNAME
        self._up = False
        self._made = []          # namespaces created so far (cleanup deletes exactly these)
        self._used_ports = set()
        self._old_handlers = {}

    # ---- facts
    def host_addr(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    @property
    def master_addr(self) -> str:
        return self.host_addr(self.rank_host[0])

    @property
    def namespaces(self) -> list:
        return list(self._made)

    def local_ranks(self, rank: int):
        host = self.rank_host[rank]
        peers = [r for r in range(self.world_size) if self.rank_host[r] == host]
        return peers.index(rank), len(peers)

    def describe(self) -> str:
        def ranks_of(h):
            return ",".join(str(r) for r in range(self.world_size) if self.rank_host[r] == h)
        where = ", ".join(f"h{i}={self.host_addr(i)}:[{ranks_of(i)}]" for i in range(self.hosts))
        return (f"{self.hosts} hosts x {self.ranks_per_host} ranks, {self.placement}, "
                f"link {self.rate_bps / 1e9:g} Gbit/s each way (tbf burst {self.burst} "
                f"latency {self.latency}); {where}")

    # ---- can this machine do it?
    @classmethod
    def available(cls, refresh: bool = False):
        """(True, '') when root, `ip netns`, veth and tc tbf all work here; else (False, why)."""
        if cls._available is not None and not refresh:
            return cls._available
        cls._available = cls._probe()
        return cls._available

    @staticmethod
    def _probe():
        if sys.platform != "linux":
            return False, f"network namespaces need Linux (this is {sys.platform})"
        if os.geteuid() != 0:
            return False, "needs root (ip netns, veth, tc)"
        for tool in ("ip", "tc"):
            if not shutil.which(tool):
                return False, f"{tool} (iproute2) not found on PATH"
        with _seq_lock:
            _seq[0] += 1
            ns = f"{PREFIX}-{os.getpid()}-{_seq[0]}-probe"
        try:
            _sh(["ip", "netns", "add", ns])
        except ClusterError as e:
            return False, f"ip netns does not work here: {e}"
        try:
            _sh(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
            _sh(["ip", "-n", ns, "link", "add", "pbr", "type", "bridge"])
            _sh(["tc", "-n", ns, "qdisc", "add", "dev", "pa", "root", "tbf", "rate", "1gbit",
                 "burst", "256kb", "latency", "50ms"])
        except ClusterError as e:
            return False, f"veth / bridge / tc tbf do not work here: {e}"
        finally:
            errors = delete_netns([ns])
            if errors:
                print(f"# cluster: probe cleanup: {errors}", file=sys.stderr)
        return True, ""

    # ---- lifecycle
    def start(self) -> "Cluster":
        if self._up:
            return self
        ok, why = self.available()
        if not ok:
            raise ClusterError(f"cannot build an emulated cluster here: {why}")
        sweep_stale()
        self._install_signal_handlers()
        _LIVE.append(self)
        self._up = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self):
        for ns in [self.switch_ns] + self.host_ns:
            _sh(["ip", "netns", "add", ns])
            self._made.append(ns)
        # veth pairs born inside their namespaces: nothing ever appears in the root namespace
        batch = "".join(f"link add {IFNAME} netns {h} type veth peer name h{i} netns "
                        f"{self.switch_ns}\n" for i, h in enumerate(self.host_ns))
        _sh(["ip", "-batch", "-"], input=batch)
        tbf = f"root tbf rate {self.rate} burst {self.burst} latency {self.latency}"
        no_v6 = ("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
                 "net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true")
        sw = [no_v6, "ip link set lo up", f"ip link add {BRIDGE} type bridge stp_state 0",
              f"ip link set {BRIDGE} up"]
        for i in range(self.hosts):
            sw += [f"ip link set h{i} master {BRIDGE}", f"ip link set h{i} up",
                   f"tc qdisc add dev h{i} {tbf}"]
        _sh(["ip", "netns", "exec", self.switch_ns, "sh", "-ec", "; ".join(sw)])
        for i, ns in enumerate(self.host_ns):
            cmds = [no_v6, "ip link set lo up",
                    f"ip addr add {self.host_addr(i)}/24 dev {IFNAME}",
                    f"ip link set {IFNAME} up", f"tc qdisc add dev {IFNAME} {tbf}"]
            _sh(["ip", "netns", "exec", ns, "sh", "-ec", "; ".join(cmds)])
        self._wait_forwarding()

    def _wait_forwarding(self, deadline_s: float = 10.0):
        """Poll until every switch port has carrier (so its host end is up) and forwards."""
        deadline = time.monotonic() + deadline_s
        state = ""
        for _ in range(500):
            res = _sh(["bridge", "-n", self.switch_ns, "link", "show"], check=False)
            state = res.stdout
            ready = sum(1 for line in state.splitlines()
                        if "LOWER_UP" in line and "state forwarding" in line)
            if ready >= self.hosts:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)   # poll interval (bounded by the deadline)
        raise ClusterError(f"switch ports not forwarding after {deadline_s:.0f} s: {state!r}")

    def close(self) -> list:
        """Kill every process in the namespaces and delete them; idempotent, never raises."""
        errors = []
        if self._made:
            errors = delete_netns(self._made)
            self._made = []
        self._up = False
        if self in _LIVE:
            _LIVE.remove(self)
        self._restore_signal_handlers()
        if errors:
            print(f"# cluster {self.name}: cleanup: {'; '.join(errors)}", file=sys.stderr,
                  flush=True)
        return errors

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                old = signal.getsignal(sig)
                if old in (signal.SIG_DFL, None):
                    signal.signal(sig, _raise_exit)
                    self._old_handlers[sig] = old
            except (ValueError, OSError):
                pass

    def _restore_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in list(self._old_handlers.items()):
            try:
                if signal.getsignal(sig) is _raise_exit:
                    signal.signal(sig, old)
            except (ValueError, OSError):
                pass
            del self._old_handlers[sig]

    # ---- processes
    def free_port(self, host: int = None) -> int:
        """A TCP port free on `host`'s address (default: rank 0's host), not handed out before."""
        host = self.rank_host[0] if host is None else host
        addr = self.host_addr(host)

        def pick():
            for _ in range(64):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind((addr, 0))
                    port = s.getsockname()[1]
                finally:
                    s.close()
                if port not in self._used_ports and _port_is_free(addr, port):
                    return port
            raise ClusterError(f"no free port on {addr} after 64 tries")
        port = _in_netns(self.host_ns[host], pick)
        self._used_ports.add(port)
        return port

    def base_env(self, env=None) -> dict:
        e = dict(os.environ)
        for k in _LAUNCH_VARS:
            e.pop(k, None)
        venv_bin = str(Path(sys.executable).parent)
        e["PATH"] = venv_bin + os.pathsep + e.get("PATH", "/usr/bin:/bin")
        old = [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]
        e["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + old)
        e.setdefault("OMP_NUM_THREADS", "1")
        e["PYTHONUNBUFFERED"] = "1"
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = str(v)
        return e

    def host_env(self, host: int) -> dict:
        return {"CLUSTER_HOST_INDEX": str(host), "CLUSTER_NUM_HOSTS": str(self.hosts),
                "CLUSTER_HOST_ADDR": self.host_addr(host), "CLUSTER_IFNAME": IFNAME,
                "CLUSTER_NETNS": self.host_ns[host], "CLUSTER_PLACEMENT": self.placement,
                "CLUSTER_LINK_RATE_BPS": str(self.rate_bps), "GROUP_RANK": str(host),
                "GLOO_SOCKET_IFNAME": IFNAME, "TOPOCOMM_SOCKET_IFNAME": IFNAME}

    def rank_env(self, rank: int, port: int, env=None) -> dict:
        host = self.rank_host[rank]
        local, local_n = self.local_ranks(rank)
        e = dict(self.host_env(host), RANK=str(rank), WORLD_SIZE=str(self.world_size),
                 LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(local_n),
                 MASTER_ADDR=self.master_addr, MASTER_PORT=str(port))
        e.update(env or {})
        return self.base_env(e)

    def popen(self, host: int, cmd, env=None, **kw) -> subprocess.Popen:
        """Start one process in host's namespace (its own session, so it can be killed whole)."""
        if not self._up:
            raise ClusterError("cluster is not started")
        full_env = self.base_env(dict(self.host_env(host), **(env or {})))
        kw.setdefault("cwd", str(REPO_ROOT))
        return subprocess.Popen(["ip", "netns", "exec", self.host_ns[host]] + list(cmd),
                                env=full_env, start_new_session=True, **kw)

    def run(self, cmd, env=None, timeout: float = 120.0, stream: bool = False,
            log_dir=None, grace: float = 2.0, max_output_bytes: int = 4 << 20) -> RunResult:
        """Run cmd as every rank; wait at most timeout seconds.

        Returns RunResult (unpacks as rc, outputs): rc 0 when every rank exited 0, the exit
        status of the first rank that failed (128+N for a signal), or 124 on timeout.
        outputs[r] is rank r's stdout+stderr (the last max_output_bytes). stream=True also
        prints every line as it comes, prefixed "[r<rank>] "; log_dir writes rank<r>.log.
        When a rank fails the others get `grace` seconds to exit on their own, then are killed.
        """
        if not self._up:
            raise ClusterError("cluster is not started")
        cmd = [str(c) for c in cmd]
        port = self.free_port()
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        events = queue.Queue()
        procs, threads = [], []
        tails = [deque() for _ in range(self.world_size)]
        print_lock = threading.Lock()

        def reader(rank, stream_in, logf):
            size = 0
            tail = tails[rank]
            try:
                for raw in iter(stream_in.readline, b""):
                    line = raw.decode("utf-8", "replace")
                    tail.append(line)
                    size += len(line)
                    while size > max_output_bytes and len(tail) > 1:
                        size -= len(tail.popleft())
                    if logf:
                        logf.write(line)
                    if stream:
                        with print_lock:
                            sys.stdout.write(f"[r{rank}] {line}" if line.endswith("\n")
                                             else f"[r{rank}] {line}\n")
                            sys.stdout.flush()
            except (OSError, ValueError):
                pass
            finally:
                if logf:
                    logf.close()

        def waiter(rank, p):
            events.put((rank, p.wait()))

        rank_rcs = [None] * self.world_size
        failed, timed_out, reason, fail_deadline = None, False, "", None
        try:
            for r in range(self.world_size):
                logf = open(Path(log_dir) / f"rank{r}.log", "w") if log_dir is not None else None
                ns = self.host_ns[self.rank_host[r]]
                p = subprocess.Popen(["ip", "netns", "exec", ns] + cmd,
                                     env=self.rank_env(r, port, env), cwd=str(REPO_ROOT),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
                procs.append(p)
                for target, args in ((reader, (r, p.stdout, logf)), (waiter, (r, p))):
                    t = threading.Thread(target=target, args=args, daemon=True)
                    t.start()
                    threads.append(t)
            deadline = t0 + timeout
            pending = set(range(self.world_size))
            for _ in range(self.world_size):
                now = time.monotonic()
                wait_s = deadline - now
                if failed is not None:
                    wait_s = min(wait_s, fail_deadline - now)
                try:
                    rank, rc = events.get(timeout=max(wait_s, 0.001))
                except queue.Empty:
                    if failed is None:
                        timed_out = True
                        reason = (f"timeout: ranks {sorted(pending)} still running after "
                                  f"{timeout:g} s; killed")
                    else:
                        reason += (f"; ranks {sorted(pending)} still running {grace:g} s later; "
                                   "killed")
                    break
                pending.discard(rank)
                rank_rcs[rank] = rc
                if rc != 0 and failed is None:
                    failed = rank
                    fail_deadline = time.monotonic() + grace
                    reason = f"rank {rank} exited with {_rc_text(rc)}"
        finally:
            for p in procs:
                _killpg(p)
            # anything a rank left behind inside the namespaces (its own children, re-parented)
            _kill_netns_procs(self.host_ns, deadline_s=5.0)
            for p in procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            for t in threads:
                t.join(timeout=5)
        if timed_out:
            rc = TIMEOUT_RC
        elif failed is not None:
            rc = _shell_rc(rank_rcs[failed])
        else:
            rc = 0
        outputs = ["".join(t) for t in tails]
        return RunResult(rc, outputs, rank_rcs=rank_rcs, timed_out=timed_out,
                         first_failed_rank=failed, reason=reason, port=port,
                         wall_s=time.monotonic() - t0)


def _rc_text(rc) -> str:
    if rc is not None and rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


def _shell_rc(rc) -> int:
    if rc is None:
        return 1
    return 128 - rc if rc < 0 else rc


def _killpg(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                p.kill()
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------------------- raw TCP probe
_TCP_RECV = r"""
import json, socket, sys, time
nbytes, timeout = int(sys.argv[1]), float(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 0))
srv.listen(1)
srv.settimeout(timeout)
print("READY", srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(timeout)
buf = bytearray(1 << 20)
view = memoryview(buf)
got, first, t_first = 0, 0, None
deadline = time.monotonic() + timeout
while got < nbytes and time.monotonic() < deadline:
    n = conn.recv_into(view)
    if n == 0:
        break
    if t_first is None:
        t_first, first = time.perf_counter(), n
    got += n
t_last = time.perf_counter()
print(json.dumps({"bytes": got, "first": first, "seconds": t_last - (t_first or t_last)}),
      flush=True)
"""

_TCP_SEND = r"""
import socket, sys
addr, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((addr, port), timeout=timeout)
chunk = bytes(1 << 20)
left = nbytes
while left > 0:
    n = min(left, len(chunk))
    s.sendall(chunk[:n] if n < len(chunk) else chunk)
    left -= n
s.shutdown(socket.SHUT_WR)
s.close()
"""


def measure_tcp(cluster: Cluster, nbytes: int = 64 << 20, src_host: int = 0, dst_host: int = 1,
                timeout: float = 60.0) -> dict:
    """One TCP stream src_host -> dst_host: {'gbit_s', 'seconds', 'bytes', 'ratio'} where
    ratio = measured / shaped rate. Timed at the receiver from the first byte to the last
    (the first read is excluded from the bytes), so connection set-up is not counted."""
    py = [sys.executable, "-I", "-S", "-c"]
    recv = cluster.popen(dst_host, py + [_TCP_RECV, str(nbytes), str(timeout)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    send = None
    try:
        lines = queue.Queue()

        def read_lines():
            for line in recv.stdout:
                lines.put(line)
            lines.put(None)                    # EOF: the receiver is gone
        threading.Thread(target=read_lines, daemon=True).start()
        try:
            ready = lines.get(timeout=min(timeout, 30.0))
        except queue.Empty:
            raise ClusterError("tcp probe: receiver did not start within 30 s") from None
        if not ready or not ready.startswith("READY"):
            raise ClusterError(f"tcp probe: receiver said {ready!r}")
        port = int(ready.split()[1])
        send = cluster.popen(src_host, py + [_TCP_SEND, cluster.host_addr(dst_host), str(port),
                                             str(nbytes), str(timeout)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        line = None
        for _ in range(int(timeout / 0.25) + 2):   # wake up to notice a failed sender early
            try:
                line = lines.get(timeout=0.25)
                break
            except queue.Empty:
                if send.poll() not in (None, 0):
                    raise ClusterError(f"tcp probe: sender exited with {send.returncode}: "
                                       f"{(send.stderr.read().strip().splitlines() or [''])[-1]}"
                                       ) from None
                if time.monotonic() > deadline:
                    break
        if not line:
            raise ClusterError(f"tcp probe: no result within {timeout:g} s")
        if not line.startswith("{"):
            raise ClusterError(f"tcp probe: receiver failed: {line.strip()}")
        res = json.loads(line)
        try:
            send.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if res["bytes"] != nbytes:
            raise ClusterError(f"tcp probe: received {res['bytes']} of {nbytes} bytes")
        timed = res["bytes"] - res["first"]
        gbit = timed * 8 / res["seconds"] / 1e9 if res["seconds"] > 0 else float("inf")
        return {"gbit_s": gbit, "seconds": res["seconds"], "bytes": res["bytes"],
                "ratio": gbit * 1e9 / cluster.rate_bps, "src_host": src_host,
                "dst_host": dst_host}
    finally:
        for p in (send, recv):
            if p is not None:
                _killpg(p)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass


# ------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run a command as every rank of an emulated multi-host cluster "
                    "(network namespaces + tbf-shaped veth links).",
        usage="%(prog)s [options] -- command [args...]")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--ranks-per-host", type=int, default=2)
    p.add_argument("--rate", default="1gbit", help="tbf rate of every host link, each way")
    p.add_argument("--placement", choices=("contiguous", "interleaved"), default="contiguous")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--grace", type=float, default=2.0,
                   help="seconds the other ranks get after one fails, before they are killed")
    p.add_argument("--log-dir", default=None, help="also write rank<r>.log files here")
    p.add_argument("--quiet", action="store_true", help="do not echo rank output")
    p.add_argument("--tcp-probe", default=None, metavar="SIZE",
                   help="before the command, time one TCP stream host0 -> host1 of SIZE bytes")
    p.add_argument("--sweep", action="store_true",
                   help="only delete stale namespaces of dead launchers, then exit")
    p.add_argument("--check", action="store_true", help="only say whether this machine can")
    p.add_argument("command", nargs=argparse.REMAINDER)
    return p


def _parse_bytes(text: str) -> int:
    m = re.match(r"^\s*(\d+)\s*([kmg]?)i?b?\s*$", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"size: cannot parse {text!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.check:
        ok, why = Cluster.available()
        print("available" if ok else f"not available: {why}")
        return 0 if ok else 1
    if args.sweep:
        ok, why = Cluster.available()
        if not ok:
            print(f"not available: {why}", file=sys.stderr)
            return 1
        print(f"swept {sweep_stale()}; remaining: {ours()}")
        return 0
    if not cmd and not args.tcp_probe:
        print("error: no command; usage: cluster.py [options] -- command [args...]",
              file=sys.stderr)
        return 2
    try:
        cluster = Cluster(hosts=args.hosts, ranks_per_host=args.ranks_per_host, rate=args.rate,
                          placement=args.placement)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok, why = Cluster.available()
    if not ok:
        print(f"error: cannot build an emulated cluster here: {why}", file=sys.stderr)
        return 3
    # SIGINT -> KeyboardInterrupt, SIGTERM/SIGHUP -> SystemExit (installed by start()):
    # both unwind through the with-block, which deletes the namespaces.
    try:
        with cluster as c:
            print(f"# cluster {c.name}: {c.describe()}", file=sys.stderr, flush=True)
            if args.tcp_probe:
                r = measure_tcp(c, _parse_bytes(args.tcp_probe), timeout=min(args.timeout, 120))
                print(f"# tcp probe h0 -> h1: {r['bytes']} B in {r['seconds']:.3f} s = "
                      f"{r['gbit_s']:.3f} Gbit/s ({r['ratio']:.2f} x link rate)",
                      file=sys.stderr, flush=True)
            if not cmd:
                return 0
            res = c.run(cmd, timeout=args.timeout, stream=not args.quiet, log_dir=args.log_dir,
                        grace=args.grace)
            status = "ok" if res.rc == 0 else res.reason
            print(f"# cluster {c.name}: {status}; rank exit codes "
                  f"{[_rc_text(x) if x else x for x in res.rank_rcs]}; {res.wall_s:.1f} s",
                  file=sys.stderr, flush=True)
            return res.rc
    except KeyboardInterrupt:
        print("# cluster: interrupted; namespaces deleted", file=sys.stderr)
        return 130
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

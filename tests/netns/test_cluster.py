"""The emulated cluster launcher (bench/cluster.py): set-up, rank environment, shaped links,
cleanup on every exit path, and gloo collectives across two emulated hosts.

Needs root, `ip netns`, veth and tc tbf; otherwise every test skips with the reason.
Waits are bounded polls, never fixed sleeps; the whole module runs in well under a minute.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import cluster as cl  # noqa: E402

pytestmark = pytest.mark.timeout(120)
BENCH_NET = ipaddress.ip_network("198.18.0.0/15")


@pytest.fixture(scope="module", autouse=True)
def need_cluster():
    ok, why = cl.Cluster.available()
    if not ok:
        pytest.skip(f"emulated cluster unavailable: {why}")


def wait_until(pred, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll pred() until true; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def root_links() -> set:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def mine(pid: int = None) -> list:
    """Namespaces created by launcher pid (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return [n for n in cl.list_netns() if n.startswith(f"{cl.PREFIX}-{pid}-")]


class Snapshot:
    """Root namespace state before a cluster, to compare after it."""

    def __init__(self):
        self.links = root_links()

    def assert_clean(self, c: cl.Cluster = None):
        names = set(cl.list_netns())
        if c is not None:
            left = [n for n in [c.switch_ns] + c.host_ns if n in names]
            assert not left, f"namespaces left behind: {left}"
        assert not mine(), f"namespaces of this process left behind: {mine()}"
        ours = {cl.IFNAME, cl.BRIDGE} | {f"h{i}" for i in range(8)}
        new = root_links() - self.links
        assert not (new & ours), f"links appeared in the root namespace: {sorted(new)}"


ENV_SCRIPT = r"""
import json, os, sys
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CLUSTER_HOST_INDEX",
        "MASTER_ADDR", "MASTER_PORT", "CLUSTER_HOST_ADDR", "GLOO_SOCKET_IFNAME", "CLUSTER_NETNS"]
info = {k: os.environ.get(k) for k in keys}
info["netns_ino"] = os.stat("/proc/self/ns/net").st_ino
info["executable"] = sys.executable
import comms  # the repository is on PYTHONPATH
info["comms"] = os.path.dirname(comms.__file__)
print("ENV " + json.dumps(info), flush=True)
"""


def parse_env(outputs):
    infos = []
    for r, text in enumerate(outputs):
        lines = [ln for ln in text.splitlines() if ln.startswith("ENV ")]
        assert len(lines) == 1, f"rank {r} printed {text!r}"
        infos.append(json.loads(lines[0][4:]))
    return infos


@pytest.mark.parametrize("placement,hosts_of_rank", [
    ("contiguous", [0, 0, 1, 1]),
    ("interleaved", [0, 1, 0, 1]),
])
def test_rank_env_and_netns(placement, hosts_of_rank):
    snap = Snapshot()
    with cl.Cluster(hosts=2, ranks_per_host=2, rate="1gbit", placement=placement) as c:
        rc, outputs = c.run([sys.executable, "-c", ENV_SCRIPT], timeout=60)
        assert rc == 0, outputs
    snap.assert_clean(c)
    infos = parse_env(outputs)
    own_ino = os.stat("/proc/self/ns/net").st_ino
    ino_of_host = {}
    for r, info in enumerate(infos):
        h = hosts_of_rank[r]
        assert info["RANK"] == str(r) and info["WORLD_SIZE"] == "4"
        assert info["CLUSTER_HOST_INDEX"] == str(h)
        assert info["LOCAL_RANK"] == str(hosts_of_rank[:r].count(h))
        assert info["LOCAL_WORLD_SIZE"] == "2"
        assert info["MASTER_ADDR"] == c.host_addr(hosts_of_rank[0]) == "198.18.0.1"
        assert info["MASTER_PORT"] == infos[0]["MASTER_PORT"] and int(info["MASTER_PORT"]) > 0
        assert info["CLUSTER_HOST_ADDR"] == c.host_addr(h)
        assert info["GLOO_SOCKET_IFNAME"] == cl.IFNAME
        assert info["CLUSTER_NETNS"] == c.host_ns[h]
        assert info["executable"] == sys.executable
        assert Path(info["comms"]).resolve() == (REPO / "comms").resolve()
        assert info["netns_ino"] != own_ino
        assert ino_of_host.setdefault(h, info["netns_ino"]) == info["netns_ino"], \
            "ranks of one host must share its namespace"
    assert ino_of_host[0] != ino_of_host[1], "ranks on different hosts must differ in netns"


def _ip_json(ns, *args):
    out = subprocess.run(["ip", "-n", ns, "-j"] + list(args), capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return json.loads(out or "[]")


def test_addresses_routes_and_shaping():
    """Only 198.18.0.0/15 and loopback addresses, no default route, tbf at both link ends."""
    with cl.Cluster(hosts=2, ranks_per_host=1, rate="1gbit") as c:
        for ns in c.host_ns + [c.switch_ns]:
            for link in _ip_json(ns, "addr", "show"):
                for a in link.get("addr_info", []):
                    ip = ipaddress.ip_address(a["local"])
                    assert ip.is_loopback or (ip.version == 4 and ip in BENCH_NET), (ns, a)
            routes = _ip_json(ns, "-4", "route", "show") + _ip_json(ns, "-6", "route", "show")
            assert not [r for r in routes if r.get("dst") == "default"], (ns, routes)
        for i, ns in enumerate(c.host_ns):
            lo = [x for x in _ip_json(ns, "link", "show") if x["ifname"] == "lo"][0]
            assert "UP" in lo["flags"]
            for where, dev in ((ns, cl.IFNAME), (c.switch_ns, f"h{i}")):
                q = subprocess.run(["tc", "-n", where, "qdisc", "show", "dev", dev],
                                   capture_output=True, text=True, timeout=10).stdout
                assert "tbf" in q and "rate 1Gbit" in q, (where, dev, q)


def test_link_rate_both_directions():
    """16 MiB at 1 Gbit/s takes about 0.13 s; the stream must run at 0.6x..1.2x the rate."""
    with cl.Cluster(hosts=2, ranks_per_host=1, rate="1gbit") as c:
        for src, dst in ((0, 1), (1, 0)):
            r = cl.measure_tcp(c, 16 << 20, src_host=src, dst_host=dst, timeout=30)
            assert 0.6 < r["ratio"] < 1.2, r


def test_lower_rate_is_enforced():
    """The shaping follows --rate: 200 Mbit/s, 4 MiB (~0.17 s)."""
    with cl.Cluster(hosts=2, ranks_per_host=1, rate="200mbit") as c:
        r = cl.measure_tcp(c, 4 << 20, timeout=30)
        assert 0.6 < r["ratio"] < 1.2, r


def test_cleanup_after_success_and_exception():
    snap = Snapshot()
    with cl.Cluster(hosts=3, ranks_per_host=1) as c:
        names = set(cl.list_netns())
        assert set(c.host_ns + [c.switch_ns]) <= names
        assert c.run(["true"], timeout=30)[0] == 0
    snap.assert_clean(c)
    with pytest.raises(ZeroDivisionError):
        with cl.Cluster(hosts=2, ranks_per_host=1) as c2:
            assert set(c2.host_ns) <= set(cl.list_netns())
            1 / 0
    snap.assert_clean(c2)


def test_rank_failure_kills_the_rest_and_cleans_up(tmp_path):
    snap = Snapshot()
    # rank 1 fails; the others stand in for ranks hung in a collective
    script = ("import os, sys, time\n"
              "r = int(os.environ['RANK'])\n"
              "print('rank', r, 'pid', os.getpid(), flush=True)\n"
              "open(os.path.join(sys.argv[1], 'pid%d' % r), 'w').write(str(os.getpid()))\n"
              "if r == 1:\n    print('boom', flush=True); sys.exit(7)\n"
              "time.sleep(60)\n")
    t0 = time.monotonic()
    with cl.Cluster(hosts=2, ranks_per_host=2, placement="interleaved") as c:
        res = c.run([sys.executable, "-c", script, str(tmp_path)], timeout=60, grace=0.5)
    assert time.monotonic() - t0 < 20
    assert res.rc == 7 and res.first_failed_rank == 1 and not res.timed_out
    assert "boom" in res.outputs[1] and "rank 0" in res.outputs[0]
    assert res.rank_rcs[1] == 7
    snap.assert_clean(c)
    for r in range(4):
        pid = int((tmp_path / f"pid{r}").read_text())
        assert not cl._pid_alive(pid), f"rank {r} (pid {pid}) still alive"


def test_timeout_kills_all_and_cleans_up(tmp_path):
    snap = Snapshot()
    t0 = time.monotonic()
    with cl.Cluster(hosts=2, ranks_per_host=2) as c:
        res = c.run([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                    timeout=2, log_dir=tmp_path / "logs")
    assert time.monotonic() - t0 < 20
    assert res.rc == cl.TIMEOUT_RC and res.timed_out, res.reason
    assert all(x is None or x < 0 for x in res.rank_rcs)
    for r in range(4):
        assert (tmp_path / "logs" / f"rank{r}.log").read_text() == "up\n"
    snap.assert_clean(c)


def _sigint_default():
    """In the child before exec: SIGINT as a terminal delivers it, even when this test runs
    with SIGINT ignored (a shell's background job), so that Python makes it
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_cli(tmp_path, *extra):
    """The CLI with 2x2 ranks that record their pids and then hang; wait until all are up."""
    script = ("import os, sys, time\n"
              "open(os.path.join(sys.argv[1], 'pid%s' % os.environ['RANK']), 'w')"
              ".write(str(os.getpid()))\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "cluster.py"), "--quiet",
                             "--timeout", "90"] + list(extra)
                            + ["--", sys.executable, "-c", script, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_sigint_default)
    wait_until(lambda: all((tmp_path / f"pid{r}").exists() and (tmp_path / f"pid{r}").read_text()
                           for r in range(4)) or proc.poll() is not None, 30, "ranks to start")
    assert proc.poll() is None, proc.stdout.read()
    assert len(mine(proc.pid)) == 3
    return proc, [int((tmp_path / f"pid{r}").read_text()) for r in range(4)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_cleans_up(tmp_path, sig):
    snap = Snapshot()
    proc, pids = _start_cli(tmp_path)
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"cluster.py did not exit within 20 s of {sig.name}")
    assert proc.returncode != 0, out
    assert not mine(proc.pid), out
    wait_until(lambda: not any(cl._pid_alive(p) for p in pids), 10, "ranks to die")
    snap.assert_clean()


def test_stale_namespaces_of_a_killed_launcher_are_swept(tmp_path):
    snap = Snapshot()
    proc, pids = _start_cli(tmp_path)
    stale = mine(proc.pid)
    proc.kill()                        # SIGKILL: no cleanup can run
    proc.communicate(timeout=20)
    assert set(stale) <= set(cl.list_netns())     # left behind, with its ranks still running
    swept = cl.sweep_stale()
    assert set(stale) <= set(swept)
    assert not set(stale) & set(cl.list_netns())
    wait_until(lambda: not any(cl._pid_alive(p) for p in pids), 10, "stale ranks to die")
    snap.assert_clean()


def test_cli_forwards_output_and_exit_status():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "cluster.py"), "--hosts", "2",
                        "--ranks-per-host", "1", "--timeout", "30", "--",
                        "sh", "-c", 'echo "hello $RANK"; exit $((3 + RANK))'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (3, 4), r
    assert "[r0] hello 0" in r.stdout and "[r1] hello 1" in r.stdout, r.stdout
    assert not mine()


GLOO_SCRIPT = r"""
import datetime, os, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank, n = dist.get_rank(), dist.get_world_size()
errors = []
count = 1 << 18                                   # 1 MiB of float32: many packets per link
t = torch.arange(count, dtype=torch.float32) % 1000 + 10000 * (rank + 1)
dist.all_reduce(t)
want = (torch.arange(count, dtype=torch.float32) % 1000) * n + 10000 * n * (n + 1) / 2
if not torch.equal(t, want):
    errors.append("all_reduce: %d wrong" % int((t != want).sum()))
k = 5                                             # elements per peer
send = torch.arange(n * k, dtype=torch.int64) + 1000 * rank
recv = torch.empty(n * k, dtype=torch.int64)
dist.all_to_all_single(recv, send)
want = torch.cat([torch.arange(rank * k, (rank + 1) * k, dtype=torch.int64) + 1000 * src
                  for src in range(n)])
if not torch.equal(recv, want):
    errors.append("all_to_all_single: got %s want %s" % (recv.tolist(), want.tolist()))
big = torch.full((n * 65536,), float(rank), dtype=torch.float32)
out = torch.empty_like(big)
dist.all_to_all_single(out, big)
if not torch.equal(out, torch.arange(n, dtype=torch.float32).repeat_interleave(65536)):
    errors.append("all_to_all_single (1 MiB): wrong")
dist.destroy_process_group()
print("RESULT", "OK" if not errors else "; ".join(errors), flush=True)
sys.exit(1 if errors else 0)
"""


def test_gloo_collectives_across_two_hosts():
    pytest.importorskip("torch")
    snap = Snapshot()
    with cl.Cluster(hosts=2, ranks_per_host=2, rate="1gbit", placement="interleaved") as c:
        rc, outputs = c.run([sys.executable, "-c", GLOO_SCRIPT], timeout=90)
    for r, text in enumerate(outputs):
        assert "RESULT OK" in text, f"rank {r} (rc {rc}):\n{text[-3000:]}"
    assert rc == 0
    snap.assert_clean(c)

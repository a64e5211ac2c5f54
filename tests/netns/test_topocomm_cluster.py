"""topocomm across emulated hosts (bench/cluster.py: one network namespace per host, tbf-shaped
veth links): equal to gloo through torch.distributed, uneven host layouts, a peer SIGKILLed
mid-transfer, and strangers knocking on a rank's TCP listener.

The cluster tests need root, `ip netns`, veth and tc tbf and skip with the reason otherwise;
the stranger tests need nothing (threads on 127.0.0.1). Each placement is one launch of
tests/netns/_rank_script.py whose ranks run every check and print one RESULT line per check;
each check is then reported by its own test. Everything is bounded: the launcher kills the
ranks after its timeout, topocomm and gloo groups get explicit timeouts, waits are polls.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from . import _rank_script as rs

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import cluster as cl  # noqa: E402

SCRIPT = str(Path(__file__).resolve().parent / "_rank_script.py")
PLACEMENTS = ("contiguous", "interleaved")
EQUAL_RUN_TIMEOUT_S = 120        # one placement's launch normally takes ~20 s
KILL_TIMEOUT_S = 20              # topocomm's timeout in the peer-death test
KILL_RAISE_WITHIN_S = 15         # every survivor must raise within this
SHM_DIR = "/dev/shm"
SHM_PREFIX = "topocomm-"         # comms/transport/shm.py: topocomm-<pid>-<128 random bits>


@pytest.fixture(scope="module")
def cluster_ok():
    ok, why = cl.Cluster.available()
    if not ok:
        pytest.skip(f"emulated cluster unavailable: {why}")
    if importlib.util.find_spec("torch") is None:   # importing it here would cost seconds
        pytest.skip("torch is not installed")


def parse(outputs):
    """[(rank, record)] from every rank's RESULT lines."""
    out = []
    for r, text in enumerate(outputs):
        for line in text.splitlines():
            if line.startswith("RESULT "):
                out.append((r, json.loads(line[len("RESULT "):])))
    return out


def shm_left_by(pids) -> list:
    """topocomm segments in /dev/shm created by any of pids (other users' runs are ignored)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return [n for n in names if n.startswith(SHM_PREFIX)
            and n[len(SHM_PREFIX):].split("-", 1)[0] in {str(p) for p in pids}]


def assert_cleaned_up(c: cl.Cluster, pids):
    left = set(c.host_ns + [c.switch_ns]) & set(cl.list_netns())
    assert not left, f"namespaces left behind: {sorted(left)}"
    for pid in pids:
        assert not cl._pid_alive(pid), f"rank process {pid} still alive"
    assert not shm_left_by(pids), f"/dev/shm entries left behind: {shm_left_by(pids)}"


def tail(text, n=3000):
    return text[-n:]


# ------------------------------------------------------------------- 1, 2: equal to gloo
_RUNS: dict = {}


def once(cache, key, launch):
    """launch() once per key; a launch that raised fails every later test at once too."""
    if key not in cache:
        try:
            cache[key] = launch()
        except Exception as exc:
            cache[key] = exc
            raise
    if isinstance(cache[key], Exception):
        pytest.fail(f"the launch failed earlier: {cache[key]!r}", pytrace=False)
    return cache[key]


def equal_run(placement):
    """Launch the 'equal' mode once per placement (2 hosts x 2 ranks, 1 Gbit/s links)."""
    return once(_RUNS, placement, lambda: _launch_equal(placement))


def _launch_equal(placement):
    with cl.Cluster(hosts=2, ranks_per_host=2, rate="1gbit", placement=placement) as c:
        with tempfile.TemporaryDirectory(prefix="topocomm-netns-") as barrier_dir:
            args = ["equal", barrier_dir, str(c.free_port())]
            if placement == "interleaved":
                args.append("p2p")
            res = c.run([sys.executable, SCRIPT] + args, timeout=EQUAL_RUN_TIMEOUT_S,
                        grace=5.0)
    records = parse(res.outputs)
    results, pids = {}, {}
    for r, rec in records:
        if rec["check"] == "started":
            pids[r] = rec["pid"]
        results.setdefault((rec["group"], rec["check"]), {})[r] = rec
    return {"res": res, "results": results, "pids": pids, "cluster": c}


def report_failures(run, key):
    res = run["res"]
    per_rank = run["results"].get(key, {})
    failures = [f"rank {r}: " + "\n".join(rec["errors"])
                for r, rec in sorted(per_rank.items()) if rec["errors"]]
    missing = [r for r in range(4) if r not in per_rank]
    if missing:
        failures.append(f"ranks {missing} never reported {key} (launch rc {res.rc}: "
                        f"{res.reason or 'ok'})")
        for r in missing:
            failures.append(f"--- rank {r} output:\n{tail(res.outputs[r])}")
    return failures


CHECK_KEYS = ([(g, name) for g in rs.GROUPS for name in rs.CHECK_NAMES]
              + [("numpy", name) for name in rs.NUMPY_CHECKS])


@pytest.mark.timeout(EQUAL_RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("group,check", CHECK_KEYS, ids=[f"{g}-{n}" for g, n in CHECK_KEYS])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_topocomm_equals_gloo(cluster_ok, placement, group, check):
    """group 'world': the default topocomm group, ranks on 2 hosts (shm inside, TCP between);
    'uneven': a topocomm group with 2+1+1 ranks per host (TOPOCOMM_HOST_ID forced while it
    is created); 'numpy': comms.init() in the same ranks, closed-form expectations."""
    run = equal_run(placement)
    failures = report_failures(run, (group, check))
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.mark.timeout(EQUAL_RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_equal_run_exits_cleanly(cluster_ok, placement):
    """Every rank finished (destroy_process_group included) with status 0; nothing is left:
    namespaces, rank processes, /dev/shm segments."""
    run = equal_run(placement)
    res = run["res"]
    done = run["results"].get(("world", "done"), {})
    assert res.rc == 0 and sorted(done) == [0, 1, 2, 3], (
        f"rc {res.rc} ({res.reason}); ranks done: {sorted(done)}\n"
        + "\n".join(f"--- rank {r}:\n{tail(o)}" for r, o in enumerate(res.outputs)
                    if r not in done))
    assert sorted(run["pids"]) == [0, 1, 2, 3]
    assert_cleaned_up(run["cluster"], run["pids"].values())


@pytest.mark.timeout(EQUAL_RUN_TIMEOUT_S + 60)
def test_large_isend_irecv_ring_completes(cluster_ok):
    run = equal_run("interleaved")
    failures = report_failures(run, ("p2p", "batch_isend_irecv_ring"))
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------- 3: a peer dies
# (api, placement, victim, delay_s, nbytes, rate); delay_s < 0 = the victim dies right
# before the call. MID: dist.all_reduce of 64 MiB at 200 Mbit/s (>= 2.7 s on the wire), the
# kill comes 0.5 s in; rank 1 is host 1's first rank, rank 3 shares its host, ranks 0 and 2
# are across the link. BEFORE: comms.init() (numpy, no torch: quick to start); rank 2 (host
# 1's first rank, contiguous) is dead when the others call allreduce; its host partner,
# rank 3, finds it through shared memory, ranks 0 and 1 through TCP.
MID = ("torch", "interleaved", 1, 0.5, 64 << 20, "200mbit")
BEFORE = ("numpy", "contiguous", 2, -1.0, 1 << 20, "1gbit")
_KILLS: dict = {}


def kill_run(scenario):
    return once(_KILLS, scenario, lambda: _launch_kill(*scenario))


def _launch_kill(api, placement, victim, delay_s, nbytes, rate):
    with cl.Cluster(hosts=2, ranks_per_host=2, rate=rate, placement=placement) as c:
        res = c.run([sys.executable, SCRIPT, "kill", api, str(victim), str(delay_s),
                     str(nbytes)], env={"TOPOCOMM_TIMEOUT": str(KILL_TIMEOUT_S)},
                    timeout=90, grace=KILL_RAISE_WITHIN_S)
    records = parse(res.outputs)
    return {"res": res, "cluster": c,
            "pids": {r: rec["pid"] for r, rec in records if rec["check"] == "started"},
            "outcome": {r: rec for r, rec in records if rec["check"] in ("raised", "returned")},
            "dump": "\n".join(f"--- rank {r} (rc {res.rank_rcs[r]}):\n{tail(o)}"
                              for r, o in enumerate(res.outputs))}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", [MID, BEFORE], ids=["mid-transfer", "before-the-call"])
def test_peer_killed_every_survivor_raises(cluster_ok, scenario):
    """Every survivor raises a CommError subclass within KILL_RAISE_WITHIN_S (topocomm's
    timeout is KILL_TIMEOUT_S), after the kill, and exits on its own with a non-zero
    status (EXIT_RAISED, not killed by the launcher); nothing is left behind."""
    victim, delay_s = scenario[2:4]
    run = kill_run(scenario)
    res, outcome, dump = run["res"], run["outcome"], run["dump"]
    assert sorted(run["pids"]) == [0, 1, 2, 3], dump
    assert not res.timed_out, dump
    assert res.first_failed_rank == victim and res.rank_rcs[victim] == -9, dump
    assert victim not in outcome, dump
    allowed = {"CommError", "PeerDeadError", "PeerAbortedError", "CommTimeoutError"}
    for r in range(4):
        if r == victim:
            continue
        rec = outcome.get(r)
        assert rec is not None, f"rank {r} neither raised nor returned\n{dump}"
        assert rec["check"] == "raised", f"rank {r}: all_reduce returned\n{dump}"
        assert rec["type"] in allowed and "CommError" in rec["mro"], (r, rec)
        # mid-transfer: raised after the kill (the transfer was under way); always well
        # before the timeout
        assert max(delay_s, 0) * 0.8 <= rec["seconds"] < KILL_RAISE_WITHIN_S, (r, rec)
        assert res.rank_rcs[r] == rs.EXIT_RAISED, (
            f"rank {r} exit status {res.rank_rcs[r]} (want {rs.EXIT_RAISED}: it must exit "
            f"on its own within {KILL_RAISE_WITHIN_S} s)\n{dump}")
    print({r: (rec["type"], rec["seconds"], rec["message"]) for r, rec in sorted(outcome.items())})
    assert_cleaned_up(run["cluster"], run["pids"].values())


_DIED = re.compile(r"rank (\d+) \(pid (\d+)\) died")


@pytest.mark.timeout(120)
def test_dead_peer_is_named_by_its_group_rank(cluster_ok):
    """A message that says 'rank N (pid P) died' with P the victim's pid must say N = victim.
    BEFORE makes it deterministic: rank 3 meets its dead host partner in shared memory."""
    run = kill_run(BEFORE)
    victim_pid = run["pids"].get(BEFORE[2])
    named = []
    for r, rec in sorted(run["outcome"].items()):
        for n, pid in _DIED.findall(rec.get("message", "")):
            if int(pid) == victim_pid:
                named.append((r, int(n), rec["message"]))
    assert named, f"no survivor named the dead pid {victim_pid}: {run['outcome']}"
    wrong = [x for x in named if x[1] != BEFORE[2]]
    assert not wrong, f"rank {BEFORE[2]} (pid {victim_pid}) died, but: {wrong}"


# ------------------------------------------------------------------- 4: strangers
def _mesh_pair(monkeypatch, before_rank1=None, fake_rank0=None, timeout=10.0):
    """Two TcpMesh ranks on 127.0.0.1 (threads, one HashStore). before_rank1(addr) runs once
    rank 0 listens and before rank 1 connects. fake_rank0: publish this address as rank 0's
    instead of starting rank 0."""
    monkeypatch.delenv("TOPOCOMM_SOCKET_IFNAME", raising=False)
    from comms.core.store import HashStore
    from comms.transport.tcp import TcpMesh

    store = HashStore(timeout)
    prefix = "netns-test"
    meshes, errors = {}, {}

    def make(rank):
        try:
            meshes[rank] = TcpMesh(rank, 2, store, prefix, [1 - rank], timeout,
                                   address="127.0.0.1", num_streams=2)
        except BaseException as exc:   # noqa: B902 - handed to the test
            errors[rank] = exc

    threads = []
    if fake_rank0 is None:
        threads.append(threading.Thread(target=make, args=(0,), daemon=True))
        threads[-1].start()
    else:
        store.set(f"{prefix}/tcp/secret", os.urandom(32))
        store.set(f"{prefix}/tcp/addr/0", f"{fake_rank0[0]}:{fake_rank0[1]}".encode())
    host, _, port = bytes(store.get(f"{prefix}/tcp/addr/0")).decode().rpartition(":")
    if before_rank1 is not None:
        before_rank1((host, int(port)))
    threads.append(threading.Thread(target=make, args=(1,), daemon=True))
    threads[-1].start()
    for t in threads:
        t.join(timeout + 5)
        assert not t.is_alive(), "TcpMesh set-up did not finish"
    return meshes, errors, (host, int(port))


def _knock(addr, payload, half_close=False):
    """Connect, send payload; what the listener answers: b'' = closed unanswered."""
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        try:
            return s.recv(1)
        except ConnectionResetError:
            return b""


@pytest.mark.timeout(60)
def test_stranger_with_wrong_secret_is_refused_and_group_works(monkeypatch):
    from comms.kernels import native
    from comms.transport.tcp import _HELLO, _MAGIC

    answers = []

    def strangers(addr):
        # the right magic and a peer's identity (rank 1, stream 0) but a wrong secret
        answers.append(_knock(addr, _HELLO.pack(_MAGIC, b"x" * 32, 1, 0)))
        answers.append(_knock(addr, os.urandom(_HELLO.size)))            # garbage hello
        answers.append(_knock(addr, b"GET / HTTP/1.0\r\n\r\n", half_close=True))  # short

    meshes, errors, addr = _mesh_pair(monkeypatch, before_rank1=strangers)
    try:
        assert not errors, errors
        assert answers == [b"", b"", b""], f"a stranger got an answer: {answers}"
        assert meshes[0].refused == 3
        # the listener is gone once the group is set up
        with pytest.raises(OSError):
            socket.create_connection(addr, timeout=5).close()
        # the group works: both directions at once, striped (3 MiB) and tiny
        nat = native.impl()
        for nbytes in (3 << 20, 7):
            send = {r: np.frombuffer(np.random.default_rng(r).bytes(nbytes), np.uint8)
                    for r in (0, 1)}
            recv = {r: np.zeros(nbytes, np.uint8) for r in (0, 1)}
            failed = {}

            def go(r):
                try:
                    meshes[r].exchange(nat, [(1 - r, 0, send[r].ctypes.data, nbytes, 5),
                                             (1 - r, 1, recv[r].ctypes.data, nbytes, 5)])
                except BaseException as exc:   # noqa: B902 - handed to the test
                    failed[r] = exc
            ts = [threading.Thread(target=go, args=(r,), daemon=True) for r in (0, 1)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(20)
                assert not t.is_alive(), "exchange hung"
            assert not failed, failed
            for r in (0, 1):
                assert np.array_equal(recv[r], send[1 - r]), f"rank {r}, {nbytes} B"
    finally:
        for m in meshes.values():
            m.close()


@pytest.mark.timeout(60)
def test_rank_refused_by_a_listener_without_the_secret_raises(monkeypatch):
    """The other side: a rank whose peer's published address answers the hello wrongly
    raises CommError at once instead of waiting out the timeout."""
    from comms.core.errors import CommError

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(10)

    def impostor():
        try:
            conn, _ = srv.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"\x00")       # not the \x01 a rank sends back
        except OSError:
            pass
    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    try:
        meshes, errors, _ = _mesh_pair(monkeypatch, fake_rank0=srv.getsockname(), timeout=10)
        assert not meshes and isinstance(errors.get(1), CommError), errors
        assert "refused" in str(errors[1])
    finally:
        srv.close()
        t.join(5)

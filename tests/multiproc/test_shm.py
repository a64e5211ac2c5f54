"""Real processes over the shm transport: results, a SIGKILLed rank, and leaks."""
import glob
import os
import textwrap

import pytest

from comms.testing import run_procs

pytestmark = pytest.mark.timeout(240)


def shm_segments():
    return set(glob.glob("/dev/shm/topocomm-*"))


# Each script prints its pid on stderr first: a segment's name carries its creator's pid
# (comms/transport/shm.py), so a test checks only the segments of its own processes and a
# test process running at the same time cannot make it fail.
SAY_PID = 'import os as _o, sys as _s; print("PID", _o.getpid(), file=_s.stderr, flush=True)\n'


def own_pids(results):
    pids = set()
    for _rc, _so, se in results:
        for line in se.splitlines():
            if line.startswith("PID "):
                pids.add(int(line.split()[1]))
    assert len(pids) == len(results), [se for _, _, se in results]
    return pids


def segments_of(pids):
    """/dev/shm topocomm segments created by any of `pids`."""
    mine = {str(q) for q in pids}
    return {p for p in shm_segments()
            if os.path.basename(p)[len("topocomm-"):].split("-", 1)[0] in mine}


def check(results):
    for r, (rc, so, se) in enumerate(results):
        assert rc == 0, f"rank {r} exit {rc}\nstdout:\n{so}\nstderr:\n{se}"


COLLECTIVES = SAY_PID + textwrap.dedent("""
    import numpy as np, comms
    c = comms.init()
    r, n = c.rank, c.size
    def v(rank, idx): return ((rank * 7 + idx % 101) % 61)
    for count in (0, 1, 13, 4099, (1 << 20) + 3):
        idx = np.arange(count)
        exp = sum(v(q, idx) for q in range(n)).astype(np.float32) if count else np.zeros(0, np.float32)
        for _ in range(2):
            x = v(r, idx).astype(np.float32); c.allreduce(x)
            assert np.array_equal(x, exp), (count, x[:4], exp[:4])
        rs = np.empty(count, np.float32)
        c.reduce_scatter(np.tile(v(r, idx).astype(np.float32), n), rs)
        assert np.array_equal(rs, exp)
        ag = np.empty(n * count, np.int32); c.allgather(v(r, idx).astype(np.int32), ag)
        assert np.array_equal(ag, np.concatenate([v(q, idx) for q in range(n)]))
        b = v(r, idx).astype(np.float64); c.broadcast(b, root=n - 1)
        assert np.array_equal(b, v(n - 1, idx))
        a2a = np.empty(n * count, np.int64)
        c.all_to_all(np.concatenate([v(r, idx) + 1000 * q for q in range(n)]).astype(np.int64), a2a)
        assert np.array_equal(a2a, np.concatenate([v(q, idx) + 1000 * r for q in range(n)]))
    sc = [(r + q) % 4 * 1000 for q in range(n)]; rc = [(q + r) % 4 * 1000 for q in range(n)]
    s = np.concatenate([np.full(sc[q], r * 10 + q) for q in range(n)]).astype(np.int32)
    o = np.empty(sum(rc), np.int32); c.all_to_all(s, o, sc, rc)
    assert np.array_equal(o, np.concatenate([np.full(rc[p], p * 10 + r) for p in range(n)]))
    if r == 0: c.send(np.arange(300000, dtype=np.float32), 1, tag=2)
    if r == 1:
        z = np.empty(300000, np.float32); c.recv(z, 0, tag=2)
        assert np.array_equal(z, np.arange(300000, dtype=np.float32))
    c.barrier()
    print("native", c.is_native)
    c.close()
""")


@pytest.mark.parametrize("n", [2, 4])
def test_collectives_across_processes(n):
    res = run_procs(n, COLLECTIVES, timeout=200)
    check(res)
    assert segments_of(own_pids(res)) == set()


A2A_REPEAT = textwrap.dedent("""
    import os, numpy as np, comms
    c = comms.init()
    r, n = c.rank, c.size
    # TOPOCOMM_CMA=0: no direct reads (what a group gets where process_vm_readv is refused)
    assert (c.group.direct_mode == 0) == (os.environ.get("TOPOCOMM_CMA") == "0"), c.group.direct_mode
    per = 300_007
    recv = np.empty(n * per, np.float32)
    for call in range(4):   # the first call checks, later ones are one C call each
        send = (np.arange(n * per) % 991 + 1000 * r + 3 * call).astype(np.float32)
        c.all_to_all(send, recv)
        exp = np.concatenate([np.arange(r * per, (r + 1) * per) % 991 + 1000 * q + 3 * call
                              for q in range(n)]).astype(np.float32)
        assert np.array_equal(recv, exp), (call, recv[:4], exp[:4])
    c.close()
""")


@pytest.mark.parametrize("algo", ["direct", "pairwise", "measured", "no-cma"])
def test_even_all_to_all_one_call_across_processes(algo):
    """The one-call even all-to-all between processes: direct reads the peers' send
    buffers with process_vm_readv; pairwise goes through the shared slots; unforced, at
    this size rank 0 alternates the two while it measures them (select.Measured); with
    TOPOCOMM_CMA=0 the group has no direct reads and stays on the slots."""
    env = {"measured": {}, "no-cma": {"TOPOCOMM_CMA": "0"}}.get(
        algo, {"TOPOCOMM_ALGO": f"alltoall:{algo}"})
    check(run_procs(3, A2A_REPEAT, timeout=200, env=env))


KILL = SAY_PID + textwrap.dedent("""
    import os, signal, threading, time, numpy as np, comms
    c = comms.init(timeout=60)
    x = np.ones(4 << 20, np.float32)
    c.allreduce(x)
    if c.rank == 1:
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    t0 = time.monotonic()
    try:
        for i in range(100000):
            c.allreduce(x)
            if time.monotonic() - t0 > 50: break
        print("NO ERROR")
    except comms.CommError as e:
        print("ERROR", type(e).__name__, round(time.monotonic() - t0, 2), e)
""")


def test_sigkilled_rank_gives_error_not_hang_and_leaves_no_segment():
    res = run_procs(3, KILL, timeout=120)
    assert res[1][0] == -9
    for r in (0, 2):
        rc, so, se = res[r]
        assert rc == 0, se
        assert so.startswith("ERROR"), so + se
        name, secs = so.split()[1], float(so.split()[2])
        assert name in ("PeerDeadError", "PeerAbortedError"), so
        assert secs < 40, so  # well within the 60 s timeout
    assert segments_of(own_pids(res)) == set()


INTERRUPT = SAY_PID + textwrap.dedent("""
    import os, signal, threading, time, numpy as np, comms
    # Ctrl-C raises KeyboardInterrupt even when this process was started with SIGINT
    # ignored (a shell's background job): Python then installs no handler of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    c = comms.init(timeout=60)
    store = c._own_store
    c.allreduce(np.ones(8, np.float32))
    x = np.ones(1 << 20, np.float32)
    if c.rank == 0:
        # rank 1 is not coming: Ctrl-C must end the wait, not the 60 s timeout
        sent = []
        def ctrl_c():
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)
        threading.Timer(1.0, ctrl_c).start()
        try:
            c.allreduce(x)
            print("NO ERROR")
        except KeyboardInterrupt:
            print("INTERRUPTED", round(time.monotonic() - sent[0], 2))
        store.set("go", b"1")
    else:
        store.get("go")
        t0 = time.monotonic()
        try:
            c.allreduce(x)
            print("NO ERROR")
        except comms.CommError as e:
            print("ERROR", type(e).__name__, round(time.monotonic() - t0, 2))
    c.close()
""")


@pytest.mark.parametrize("pure", [False, True], ids=["native", "pure-python"])
def test_ctrl_c_interrupts_a_wait_and_the_peers_hear_of_it(pure):
    """SIGINT while a rank waits for a peer that is not coming raises KeyboardInterrupt
    there within a fraction of a second (the C waits run Python's signal handlers every
    ~20 ms), not at the timeout; the group is aborted, so the peer that comes later raises
    PeerAbortedError at once instead of waiting for its own timeout."""
    env = {"TOPOCOMM_PURE_PYTHON": "1"} if pure else {}
    res = run_procs(2, INTERRUPT, timeout=120, env=env)
    check(res)
    so0, so1 = res[0][1].split(), res[1][1].split()
    assert so0[0] == "INTERRUPTED" and float(so0[1]) < 5, res[0]
    assert so1[:2] == ["ERROR", "PeerAbortedError"] and float(so1[2]) < 5, res[1]
    assert segments_of(own_pids(res)) == set()


HANDLER_CLOSES = textwrap.dedent("""
    import os, signal, threading, time, numpy as np, comms
    c = comms.init(timeout=20)
    c.allreduce(np.ones(8, np.float32))
    store = c._own_store
    x = np.ones(1 << 16, np.float32)
    if c.rank == 0:
        # a handler that tears the group down while rank 0 waits for rank 1
        signal.signal(signal.SIGUSR1, lambda *a: c.close())
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
        store.set("armed", b"1")
    else:
        store.get("armed")
        time.sleep(1.0)  # the stimulus: rank 0 must be inside its wait when the signal lands
    try:
        c.allreduce(x)
        print("DONE", float(x[0]))
    except comms.CommError as e:
        print("ERROR", type(e).__name__)
""")


def test_signal_handler_closing_the_group_during_a_wait_does_not_crash():
    """Only SIGINT ends a wait early; other handlers run after the operation, as Python runs
    them after any C call, so one that closes the group cannot unmap what the wait reads."""
    res = run_procs(2, HANDLER_CLOSES, timeout=120)
    check(res)
    assert res[0][1].split()[0] in ("DONE", "ERROR"), res[0]


EXC = SAY_PID + textwrap.dedent("""
    import numpy as np, comms, sys
    c = comms.init(timeout=20)
    c.allreduce(np.ones(10))
    if c.rank == 0:
        raise SystemExit(3)       # leaves without closing
    try:
        c.allreduce(np.ones(1 << 20))
    except comms.CommError as e:
        print("ERROR", type(e).__name__)
""")


def test_rank_exiting_without_close_leaves_no_segment():
    res = run_procs(2, EXC, timeout=120)
    assert res[0][0] == 3
    assert res[1][0] == 0 and "ERROR PeerDeadError" in res[1][1], res[1]
    assert segments_of(own_pids(res)) == set()


def test_orphan_segment_of_dead_creator_is_swept(tmp_path, monkeypatch):
    from comms.transport import shm
    # a directory of its own: a sweep by a test process running at the same time cannot
    # take this test's orphan first, and this sweep touches no one else's segments
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path))
    dead = tmp_path / "topocomm-4194399-deadbeef"   # a pid that cannot be alive: above pid_max
    alive = tmp_path / f"topocomm-{os.getpid()}-cafe"
    other = tmp_path / "not-ours-4194399"
    for p in (dead, alive, other):
        p.write_bytes(b"x")
    assert shm.sweep_orphans() == 1
    assert not dead.exists() and alive.exists() and other.exists()


REINIT = SAY_PID + textwrap.dedent("""
    import datetime, os, torch, torch.distributed as dist
    import comms
    rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), ws, rank == 0,
                          timeout=datetime.timedelta(seconds=30))
    prefixes = []
    for it in range(3):   # torch wraps the same store anew and names the group "0" each time
        dist.init_process_group("topocomm", store=store, rank=rank, world_size=ws,
                                timeout=datetime.timedelta(seconds=30))
        prefixes.append(comms.torch.backend.communicator_of()[0]._prefix)
        t = torch.ones(4) * (rank + 1 + it)
        dist.all_reduce(t)
        assert t.tolist() == [float(sum(r + 1 + it for r in range(ws)))] * 4, t
        dist.destroy_process_group()
    # a world reusing the last one's keys reads its peers' old (unlinked) segment names
    assert len(set(prefixes)) == 3, prefixes
    print("ok")
""")


def test_reinit_after_destroy_on_the_same_store():
    """init_process_group / destroy_process_group repeated over one TCPStore: every world
    gets fresh keys (found by review: the second world read the first one's segment names)."""
    pytest.importorskip("torch")
    res = run_procs(2, REINIT, timeout=120)
    check(res)
    assert all("ok" in so for _, so, _ in res)
    assert segments_of(own_pids(res)) == set()


INIT_CLOSE = textwrap.dedent("""
    import threading, time, numpy as np, comms
    for it in range(3):
        c = comms.init(timeout=30)
        x = np.ones(4, np.float32); c.allreduce(x)
        assert x[0] == c.size
        c.close()
        # the store comms.init() made goes with the group: no server thread (each join in
        # close() is bounded, so a loaded machine may need a moment more), port free (the
        # next init binds it)
        deadline = time.monotonic() + 30
        while len(threading.enumerate()) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [t.name for t in threading.enumerate()] == ["MainThread"], threading.enumerate()
    print("ok")
""")


def test_init_close_repeated_leaves_no_store_server():
    """comms.init() / close() three times in the same processes (found by review: rank 0's
    store server outlived close(), so the next init failed with address in use)."""
    res = run_procs(2, INIT_CLOSE, timeout=120)
    check(res)
    assert all("ok" in so for _, so, _ in res)

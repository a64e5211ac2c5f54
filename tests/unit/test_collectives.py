"""Every collective on the threads transport against closed-form expected values:
world sizes 1, 2, 3, 4, 5, 8; sizes 0, 1, odd, primes, and large enough to cycle the
ring's slots and the staged rounds (the test worlds have a 256 KiB data area); every
algorithm run twice on one group; in place and out of place."""
import numpy as np
import pytest

from comms.plan import select

SIZES = [0, 1, 7, 13, 1000, 100003]
WORLDS = [1, 2, 3, 4, 5, 8]


def value(rank, idx):
    """Unique per (rank, index), small integers so float sums are exact."""
    return (rank * 7 + idx % 101) % 61


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("count", SIZES)
def test_allreduce_sum_twice(worlds, n, count):
    w = worlds(n)
    idx = np.arange(count)
    expected = sum(value(r, idx) for r in range(n)).astype(np.float32) if count else np.zeros(0, np.float32)

    def body(comm):
        outs = []
        for _ in range(2):
            x = value(comm.rank, idx).astype(np.float32)
            comm.allreduce(x)
            y = np.empty_like(x)
            comm.allreduce(value(comm.rank, idx).astype(np.float32), out=y)
            outs.append((x, y))
        return outs
    for outs in w.run(body):
        for x, y in outs:
            np.testing.assert_array_equal(x, expected)
            np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("op,np_op", [("max", np.maximum), ("min", np.minimum), ("prod", np.multiply),
                                      ("band", np.bitwise_and), ("bor", np.bitwise_or),
                                      ("bxor", np.bitwise_xor)])
def test_allreduce_ops_int(worlds, n, op, np_op):
    w = worlds(n)
    for count in (5, 40000):
        idx = np.arange(count)
        exp = value(0, idx).astype(np.int64) + 1
        for r in range(1, n):
            exp = np_op(exp, value(r, idx).astype(np.int64) + 1)

        def body(comm):
            x = value(comm.rank, idx).astype(np.int64) + 1
            return comm.allreduce(x, op=op)
        for got in w.run(body):
            np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize("n", WORLDS)
def test_allreduce_avg(worlds, n):
    w = worlds(n)
    for count in (3, 70000):
        idx = np.arange(count)
        exp = sum(value(r, idx) for r in range(n)) / n
        for got in w.run(lambda c: c.allreduce(value(c.rank, idx).astype(np.float64), op="avg")):
            np.testing.assert_allclose(got, exp, rtol=1e-15)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("count", [0, 1, 13, 50021])
def test_reduce_scatter(worlds, n, count):
    w = worlds(n)
    idx = np.arange(n * count)
    total = sum(value(r, idx) for r in range(n)).astype(np.float32)

    def body(comm):
        recv = np.full(count, -1, np.float32)
        comm.reduce_scatter(value(comm.rank, idx).astype(np.float32), recv)
        recv2 = np.full(count, -1, np.float32)
        comm.reduce_scatter(value(comm.rank, idx).astype(np.float32), recv2)
        return recv, recv2
    for r, (a, b) in enumerate(w.run(body)):
        np.testing.assert_array_equal(a, total[r * count:(r + 1) * count])
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("count", [0, 1, 13, 150001])
def test_broadcast_allgather_gather_scatter(worlds, n, count):
    w = worlds(n)
    idx = np.arange(count)
    root = n - 1

    def body(comm):
        r = comm.rank
        b = value(r, idx).astype(np.int32)
        comm.broadcast(b, root=root)
        ag = np.full(n * count, -1, np.int32)
        comm.allgather(value(r, idx).astype(np.int32), ag)
        g = np.full(n * count, -1, np.int32) if r == root else None
        comm.gather(value(r, idx).astype(np.int32), g, root=root)
        s = np.concatenate([value(q, idx) for q in range(n)]).astype(np.int32) if r == 0 else None
        sr = np.full(count, -1, np.int32)
        comm.scatter(s, sr, root=0)
        return b, ag, g, sr
    allv = np.concatenate([value(q, idx) for q in range(n)]).astype(np.int32)
    for r, (b, ag, g, sr) in enumerate(w.run(body)):
        np.testing.assert_array_equal(b, value(root, idx))
        np.testing.assert_array_equal(ag, allv)
        if r == root:
            np.testing.assert_array_equal(g, allv)
        np.testing.assert_array_equal(sr, value(r, idx))


def splits(n, seed, big=False):
    rng = np.random.default_rng(seed)
    hi = 90000 if big else 9
    m = rng.integers(0, hi, size=(n, n))
    m[rng.random((n, n)) < 0.3] = 0  # zero splits
    return m


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("big", [False, True])
def test_all_to_all_uneven(worlds, n, big):
    w = worlds(n)
    m = splits(n, n, big)   # m[p][q]: elements p sends to q

    def body(comm):
        r = comm.rank
        send = np.concatenate([np.full(m[r][q], r * 1000 + q) for q in range(n)]).astype(np.int64)
        recv = np.full(int(m[:, r].sum()), -1, np.int64)
        comm.all_to_all(send, recv, m[r].tolist(), m[:, r].tolist())
        return recv
    for r, got in enumerate(w.run(body)):
        exp = np.concatenate([np.full(m[p][r], p * 1000 + r) for p in range(n)]).astype(np.int64)
        np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_all_to_all_even(worlds, n):
    w = worlds(n)
    per = 1001

    def body(comm):
        r = comm.rank
        send = np.arange(n * per, dtype=np.float64) + r * 1e6
        recv = np.zeros(n * per)
        comm.all_to_all(send, recv)
        return recv
    for r, got in enumerate(w.run(body)):
        exp = np.concatenate([np.arange(r * per, (r + 1) * per) + p * 1e6 for p in range(n)])
        np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize("n", [2, 4])
def test_send_recv_and_barrier(worlds, n):
    w = worlds(n)
    count = 20011  # several mailbox pieces

    def body(comm):
        r = comm.rank
        comm.barrier()
        if r % 2 == 0:
            comm.send(np.arange(count, dtype=np.float32) + r, r + 1, tag=5)
            back = np.zeros(3, np.int64)
            comm.recv(back, r + 1, tag=6)
            return back
        buf = np.zeros(count, np.float32)
        comm.recv(buf, r - 1, tag=5)
        comm.send(np.array([r, r, r], np.int64), r - 1, tag=6)
        comm.barrier()
        return buf
    res = w.run(lambda c: (body(c), c.barrier() if c.rank % 2 == 0 else None)[0])
    for r, got in enumerate(res):
        if r % 2:
            np.testing.assert_array_equal(got, np.arange(count, dtype=np.float32) + r - 1)
        else:
            np.testing.assert_array_equal(got, [r + 1] * 3)


def test_reduce_to_root_leaves_others_unchanged(worlds):
    w = worlds(3)

    def body(comm):
        x = np.full(50000, comm.rank + 1.0)
        comm.reduce(x, root=1)
        return x
    res = w.run(body)
    np.testing.assert_array_equal(res[1], np.full(50000, 6.0))
    np.testing.assert_array_equal(res[0], np.full(50000, 1.0))
    np.testing.assert_array_equal(res[2], np.full(50000, 3.0))


def test_torch_tensors_and_bfloat16(worlds):
    torch = pytest.importorskip("torch")
    w = worlds(2)

    def body(comm):
        t = torch.arange(1000, dtype=torch.bfloat16) + comm.rank
        comm.allreduce(t)
        u = torch.full((70000,), 1.5 + comm.rank, dtype=torch.bfloat16)
        comm.allreduce(u)
        return t, u
    for t, u in w.run(body):
        a = torch.arange(1000, dtype=torch.bfloat16)
        exp = a + (a + 1)  # rank 0's input + rank 1's, one bfloat16 rounding
        assert torch.equal(t, exp)
        assert torch.equal(u, torch.full((70000,), 4.0, dtype=torch.bfloat16))


def test_explain_names_algorithm_and_reason(worlds):
    comm = worlds(2).comms[0]
    small = comm.explain("allreduce", 8)
    big = comm.explain("allreduce", 64 << 20)
    assert "small" in small and "why" in small
    assert "ring" in big and str(64 << 20) in big
    assert select.ALGORITHMS["allreduce"] == ("small", "ring")


@pytest.mark.parametrize("algo", ["pairwise", "direct", "staged"])
def test_every_all_to_all_algorithm(monkeypatch, algo):
    """Each all-to-all algorithm, forced through TOPOCOMM_ALGO, on uneven and zero splits
    large enough to cycle slots and rounds; run twice on one group."""
    from comms.testing import ThreadWorld
    monkeypatch.setenv("TOPOCOMM_ALGO", f"alltoall:{algo}")
    n = 3
    m = splits(n, 7, big=True)
    with ThreadWorld(n) as w:
        assert algo in w.comms[0].explain("all_to_all", 1 << 20)

        def body(comm):
            r = comm.rank
            outs = []
            for _ in range(2):
                send = np.concatenate([np.full(m[r][q], r * 1000 + q) for q in range(n)]).astype(np.int32)
                recv = np.full(int(m[:, r].sum()), -1, np.int32)
                comm.all_to_all(send, recv, m[r].tolist(), m[:, r].tolist())
                outs.append(recv)
            return outs
        for r, outs in enumerate(w.run(body)):
            exp = np.concatenate([np.full(m[p][r], p * 1000 + r) for p in range(n)]).astype(np.int32)
            for got in outs:
                np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize("algo", ["pairwise", "direct", "staged"])
def test_even_all_to_all_one_call_path(monkeypatch, algo):
    """Even splits repeated on one (type, dtype, size): the first call checks and later ones
    take the one-call path (pairwise and direct); every call's data is new, so a stale or
    misplaced block shows."""
    from comms.testing import ThreadWorld
    monkeypatch.setenv("TOPOCOMM_ALGO", f"alltoall:{algo}")
    n, per = 3, 50_001
    with ThreadWorld(n) as w:
        def body(comm):
            r = comm.rank
            got = []
            recv = np.empty(n * per, np.float32)
            for call in range(4):
                send = (np.arange(n * per) % 997 + 1000 * r + 7 * call).astype(np.float32)
                comm.all_to_all(send, recv)
                got.append(recv.copy())
            return got
        for r, got in enumerate(w.run(body)):
            for call, recv in enumerate(got):
                exp = np.concatenate([(np.arange(r * per, (r + 1) * per) % 997 + 1000 * p + 7 * call)
                                      for p in range(n)]).astype(np.float32)
                np.testing.assert_array_equal(recv, exp)


@pytest.mark.parametrize("algo,direct_reads", [("pairwise", True), ("direct", True),
                                               ("staged", True), ("pairwise", False),
                                               ("staged", False)])
def test_in_place_all_to_all_reuses_its_copy_aside(monkeypatch, algo, direct_reads):
    """send is recv (even and uneven splits), repeated with new data: every result is right,
    also where peers cannot read each other's memory (no process_vm_readv: Yama ptrace
    scope 1, containers), and the copy set aside is one buffer kept by the communicator,
    not fresh memory per call."""
    from comms.testing import ThreadWorld
    monkeypatch.setenv("TOPOCOMM_ALGO", f"alltoall:{algo}")
    n, per = 3, 20_011
    with ThreadWorld(n) as w:
        if not direct_reads:
            for c in w.comms:
                c.group.direct_mode = 0              # what a group without CMA runs with

        def body(comm):
            r = comm.rank
            got, kept = [], []
            for call in range(3):
                buf = (np.arange(n * per) % 991 + 1000 * r + 7 * call).astype(np.float32)
                counts = None if call < 2 else [per] * n
                comm.all_to_all(buf, buf, counts, counts)
                got.append(buf)
                kept.append(id(comm.group.staging.kept.get("aside")))
            return got, kept
        for r, (got, kept) in enumerate(w.run(body)):
            for call, buf in enumerate(got):
                exp = np.concatenate([(np.arange(r * per, (r + 1) * per) % 991 + 1000 * p + 7 * call)
                                      for p in range(n)]).astype(np.float32)
                np.testing.assert_array_equal(buf, exp)
            assert len(set(kept)) == 1 and kept[0] != id(None)
        comm0 = w.comms[0]
    assert comm0._closed and not getattr(comm0, "_scratch_bufs", {})   # released on close


def test_even_all_to_all_runs_rank0s_algorithm(monkeypatch):
    """Ranks that would pick different algorithms still agree: every rank runs the one rank
    0 put in its arrival header, on the general path and on the one-call path."""
    from comms.testing import ThreadWorld
    monkeypatch.delenv("TOPOCOMM_ALGO", raising=False)
    n, per = 3, 20_011
    with ThreadWorld(n) as w:
        def call(comm, k):
            send = (np.arange(n * per) + 1000 * comm.rank + k).astype(np.int32)
            recv = np.empty(n * per, np.int32)
            comm.all_to_all(send, recv)
            return recv

        def check(outs, k):
            for r, got in enumerate(outs):
                exp = np.concatenate([np.arange(r * per, (r + 1) * per) + 1000 * p + k
                                      for p in range(n)]).astype(np.int32)
                np.testing.assert_array_equal(got, exp)
        # rank 0 proposes direct, the others pairwise: all take direct, then the one-call path
        for c in w.comms:
            c.group._a2a_plan = (lambda nbytes: 1) if c.rank == 0 else (lambda nbytes: 0)
        for k in range(3):
            check(w.run(lambda c: call(c, k)), k)
        assert all(len(c.group._fast_a2a) == 1 for c in w.comms)
        # rank 0 forgets its one-call entry and asks for staged: the others, on the one-call
        # path, see it in rank 0's header and run staged too
        w.comms[0].group._fast_a2a.clear()
        w.comms[0].group._a2a_plan = lambda nbytes: 2
        for k in range(3, 5):
            check(w.run(lambda c: call(c, k)), k)


@pytest.mark.parametrize("nbytes", [512 << 10, (2 << 20) + 12])
def test_no_direct_reads_measures_streamed_pairwise(monkeypatch, nbytes):
    """Without direct reads, rank 0 measures pairwise with cached against streamed slot
    writes from 512 KiB (kind 3); both give the right bytes, on the general path and the
    one-call path, and with uneven multi-chunk blocks (the second size)."""
    from comms.testing import ThreadWorld
    from comms.core.status import AllToAllAlgorithm
    _A2A_STREAMED = int(AllToAllAlgorithm.PAIRWISE_STREAMED)
    from comms.plan.select import Measured
    monkeypatch.delenv("TOPOCOMM_ALGO", raising=False)
    n = 3
    per = -(-nbytes // (4 * n))             # at least nbytes in all
    with ThreadWorld(n) as w:
        for c in w.comms:                       # what a group without process_vm_readv has
            c.group.transport.direct, c.group.direct_mode = None, 0
            c.group.use_links()
        plan = w.comms[0].group._a2a_plan(n * per * 4)
        assert isinstance(plan, Measured) and plan.kinds == (0, _A2A_STREAMED)
        assert w.comms[1].group._a2a_plan(n * per * 4) == 0     # only rank 0 measures
        ran = []
        real = w.comms[0].group.nat.alltoall_even_g

        def spy(*args):
            ran.append(args[12])
            return real(*args)
        w.comms[0].group.nat = type("Nat", (), {"__getattr__": lambda self, k: getattr(
            w.comms[1].group.nat, k), "alltoall_even_g": staticmethod(spy)})()

        def body(comm):
            got = []
            for k in range(2 * Measured.EXPLORE + 1):
                send = (np.arange(n * per) % 977 + 1000 * comm.rank + k).astype(np.float32)
                recv = np.empty(n * per, np.float32)
                comm.all_to_all(send, recv)
                got.append(recv)
            return got
        for r, got in enumerate(w.run(body)):
            for k, recv in enumerate(got):
                exp = np.concatenate([np.arange(r * per, (r + 1) * per) % 977 + 1000 * p + k
                                      for p in range(n)]).astype(np.float32)
                np.testing.assert_array_equal(recv, exp)
        assert _A2A_STREAMED in ran and 0 in ran, ran   # both were run on the one-call path


def test_measured_choice_alternates_then_keeps_the_faster():
    from comms.plan.select import Measured
    m = Measured(0, 1)
    seen = []
    for i in range(2 * Measured.EXPLORE):
        kind = m.propose()
        seen.append(kind)
        m.record(kind, 0.002 if kind == 0 else 0.001)
    assert seen == [0, 1] * Measured.EXPLORE
    rest = []
    for _ in range(3 * Measured.RETRY):
        kind = m.propose()
        rest.append(kind)
        m.record(kind, 0.002 if kind == 0 else 0.001)
    assert rest.count(0) == 3 and rest.count(1) == len(rest) - 3  # one retry per RETRY calls
    # the machine changes: the retried one is now faster and takes over
    for _ in range(3 * Measured.RETRY):
        kind = m.propose()
        m.record(kind, 0.0005 if kind == 0 else 0.001)
    assert m.best == 0
    # a few slow calls of the faster one (a late peer) do not flip the choice ...
    for t in (0.01, 0.02, 0.01):
        m.record(0, t)
        assert m.best == 0
    # ... a window of them does (the machine changed)
    for _ in range(Measured.WINDOW):
        m.record(0, 0.01)
    assert m.best == 1


@pytest.mark.parametrize("algo", ["direct", "staged"])
def test_every_gather_family_algorithm(monkeypatch, algo):
    from comms.testing import ThreadWorld
    monkeypatch.setenv("TOPOCOMM_ALGO", ";".join(f"{c}:{algo}" for c in
                                                  ("broadcast", "allgather", "gather", "scatter")))
    n, count = 3, 100003
    idx = np.arange(count)
    allv = np.concatenate([value(q, idx) for q in range(n)]).astype(np.int32)
    with ThreadWorld(n) as w:
        def body(comm):
            r = comm.rank
            b = value(r, idx).astype(np.int32)
            comm.broadcast(b, root=1)
            ag = np.empty(n * count, np.int32)
            comm.allgather(value(r, idx).astype(np.int32), ag)
            inplace = np.zeros(n * count, np.int32)       # send is a view into recv
            inplace[r * count:(r + 1) * count] = value(r, idx)
            comm.allgather(inplace[r * count:(r + 1) * count], inplace)
            g = np.empty(n * count, np.int32) if r == 2 else None
            comm.gather(value(r, idx).astype(np.int32), g, root=2)
            s = np.empty(count, np.int32)
            comm.scatter(allv if r == 0 else None, s, root=0)
            return b, ag, inplace, g, s
        for r, (b, ag, inplace, g, s) in enumerate(w.run(body)):
            np.testing.assert_array_equal(b, value(1, idx))
            np.testing.assert_array_equal(ag, allv)
            np.testing.assert_array_equal(inplace, allv)
            if r == 2:
                np.testing.assert_array_equal(g, allv)
            np.testing.assert_array_equal(s, value(r, idx))


@pytest.mark.parametrize("coll", ["allreduce", "reduce", "allgather", "gather", "scatter",
                                  "reduce_scatter"])
@pytest.mark.parametrize("setup", ["direct", "nodirect", "hosts"])
@pytest.mark.parametrize("shift", [1, -3])
def test_partially_overlapping_buffers_give_the_right_result(coll, setup, shift):
    """send and recv that overlap other than in the supported in-place layout (views of one
    array, shifted by a few elements) give what separate buffers give: the send data is
    read from a copy. Found by review: every collective but all_to_all was wrong here."""
    from comms.testing import ThreadWorld
    n, per = 3, 30_011
    kw = {"hosts": "AAB"} if setup == "hosts" else {}
    if setup == "hosts" and coll in ("allgather", "gather", "scatter", "reduce_scatter"):
        pytest.skip("multi-host groups copy these aside on any overlap (already tested)")
    with ThreadWorld(n, **kw) as w:
        if setup == "nodirect":
            for c in w.comms:
                c.group.transport.direct, c.group.direct_mode = None, 0
                c.group.use_links()

        def body(c):
            r = c.rank
            big = np.zeros(2 * n * per + 16, np.float32)
            mid = n * per // 2 + 8                      # room for shifts both ways

            def view(start, count):
                return big[mid + start:mid + start + count]
            if coll in ("allreduce", "reduce"):
                buf, out = view(0, per), view(shift, per)
                buf[:] = np.arange(per) % 1000 + r
                sent = buf.copy()
                if coll == "allreduce":
                    c.allreduce(buf, out=out)
                else:
                    c.reduce(buf, root=1, out=out if r == 1 else None)
                return sent, out.copy()
            if coll in ("allgather", "gather"):
                send, recv = view(r * per + shift, per), view(0, n * per)
                send[:] = np.arange(per) + 100_000 * r
                sent = send.copy()
                if coll == "allgather":
                    c.allgather(send, recv)
                else:
                    c.gather(send, recv if r == 0 else None, root=0)
                return sent, recv.copy()
            if coll == "scatter":
                send, recv = view(0, n * per), view(shift, per)
                send[:] = np.arange(n * per)
                sent = send.copy()
                if r == 1:
                    c.scatter(send, recv, root=1)
                else:
                    recv = np.zeros(per, np.float32)
                    c.scatter(None, recv, root=1)
                return sent, recv.copy()
            send, recv = view(0, n * per), view(r * per + shift, per)     # reduce_scatter
            send[:] = np.arange(n * per) % 1000 + r
            sent = send.copy()
            c.reduce_scatter(send, recv)
            return sent, recv.copy()
        res = w.run(body)
    sents = [s for s, _ in res]
    for r, (_, got) in enumerate(res):
        if coll == "allreduce" or (coll == "reduce" and r == 1):
            exp = sum(sents)
        elif coll == "reduce":
            continue
        elif coll == "allgather" or (coll == "gather" and r == 0):
            exp = np.concatenate(sents)
        elif coll == "gather":
            continue
        elif coll == "scatter":
            exp = sents[1][r * per:(r + 1) * per]
        else:
            exp = sum(s[r * per:(r + 1) * per] for s in sents)
        np.testing.assert_array_equal(got, exp, err_msg=f"rank {r}")


@pytest.mark.parametrize("coll", ["allreduce", "reduce", "reduce_scatter"])
@pytest.mark.parametrize("count", [8, 100_002])          # the small path and the ring
@pytest.mark.parametrize("hosts", [None, "AAB"])
def test_float16_avg_does_not_overflow_where_the_mean_fits(coll, count, hosts):
    """float16 AVG: each rank's input is scaled by 1/size before the sum (as NCCL does for
    floats), so a mean that fits float16 comes out though the sum would overflow 65504."""
    from comms.testing import ThreadWorld
    n = 3
    count -= count % n
    with ThreadWorld(n, **({"hosts": hosts} if hosts else {})) as w:
        def body(c):
            x = np.full(count, 40000.0 + 1000 * c.rank, np.float16)
            keep = x.copy()
            if coll == "allreduce":
                c.allreduce(np.zeros(0, np.float16), op="avg")   # must not cache a fast path
                c.allreduce(x, op="avg")
                return x, keep
            if coll == "reduce":
                c.reduce(x, root=2, op="avg")
                return x, keep
            out = np.empty(count // n, np.float16)
            c.reduce_scatter(x, out, op="avg")
            return out, keep
        res = w.run(body)
    exp = np.float32(sum(np.float32(np.float16(1.0 / n)) * np.float32(40000 + 1000 * r)
                         for r in range(n)))
    for r, (got, keep) in enumerate(res):
        if coll == "reduce" and r != 2:
            np.testing.assert_array_equal(got, keep)      # non-roots keep their input
            continue
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got.astype(np.float32), exp, rtol=2e-3)

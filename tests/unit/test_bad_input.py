"""Bad input: a clear error naming the argument, on every rank, before data moves; the
group stays usable afterwards. A silent rank: an error within the timeout, no hang."""
import time

import numpy as np

import comms
import pytest

from comms import CommError, CommTimeoutError
from comms.kernels import native
from comms.testing import ThreadWorld


def errors(results):
    return [r if isinstance(r, BaseException) else None for r in results]


def still_works(w):
    n = w.size
    for got in w.run(lambda c: c.allreduce(np.ones(5000, np.float32))):
        np.testing.assert_array_equal(got, np.full(5000, n, np.float32))


@pytest.mark.parametrize("count0", [3, 50000])
def test_mismatched_sizes_raise_everywhere(worlds, count0):
    w = worlds(3)

    def body(c):
        x = np.ones(count0 if c.rank == 0 else count0 + 1, np.float32)
        keep = x.copy()
        try:
            c.allreduce(x)
        finally:
            np.testing.assert_array_equal(x, keep)  # nothing moved
    errs = errors(w.run(body, raise_errors=False))
    assert all(isinstance(e, ValueError) for e in errs), errs
    assert all("size" in str(e) for e in errs)
    still_works(w)


def test_mismatched_dtypes(worlds):
    w = worlds(2)
    errs = errors(w.run(lambda c: c.allreduce(np.ones(4, np.float32 if c.rank else np.float64)),
                        raise_errors=False))
    assert all(isinstance(e, ValueError) and "dtype" in str(e) for e in errs), errs
    still_works(w)


def test_one_rank_bad_argument_names_it_and_peers_raise(worlds):
    w = worlds(3)

    def body(c):
        x = np.ones((4, 4), np.float32)
        if c.rank == 1:
            x = x[:, ::2]  # not contiguous
        c.allreduce(x)
    errs = errors(w.run(body, raise_errors=False))
    assert isinstance(errs[1], ValueError) and "buf" in str(errs[1]) and "contiguous" in str(errs[1])
    assert "rank 1" in str(errs[0]) and "rank 1" in str(errs[2])
    still_works(w)


def test_unsupported_dtype_op(worlds):
    w = worlds(2)
    errs = errors(w.run(lambda c: c.allreduce(np.ones(3, np.float32), op="bxor"), raise_errors=False))
    assert all(isinstance(e, (TypeError, ValueError)) for e in errs)
    assert "op" in str(errs[0]) and "float32" in str(errs[0])
    errs = errors(w.run(lambda c: c.allreduce(np.ones(3, np.complex64)), raise_errors=False))
    assert isinstance(errs[0], TypeError) and "dtype" in str(errs[0])
    errs = errors(w.run(lambda c: c.allreduce(np.ones(3), op="median"), raise_errors=False))
    assert "op" in str(errs[0])
    still_works(w)


def test_out_of_range_root_and_peer(worlds):
    w = worlds(2)
    errs = errors(w.run(lambda c: c.broadcast(np.ones(3), root=5), raise_errors=False))
    assert all(isinstance(e, ValueError) and "root" in str(e) for e in errs)
    errs = errors(w.run(lambda c: c.send(np.ones(3), dst=7), raise_errors=False))
    assert all(isinstance(e, ValueError) and "dst" in str(e) for e in errs)
    still_works(w)


def test_mismatched_roots(worlds):
    w = worlds(2)
    errs = errors(w.run(lambda c: c.broadcast(np.ones(3), root=c.rank), raise_errors=False))
    assert all(isinstance(e, ValueError) and "root" in str(e) for e in errs), errs
    still_works(w)


def test_all_to_all_split_errors(worlds):
    w = worlds(3)
    # wrong number of counts
    errs = errors(w.run(lambda c: c.all_to_all(np.ones(6), np.ones(6), [2, 4], [2, 2, 2]),
                        raise_errors=False))
    assert "send_counts" in str(errs[0])
    # counts do not add up to the buffer
    errs = errors(w.run(lambda c: c.all_to_all(np.ones(6), np.ones(6), [1, 1, 1], [2, 2, 2]),
                        raise_errors=False))
    assert "send_counts" in str(errs[0]) and "sum" in str(errs[0])
    # counts consistent locally, but rank 0 sends 3 to rank 1 which expects 2

    def body(c):
        sc = [2, 3, 1] if c.rank == 0 else [2, 2, 2]
        c.all_to_all(np.ones(6), np.ones(6), sc, [2, 2, 2])
    errs = errors(w.run(body, raise_errors=False))
    assert all(isinstance(e, ValueError) and "split counts" in str(e) for e in errs), errs
    # uneven total without counts
    errs = errors(w.run(lambda c: c.all_to_all(np.ones(7), np.ones(7)), raise_errors=False))
    assert "send" in str(errs[0]) and "evenly" in str(errs[0])
    still_works(w)


def test_size_relations_are_checked(worlds):
    w = worlds(2)
    errs = errors(w.run(lambda c: c.allgather(np.ones(3), np.ones(5)), raise_errors=False))
    assert "recv" in str(errs[0])
    errs = errors(w.run(lambda c: c.reduce_scatter(np.ones(5), np.ones(3)), raise_errors=False))
    assert "send" in str(errs[0])
    errs = errors(w.run(lambda c: c.allreduce(np.ones(3), out=np.ones(4)), raise_errors=False))
    assert "out" in str(errs[0])
    errs = errors(w.run(lambda c: c.allreduce(np.ones(3), out=np.ones(3, np.float32)),
                        raise_errors=False))
    assert "out" in str(errs[0])
    errs = errors(w.run(lambda c: c.recv(np.ones(3), src=c.rank), raise_errors=False))
    assert "src" in str(errs[0])
    still_works(w)


def test_recv_size_mismatch_is_an_error():
    def body(c):
        if c.rank == 0:
            c.send(np.ones(4), 1, tag=1)
        else:
            c.recv(np.ones(5), 0, tag=1)
    w2 = ThreadWorld(2, timeout=5)
    try:
        errs = errors(w2.run(body, raise_errors=False))
        # the pair is out of step: a bad argument (ValueError) that breaks the group (CommError)
        assert isinstance(errs[1], comms.MessageMismatch) and "bytes" in str(errs[1])
        assert isinstance(errs[1], ValueError) and isinstance(errs[1], comms.CommError)
    finally:
        w2.close()


@pytest.mark.parametrize("hosts", [None, "AB"])
def test_send_recv_tags_are_c_ints_everywhere(hosts, monkeypatch):
    """Tags are checked the same on one host and across hosts (found by review: across hosts
    2**32 + 7 was cut to 32 bits and matched a recv of tag 7)."""
    monkeypatch.setenv("TOPOCOMM_SOCKET_IFNAME", "lo")
    with ThreadWorld(2, timeout=5, hosts=hosts) as w:
        for bad in (2 ** 32 + 7, 2 ** 31, -(2 ** 31) - 1):
            errs = errors(w.run(lambda c: c.send(np.ones(2), 1 - c.rank, tag=bad),
                                raise_errors=False))
            assert all(isinstance(e, ValueError) and "tag" in str(e) for e in errs), errs
        errs = errors(w.run(lambda c: c.send(np.ones(2), 1 - c.rank, tag=1.5),
                            raise_errors=False))
        assert all(isinstance(e, TypeError) and "tag" in str(e) for e in errs), errs

        def pair(c):
            x = np.full(2, c.rank, np.float64)
            for tag in (-(2 ** 31), 2 ** 31 - 1, np.int64(5)):
                if c.rank == 0:
                    c.send(x, 1, tag=tag)
                else:
                    c.recv(x, 0, tag=tag)
            return x
        assert w.run(pair)[1].tolist() == [0.0, 0.0]


def test_silent_rank_gives_timeout_not_hang():
    with ThreadWorld(3, timeout=1.0 if native.is_native else 3.0) as w:
        t0 = time.monotonic()

        def body(c):
            if c.rank == 2:
                return None  # never arrives
            c.allreduce(np.ones(100000, np.float32))
        errs = errors(w.run(body, raise_errors=False))
        assert time.monotonic() - t0 < 10
        assert isinstance(errs[0], CommTimeoutError) and "rank 2" in str(errs[0])
        assert isinstance(errs[1], CommError)
        # the group is broken: later calls fail fast with the reason
        errs = errors(w.run(lambda c: c.barrier() if c.rank < 2 else None, raise_errors=False))
        assert isinstance(errs[0], CommError) and "broken" in str(errs[0])


def test_all_to_all_even_vs_counts_and_size_mismatch(worlds):
    w = worlds(2)
    # one rank passes counts, the other relies on the even split: an error, not a hang

    def body(c):
        if c.rank == 0:
            c.all_to_all(np.ones(4), np.ones(4), [2, 2], [2, 2])
        else:
            c.all_to_all(np.ones(4), np.ones(4))
    errs = errors(w.run(body, raise_errors=False))
    assert all(isinstance(e, ValueError) and "split mode" in str(e) for e in errs), errs
    # even split with different sizes on the two ranks
    errs = errors(w.run(lambda c: c.all_to_all(np.ones(4 + 2 * c.rank), np.ones(4 + 2 * c.rank)),
                        raise_errors=False))
    assert all(isinstance(e, ValueError) and "size" in str(e) for e in errs), errs
    still_works(w)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_all_to_all_fast_path_still_checks_every_rank(worlds, kind):
    """After a (type, dtype, size) took the one-call path, a rank that changes its size or
    dtype still makes every rank raise before data moves."""
    w = worlds(3)
    if kind == "torch":
        torch = pytest.importorskip("torch")
        make = lambda n, r, dt=torch.float32: torch.arange(n, dtype=dt) + 100 * r  # noqa: E731
        f64 = torch.float64
    else:
        make = lambda n, r, dt=np.float32: (np.arange(n) + 100 * r).astype(dt)  # noqa: E731
        f64 = np.float64

    def good(c):
        out = make(12, 0) * 0
        for _ in range(3):  # first call checks, later ones take the fast path
            c.all_to_all(make(12, c.rank), out)
        return out
    for r, out in enumerate(w.run(good)):
        want = np.concatenate([np.arange(4) + 4 * r + 100 * p for p in range(3)])
        np.testing.assert_array_equal(np.asarray(out), want)

    def bad_size(c):
        n = 15 if c.rank == 1 else 12
        return c.all_to_all(make(n, c.rank), make(n, 0))
    errs = errors(w.run(bad_size, raise_errors=False))
    assert all(isinstance(e, ValueError) for e in errs), errs

    def bad_dtype(c):
        dt = f64 if c.rank == 2 else None
        x = make(12, c.rank, dt) if dt is not None else make(12, c.rank)
        return c.all_to_all(x, x * 0)
    errs = errors(w.run(bad_dtype, raise_errors=False))
    assert all(isinstance(e, ValueError) for e in errs), errs
    assert any("dtype" in str(e) for e in errs)
    still_works(w)


def test_topocomm_cma_setting_and_yama(tmp_path):
    """TOPOCOMM_CMA: auto (default) or 0; anything else names the variable. Under Yama
    ptrace_scope 1 a rank declares any process may read it (PR_SET_PTRACER_ANY); other
    scopes, or no Yama, leave it alone."""
    from comms.transport import shm
    assert shm.cma_wanted({}) and shm.cma_wanted({"TOPOCOMM_CMA": "auto"})
    assert not shm.cma_wanted({"TOPOCOMM_CMA": "0"}) and not shm.cma_wanted({"TOPOCOMM_CMA": "off"})
    with pytest.raises(ValueError, match="TOPOCOMM_CMA"):
        shm.cma_wanted({"TOPOCOMM_CMA": "maybe"})
    calls = []

    def prctl(*args):
        calls.append(args)
        return 0
    scope = tmp_path / "ptrace_scope"
    for value, declared in (("0\n", False), ("1\n", True), ("2\n", False), ("3\n", False)):
        scope.write_text(value)
        assert shm.allow_peer_reads(str(scope), prctl) is declared
    assert calls == [(shm.PR_SET_PTRACER, shm.PR_SET_PTRACER_ANY, 0, 0, 0)]
    assert shm.allow_peer_reads(str(tmp_path / "no-yama"), prctl) is False and len(calls) == 1
    # the real prctl on this kernel: declares under scope 1, else a harmless no-op
    shm.allow_peer_reads()
    # per group: the last group to close takes the declaration back (PR_SET_PTRACER 0)
    calls.clear()
    scope.write_text("1\n")
    assert shm.hold_peer_reads(str(scope), prctl) and shm.hold_peer_reads(str(scope), prctl)
    shm.release_peer_reads(prctl)
    assert calls == [(shm.PR_SET_PTRACER, shm.PR_SET_PTRACER_ANY, 0, 0, 0)] * 2
    shm.release_peer_reads(prctl)
    assert calls[-1] == (shm.PR_SET_PTRACER, 0, 0, 0, 0) and len(calls) == 3
    scope.write_text("0\n")
    assert not shm.hold_peer_reads(str(scope), prctl) and len(calls) == 3


def test_all_to_all_of_non_arrays_on_one_rank_raises_everywhere():
    """send/recv that are not arrays (None, lists) on one rank: a TypeError naming `send` there,
    ArgumentMismatch on the others at once (found by review: the fast path read .dtype first
    and the others waited for the timeout), and the group stays usable."""
    with ThreadWorld(3) as w:
        def body(c):
            s = np.ones(30, np.float32)
            o = np.empty_like(s)
            c.all_to_all(s, o)                       # a one-call entry exists for this size
            if c.rank == 1:
                s = o = None
            t0 = time.monotonic()
            try:
                c.all_to_all(s, o)
                err = None
            except Exception as e:
                err = (type(e).__name__, str(e))
            took = time.monotonic() - t0
            x = np.ones(3, np.float32)
            c.allreduce(x)
            return err, took, float(x[0])
        res = w.run(body)
    for r, (err, took, total) in enumerate(res):
        assert err is not None and took < 5, (r, err, took)
        assert (err[0] == "TypeError" and "send" in err[1]) if r == 1 else "rejected" in err[1]
        assert total == 3.0


def test_a_rank_failing_late_in_creation_fails_its_peers_at_once(monkeypatch):
    """A rank that fails after the last exchange of group creation tells its peers: they
    raise CommError at creation (and close their side) instead of holding a group whose
    first collective waits for the timeout (found by review)."""
    from comms.api.host import HostGroup
    real = HostGroup.use_links

    def flaky(self, link=None):
        if self.rank == 1:
            raise RuntimeError("no selector here")
        return real(self, link)
    monkeypatch.setattr(HostGroup, "use_links", flaky)
    with pytest.raises(CommError, match="rank 1 failed to create group.*no selector here"):
        ThreadWorld(2, timeout=20.0)

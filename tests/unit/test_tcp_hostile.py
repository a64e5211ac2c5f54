"""Hostile bytes on the TCP data connections (comms/transport/tcp.py, native/src/tcp.c and its
twin comms/kernels/reference_tcp.py): strangers at set-up, truncated frames, oversized
lengths, wrong tags and sizes, random garbage. Expected: a clear CommError on the rank
concerned within the timeout, nothing written outside (or, before the header checks out,
inside) the user's buffer, no socket or thread left behind. Bounded random, fixed seeds."""
import errno
import os
import random
import socket
import struct
import threading
import time

import numpy as np
import pytest

from comms.core.errors import CommError, CommTimeoutError, MessageMismatch, PeerDeadError
from comms.core.status import Status
from comms.core.store import HashStore
from comms.kernels import reference_tcp
from comms.transport import tcp as T

pytestmark = pytest.mark.timeout(120)

try:
    from comms.kernels import _native
except ImportError:   # not built: the twin is tested alone
    _native = None

IMPLS = [pytest.param(reference_tcp, id="numpy-twin"),
         pytest.param(_native, id="C", marks=pytest.mark.skipif(_native is None,
                                                                 reason="C helpers not built"))]
HDR = struct.Struct("<IIQQ")
MAGIC = 0x54434D31
GUARD = 64
FILL = 0xAB


def frame(tag, nbytes, payload=b"", magic=MAGIC):
    return HDR.pack(magic, 0, tag, nbytes) + payload


def tcp_pair():
    """(receiver, attacker): a connected loopback TCP pair, the receiver non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    b.setblocking(False)
    return b, a


def open_fds():
    """The sockets this process holds (by inode: a number reused by the directory listing
    itself, or by another file, does not count)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:   # the listing's own descriptor, closed meanwhile
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


class Guarded:
    """A user buffer of n bytes with guard bytes either side, all filled with FILL."""

    def __init__(self, n):
        self.n = n
        self.mem = np.full(n + 2 * GUARD, FILL, np.uint8)
        self.addr = self.mem.ctypes.data + GUARD

    def guards_intact(self):
        return bool((self.mem[:GUARD] == FILL).all() and (self.mem[GUARD + self.n:] == FILL).all())

    def untouched(self):
        return bool((self.mem == FILL).all())


def recv_one(impl, data, n, tag, close, timeout=0.5):
    """The receiver expects one frame (tag, n bytes); the attacker sends `data`, then closes
    its socket or stays silent. Returns (status tuple, Guarded, seconds)."""
    rx, tx = tcp_pair()
    buf = Guarded(n)
    try:
        tx.sendall(data)
        if close:
            tx.close()
        t0 = time.monotonic()
        res = impl.tcp_exchange([(rx.fileno(), 1, buf.addr, n, tag)], timeout, ())
        return res, buf, time.monotonic() - t0
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_each_kind_of_bad_frame(impl):
    n, tag = 1000, (5 << 32) | 3
    payload = bytes(range(256)) * 4
    # a good frame, for reference
    (st, *_), buf, _ = recv_one(impl, frame(tag, n, payload[:n]), n, tag, close=False)
    assert st == Status.OK and bytes(buf.mem[GUARD:GUARD + n]) == payload[:n] and buf.guards_intact()
    cases = [
        # (bytes, closes, expected status, buffer must be untouched, errno)
        (frame(tag, n, payload[:n], magic=0xDEADBEEF), False, Status.MISMATCH, True, errno.EPROTO),
        (frame(tag + 1, n, payload[:n]), False, Status.MISMATCH, True, 0),       # wrong tag/step
        (frame(tag, n + 1, payload[:n + 1]), False, Status.MISMATCH, True, 0),   # one byte more
        (frame(tag, n - 1, payload[:n - 1]), False, Status.MISMATCH, True, 0),   # one byte less
        (frame(tag, 2**64 - 1), False, Status.MISMATCH, True, 0),                # oversized
        (frame(tag, 2**63 + n), False, Status.MISMATCH, True, 0),
        (frame(tag, 0), False, Status.MISMATCH, True, 0),
        (frame(tag, n)[:13], True, Status.CLOSED, True, 0),                       # truncated header
        (frame(tag, n, payload[:n // 2]), True, Status.CLOSED, False, 0),         # truncated payload
        (b"", True, Status.CLOSED, True, 0),
    ]
    for data, closes, want, untouched, want_err in cases:
        (st, idx, err, got_tag, got_nbytes), buf, took = recv_one(impl, data, n, tag, closes)
        assert st == want, (data[:24], st)
        assert idx == 0 and took < 5
        assert buf.guards_intact(), data[:24]
        if untouched:
            assert buf.untouched(), data[:24]
        if want == Status.MISMATCH:
            assert err == want_err
            if not want_err:
                _m, _f, t, nb = HDR.unpack(data[:24])
                assert (got_tag, got_nbytes) == (t, nb)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_stalled_frame_times_out(impl):
    n, tag = 4096, 9
    for data in (b"", frame(tag, n)[:10], frame(tag, n, b"x" * 100)):
        (st, idx, *_), buf, took = recv_one(impl, data, n, tag, close=False, timeout=0.3)
        assert st == Status.TIMEOUT and idx == 0 and 0.25 < took < 10, (data[:24], st, took)
        assert buf.guards_intact()


@pytest.mark.parametrize("impl", IMPLS)
def test_fuzz_random_streams(impl):
    """Random bytes, random headers (random magic, tag, length) and truncations of good
    frames: the receiver ends within its timeout with a status, the guards are intact, and
    a payload byte is written only after a header that matches."""
    rng = random.Random(4321)
    n, tag = 300, (77 << 32) | 1
    good = frame(tag, n, bytes(rng.randrange(256) for _ in range(n)))
    t_end = time.monotonic() + 8
    runs = 0
    while runs < 150 and time.monotonic() < t_end:
        kind = rng.randrange(4)
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 400))
        elif kind == 1:
            data = HDR.pack(rng.choice([MAGIC, rng.getrandbits(32)]), rng.getrandbits(32),
                            rng.choice([tag, rng.getrandbits(64)]),
                            rng.choice([n, rng.getrandbits(64), rng.randrange(0, 2 * n)]))
            data += rng.randbytes(rng.randrange(0, 2 * n))
        elif kind == 2:
            data = good[:rng.randrange(0, len(good))]
        else:
            data = good + rng.randbytes(rng.randrange(0, 50))   # trailing bytes: not ours to read
        closes = rng.random() < 0.7
        (st, *_), buf, took = recv_one(impl, data, n, tag, closes, timeout=0.2)
        assert st in (Status.OK, Status.MISMATCH, Status.CLOSED, Status.TIMEOUT), st
        assert buf.guards_intact() and took < 5
        # the flags word is not checked: magic, tag and length are
        header_ok = len(data) >= 24 and HDR.unpack(data[:24])[::2] == (MAGIC, tag) and \
            HDR.unpack(data[:24])[3] == n
        if not header_ok:
            assert buf.untouched(), data[:24]
        if st == Status.OK:
            assert header_ok and bytes(buf.mem[GUARD:GUARD + n]) == data[24:24 + n]
        runs += 1
    assert runs >= 30


@pytest.mark.parametrize("impl", IMPLS)
def test_sending_to_a_closed_peer_is_an_error_not_a_signal(impl):
    rx, tx = tcp_pair()
    rx.close()   # the receiver is gone: the sender gets EPIPE / ECONNRESET, never SIGPIPE
    tx.setblocking(False)
    src = np.ones(1 << 20, np.uint8)
    st, idx, err, *_ = impl.tcp_exchange([(tx.fileno(), 0, src.ctypes.data, src.nbytes, 1)], 2.0, ())
    tx.close()
    assert st in (Status.CLOSED, Status.ERRNO) and idx == 0, (st, err)


# ---- the mesh: set-up and exchange over real TcpMesh objects ----------------------------
def make_meshes(store, prefix, strangers=(), timeout=10.0, num_streams=1):
    """Ranks 0 and 1, each on its own 'host'; `strangers` connect to rank 0's listener
    before rank 1 does. Returns ([mesh0, mesh1], stranger sockets)."""
    meshes, errs = [None, None], []

    def build(r):
        try:
            meshes[r] = T.TcpMesh(r, 2, store, prefix, [1 - r], timeout, address="127.0.0.1",
                                  num_streams=num_streams)
        except BaseException as exc:   # reported by the caller
            errs.append(exc)

    t0 = threading.Thread(target=build, args=(0,))
    t0.start()
    host, _, port = bytes(store.get(f"{prefix}/tcp/addr/0")).decode().rpartition(":")
    socks = []
    for data in strangers:
        sk = socket.create_connection((host, int(port)), timeout=5)
        if data:
            sk.sendall(data)
        socks.append(sk)
    t1 = threading.Thread(target=build, args=(1,))
    t1.start()
    t0.join(timeout + 10)
    t1.join(timeout + 10)
    assert not t0.is_alive() and not t1.is_alive(), "TcpMesh set-up did not finish"
    if errs:
        raise errs[0]
    return meshes, socks


def closed_by_peer(sk, wait_s=5.0):
    sk.settimeout(wait_s)
    try:
        return sk.recv(16) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_strangers_at_set_up_are_refused_and_do_not_delay_the_group():
    """Silent strangers, wrong magic, wrong secret, a good-looking hello for a rank that is
    not expected, a half hello: all closed unanswered, while the group connects at once."""
    store = HashStore(30)
    before = open_fds()
    secretless = T._HELLO.pack(T._MAGIC, b"\0" * 32, 1, 0)
    strangers = [b"", b"", b"GET / HTTP/1.0\r\n\r\n" + b"x" * 40,
                 T._HELLO.pack(b"NOTOURS!", b"\0" * 32, 1, 0), secretless,
                 T._HELLO.pack(T._MAGIC, b"\0" * 32, 7, 0), secretless[:20],
                 b"\xff" * T._HELLO.size]
    t0 = time.monotonic()
    (m0, m1), socks = make_meshes(store, "g1", strangers)
    took = time.monotonic() - t0
    try:
        assert took < 4, took   # two silent strangers did not cost a hello wait each
        # every stranger is closed unanswered (refused, or still queued when the listener
        # closed at the end of set-up)
        for sk in socks:
            assert closed_by_peer(sk), "a stranger was answered"
        assert 0 < m0.refused <= len(strangers)
        # the group works
        nat = reference_tcp
        a = np.arange(100, dtype=np.int64)
        b = np.zeros(100, np.int64)
        done = []
        t = threading.Thread(target=lambda: done.append(
            m1.exchange(nat, [(0, False, a.ctypes.data, a.nbytes, 5)])))
        t.start()
        m0.exchange(nat, [(1, True, b.ctypes.data, b.nbytes, 5)])
        t.join(10)
        assert done and (b == a).all()
    finally:
        for sk in socks:
            sk.close()
        m0.close()
        m1.close()
    assert open_fds() - before == set()


def test_silent_strangers_time_out_set_up_only_when_the_peer_never_comes():
    store = HashStore(30)
    before = open_fds()
    mesh = []
    errs = []

    def build():
        try:
            mesh.append(T.TcpMesh(0, 2, store, "g2", [1], 0.6, address="127.0.0.1"))
        except CommError as exc:
            errs.append(exc)
    t = threading.Thread(target=build)
    t.start()
    host, _, port = bytes(store.get("g2/tcp/addr/0")).decode().rpartition(":")
    sk = socket.create_connection((host, int(port)), timeout=5)
    t.join(15)
    sk.close()
    assert not t.is_alive() and not mesh
    assert isinstance(errs[0], CommTimeoutError) and "[1]" in str(errs[0])
    assert open_fds() - before == set()


@pytest.mark.parametrize("impl", IMPLS)
def test_hostile_peer_frames_over_a_mesh(impl):
    """Rank 1's socket carries hostile bytes instead of its frames: rank 0's exchange raises
    MessageMismatch (a frame of another tag or size), CommError (not a frame),
    PeerDeadError (truncated, then closed) or CommTimeoutError (truncated, then silent),
    naming rank 1, with rank 0's buffer unwritten where the header was wrong."""
    store = HashStore(30)
    before = open_fds()
    n, tag = 512, (3 << 32) | 2
    cases = [
        (frame(tag + 1, n, b"\0" * n), False, MessageMismatch, "tag"),
        (frame(tag, n * 1000), False, MessageMismatch, "bytes"),
        (frame(tag, 2**64 - 1), False, MessageMismatch, "bytes"),
        (frame(tag, n, b"z" * n, magic=1), False, CommError, "not a topocomm frame"),
        (frame(tag, n, b"z" * 10), True, PeerDeadError, "closed"),
        (frame(tag, n)[:7], False, CommTimeoutError, "did not respond"),
    ]
    for i, (data, closes, want, words) in enumerate(cases):
        (m0, m1), _ = make_meshes(store, f"h{i}", timeout=0.5)
        try:
            buf = Guarded(n)
            sk = socket.socket(fileno=os.dup(m1.fds[0][0]))
            sk.setblocking(True)
            sk.sendall(data)
            if closes:
                m1.abort()
            sk.close()
            t0 = time.monotonic()
            with pytest.raises(CommError) as info:
                m0.exchange(impl, [(1, True, buf.addr, n, tag)], what="a test")
            assert type(info.value) is want, info.value
            assert "rank 1" in str(info.value) and words in str(info.value), info.value
            assert time.monotonic() - t0 < 5
            assert buf.guards_intact()
            if want is not PeerDeadError:
                assert buf.untouched()
        finally:
            m0.close()
            m1.close()
    assert open_fds() - before == set()

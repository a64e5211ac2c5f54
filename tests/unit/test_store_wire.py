"""The TCPStore server against strangers: random bytes, truncated and oversized frames,
unknown commands and pickle payloads from sockets that are not a store client, while a
legitimate client keeps working. The server must never unpickle or evaluate what it gets,
must refuse a bad frame with one log line and a closed connection, and must leave no thread
behind when it stops."""
import logging
import os
import pickle
import random
import socket
import struct
import threading
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comms.core import store as S
from comms.core.store import StoreTimeout, TCPStore

pytestmark = pytest.mark.timeout(120)

LOGGER = "topocomm"


class Evil:
    """Unpickling this creates a directory: the proof that someone ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def frame(cmd, key, value=b""):
    if isinstance(key, str):
        key = key.encode()
    return struct.pack("!BII", cmd, len(key), len(value)) + key + value


def stranger(port, data, *, half_close=True, wait_close=2.0):
    """Connect, send `data`, optionally half-close; then whether the server closed the
    connection within `wait_close` seconds (reading and dropping any replies)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sk:
        try:
            if data:
                sk.sendall(data)
            if half_close:
                sk.shutdown(socket.SHUT_WR)
        except OSError:
            return True   # the server closed it while we sent
        sk.settimeout(wait_close)
        try:
            while sk.recv(65536):
                pass
            return True
        except socket.timeout:
            return False
        except OSError:
            return True


def check_client(client, n):
    client.set(f"legit/{n}", f"v{n}".encode())
    assert client.get(f"legit/{n}") == f"v{n}".encode()
    assert client.add("legit/count", 1) == n + 1


def refused_lines(caplog):
    return [r for r in caplog.records
            if r.name == LOGGER and "refused a frame" in r.getMessage()]


def leaked_threads(before, wait_s=20.0):
    """Threads started since `before` still alive after a bounded wait: close() bounds each
    of its joins, so on a loaded machine a finishing thread may need a moment more."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
        if not left or time.monotonic() >= deadline:
            return left
        left[0].join(timeout=0.05)


@pytest.fixture
def server():
    before = set(threading.enumerate())
    srv = TCPStore("127.0.0.1", 0, True, timeout=5.0)
    yield srv
    srv.close()
    assert not leaked_threads(before)


def test_round_trip_and_limits(server):
    client = TCPStore("127.0.0.1", server.port, False, timeout=0.5)
    client.set("k", "text")
    client.set("b", b"\x00\xff" * 10)
    assert server.get("k") == b"text" and client.get("b") == b"\x00\xff" * 10
    assert client.add("n", 5) == 5 and server.add("n", -7) == -2
    assert client.add("n", 0) == -2
    t0 = time.monotonic()
    with pytest.raises(StoreTimeout):
        client.get("missing")
    assert 0.4 < time.monotonic() - t0 < 5
    assert client.get("k") == b"text"          # the connection survived the timeout reply
    client.set("not-int", b"x")
    with pytest.raises(RuntimeError, match="ValueError"):
        client.add("not-int", 1)
    with pytest.raises(ValueError, match="key of"):
        client.set("k" * (S.MAX_KEY_BYTES + 1), b"")
    with pytest.raises(ValueError, match="value of"):
        client.set("k", bytes(S.MAX_VALUE_BYTES + 1))
    with pytest.raises(OverflowError):
        client.add("n", 1 << 63)
    assert client.get("k") == b"text"
    client.close()


BAD_FRAMES = {
    "unknown command": frame(9, "k", b"v"),
    "old pickle format": None,   # filled in the test: 4-byte length + pickle
    "oversized key": struct.pack("!BII", S.SET, S.MAX_KEY_BYTES + 1, 0),
    "oversized value": struct.pack("!BII", S.SET, 1, 0xFFFFFFFF) + b"k",
    "GET with a 3-byte value": frame(S.GET, "k", b"abc"),
    "ADD with a pickle": None,
    "key not UTF-8": frame(S.SET, b"\xff\xfe", b"v"),
    "truncated header": frame(S.SET, "key", b"value")[:5],
    "truncated value": frame(S.SET, "key", b"value")[:-2],
}


@pytest.mark.parametrize("what", sorted(BAD_FRAMES))
def test_a_bad_frame_is_refused_with_one_line_and_the_group_goes_on(server, caplog, tmp_path,
                                                                   what):
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(Evil(marker))
    data = {"old pickle format": struct.pack("!I", len(payload)) + payload,
            "ADD with a pickle": frame(S.ADD, "n", payload)}.get(what, BAD_FRAMES[what])
    client = TCPStore("127.0.0.1", server.port, False, timeout=2.0)
    check_client(client, 0)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert stranger(server.port, data), "the server kept a bad connection open"
    deadline = time.monotonic() + 5
    while not refused_lines(caplog) and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = refused_lines(caplog)
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert len(lines[0].getMessage().splitlines()) == 1
    assert not os.path.exists(marker)
    check_client(client, 1)
    client.close()


def test_pickle_values_are_stored_as_bytes_never_run(server, tmp_path):
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(Evil(marker))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sk:
        sk.sendall(frame(S.SET, "evil", payload))
        status, size = struct.unpack("!BI", sk.recv(5))
        assert (status, size) == (S.OK, 0)
    client = TCPStore("127.0.0.1", server.port, False, timeout=2.0)
    assert client.get("evil") == payload
    assert not os.path.exists(marker)
    client.close()


def test_a_frame_left_unfinished_is_refused_after_the_frame_timeout(server, caplog,
                                                                     monkeypatch):
    monkeypatch.setattr(S, "FRAME_TIMEOUT_S", 0.3)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    t0 = time.monotonic()
    assert stranger(server.port, frame(S.SET, "key", b"value")[:7], half_close=False,
                    wait_close=5.0)
    assert time.monotonic() - t0 < 3
    assert len(refused_lines(caplog)) == 1


def test_a_claimed_length_is_not_allocated_before_it_arrives(server):
    """A frame claiming MAX_VALUE_BYTES that sends 10 bytes costs the server about 10 bytes."""
    head = struct.pack("!BII", S.SET, 1, S.MAX_VALUE_BYTES) + b"k" + b"0123456789"
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sk:
            sk.sendall(head)
            time.sleep(0.3)
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < S.MAX_VALUE_BYTES // 8, peak


def test_fuzz_strangers_never_break_the_server_or_leak_threads(tmp_path, caplog):
    """Random bytes, random frames with random lengths, truncations and pickle payloads from
    stranger sockets (some left open, some closed mid-frame, some blocked in a GET),
    interleaved with a legitimate client; then stop() leaves no thread behind."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    before = set(threading.enumerate())
    srv = TCPStore("127.0.0.1", 0, True, timeout=60.0)   # GETs without a wait block 60 s
    client = TCPStore("127.0.0.1", srv.port, False, timeout=5.0)
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(Evil(marker))
    kept = []   # strangers left connected when the server stops
    count = [0]

    frames = st.one_of(
        st.binary(max_size=64),
        st.builds(lambda c, k, v: frame(c, k, v), st.integers(0, 255),
                  st.binary(max_size=16), st.binary(max_size=16)),
        st.builds(lambda c, kl, vl, tail: struct.pack("!BII", c, kl, vl) + tail,
                  st.sampled_from([S.SET, S.GET, S.ADD]), st.integers(0, 2**32 - 1),
                  st.integers(0, 2**32 - 1), st.binary(max_size=32)),
        st.builds(lambda cut: frame(S.SET, "p", payload)[:cut], st.integers(0, 40)),
        st.just(struct.pack("!I", len(payload)) + payload),
        st.just(frame(S.GET, "never-set")),   # blocks in the server until stop()
    )

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(data=frames, keep_open=st.booleans())
    def attack(data, keep_open):
        if keep_open and len(kept) < 8:
            sk = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            try:
                sk.sendall(data)
            except OSError:
                pass
            kept.append(sk)
        else:
            stranger(srv.port, data, wait_close=0.05)
        check_client(client, count[0])
        count[0] += 1

    try:
        attack()
        # and plain random garbage, a bounded number of times
        rng = random.Random(1234)
        for _ in range(40):
            stranger(srv.port, rng.randbytes(rng.randrange(1, 200)), wait_close=0.05)
            check_client(client, count[0])
            count[0] += 1
        assert not os.path.exists(marker)
    finally:
        client.close()
        t0 = time.monotonic()
        srv.close()
        took = time.monotonic() - t0
        for sk in kept:
            sk.close()
    assert took < 5, took
    leaked = leaked_threads(before)
    assert not leaked, leaked
    assert refused_lines(caplog)   # the bad frames were reported


def test_stop_ends_a_thread_blocked_in_get_and_frees_the_port():
    before = set(threading.enumerate())
    srv = TCPStore("127.0.0.1", 0, True, timeout=60.0)
    port = srv.port
    waiter = TCPStore("127.0.0.1", port, False, timeout=60.0)
    got = []
    t = threading.Thread(target=lambda: got.append(_try_get(waiter, "never")), daemon=True)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 5
    t.join(5)
    assert not t.is_alive() and got and isinstance(got[0], OSError)
    waiter.close()
    leaked = leaked_threads(before)
    assert not leaked, leaked
    again = TCPStore("127.0.0.1", port, True, timeout=1.0)   # the port is free again
    again.close()


def _try_get(store, key):
    try:
        return store.get(key)
    except Exception as exc:  # noqa: BLE001 - returned for the test to look at
        return exc

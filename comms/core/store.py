"""Key-value stores for rendezvous, with the torch Store's interface:
set(key, bytes), get(key) -> bytes (blocks until the key exists, up to the timeout),
add(key, int) -> int. A torch.distributed Store can be used wherever these are.

    HashStore   in-process (threads transport, tests; the server's table)
    TCPStore    rank 0 serves, every rank connects; used by comms.init() unless a launcher
                already serves a store (torchrun's agent store)

TCPStore wire format: plain framed bytes; nothing received is ever unpickled or evaluated,
and a frame can only name one of the three commands below.

    request  command (1 byte) | key length (4) | value length (4) | key (UTF-8) | value
    reply    status (1 byte)  | body length (4) | body
    (lengths are unsigned big-endian)

    command  key, value                                  reply body when OK
    SET  1   the key, the bytes to store                 empty
    GET  2   the key, the wait in milliseconds as 8      the value; TIMEOUT when the key was
             bytes unsigned (empty: the server's timeout)  not set within the wait
    ADD  3   the key, the amount as 8 bytes signed       the new value, 8 bytes signed
    status   OK 0, TIMEOUT 1, ERROR 2 (the body is a UTF-8 message; the connection stays)

Keys are at most MAX_KEY_BYTES, values MAX_VALUE_BYTES. The server refuses a frame that
breaks the format (unknown command, a length above its bound, a key that is not UTF-8, a
GET or ADD value of the wrong size, a frame not finished within FRAME_TIMEOUT_S or cut off
by the peer): it logs one line on the "topocomm" logger, closes that connection and goes on
serving the others. Lengths are checked before anything is read into memory, and a frame
is buffered as its bytes arrive, so a false length costs nothing.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time

from comms.core.errors import CommError, CommTimeoutError

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 16 << 20
# the rest of a frame must arrive within this many seconds of its first byte
FRAME_TIMEOUT_S = 60.0
# a client waits this much longer than a GET's own wait for the reply
_REPLY_MARGIN_S = 30.0
# a stopping server waits at most this long for its threads to end
_JOIN_S = 2.0

SET, GET, ADD = 1, 2, 3
OK, TIMEOUT, ERROR = 0, 1, 2
_COMMANDS = {SET: "set", GET: "get", ADD: "add"}
_REQUEST = struct.Struct("!BII")
_REPLY = struct.Struct("!BI")
_I64 = struct.Struct("!q")
_U64 = struct.Struct("!Q")
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_MAX_REPLY_BYTES = MAX_VALUE_BYTES + 65536
_CHUNK = 1 << 16

_log = logging.getLogger("topocomm")


class StoreTimeout(CommTimeoutError):
    """A key did not appear within the store's timeout: during group creation, a rank that
    died or never started. A CommError (and a TimeoutError), like every peer failure."""


class _StoreShut(CommError):
    """The store stopped while a get waited on it (the server is stopping)."""


def everyones(store, key, rank, size, value=b"1") -> list:
    """Set `key`/rank to value, then read `key`/q of every rank q (each read blocks until it
    is set, up to the store's timeout): every rank's value, in rank order."""
    store.set(f"{key}/{rank}", value)
    return [bytes(store.get(f"{key}/{q}")) for q in range(size)]


def has_key(store, key) -> bool | None:
    """Whether `key` is set, without waiting: True / False, or None when the store cannot
    tell (it has no check: our stores and torch's have)."""
    check = getattr(store, "check", None)
    if check is None:
        return None
    return bool(check([key]))


class WatchedStore:
    """A store whose get waits in short polls (has_key) and calls `watch()` between them:
    during group creation `watch` raises as soon as a peer that already said who it is has
    died, instead of each get waiting out the store's whole timeout (a rank SIGKILLed while
    the group is made). Stores that cannot check keys are waited on as they are."""

    POLL_MAX_S = 0.05

    def __init__(self, store, watch, timeout: float):
        self.store, self.watch, self.timeout = store, watch, float(timeout)

    def set(self, key, value):
        self.store.set(key, value)

    def add(self, key, amount):
        return self.store.add(key, amount)

    def check(self, keys) -> bool:
        return all(has_key(self.store, k) for k in keys)

    def get(self, key):
        if has_key(self.store, key) is None:
            return self.store.get(key)
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while not has_key(self.store, key):
            self.watch()
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreTimeout(f"store: key {key!r} not set within {self.timeout:g}s "
                                   "(a rank died or never started)")
            time.sleep(min(delay, left))
            delay = min(delay * 2, self.POLL_MAX_S)
        return self.store.get(key)


class HashStore:
    """An in-process store: a dict under a condition variable. `timeout` (seconds) bounds
    every get."""

    def __init__(self, timeout: float = 300.0):
        self._data: dict = {}
        self._cv = threading.Condition()
        self._shut = False
        self.timeout = timeout

    def set(self, key, value):
        """Store `value` (bytes, or str as UTF-8) under `key`; wakes the gets waiting on it."""
        if isinstance(value, str):
            value = value.encode()
        with self._cv:
            self._data[key] = bytes(value)
            self._cv.notify_all()

    def check(self, keys) -> bool:
        """Whether every key in `keys` is set (no waiting)."""
        with self._cv:
            return all(k in self._data for k in keys)

    def get(self, key, timeout: float | None = None):
        """The bytes under `key`, waiting until it is set: at most `timeout` seconds (default
        the store's), then StoreTimeout."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._cv:
            while key not in self._data:
                if self._shut:
                    raise _StoreShut("store: stopped while waiting for key " + repr(key))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreTimeout(f"store: key {key!r} not set within {wait:g}s")
                self._cv.wait(min(left, 3600.0))  # (threading refuses too long a wait)
            return self._data[key]

    def add(self, key, amount):
        """Add `amount` to the integer under `key` (absent: 0), stored as decimal text; the
        new value. ValueError when the key holds something else, OverflowError when the
        sum leaves the signed 64-bit range (torch's store has the same range)."""
        with self._cv:
            value = int(self._data.get(key, b"0")) + int(amount)
            if not _I64_MIN <= value <= _I64_MAX:
                raise OverflowError(f"store: add({key!r}, {amount}) leaves the int64 range")
            self._data[key] = str(value).encode()
            self._cv.notify_all()
            return value

    def _shut_down(self):
        """Wake every waiting get; they, and later gets of missing keys, raise _StoreShut."""
        with self._cv:
            self._shut = True
            self._cv.notify_all()


# ---------------------------------------------------------------------------- framing
class _Closed(ConnectionError):
    """The peer closed the connection before all the bytes expected came."""

    def __init__(self):
        super().__init__("store: connection closed")


class _Refused(Exception):
    """A frame that breaks the format; the message says how."""


def _recv_exact(sock, n, deadline=None) -> bytes:
    """n bytes from sock, buffered as they arrive (never n at once before they come).
    `deadline` (time.monotonic()) bounds the wait; socket.timeout past it."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("frame not finished in time")
            sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), _CHUNK))
        if not chunk:
            raise _Closed()
        buf += chunk
    return bytes(buf)


def _read_request(sock):
    """(command, key, value) of the next frame, or None when the peer closed the connection
    between frames. Raises _Refused for a frame that breaks the format (see the module
    docstring)."""
    sock.settimeout(None)  # between frames a client may be idle for as long as it likes
    first = sock.recv(1)
    if not first:
        return None
    deadline = time.monotonic() + FRAME_TIMEOUT_S
    try:
        head = first + _recv_exact(sock, _REQUEST.size - 1, deadline)
        cmd, klen, vlen = _REQUEST.unpack(head)
        if cmd not in _COMMANDS:
            raise _Refused(f"unknown command {cmd}")
        if klen > MAX_KEY_BYTES:
            raise _Refused(f"key of {klen} bytes (at most {MAX_KEY_BYTES})")
        if vlen > MAX_VALUE_BYTES:
            raise _Refused(f"value of {vlen} bytes (at most {MAX_VALUE_BYTES})")
        if cmd == GET and vlen not in (0, _U64.size):
            raise _Refused(f"GET with a value of {vlen} bytes (0 or 8)")
        if cmd == ADD and vlen != _I64.size:
            raise _Refused(f"ADD with a value of {vlen} bytes (8)")
        key = _recv_exact(sock, klen, deadline)
        value = _recv_exact(sock, vlen, deadline)
    except _Closed:
        raise _Refused("connection closed mid-frame") from None
    except socket.timeout:
        raise _Refused(f"frame not finished within {FRAME_TIMEOUT_S:g}s") from None
    except OSError as exc:
        raise _Refused(f"connection failed mid-frame ({exc})") from None
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("key is not UTF-8") from None
    return cmd, text, value


def _send_reply(sock, status, body=b""):
    sock.sendall(_REPLY.pack(status, len(body)) + body)


class _Server(threading.Thread):
    """Serves a HashStore on host:port (port 0: a free one, see .port), a thread per
    connection."""

    def __init__(self, host, port, timeout):
        super().__init__(daemon=True, name="topocomm-store")
        self.store = HashStore(timeout)
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self._stopping = threading.Event()   # no new connections
        self._stopped = threading.Event()    # no more serving either
        self._lock = threading.Lock()
        self._conns: set = set()     # the connections being served
        self._threads: list = []     # the serving threads (finished ones pruned at accept)

    def run(self):
        while not self._stopping.is_set():
            try:
                conn, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                                 name="topocomm-store-conn")
            with self._lock:
                if self._stopping.is_set():   # accepted as it stopped: not ours to serve
                    conn.close()
                    return
                self._conns.add(conn)
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
                t.start()   # under the lock: stop() never sees a thread not yet started

    def _serve(self, conn, peer):
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        try:
            while True:
                try:
                    frame = _read_request(conn)
                except _Refused as exc:
                    if not self._stopped.is_set():
                        _log.warning("topocomm store: refused a frame from %s (%s); "
                                     "connection closed", where, exc)
                    return
                if frame is None:
                    return
                status, body = self._run(*frame)
                if status is None:
                    return
                _send_reply(conn, status, body)
        except OSError:  # the peer went away, or stop() shut the connection
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _run(self, cmd, key, value):
        """(status, body) of one well-formed request; (None, None) when the store stopped."""
        try:
            if cmd == SET:
                self.store.set(key, value)
                return OK, b""
            if cmd == GET:
                wait = _U64.unpack(value)[0] / 1000.0 if value else None
                return OK, bytes(self.store.get(key, wait))
            return OK, _I64.pack(self.store.add(key, _I64.unpack(value)[0]))
        except StoreTimeout as exc:
            return TIMEOUT, str(exc).encode()
        except _StoreShut:
            return None, None
        except (ValueError, OverflowError) as exc:  # add on a key that holds no int
            return ERROR, f"{type(exc).__name__}: {exc}".encode()[:65536]

    def stop_accepting(self):
        """No new connections (a new store may take the port); served ones go on."""
        self._stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # stops listening now, wakes accept()
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def stop(self):
        """Stop serving: close every connection, end every thread (each join bounded; the
        accept loop wakes every 0.2 s, so the port is free when this returns)."""
        self._stopped.set()
        self.stop_accepting()
        self.store._shut_down()            # wakes serving threads waiting in get
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)   # wakes its serving thread's recv / send
            except OSError:
                pass
        deadline = time.monotonic() + _JOIN_S
        me = threading.current_thread()
        for t in [self] + threads:
            if t is not me and t.is_alive():
                t.join(timeout=max(0.0, deadline - time.monotonic()))


class TCPStore:
    """A store served over TCP: rank 0 (is_server) serves on host:port (port 0: a free
    port, then read .port), and every rank, the server's too, connects as a client.
    timeout: seconds a get waits for its key (StoreTimeout), and a connection for the
    server to come up."""

    def __init__(self, host, port, is_server, timeout=300.0):
        self.timeout = float(timeout)
        self._server = _Server(host, port, self.timeout) if is_server else None
        if self._server:
            port = self._server.port
            self._server.start()
        self.host, self.port = host, int(port)
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                self._sock = socket.create_connection(
                    (host, self.port), timeout=max(0.05, min(30.0, deadline - time.monotonic())))
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    if self._server:
                        self._server.stop()
                    raise StoreTimeout(f"store: cannot reach {host}:{self.port}: {exc}") from exc
                time.sleep(delay)  # the server rank may not be up yet
                delay = min(delay * 2, 0.5)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(self.timeout + _REPLY_MARGIN_S)
        self._lock = threading.Lock()
        self._broken = None

    def _call(self, cmd, key, value=b""):
        if isinstance(key, str):
            key = key.encode("utf-8")
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"store: key of {len(key)} bytes (at most {MAX_KEY_BYTES})")
        if len(value) > MAX_VALUE_BYTES:
            raise ValueError(f"store: value of {len(value)} bytes (at most {MAX_VALUE_BYTES})")
        with self._lock:
            if self._broken is not None:
                raise ConnectionError(f"store: connection to {self.host}:{self.port} is "
                                      f"unusable ({self._broken})")
            try:
                self._sock.sendall(_REQUEST.pack(cmd, len(key), len(value)) + key + value)
                status, size = _REPLY.unpack(_recv_exact(self._sock, _REPLY.size))
                if status not in (OK, TIMEOUT, ERROR) or size > _MAX_REPLY_BYTES:
                    raise ConnectionError(f"store: malformed reply (status {status}, "
                                          f"{size} bytes)")
                body = _recv_exact(self._sock, size)
            except socket.timeout as exc:
                # the reply may still come: this connection is out of step from now on
                self._broken = "a reply did not come in time"
                raise StoreTimeout(f"store: no reply from {self.host}:{self.port} within "
                                   f"{self._sock.gettimeout():g}s") from exc
            except OSError as exc:
                self._broken = str(exc) or type(exc).__name__
                raise
        if status == TIMEOUT:
            raise StoreTimeout(body.decode("utf-8", "replace"))
        if status == ERROR:
            raise RuntimeError(body.decode("utf-8", "replace"))
        return body

    def set(self, key, value):
        """Store `value` (bytes, or str as UTF-8) under `key` (str)."""
        self._call(SET, key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key):
        """The bytes under `key`, waiting up to the timeout for it to be set (StoreTimeout)."""
        wait_ms = min(int(self.timeout * 1000), (1 << 64) - 1)
        return self._call(GET, key, _U64.pack(wait_ms))

    def check(self, keys) -> bool:
        """Whether every key in `keys` is set (no waiting: a get that may wait 0 ms)."""
        for key in keys:
            try:
                self._call(GET, key, _U64.pack(0))
            except StoreTimeout:
                if self._broken is not None:
                    raise
                return False
        return True

    def add(self, key, amount):
        """Add `amount` (an int in the signed 64-bit range) to the integer under `key`; the
        new value."""
        amount = int(amount)
        if not _I64_MIN <= amount <= _I64_MAX:
            raise OverflowError(f"store: add amount {amount} is outside the int64 range")
        return _I64.unpack(self._call(ADD, key, _I64.pack(amount)))[0]

    def stop_accepting(self):
        """The server's rank: refuse new connections, keep serving the open ones."""
        if self._server:
            self._server.stop_accepting()

    def close(self):
        """Close this client's connection; the server's rank also stops the server."""
        try:
            self._sock.close()
        except OSError:
            pass
        if self._server:
            self._server.stop()

"""Key-value stores for rendezvous, with the torch Store's interface:
set(key, bytes), get(key) -> bytes (blocks until the key exists, up to the timeout),
add(key, int) -> int. A torch.distributed Store can be used wherever these are.

    HashStore   in-process (threads transport, tests)
    TCPStore    rank 0 serves; used by comms.init() when torch is not installed
"""
from __future__ import annotations

import pickle
import socket
import struct
import threading
import time

from comms.core.errors import CommTimeoutError


class StoreTimeout(CommTimeoutError):
    """A key did not appear within the store's timeout: during group creation, a rank that
    died or never started. A CommError (and a TimeoutError), like every peer failure."""


def everyones(store, key, rank, size, value=b"1") -> list:
    """Set `key`/rank to value, then read `key`/q of every rank q (each read blocks until it
    is set, up to the store's timeout): every rank's value, in rank order."""
    store.set(f"{key}/{rank}", value)
    return [bytes(store.get(f"{key}/{q}")) for q in range(size)]


class HashStore:
    def __init__(self, timeout: float = 300.0):
        self._data: dict = {}
        self._cv = threading.Condition()
        self.timeout = timeout

    def set(self, key, value):
        if isinstance(value, str):
            value = value.encode()
        with self._cv:
            self._data[key] = bytes(value)
            self._cv.notify_all()

    def get(self, key):
        deadline = time.monotonic() + self.timeout
        with self._cv:
            while key not in self._data:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreTimeout(f"store: key {key!r} not set within {self.timeout}s")
                self._cv.wait(left)
            return self._data[key]

    def add(self, key, amount):
        with self._cv:
            value = int(self._data.get(key, b"0")) + int(amount)
            self._data[key] = str(value).encode()
            self._cv.notify_all()
            return value


def _send(sock, obj):
    data = pickle.dumps(obj)
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv(sock):
    head = _recv_exact(sock, 4)
    return pickle.loads(_recv_exact(sock, struct.unpack("!I", head)[0]))


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("store: connection closed")
        buf += chunk
    return bytes(buf)


class _Server(threading.Thread):
    def __init__(self, host, port, timeout):
        super().__init__(daemon=True, name="topocomm-store")
        self.store = HashStore(timeout)
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.sock.settimeout(0.2)
        self._stopping = threading.Event()
        self._clients = []

    def run(self):
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self._stopping.is_set():   # accepted as it stopped: not ours to serve
                conn.close()
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._clients.append(conn)
            t.start()

    def _serve(self, conn):
        try:
            while True:
                cmd, key, value = _recv(conn)
                try:
                    result = getattr(self.store, cmd)(key, value) if cmd != "get" else self.store.get(key)
                    _send(conn, (True, result))
                except Exception as exc:  # report to the client, keep serving
                    _send(conn, (False, repr(exc)))
        except (ConnectionError, OSError, EOFError):
            pass
        finally:
            conn.close()

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
        self.stop_accepting()
        for c in self._clients:
            try:
                c.shutdown(socket.SHUT_RDWR)   # wakes its serving thread's recv now
                c.close()
            except OSError:
                pass
        # the accept loop wakes every 0.2 s: gone (and the port free) when stop returns
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)


class TCPStore:
    """Rank 0 (is_server) serves on host:port; everyone connects as a client."""

    def __init__(self, host, port, is_server, timeout=300.0):
        self.timeout = timeout
        self._server = _Server(host, port, timeout) if is_server else None
        if self._server:
            self._server.start()
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                self._sock = socket.create_connection((host, port), timeout=timeout)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise StoreTimeout(f"store: cannot reach {host}:{port}: {exc}") from exc
                time.sleep(delay)  # the server rank may not be up yet
                delay = min(delay * 2, 0.5)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()

    def _call(self, cmd, key, value=None):
        with self._lock:
            _send(self._sock, (cmd, key, value))
            ok, result = _recv(self._sock)
        if not ok:
            raise StoreTimeout(result) if "StoreTimeout" in result else RuntimeError(result)
        return result

    def set(self, key, value):
        self._call("set", key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key):
        return self._call("get", key)

    def add(self, key, amount):
        return self._call("add", key, int(amount))

    def stop_accepting(self):
        """The server's rank: refuse new connections, keep serving the open ones."""
        if self._server:
            self._server.stop_accepting()

    def close(self):
        try:
            self._sock.close()
        except OSError:
            pass
        if self._server:
            self._server.stop()


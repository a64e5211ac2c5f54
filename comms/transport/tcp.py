"""tcp: connected sockets between ranks on different hosts.

Set-up (once per group, in Python): every rank listens on the address it should be reached
at (TOPOCOMM_SOCKET_IFNAME, else the topology's choice, else the first interface that is
up), publishes it through the Store with a per-group secret that rank 0 drew, then
connects to every remote rank below it and accepts every remote rank above it, `num_streams`
sockets per peer. A connection must present the secret, its rank and stream index in its
first 48 bytes, or it is closed unanswered: a stray or hostile client cannot join the group.

Data (native/src/tcp.c, GIL released): `exchange(ops)` moves a list of framed transfers at
once under one poll loop; each frame's header is checked against the receiver's
expectation before any payload byte is read into the user's buffer, so disagreeing ranks
raise (MessageMismatch) instead of reading garbage, and a stream that is not topocomm frames
raises CommError. A peer that closes or resets its sockets (it died, or it aborted) is
reported within one poll slice.
"""
from __future__ import annotations

import errno
import hmac
import os
import secrets
import selectors
import socket
import struct
import time

from comms.core.errors import CommError, CommTimeoutError, MessageMismatch, PeerAbortedError, PeerDeadError
from comms.core.status import Status
from topology import env as settings

# TCP streams per remote peer (transfers >= 1 MiB are striped over them). Measured on the
# emulated cluster (bench/cluster.py, 1 Gbit/s tbf, both directions busy at once): one
# stream per direction reached 0.72-0.87 Gbit/s, four 0.93-0.95; the hierarchical
# all-reduce at 64 MiB went from 0.98-1.20x to 1.27-1.29x the link rate with 2 or 4.
DEFAULT_STREAMS = 2

_HELLO = struct.Struct("<8s32sii")  # magic, secret, rank, stream
_MAGIC = b"TOPOCOMM"
_HELLO_S = 5.0  # a connection must present its hello within this long of its accept


def _user_tag(frame_tag: int) -> int:
    """The send/recv tag a frame tag carries (its low 32 bits, a C int)."""
    t = int(frame_tag) & 0xFFFFFFFF
    return t - (1 << 32) if t >= 1 << 31 else t


def choose_address(preferred: str | None = None) -> tuple[str, str]:
    """(address, why): where this rank listens for its remote peers. `preferred` is the
    topology's choice (it applies TOPOCOMM_SOCKET_IFNAME: names, prefixes, ^excludes);
    without one, the interface named by TOPOCOMM_SOCKET_IFNAME, else the first interface
    that is up, else loopback (the NIC facts come from topology/detect/net.py)."""
    from topology.detect.net import ipv4_of, probe_nics
    ifname = settings.get("TOPOCOMM_SOCKET_IFNAME")
    if preferred:
        return preferred, "topology" + (f" (TOPOCOMM_SOCKET_IFNAME={ifname})" if ifname else "")
    if ifname and not ifname.startswith("^") and "," not in ifname:
        addrs = ipv4_of(ifname)
        if not addrs:
            raise CommError(f"TOPOCOMM_SOCKET_IFNAME={ifname!r}: no such interface with an "
                            "IPv4 address")
        return addrs[0].split("/")[0], f"TOPOCOMM_SOCKET_IFNAME={ifname}"
    for nic in probe_nics():
        addrs = [a.split("/")[0] for a in nic.get("addresses") or []]
        if nic.get("is_up") and not nic.get("is_loopback") and addrs:
            return addrs[0], f"first interface up ({nic['name']})"
    return "127.0.0.1", "loopback (no other interface is up)"


class TcpMesh:
    """Sockets to every rank in `peers` (ranks on other hosts), num_streams per peer."""

    name = "tcp"

    def __init__(self, rank, size, store, prefix, peers, timeout, *, address=None,
                 num_streams=1):
        self.rank, self.size = rank, size
        self.peers = sorted(peers)
        self.timeout = float(timeout)
        self.num_streams = max(1, int(num_streams))
        # one more connection per peer carries send/recv only, so point-to-point traffic
        # (which runs on its own threads) never interleaves with a collective's frames
        self._num_conns = self.num_streams + 1
        self.fds: dict[int, list[int]] = {}
        self._socks: list[socket.socket] = []
        self.refused = 0
        self.address, self.address_why = choose_address(address)
        key = f"{prefix}/tcp"
        if rank == 0:
            store.set(f"{key}/secret", secrets.token_bytes(32))
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.address, 0))
            listener.listen(max(16, len(self.peers) * self._num_conns))
            port = listener.getsockname()[1]
            store.set(f"{key}/addr/{rank}", f"{self.address}:{port}".encode())
            secret = bytes(store.get(f"{key}/secret"))
            deadline = time.monotonic() + self.timeout
            lower = [q for q in self.peers if q < rank]
            higher = [q for q in self.peers if q > rank]
            for q in lower:
                host, _, p = bytes(store.get(f"{key}/addr/{q}")).decode().rpartition(":")
                for s in range(self._num_conns):
                    self._connect(q, s, (host, int(p)), secret, deadline)
            self._accept(listener, higher, secret, deadline)
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()
        for s in self._socks:
            s.setblocking(False)

    # set-up --------------------------------------------------------------------------------
    def _keep(self, q, s, sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socks.append(sock)
        fds = self.fds.setdefault(q, [0] * self._num_conns)
        fds[s] = sock.fileno()

    def _connect(self, q, s, addr, secret, deadline):
        last = None
        while time.monotonic() < deadline:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.connect(addr)
                sock.sendall(_HELLO.pack(_MAGIC, secret, self.rank, s))
                if sock.recv(1) != b"\x01":
                    raise CommError(f"rank {q} at {addr[0]}:{addr[1]} refused the connection "
                                    "(wrong group secret?)")
                self._keep(q, s, sock)
                return
            except (ConnectionRefusedError, ConnectionResetError, socket.timeout) as exc:
                sock.close()
                last = exc
                time.sleep(0.01)  # the peer is not listening yet: retry until the deadline
            except BaseException:
                sock.close()
                raise
        raise CommTimeoutError(f"could not connect to rank {q} at {addr[0]}:{addr[1]} within "
                               f"{self.timeout:g}s ({last})")

    def _accept(self, listener, higher, secret, deadline):
        """Accept until every (rank, stream) in `higher` has presented a good hello. Hellos
        are read from every pending connection at once, each within _HELLO_S of its
        accept: a stranger that connects and stays silent delays no one."""
        want = {(q, s) for q in higher for s in range(self._num_conns)}
        listener.setblocking(False)
        sel = selectors.DefaultSelector()
        pending: dict = {}   # socket -> [hello bytes so far, deadline]
        try:
            sel.register(listener, selectors.EVENT_READ)
            while want:
                now = time.monotonic()
                if now >= deadline:
                    missing = sorted({q for q, _ in want})
                    raise CommTimeoutError(f"ranks {missing} did not connect within "
                                           f"{self.timeout:g}s")
                for sock in [k for k, (_, d) in pending.items() if d <= now]:
                    self._refuse(sel, pending, sock)   # silent past its hello time
                wake = min([deadline] + [d for _, d in pending.values()])
                for key, _ in sel.select(max(0.0, min(wake - now, 0.5))):
                    if key.fileobj is listener:
                        try:
                            sock, _ = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        sock.setblocking(False)
                        pending[sock] = [b"", min(deadline, time.monotonic() + _HELLO_S)]
                        sel.register(sock, selectors.EVENT_READ)
                        continue
                    sock = key.fileobj
                    got, _d = pending[sock]
                    try:
                        part = sock.recv(_HELLO.size - len(got))
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        part = b""
                    if not part:
                        self._refuse(sel, pending, sock)   # closed before a whole hello
                        continue
                    got += part
                    pending[sock][0] = got
                    if len(got) < _HELLO.size:
                        continue
                    magic, got_secret, q, s = _HELLO.unpack(got)
                    if not (magic == _MAGIC and hmac.compare_digest(got_secret, secret)
                            and (q, s) in want):
                        self._refuse(sel, pending, sock)
                        continue
                    sel.unregister(sock)
                    del pending[sock]
                    try:
                        sock.setblocking(True)
                        sock.settimeout(max(0.05, deadline - time.monotonic()))
                        sock.sendall(b"\x01")
                    except OSError:
                        self.refused += 1
                        sock.close()
                        continue
                    want.discard((q, s))
                    self._keep(q, s, sock)
        finally:
            for sock in list(pending):
                self._refuse(sel, pending, sock, count=False)
            sel.close()

    def _refuse(self, sel, pending, sock, count=True):
        """Close a connection that is not one of ours, unanswered."""
        pending.pop(sock, None)
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        if count:
            self.refused += 1

    # data ----------------------------------------------------------------------------------
    def exchange(self, nat, ops, abort_addrs=(), what="", p2p=False):
        """ops: (peer, is_recv, addr, nbytes, tag); all progress at once. A transfer larger
        than 1 MiB is striped over the peer's streams. p2p: on the send/recv connection."""
        if not ops:
            return
        flat = []
        owners = []
        ns = 1 if p2p else self.num_streams
        for peer, is_recv, addr, nbytes, tag in ops:
            fds = self.fds[peer][-1:] if p2p else self.fds[peer]
            if ns == 1 or nbytes < (1 << 20):
                flat.append((fds[0], is_recv, addr, nbytes, tag))
                owners.append(peer)
                continue
            part = -(-nbytes // ns)
            for s in range(ns):
                lo = min(nbytes, s * part)
                flat.append((fds[s], is_recv, addr + lo, min(nbytes, lo + part) - lo, tag))
                owners.append(peer)
        st, idx, err, got_tag, got_nbytes = nat.tcp_exchange(flat, self.timeout, abort_addrs)
        if st == Status.OK:
            return
        where = f" during {what}" if what else ""
        peer = owners[idx] if st != Status.ABORTED and 0 <= idx < len(owners) else None
        if st == Status.TIMEOUT:
            raise CommTimeoutError(f"rank {peer} did not respond within {self.timeout:g}s{where} "
                                   "(over tcp); it is slow, stuck or at another collective")
        if st == Status.ABORTED:
            raise PeerAbortedError(f"a rank on this host aborted{where}")
        if st == Status.INTERRUPTED:
            raise CommError(f"interrupted (SIGINT){where}; the group is broken")
        if st == Status.CLOSED:
            raise PeerDeadError(f"rank {peer} closed its connection{where}: it died or aborted")
        if st == Status.MISMATCH and err == errno.EPROTO:
            raise CommError(f"rank {peer} sent bytes that are not a topocomm frame (bad magic)"
                            f"{where}: not a rank of this group, or its stream is out of step; "
                            "the group is broken")
        if st == Status.MISMATCH and p2p:
            want = flat[idx]
            raise MessageMismatch(
                f"recv: rank {peer} sent {got_nbytes} bytes with tag {_user_tag(got_tag)}, but "
                f"this recv expects {want[3]} bytes with tag {_user_tag(want[4])}; the group "
                "is broken")
        if st == Status.MISMATCH:
            want = flat[idx]
            raise MessageMismatch(f"rank {peer} sent a frame (tag {got_tag:#x}, {got_nbytes} bytes) "
                            f"where tag {want[4]:#x}, {want[3]} bytes was expected{where}: "
                            "the ranks disagree on the sequence of operations")
        raise CommError(f"socket error with rank {peer}{where}: {os.strerror(err) if err else st}")

    def abort(self):
        """Make every remote peer's next wait on us fail at once."""
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

"""tcp: connected sockets between ranks on different hosts.

Set-up (once per group, in Python): every rank listens on the address it should be reached
at (TOPOCOMM_SOCKET_IFNAME, else the topology's choice, else the first interface that is
up), publishes it through the Store with a per-group secret that rank 0 drew, then
connects to every remote rank below it and accepts every remote rank above it, `num_streams`
sockets per peer. A connection must present the secret, its rank and stream index in its
first 48 bytes, or it is closed unanswered: a stray or hostile client cannot join the group.

Data (native/src/tcp.c, GIL released): `exchange(ops)` moves a list of framed transfers at
once under one poll loop; each frame's header is checked against the receiver's
expectation, so disagreeing ranks raise instead of reading garbage. A peer that closes or
resets its sockets (it died, or it aborted) is reported within one poll slice.
"""
from __future__ import annotations

import hmac
import os
import secrets
import socket
import struct
import time

from comms.core.errors import CommError, CommTimeoutError, MessageMismatch, PeerAbortedError, PeerDeadError
from comms.core.status import Status

# TCP streams per remote peer (transfers >= 1 MiB are striped over them). Measured on the
# emulated cluster (bench/cluster.py, 1 Gbit/s tbf, both directions busy at once): one
# stream per direction reached 0.72-0.87 Gbit/s, four 0.93-0.95; the hierarchical
# all-reduce at 64 MiB went from 0.98-1.20x to 1.27-1.29x the link rate with 2 or 4.
DEFAULT_STREAMS = 2

_HELLO = struct.Struct("<8s32sii")  # magic, secret, rank, stream
_MAGIC = b"TOPOCOMM"


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
    ifname = os.environ.get("TOPOCOMM_SOCKET_IFNAME")
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
        want = {(q, s) for q in higher for s in range(self._num_conns)}
        while want:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted({q for q, _ in want})
                raise CommTimeoutError(f"ranks {missing} did not connect within {self.timeout:g}s")
            listener.settimeout(left)
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            try:
                sock.settimeout(min(5.0, max(0.05, deadline - time.monotonic())))
                hello = b""
                while len(hello) < _HELLO.size:
                    part = sock.recv(_HELLO.size - len(hello))
                    if not part:
                        break
                    hello += part
                if len(hello) == _HELLO.size:
                    magic, got_secret, q, s = _HELLO.unpack(hello)
                    if magic == _MAGIC and hmac.compare_digest(got_secret, secret) and (q, s) in want:
                        sock.sendall(b"\x01")
                        want.discard((q, s))
                        self._keep(q, s, sock)
                        continue
            except OSError:
                pass
            self.refused += 1  # not one of ours: close it unanswered
            sock.close()

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
        if st == Status.MISMATCH and p2p:
            want = flat[idx]
            raise MessageMismatch(
                f"recv: rank {peer} sent {got_nbytes} bytes with tag {_user_tag(got_tag)}, but "
                f"this recv expects {want[3]} bytes with tag {_user_tag(want[4])}; the group "
                "is broken")
        if st == Status.MISMATCH:
            want = flat[idx]
            raise CommError(f"rank {peer} sent a frame (tag {got_tag:#x}, {got_nbytes} bytes) "
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

"""The address rank 0 serves the rendezvous store on when no launcher names one (mpiexec
without MASTER_ADDR): an address every rank can reach.

Every rank on rank 0's host: loopback (nothing outside the host can reach the store).
Ranks on other hosts: the address the topology picks for rank 0's traffic to other hosts
(topology.model.Topology.address_of over the hosts' network interfaces, as
topology/detect/net.py reports them): TOPOCOMM_SOCKET_IFNAME's interface when it is set,
else the interface whose subnet reaches most of the other hosts, then the fastest, then the
one with the default route. Loopback only when rank 0 has no other interface with an
address (the other hosts then cannot reach it; a warning says so).
"""
from __future__ import annotations

import logging

LOOPBACK = "127.0.0.1"

_log = logging.getLogger("topocomm")


def rendezvous_host(rank_hosts: list, host_nics: dict, ifname: str | None = None) -> tuple[str, str]:
    """(address, why): where rank 0 serves the rendezvous store.

    rank_hosts: the host id of every rank, in rank order (topology.host.host_id()).
    host_nics: {host id: [interface dicts as topology.detect.net.probe_nics() returns]};
        rank 0's host is needed, the other hosts' lists sharpen the choice (which subnet
        reaches them); unused when every rank is on rank 0's host.
    ifname: TOPOCOMM_SOCKET_IFNAME as rank 0 sees it (names or prefixes, comma-separated,
        "^" excludes), or None (the Topology then still reads this process's
        TOPOCOMM_SOCKET_IFNAME, which is the same value when rank 0 calls this).
    Raises RuntimeError naming TOPOCOMM_SOCKET_IFNAME when it is set but no interface of
    rank 0 with an IPv4 address matches it."""
    if not rank_hosts:
        raise ValueError("rendezvous_host: no ranks")
    if all(h == rank_hosts[0] for h in rank_hosts):
        return LOOPBACK, "every rank is on rank 0's host"
    from topology.fuse import fuse
    views = [{"rank": r, "host": {"host_id": str(h)}, "nics": list(host_nics.get(h) or []),
              "socket_ifname": ifname or None}
             for r, h in enumerate(rank_hosts)]
    topo = fuse(views)
    address = topo.address_of(0)
    if address is not None:
        nic = topo.nic_of(0) or {}
        how = f"TOPOCOMM_SOCKET_IFNAME={ifname}" if ifname else "the topology's choice"
        return address, f"{how}: interface {nic.get('name', '?')}"
    if ifname:
        raise RuntimeError(f"TOPOCOMM_SOCKET_IFNAME={ifname!r}: rank 0 has no interface with an "
                           "IPv4 address that it selects, to serve the rendezvous on")
    _log.warning("topocomm: ranks run on %d hosts but rank 0 has no network interface other "
                 "than loopback with an address; serving the rendezvous on %s, which the other "
                 "hosts cannot reach", len(set(rank_hosts)), LOOPBACK)
    return LOOPBACK, "no interface other than loopback has an address"

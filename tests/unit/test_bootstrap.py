"""comms.init()'s bootstrap without launching anything: Slurm host lists, the address rank 0
serves the rendezvous on (fake interface lists), TOPOCOMM_TIMEOUT parsing, and the client of
torchrun's agent store."""
import logging
import math
import socket
import time

import pytest

import comms.bootstrap as bootstrap
from comms.bootstrap.netaddr import LOOPBACK, rendezvous_host
from comms.bootstrap.slurm import expand_nodelist, first_host
from topology import env

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMIX_SIZE",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST", "SLURM_STEP_NODELIST",
                 "SLURM_JOB_NODELIST", "TORCHELASTIC_USE_AGENT_STORE",
                 "TORCHELASTIC_RESTART_COUNT", "TOPOCOMM_SOCKET_IFNAME")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# ----------------------------------------------------------------------------- Slurm
@pytest.mark.parametrize("text, hosts", [
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("gpu[1,3-5],cpu7", ["gpu1", "gpu3", "gpu4", "gpu5", "cpu7"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a,b,c", ["a", "b", "c"]),
    ("host-1.example.com", ["host-1.example.com"]),
    ("x[007]", ["x007"]),
    ("c[1-2]x,d[3]", ["c1x", "c2x", "d3"]),
    ("[1-2]", ["1", "2"]),
    (" node[1-2] , login ", ["node1", "node2", "login"]),
])
def test_slurm_nodelist_expansion(text, hosts):
    assert expand_nodelist(text) == hosts
    assert first_host(text) == hosts[0]


def test_first_host_of_a_huge_list_is_immediate():
    t0 = time.monotonic()
    assert first_host("n[0000000-9999999],m[1-99999999]") == "n0000000"
    assert time.monotonic() - t0 < 1


@pytest.mark.parametrize("text", ["node[1-", "node]1", "n[3-1]", "n[a]", "n[]", "n[1-2",
                                  "n[[1]]", "n[1-2-3]", "", " , "])
def test_slurm_nodelist_malformed_names_the_variable(text):
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
        first_host(text, "SLURM_STEP_NODELIST")


class _Made(Exception):
    pass


def _record_store(monkeypatch):
    """Replace the TCPStore comms.init() makes with one that records its arguments."""
    made = []

    def fake(host, port, is_server, timeout=300.0):
        made.append((host, port, is_server))
        raise _Made()
    monkeypatch.setattr(bootstrap, "TCPStore", fake)
    return made


@pytest.mark.parametrize("nodelist, host", [("node[01-04]", "node01"),
                                            ("gpu[1,3-5],cpu7", "gpu1"),
                                            ("rack[1-2]-node[01-02]", "rack1-node01")])
def test_slurm_rank0_serves_on_the_first_host(clean_env, nodelist, host):
    clean_env.setenv("SLURM_PROCID", "2")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_NODELIST", nodelist)
    made = _record_store(clean_env)
    with pytest.raises(_Made):
        bootstrap.init(timeout=5)
    assert made == [(host, bootstrap.DEFAULT_PORT, False)]


# --------------------------------------------------------------- rendezvous address
def nic(name, *addresses, up=True, loopback=False, default=False, speed=None):
    return {"name": name, "kind": "loopback" if loopback else "ethernet",
            "addresses": list(addresses), "speed_mbps": speed, "shaped_mbps": None,
            "is_up": up, "is_loopback": loopback, "is_default_route": default,
            "numa_idx": None, "pci_path": None}


LO = nic("lo", "127.0.0.1/8", loopback=True)
HOST_A = [LO, nic("docker0", "172.17.0.1/16", speed=100000),
          nic("eth0", "10.0.0.5/24", default=True, speed=1000),
          nic("ib0", "192.168.7.5/24", speed=100000),
          nic("eth9", "10.9.9.5/24", up=False, speed=400000)]
HOST_B = [LO, nic("docker0", "172.17.0.1/16", speed=100000),
          nic("eth0", "10.0.0.6/24", default=True, speed=1000)]


@pytest.fixture
def no_ifname(monkeypatch):
    monkeypatch.delenv("TOPOCOMM_SOCKET_IFNAME", raising=False)


def test_every_rank_on_rank0s_host_gets_loopback(no_ifname):
    assert rendezvous_host(["a", "a", "a"], {"a": HOST_A})[0] == LOOPBACK
    assert rendezvous_host(["a"], {"a": HOST_A}, "eth0")[0] == LOOPBACK


def test_other_hosts_get_the_interface_that_reaches_them(no_ifname):
    """eth0 shares a subnet with host b; ib0 is faster but reaches nobody; docker0 has the
    same address on both hosts (no link); eth9 is down."""
    address, why = rendezvous_host(["a", "a", "b"], {"a": HOST_A, "b": HOST_B})
    assert address == "10.0.0.5", why
    assert "eth0" in why


def test_without_the_other_hosts_interfaces_the_fastest_up_interface_wins(no_ifname):
    fast = [LO, nic("eth0", "10.0.0.5/24", default=True, speed=1000),
            nic("ib0", "192.168.7.5/24", speed=100000),
            nic("eth1", "10.1.0.5/24", up=False, speed=400000)]
    assert rendezvous_host(["a", "b"], {"a": fast})[0] == "192.168.7.5"
    unknown = [LO, nic("eth0", "10.0.0.5/24"), nic("eth1", "10.1.0.5/24", default=True)]
    assert rendezvous_host(["a", "b"], {"a": unknown})[0] == "10.1.0.5"


def test_topocomm_socket_ifname_is_honoured(no_ifname):
    hosts, nics = ["a", "b"], {"a": HOST_A, "b": HOST_B}
    assert rendezvous_host(hosts, nics, "ib")[0] == "192.168.7.5"
    assert rendezvous_host(hosts, nics, "nope,ib0")[0] == "192.168.7.5"
    assert rendezvous_host(hosts, nics, "^eth,docker")[0] == "192.168.7.5"
    with pytest.raises(RuntimeError, match="TOPOCOMM_SOCKET_IFNAME"):
        rendezvous_host(hosts, nics, "wlan")


def test_loopback_only_when_nothing_else_exists(no_ifname, caplog):
    caplog.set_level(logging.WARNING, logger="topocomm")
    assert rendezvous_host(["a", "b"], {"a": [LO, nic("eth0", up=True)]})[0] == LOOPBACK
    assert any("cannot reach" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- TOPOCOMM_TIMEOUT
@pytest.mark.parametrize("text, value", [("300", 300.0), ("2.5", 2.5), (" 60 ", 60.0),
                                         ("1e3", 1000.0), ("0.001", 0.001)])
def test_parse_timeout_accepts_positive_seconds(text, value):
    assert math.isclose(env.parse("TOPOCOMM_TIMEOUT", text), value)


@pytest.mark.parametrize("text", ["abc", "-1", "0", "0.0", "-0", "inf", "-inf", "nan", "",
                                  "1e300", "5s"])
def test_parse_timeout_refuses_with_the_variables_name(text):
    with pytest.raises(ValueError, match=r"^TOPOCOMM_TIMEOUT: .*" + "got"):
        env.parse("TOPOCOMM_TIMEOUT", text)


# --------------------------------------------------------------------- torchrun's store
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_every_rank_is_a_client_of_the_agent_store(clean_env):
    """TORCHELASTIC_USE_AGENT_STORE=True: no rank serves on MASTER_PORT (the agent does);
    rank 0 connects as a client, and the keys live under topocomm/attempt_<restart>/."""
    import datetime
    dist = pytest.importorskip("torch.distributed")
    port = _free_port()
    agent = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=10),
                          wait_for_workers=False)
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", str(port))
    clean_env.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    clean_env.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    made = _record_store(clean_env)
    store = bootstrap._make_store(0, 2, "torchrun", 5.0)
    assert made == []
    store.set("k", b"v")
    assert agent.get("topocomm/attempt_3/k") == b"v"
    assert store.add("n", 2) == 2

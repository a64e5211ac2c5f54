"""The probes of topology/detect on fake machines: a temporary directory laid out like /sys
and /proc (complete, garbled, or empty), a fake NVML, and crafted rtnetlink replies. Every
probe must return the facts it can read and never raise. No root, network or GPU needed."""
import json
import os
import socket
import struct

import pytest

from topology.detect import cpu, gpu, infiniband, local_view, net, qdisc, sysfs
from topology.host import host_id, host_identity


def put(root, rel, text):
    path = os.path.join(root, rel.lstrip("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def link(root, rel, target_rel):
    """A sysfs-style symlink at rel pointing to target_rel (both under root)."""
    path = os.path.join(root, rel.lstrip("/"))
    target = os.path.join(root, target_rel.lstrip("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.makedirs(target, exist_ok=True)
    os.symlink(target, path)


@pytest.fixture
def machine(tmp_path):
    """Two sockets x 2 cores, two NUMA nodes, eth0 (1 Gbit/s, NUMA 1, default route), lo,
    a down veth with speed -1, an IB adapter with IPoIB ib0, a host identity."""
    r = str(tmp_path)
    put(r, "/sys/devices/system/cpu/online", "0-3\n")
    for c, pkg in enumerate([0, 0, 1, 1]):
        put(r, f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id", f"{pkg}\n")
    put(r, "/sys/devices/system/node/node0/cpulist", "0-1\n")
    put(r, "/sys/devices/system/node/node0/meminfo", "Node 0 MemTotal:       2097152 kB\n")
    put(r, "/sys/devices/system/node/node1/cpulist", "2-3\n")
    put(r, "/sys/devices/system/node/online", "0-1\n")  # not a nodeN entry: ignored
    eth = "/sys/class/net/eth0"
    for name, text in [("speed", "1000"), ("operstate", "up"), ("flags", "0x1003"),
                       ("type", "1"), ("ifindex", "2")]:
        put(r, f"{eth}/{name}", text + "\n")
    link(r, f"{eth}/device", "/sys/devices/pci0000:00/0000:00:03.0")
    put(r, "/sys/devices/pci0000:00/0000:00:03.0/numa_node", "1\n")
    for name, text in [("operstate", "unknown"), ("flags", "0x9"), ("type", "772")]:
        put(r, f"/sys/class/net/lo/{name}", text + "\n")
    for name, text in [("speed", "-1"), ("operstate", "down"), ("flags", "0x1002"), ("type", "1")]:
        put(r, f"/sys/class/net/veth9/{name}", text + "\n")
    for name, text in [("speed", "200000"), ("operstate", "up"), ("flags", "0x1003"), ("type", "32")]:
        put(r, f"/sys/class/net/ib0/{name}", text + "\n")
    ib = "/sys/class/infiniband/mlx5_0"
    put(r, f"{ib}/ports/1/state", "4: ACTIVE\n")
    put(r, f"{ib}/ports/1/rate", "200 Gb/sec (4X HDR)\n")
    put(r, f"{ib}/ports/1/link_layer", "InfiniBand\n")
    put(r, f"{ib}/ports/2/state", "1: DOWN\n")
    link(r, f"{ib}/device", "/sys/devices/pci0000:80/0000:80:01.0")
    put(r, "/sys/devices/pci0000:80/0000:80:01.0/numa_node", "0\n")
    os.makedirs(os.path.join(r, "sys/devices/pci0000:80/0000:80:01.0/net/ib0"))
    put(r, "/proc/net/route",
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010012C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000012C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    put(r, "/proc/sys/kernel/hostname", "fakehost\n")
    put(r, "/proc/sys/kernel/random/boot_id", "b00t\n")
    put(r, "/proc/self/ns/net", "")
    return r


# ---------------------------------------------------------------------------- cpulist
@pytest.mark.parametrize("text,cpus", [("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]), ("5", [5]),
                                       ("", []), (" 0-1 \n", [0, 1])])
def test_cpulist_parses_and_formats_back(text, cpus):
    assert sysfs.parse_cpulist(text) == cpus
    assert sysfs.parse_cpulist(sysfs.format_cpulist(cpus)) == cpus


@pytest.mark.parametrize("text", ["x", "3-1", "1-", "-2", "0-99999999", None])
def test_cpulist_garbled_is_none(text):
    assert sysfs.parse_cpulist(text) is None


def test_format_cpulist_is_compact():
    assert sysfs.format_cpulist([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"


# ---------------------------------------------------------------------------- cpu
def test_cpu_probe_reads_sockets_and_numa(machine):
    facts = cpu.probe_cpus(machine)
    assert facts == {
        "sockets": [{"socket_idx": 0, "cpus": "0-1", "numa_idxs": [0]},
                    {"socket_idx": 1, "cpus": "2-3", "numa_idxs": [1]}],
        "numa_nodes": [{"numa_idx": 0, "cpus": "0-1", "mem_mib": 2048},
                       {"numa_idx": 1, "cpus": "2-3", "mem_mib": None}]}
    assert cpu.placement([2, 3], facts) == (1, 1)
    assert cpu.placement([0], facts) == (0, 0)
    assert cpu.placement([1, 2], facts) == (None, None)   # spans both sockets
    assert cpu.placement([], facts) == (None, None)
    assert cpu.placement([0], None) == (None, None)


def test_cpu_probe_without_online_file_lists_cpu_dirs(machine):
    os.remove(os.path.join(machine, "sys/devices/system/cpu/online"))
    os.makedirs(os.path.join(machine, "sys/devices/system/cpu/cpufreq"))  # not a cpuN
    assert [s["cpus"] for s in cpu.probe_cpus(machine)["sockets"]] == ["0-1", "2-3"]


def test_cpu_probe_garbled(machine):
    put(machine, "/sys/devices/system/cpu/online", "garbage")
    put(machine, "/sys/devices/system/cpu/cpu0/topology/physical_package_id", "x")
    put(machine, "/sys/devices/system/cpu/cpu1/topology/physical_package_id", "-1")
    put(machine, "/sys/devices/system/node/node1/cpulist", "9-2")
    facts = cpu.probe_cpus(machine)
    assert facts["sockets"] == [{"socket_idx": 1, "cpus": "2-3", "numa_idxs": []}]
    assert facts["numa_nodes"] == [{"numa_idx": 0, "cpus": "0-1", "mem_mib": 2048}]


def test_cpu_probe_on_empty_root(tmp_path):
    assert cpu.probe_cpus(str(tmp_path)) is None


def test_affinity_is_this_process():
    assert cpu.affinity() == sorted(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------- net
def test_nic_probe_reads_sysfs(machine):
    nics = {n["name"]: n for n in net.probe_nics(machine, addresses={"eth0": ["198.18.0.5/24"]})}
    assert sorted(nics) == ["eth0", "ib0", "lo", "veth9"]
    assert nics["eth0"] == {
        "name": "eth0", "kind": "ethernet", "addresses": ["198.18.0.5/24"], "speed_mbps": 1000,
        "shaped_mbps": None, "is_up": True, "is_loopback": False, "is_default_route": True,
        "numa_idx": 1, "pci_path": "/sys/devices/pci0000:00/0000:00:03.0"}
    assert nics["lo"]["kind"] == "loopback" and nics["lo"]["is_loopback"] and nics["lo"]["is_up"]
    assert nics["lo"]["speed_mbps"] is None and nics["lo"]["addresses"] == []
    assert nics["veth9"]["speed_mbps"] is None and nics["veth9"]["is_up"] is False
    assert nics["ib0"]["kind"] == "infiniband" and nics["ib0"]["speed_mbps"] == 200000
    assert not nics["ib0"]["is_default_route"]


def test_nic_probe_garbled(machine):
    eth = os.path.join(machine, "sys/class/net/eth0")
    os.remove(os.path.join(eth, "speed"))
    os.makedirs(os.path.join(eth, "speed"))             # a directory where a file should be
    put(machine, "/sys/class/net/eth0/flags", "zz")
    put(machine, "/sys/class/net/eth0/operstate", "")
    put(machine, "/sys/class/net/eth0/type", "\x00\x01")
    put(machine, "/sys/devices/pci0000:00/0000:00:03.0/numa_node", "-1")
    put(machine, "/proc/net/route", "nonsense\nshort line\n")
    nics = {n["name"]: n for n in net.probe_nics(machine)}
    eth0 = nics["eth0"]
    assert eth0["speed_mbps"] is None and eth0["numa_idx"] is None
    assert eth0["is_up"] is False and eth0["kind"] == "other" and eth0["addresses"] == []
    assert not any(n["is_default_route"] for n in nics.values())


def test_nic_probe_on_empty_root(tmp_path):
    assert net.probe_nics(str(tmp_path)) == []


def test_ipv4_of_loopback_and_missing():
    names = [name for _, name in socket.if_nameindex()]
    if "lo" in names:
        assert net.ipv4_of("lo") == ["127.0.0.1/8"]
    assert net.ipv4_of("no-such-if0") == []


def test_nic_probe_real_root_lists_own_netns():
    nics = net.probe_nics()
    assert sorted(n["name"] for n in nics) == sorted(name for _, name in socket.if_nameindex())
    json.dumps(nics)


# ---------------------------------------------------------------------------- qdisc
def _attr(kind, payload):
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _qdisc_msg(ifindex, kind, options, parent=0xFFFFFFFF):
    body = struct.pack("=BxxxiIII", 0, ifindex, 0x80010000, parent, 1)
    body += _attr(1, kind + b"\0") + _attr(2 | 0x8000, options)
    return struct.pack("=IHHII", 16 + len(body), 36, 2, 1, 0) + body


def test_qdisc_parse_tbf_rates():
    ratespec = struct.pack("=BBHhHI", 0, 1, 0, 0, 0, 125_000_000)   # 1 Gbit/s in bytes/s
    tbf_parms = ratespec + b"\0" * 12 + struct.pack("=III", 0, 0, 0)
    fast = _attr(1, tbf_parms) + _attr(4, struct.pack("=Q", 5_000_000_000))  # 40 Gbit/s
    msgs = (_qdisc_msg(3, b"tbf", _attr(1, tbf_parms)) + _qdisc_msg(4, b"tbf", fast)
            + _qdisc_msg(5, b"pfifo_fast", b"") + _qdisc_msg(6, b"tbf", _attr(1, tbf_parms), parent=7))
    out = {}
    assert qdisc._parse(msgs, out) is False                 # no NLMSG_DONE yet
    assert out == {3: 1000, 4: 40000}
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0\0\0\0"
    assert qdisc._parse(done, out) is True


def test_qdisc_parse_truncated_is_harmless():
    msg = _qdisc_msg(3, b"tbf", b"\x01\x02")
    out = {}
    qdisc._parse(msg[:30], out)
    qdisc._parse(msg, out)
    assert out == {}


def test_qdisc_dump_of_real_netns_is_a_dict():
    rates = qdisc.shaped_rates()
    assert isinstance(rates, dict) and all(v > 0 for v in rates.values())


# ---------------------------------------------------------------------------- infiniband
def test_infiniband_probe(machine):
    assert infiniband.probe_infiniband(machine) == [{
        "name": "mlx5_0", "numa_idx": 0, "pci_path": "/sys/devices/pci0000:80/0000:80:01.0",
        "netdevs": ["ib0"],
        "ports": [{"port": 1, "state": "ACTIVE", "rate_gbps": 200.0, "link_layer": "InfiniBand"},
                  {"port": 2, "state": "DOWN", "rate_gbps": None, "link_layer": None}]}]


def test_infiniband_probe_garbled_and_empty(machine, tmp_path):
    put(machine, "/sys/class/infiniband/mlx5_0/ports/1/rate", "fast")
    put(machine, "/sys/class/infiniband/mlx5_0/ports/1/state", "")
    os.makedirs(os.path.join(machine, "sys/class/infiniband/mlx5_0/ports/notaport"))
    dev = infiniband.probe_infiniband(machine)[0]
    assert [p["port"] for p in dev["ports"]] == [1, 2]
    assert dev["ports"][0]["rate_gbps"] is None and dev["ports"][0]["state"] is None
    assert infiniband.probe_infiniband(str(tmp_path / "nothing")) == []


# ---------------------------------------------------------------------------- gpu
class FakeNvml:
    """4 GPUs: 0-1 joined by 4 direct NVLinks, 2-3 on an NVSwitch (6 links each)."""
    bus = ["00000000:1B:00.0", "00000000:1C:00.0", "00000000:9A:00.0", "00000000:9B:00.0"]

    def __init__(self, fail=False):
        self.fail = fail
        self.closed = False

    def count(self):
        if self.fail:
            raise OSError("driver went away")
        return 4

    def name(self, i):
        return "NVIDIA Fake 80GB"

    def uuid(self, i):
        return f"GPU-{i}abc"

    def bus_id(self, i):
        return self.bus[i]

    def nvlink_remote_bus_ids(self, i):
        if i in (0, 1):
            return [self.bus[1 - i]] * 4
        return ["00000000:C0:00.0"] * 6          # an NVSwitch: not a GPU

    def common_ancestor(self, a, b):
        return 10 if a // 2 == b // 2 else 50

    def close(self):
        self.closed = True


def test_gpu_probe_with_fake_nvml(machine):
    put(machine, "/sys/bus/pci/devices/0000:1b:00.0/numa_node", "0\n")
    put(machine, "/sys/bus/pci/devices/0000:9a:00.0/numa_node", "garbage\n")
    gpus = gpu.probe_gpus(machine, nvml=FakeNvml())
    assert [g["bus_id"] for g in gpus] == ["0000:1b:00.0", "0000:1c:00.0", "0000:9a:00.0", "0000:9b:00.0"]
    assert gpus[0]["nvlinks"] == {"1": 4} and gpus[1]["nvlinks"] == {"0": 4}
    assert gpus[2]["nvlinks"] == {"nvswitch": 6}
    assert gpus[0]["pcie"] == {"1": "single", "2": "system", "3": "system"}
    assert [g["numa_idx"] for g in gpus] == [0, None, None, None]
    assert gpus[3]["name"] == "NVIDIA Fake 80GB" and gpus[3]["uuid"] == "GPU-3abc"
    json.dumps(gpus)


def test_gpu_probe_failing_driver_gives_nothing(machine):
    assert gpu.probe_gpus(machine, nvml=FakeNvml(fail=True)) == []


def test_gpu_probe_without_nvml(monkeypatch, tmp_path):
    fake = FakeNvml()
    monkeypatch.setattr(gpu.Nvml, "open", classmethod(lambda cls: None))
    assert gpu.probe_gpus(str(tmp_path)) == []
    monkeypatch.setattr(gpu.Nvml, "open", classmethod(lambda cls: fake))
    assert len(gpu.probe_gpus(str(tmp_path))) == 4 and fake.closed   # opened here: closed here


@pytest.mark.parametrize("text,want", [("00000000:1B:00.0", "0000:1b:00.0"), ("0001:AB:1f.1", "0001:ab:1f.1"),
                                       ("", None), (None, None), ("zz:00.0", None), ("nocolon", None)])
def test_sysfs_bus_id(text, want):
    assert gpu.sysfs_bus_id(text) == want


@pytest.mark.parametrize("env,want", [(None, [0, 1, 2, 3]), ("2,0", [2, 0]), ("1,7,2", [1]),
                                      ("", []), ("GPU-3", [3]), ("GPU-", []), ("-1", [])])
def test_visible_gpus(env, want):
    gpus = [{"gpu_idx": i, "uuid": f"GPU-{i}abc"} for i in range(4)]
    assert gpu.visible_gpus(gpus, env) == want


def test_real_gpu_probe_never_raises():
    assert isinstance(gpu.probe_gpus(), list)


# ---------------------------------------------------------------------------- host + view
def test_host_identity_matches_host_id(monkeypatch):
    monkeypatch.delenv("TOPOCOMM_HOST_ID", raising=False)
    ident = host_identity()
    assert ident["host_id"] == host_id() and not ident["is_host_id_forced"]
    assert ident["hostname"] == socket.gethostname()
    monkeypatch.setenv("TOPOCOMM_HOST_ID", "rack1/node7")
    assert host_identity()["host_id"] == host_id() == "rack1/node7"
    assert host_identity()["is_host_id_forced"]


def test_host_identity_on_fake_root(machine, tmp_path):
    ident = host_identity(machine)
    netns = str(os.stat(os.path.join(machine, "proc/self/ns/net")).st_ino)
    assert ident["host_id"] == f"fakehost/b00t/{netns}"
    assert host_identity(str(tmp_path / "nothing"))["host_id"] == "?/?/?"


def test_local_view_on_fake_machine(machine, monkeypatch):
    monkeypatch.delenv("TOPOCOMM_HOST_ID", raising=False)
    monkeypatch.setenv("TOPOCOMM_SOCKET_IFNAME", "eth")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    view = local_view(3, machine, cpus=[2, 3], addresses={"eth0": ["198.18.0.5/24"]},
                      nvml=FakeNvml())
    assert view["rank"] == 3 and view["pid"] is None
    assert (view["cpus"], view["socket_idx"], view["numa_idx"]) == ("2-3", 1, 1)
    assert view["host"]["hostname"] == "fakehost"
    assert [n["name"] for n in view["nics"]] == ["eth0", "ib0", "lo", "veth9"]
    assert [d["name"] for d in view["infiniband"]] == ["mlx5_0"]
    assert len(view["gpus"]) == 4 and view["visible_gpus"] == [1]
    assert view["socket_ifname"] == "eth"
    assert json.loads(json.dumps(view)) == view


def test_local_view_on_empty_root(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu.Nvml, "open", classmethod(lambda cls: None))
    view = local_view(0, str(tmp_path))
    assert (view["cpu"], view["nics"], view["infiniband"], view["gpus"]) == (None, [], [], [])
    assert (view["cpus"], view["socket_idx"], view["numa_idx"]) == ("", None, None)
    json.dumps(view)


def test_local_view_of_this_process(monkeypatch):
    monkeypatch.delenv("TOPOCOMM_HOST_ID", raising=False)
    view = local_view(5)
    assert view["rank"] == 5 and view["pid"] == os.getpid()
    assert view["host"]["host_id"] == host_id()
    assert sysfs.parse_cpulist(view["cpus"]) == sorted(os.sched_getaffinity(0))
    assert json.loads(json.dumps(view)) == view

"""The topology model, fusion, fixtures, gather over a store and `topocomm topo`.

Expected path-kind matrices are written down per fixture (labels of PathKind), so a model
change shows up as a readable diff. No root, network or GPU needed."""
import json
import os
import subprocess
import sys
import threading

import pytest

import topology
from comms.core.store import HashStore
from topology import PathKind, Topology, fixture, fixture_names, fuse, gather
from topology.fixtures import build
from topology.model import DEFAULT_LINKS, LABELS

FIXTURE_DIR = os.path.join(os.path.dirname(topology.__file__), "fixtures")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("TOPOCOMM_SOCKET_IFNAME", "TOPOCOMM_TOPO_FILE", "TOPOCOMM_TOPO_DUMP_FILE",
                 "TOPOCOMM_HOST_ID"):
        monkeypatch.delenv(name, raising=False)


def matrix(topo, gpu=True):
    return [" ".join(topo.path_kind(a, b, gpu).label for b in range(topo.size))
            for a in range(topo.size)]


# ---------------------------------------------------------------------------- fixtures
def test_fixture_names():
    assert fixture_names() == ["1host_2ranks", "2hosts_2ranks", "2hosts_2ranks_interleaved",
                               "3hosts_uneven", "4hosts_8gpus_nvlink"]
    with pytest.raises(ValueError, match="unknown 'nope'.*2hosts_2ranks"):
        fixture("nope")


@pytest.mark.parametrize("name", sorted(build.FIXTURES))
def test_fixture_round_trips_exactly(name):
    with open(os.path.join(FIXTURE_DIR, name + ".json")) as f:
        text = f.read()
    topo = Topology.from_json(text)
    assert topo.to_json() == text                      # byte for byte
    again = Topology.from_json(topo.to_json())
    assert again == topo and again.to_dict() == json.loads(text)
    assert fixture(name) == topo == fixture(name + ".json")


@pytest.mark.parametrize("name", sorted(build.FIXTURES))
def test_fixture_files_are_what_build_makes(name):
    """The files come from hand-written views through fuse(); rebuild with
    `python -m topology.fixtures.build` after a model change."""
    with open(os.path.join(FIXTURE_DIR, name + ".json")) as f:
        assert build.build(name) == f.read()


EXPECTED = {
    "1host_2ranks": (
        [[0, 1]],
        ["X SOC",
         "SOC X"]),
    "2hosts_2ranks": (
        [[0, 1], [2, 3]],
        ["X SOC SW SW",
         "SOC X SW SW",
         "SW SW X SOC",
         "SW SW SOC X"]),
    "2hosts_2ranks_interleaved": (
        [[0, 2], [1, 3]],
        ["X SW SOC SW",
         "SW X SW SOC",
         "SOC SW X SW",
         "SW SOC SW X"]),
    "3hosts_uneven": (
        [[0, 1, 2], [3, 4], [5]],
        ["X SOC HOST SW SW NET",
         "SOC X HOST SW SW NET",
         "HOST HOST X SW SW NET",
         "SW SW SW X SOC NET",
         "SW SW SW SOC X NET",
         "NET NET NET NET NET X"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_hosts_and_path_kinds(name):
    topo = fixture(name)
    hosts, rows = EXPECTED[name]
    assert topo.hosts == hosts
    assert matrix(topo) == rows
    assert matrix(topo, gpu=False) == rows             # no GPUs: the same
    for h, members in enumerate(hosts):
        for i, r in enumerate(members):
            assert topo.host_of(r) == h and topo.local_rank(r) == i


def test_fixture_placement_facts():
    assert fixture("1host_2ranks").is_uniform and fixture("2hosts_2ranks").is_uniform
    uneven = fixture("3hosts_uneven")
    assert not uneven.is_uniform and uneven.num_hosts == 3 and uneven.size == 6
    assert [uneven.nic_of(r)["name"] for r in range(6)] == ["eth0"] * 6   # not the shared bridge
    assert [uneven.address_of(r) for r in (0, 3, 5)] == ["198.18.0.1", "198.18.0.2", "198.18.1.1"]
    two = fixture("2hosts_2ranks")
    assert [two.nic_of(r)["name"] for r in range(4)] == ["veth0", "veth0", "veth1", "veth1"]
    assert [two.address_of(r) for r in range(4)] == ["198.18.0.1"] * 2 + ["198.18.0.2"] * 2
    assert fixture("1host_2ranks").address_of(1) == "198.18.0.1"


def test_gpu_fixture_path_kinds():
    topo = fixture("4hosts_8gpus_nvlink")
    assert topo.size == 32 and topo.is_uniform
    assert topo.hosts == [list(range(8 * h, 8 * h + 8)) for h in range(4)]
    # written down: rank 0 (gpu 0, rail ib0) against everyone
    assert matrix(topo)[0] == ("X " + "NV " * 7 + ("SW SW " + "NET " * 6) * 3).strip()
    for a in range(32):
        for b in range(32):
            same_host, la, lb = a // 8 == b // 8, a % 8, b % 8
            if a == b:
                want, want_cpu = PathKind.SELF, PathKind.SELF
            elif same_host:      # NVSwitch joins all 8; cores bound to the GPU's socket
                want = PathKind.NVLINK
                want_cpu = PathKind.SAME_SOCKET if la // 4 == lb // 4 else PathKind.SAME_HOST
            else:                # one rail subnet per NIC; GPUs 2k, 2k+1 use NIC k
                want = want_cpu = PathKind.SAME_SWITCH if la // 2 == lb // 2 else PathKind.NETWORK
            assert topo.path_kind(a, b) == want, (a, b)
            assert topo.path_kind(a, b, gpu=False) == want_cpu, (a, b)
    assert [topo.nic_of(r)["name"] for r in range(8)] == ["ib0", "ib0", "ib1", "ib1",
                                                         "ib2", "ib2", "ib3", "ib3"]
    assert topo.address_of(13) == "198.18.3.2"
    assert topo.gpu_of(13).gpu_idx == 5 and topo.gpu_of(13).numa_idx == 1
    nv = topo.link(0, 7)
    assert (nv.kind, nv.gbs) == (PathKind.NVLINK, 18 * 25.0)
    ib = topo.link(0, 8)
    assert (ib.kind, ib.gbs) == (PathKind.SAME_SWITCH, 50.0) and "400000 Mbit/s" in ib.source
    assert topo.link(0, 1, gpu=False) == DEFAULT_LINKS[PathKind.SAME_SOCKET]


def test_link_classes():
    two = fixture("2hosts_2ranks")
    sw = two.link(0, 2)
    assert sw.kind == PathKind.SAME_SWITCH and sw.gbs == pytest.approx(0.125)   # tbf, not veth 10G
    assert "tbf" in sw.source and sw.us == DEFAULT_LINKS[PathKind.SAME_SWITCH].us
    assert two.link(0, 1) == DEFAULT_LINKS[PathKind.SAME_SOCKET]
    assert two.link(3, 3) == DEFAULT_LINKS[PathKind.SELF]
    uneven = fixture("3hosts_uneven")
    assert uneven.link(0, 3).gbs == pytest.approx(1.25)      # 10 Gbit/s both ends
    assert uneven.link(3, 5).gbs == pytest.approx(0.125)     # the 1 Gbit/s end
    assert uneven.link(0, 5).kind == PathKind.NETWORK


def test_path_kinds_are_ordered_and_every_kind_has_a_sourced_default():
    order = [PathKind.SELF, PathKind.SAME_GPU, PathKind.NVLINK, PathKind.PCIE,
             PathKind.SAME_SOCKET, PathKind.SAME_HOST, PathKind.SAME_SWITCH, PathKind.NETWORK]
    assert sorted(PathKind) == order and all(a < b for a, b in zip(order, order[1:]))
    for kind in PathKind:
        link = DEFAULT_LINKS[kind]
        assert link.kind == kind and link.gbs > 0 and link.us >= 0 and len(link.source) > 20
        assert LABELS[kind]
    # closer paths are never slower in the default table, except the NVLink/PCIe GPU
    # kinds, which are faster than host memory
    assert DEFAULT_LINKS[PathKind.SAME_SOCKET].us < DEFAULT_LINKS[PathKind.SAME_SWITCH].us


def test_link_override_from_json_wins_and_round_trips():
    data = fixture("2hosts_2ranks").to_dict()
    data["links"] = {"SAME_SWITCH": {"gbs": 0.11, "us": 45.0, "source": "ping-pong, 2026-11-23"}}
    topo = Topology.from_dict(data)
    link = topo.link(1, 3)
    assert (link.gbs, link.us, link.source) == (0.11, 45.0, "ping-pong, 2026-11-23")
    assert topo.link(0, 1) == DEFAULT_LINKS[PathKind.SAME_SOCKET]
    assert Topology.from_json(topo.to_json()).to_dict() == data
    data["links"] = {"WARP": {"gbs": 1, "us": 1}}
    with pytest.raises(ValueError, match="unknown path kind 'WARP'"):
        Topology.from_dict(data)
    data["links"] = {"NETWORK": {"gbs": 1}}
    with pytest.raises(ValueError, match="links.NETWORK: needs gbs and us"):
        Topology.from_dict(data)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="other/9"), "format must be"),
    (lambda d: d.update(size=3), "size is 3 but 4 ranks"),
    (lambda d: d.update(extra=1), "unknown keys"),
    (lambda d: d["hosts"][0].update(colour="red"), r"hosts\[0\]: unknown keys \['colour'\]"),
    (lambda d: d["hosts"][0]["nics"][0].pop("name"), r"hosts\[0\].nics\[0\]: missing 'name'"),
    (lambda d: d["ranks"][1].update(rank=7), "ranks must be 0..3 in order"),
    (lambda d: d["ranks"][1].update(host_idx=5), "rank 1 is on host 5"),
    (lambda d: [p.update(host_idx=0) for p in d["ranks"]], r"hosts \[1\] have no ranks"),
    (lambda d: d.update(hosts="ab"), r"hosts\[0\]: expected an object, got str"),
])
def test_from_json_rejects_malformed(edit, message):
    data = fixture("2hosts_2ranks").to_dict()
    edit(data)
    with pytest.raises(ValueError, match=message):
        Topology.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="not JSON"):
        Topology.from_json("{")


def test_hosts_are_renumbered_by_lowest_rank():
    data = fixture("2hosts_2ranks").to_dict()
    data["hosts"].reverse()
    for p in data["ranks"]:
        p["host_idx"] = 1 - p["host_idx"]
    assert Topology.from_dict(data) == fixture("2hosts_2ranks")


# ---------------------------------------------------------------------------- NIC choice
def test_socket_ifname_override(monkeypatch):
    topo = fixture("3hosts_uneven")
    monkeypatch.setenv("TOPOCOMM_SOCKET_IFNAME", "br-")
    assert topo.nic_of(0)["name"] == "br-docker"
    # the bridges carry the same address on every host: no link between them
    assert topo.path_kind(0, 3) == PathKind.NETWORK
    monkeypatch.setenv("TOPOCOMM_SOCKET_IFNAME", "^eth")
    assert topo.nic_of(3)["name"] == "br-docker"
    monkeypatch.setenv("TOPOCOMM_SOCKET_IFNAME", "ib9,eth0")
    assert topo.nic_of(3)["name"] == "eth0" and topo.path_kind(0, 3) == PathKind.SAME_SWITCH
    monkeypatch.setenv("TOPOCOMM_SOCKET_IFNAME", "wlan")
    assert topo.nic_of(0) is None and topo.address_of(0) is None
    assert topo.path_kind(0, 3) == PathKind.NETWORK and topo.path_kind(0, 1) == PathKind.SAME_SOCKET


def view(rank, host_id, nics=(), cpus="0-1", socket_idx=0, **extra):
    v = {"rank": rank, "host": {"host_id": host_id, "hostname": host_id.split("/")[0]},
         "cpus": cpus, "socket_idx": socket_idx, "numa_idx": socket_idx, "nics": list(nics)}
    v.update(extra)
    return v


def nic(name, *addresses, **kw):
    return {"name": name, "addresses": list(addresses), **kw}


def test_socket_ifname_as_the_rank_saw_it():
    views = [view(0, "a", [nic("eth0", "198.18.0.1/24"), nic("eth1", "198.18.1.1/24")],
                  socket_ifname="eth1"),
             view(1, "b", [nic("eth0", "198.18.0.2/24"), nic("eth1", "198.18.1.2/24")])]
    topo = fuse(views)
    assert topo.nic_of(0)["name"] == "eth1"
    assert topo.nic_of(1)["name"] == "eth0"           # ties: both reach host a; by name
    assert topo.path_kind(0, 1) == PathKind.NETWORK   # 198.18.1.0/24 vs 198.18.0.0/24


def test_nic_choice_prefers_reach_then_speed_then_default_route():
    views = [view(0, "a", [nic("eth0", "198.18.0.1/24", speed_mbps=1000),
                           nic("eth1", "198.18.1.1/24", speed_mbps=100000),
                           nic("lo", "127.0.0.1/8", is_loopback=True, kind="loopback")]),
             view(1, "b", [nic("eth0", "198.18.0.2/24")]),
             view(2, "c", [nic("eth0", "198.18.0.3/24"), nic("eth5", "198.18.1.3/24")])]
    topo = fuse(views)
    assert topo.nic_of(0)["name"] == "eth0"           # reaches b and c; eth1 only c
    assert topo.path_kind(0, 1) == topo.path_kind(0, 2) == PathKind.SAME_SWITCH
    alone = fuse([view(0, "a", [nic("eth0", "198.18.0.1/24", speed_mbps=1000),
                                nic("eth1", "198.18.1.1/24", speed_mbps=100000),
                                nic("eth2", "198.18.2.1/24", speed_mbps=100000,
                                    is_default_route=True),
                                nic("eth3", "198.18.3.1/24", speed_mbps=400000, is_up=False)])])
    assert alone.nic_of(0)["name"] == "eth2"           # fastest up, then default route


def test_loopback_only_for_a_single_host():
    lo = nic("lo", "127.0.0.1/8", is_loopback=True, kind="loopback")
    one = fuse([view(0, "a", [lo, nic("eth0")]), view(1, "a", [lo])])
    assert one.nic_of(0)["name"] == "lo" and one.address_of(1) == "127.0.0.1"
    two = fuse([view(0, "a", [lo]), view(1, "b", [lo])])
    assert two.nic_of(0) is None and two.path_kind(0, 1) == PathKind.NETWORK
    assert fuse([view(0, "a")]).nic_of(0) is None


# ---------------------------------------------------------------------------- fuse
def test_fuse_two_netns_hosts_of_one_machine():
    """Same hostname and boot id, different netns inode: two hosts."""
    views = [view(r, f"vm/b00t/{4026532200 + 10 * (r // 2)}", [nic("veth", f"198.18.0.{1 + r // 2}/24")])
             for r in range(4)]
    topo = fuse(views)
    assert topo.hosts == [[0, 1], [2, 3]] and matrix(topo) == EXPECTED["2hosts_2ranks"][1]


def test_fuse_views_built_by_host_identity(tmp_path, monkeypatch):
    """local_view on two fake roots (different netns files): two hosts; TOPOCOMM_HOST_ID
    set to one value on both: one host."""
    from topology.detect import local_view
    roots = []
    for name in ("h0", "h1"):
        root = tmp_path / name
        for rel, text in [("proc/sys/kernel/hostname", "vm"), ("proc/sys/kernel/random/boot_id", "b"),
                          ("proc/self/ns/net", "")]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        roots.append(str(root))
    nvml_none = object()  # has no NVML methods: the GPU probe gives [] whatever the machine

    def views():
        return [local_view(r, roots[r % 2], nvml=nvml_none) for r in range(4)]
    assert fuse(views()).hosts == [[0, 2], [1, 3]]
    monkeypatch.setenv("TOPOCOMM_HOST_ID", "one-box")
    topo = fuse(views())
    assert topo.hosts == [[0, 1, 2, 3]] and topo.host_nodes[0].host_id == "one-box"


def test_fuse_interleaved_and_shuffled():
    views = [view(r, "A" if r % 2 == 0 else "B", [nic("eth0", f"198.18.0.{1 + r % 2}/24")])
             for r in range(4)]
    topo = fuse(list(reversed(views)))
    assert topo.hosts == [[0, 2], [1, 3]]
    assert [topo.host_of(r) for r in range(4)] == [0, 1, 0, 1]
    assert [topo.local_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [h.host_id for h in topo.host_nodes] == ["A", "B"]
    assert matrix(topo) == EXPECTED["2hosts_2ranks_interleaved"][1]


def test_fuse_uneven_with_lowest_rank_host_order():
    ids = ["B", "A", "A", "C", "A", "B"]
    topo = fuse([view(r, h) for r, h in enumerate(ids)])
    assert topo.hosts == [[0, 5], [1, 2, 4], [3]] and not topo.is_uniform
    assert [h.host_id for h in topo.host_nodes] == ["B", "A", "C"]
    assert topo.local_rank(4) == 2 and topo.host_of(3) == 2


def test_fuse_sockets_decide_same_socket():
    topo = fuse([view(0, "a", cpus="0-3", socket_idx=0), view(1, "a", cpus="4-7", socket_idx=1),
                 view(2, "a", cpus="0-7", socket_idx=None), view(3, "a", cpus="1", socket_idx=0)])
    assert matrix(topo) == ["X HOST HOST SOC", "HOST X HOST HOST", "HOST HOST X HOST",
                            "SOC HOST HOST X"]


def _gpus(n, nvlinks, pcie):
    return [{"gpu_idx": i, "name": "G", "numa_idx": i // 2, "nvlinks": nvlinks(i), "pcie": pcie(i)}
            for i in range(n)]


def test_fuse_assigns_gpus_and_gpu_path_kinds():
    """4 GPUs: 0-1 direct NVLink x4; 2, 3 none; PCIe: 0-2 hostbridge, 1-3 node, rest system."""
    levels = {(0, 2): "hostbridge", (1, 3): "node"}
    gpus = _gpus(4, lambda i: {str(1 - i): 4} if i < 2 else {},
                 lambda i: {str(j): levels.get((min(i, j), max(i, j)), "system")
                            for j in range(4) if j != i})
    views = [view(r, "g", gpus=gpus) for r in range(5)]       # 5 ranks: rank 4 shares GPU 0
    topo = fuse(views)
    assert [topo.ranks[r].gpu_idx for r in range(5)] == [0, 1, 2, 3, 0]
    assert matrix(topo) == ["X NV PCI HOST GPU",
                            "NV X HOST SOC NV",
                            "PCI HOST X HOST PCI",
                            "HOST SOC HOST X HOST",
                            "GPU NV PCI HOST X"]
    assert matrix(topo, gpu=False) == ["X SOC SOC SOC SOC", "SOC X SOC SOC SOC", "SOC SOC X SOC SOC",
                                       "SOC SOC SOC X SOC", "SOC SOC SOC SOC X"]
    assert topo.link(0, 1).gbs == 100.0                       # 4 links x 25 GB/s
    assert topo.link(0, 4) == DEFAULT_LINKS[PathKind.SAME_GPU]
    # visible GPUs and explicit choices are honoured; no PCIe facts: NUMA decides
    views = [view(0, "g", gpus=_gpus(4, lambda i: {}, lambda i: {}), visible_gpus=[3, 2]),
             view(1, "g", gpus=_gpus(4, lambda i: {}, lambda i: {}), visible_gpus=[3, 2]),
             view(2, "g", gpus=_gpus(4, lambda i: {}, lambda i: {}), gpu_idx=0)]
    topo = fuse(views)
    assert [topo.ranks[r].gpu_idx for r in range(3)] == [3, 2, 0]
    assert matrix(topo) == ["X SOC HOST", "SOC X HOST", "HOST HOST X"]


@pytest.mark.parametrize("views,message", [
    ([], "no views"),
    ([{"rank": 0}], "needs 'rank' and 'host'"),
    ([view(0, "a"), view(0, "b")], "rank 0 has two views"),
    ([view(0, "a"), view(2, "b")], r"ranks must be 0..1, got \[0, 2\]"),
    ([dict(view(0, "a"), format="topocomm-view/99")], "different topocomm versions"),
    ([view(0, "a", [{"name": "eth0", "mtu": 1500}])], r"nics\[0\]: unknown keys \['mtu'\]"),
])
def test_fuse_rejects_bad_views(views, message):
    with pytest.raises(ValueError, match=message):
        fuse(views)


# ---------------------------------------------------------------------------- gather
def run_ranks(size, fn):
    results, errors = [None] * size, []

    def body(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_gather_three_threads_detects_this_machine():
    store = HashStore(timeout=30)
    topos = run_ranks(3, lambda r: gather(store, "g1", r, 3, timeout=30))
    assert topos[0] == topos[1] == topos[2]
    assert topos[0].hosts == [[0, 1, 2]] and topos[0].size == 3
    assert sorted(store._data) == ["g1/topo/0", "g1/topo/1", "g1/topo/2"]
    assert json.loads(store.get("g1/topo/2"))["rank"] == 2


def test_gather_fuses_every_rank_view(monkeypatch):
    """Each thread publishes the view of one rank of the uneven fixture: every rank gets
    the fixture back."""
    import topology.detect
    views = build.views_3hosts_uneven()
    monkeypatch.setattr(topology.detect, "local_view", lambda rank: views[rank])
    store = HashStore(timeout=30)
    topos = run_ranks(6, lambda r: gather(store, "g2", r, 6, timeout=30))
    assert all(t == fixture("3hosts_uneven") for t in topos)


def test_gather_missing_peer_times_out():
    store = HashStore(timeout=0.2)
    with pytest.raises(TimeoutError, match="rank 0 got no view from rank 1"):
        gather(store, "g3", 0, 2, timeout=0.2)


def test_gather_over_a_torch_store_bounds_the_wait():
    dist = pytest.importorskip("torch.distributed")
    store = dist.HashStore()
    topos = run_ranks(2, lambda r: gather(store, "g6", r, 2, timeout=30))
    assert topos[0] == topos[1] and topos[0].hosts == [[0, 1]]
    with pytest.raises(TimeoutError, match="no view from rank 1"):
        gather(dist.HashStore(), "g7", 0, 2, timeout=0.2)   # torch's own default is 300 s


def test_topo_file_replaces_detection_and_checks_size(monkeypatch, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(fixture("2hosts_2ranks").to_json())
    monkeypatch.setenv("TOPOCOMM_TOPO_FILE", str(path))
    store = HashStore(timeout=0.2)
    assert gather(store, "g4", 3, 4, timeout=1) == fixture("2hosts_2ranks")
    assert store._data == {}                            # no detection, no store traffic
    with pytest.raises(ValueError, match=r"t.json describes 4 ranks but this group has 3"):
        gather(store, "g4", 0, 3, timeout=1)
    path.write_text("{}")
    with pytest.raises(ValueError, match="t.json: topology: format must be"):
        gather(store, "g4", 0, 4, timeout=1)


def test_topo_dump_file_written_by_rank_0(monkeypatch, tmp_path):
    dump = tmp_path / "dump.json"
    monkeypatch.setenv("TOPOCOMM_TOPO_DUMP_FILE", str(dump))
    store = HashStore(timeout=30)
    topos = run_ranks(2, lambda r: gather(store, "g5", r, 2, timeout=30))
    assert Topology.load(str(dump)) == topos[0] == topos[1]
    assert os.listdir(tmp_path) == ["dump.json"]        # no temporary left behind


def test_import_reads_and_writes_nothing(tmp_path):
    env = dict(os.environ, TOPOCOMM_TOPO_FILE=str(tmp_path / "missing.json"),
               TOPOCOMM_TOPO_DUMP_FILE=str(tmp_path / "dump.json"))
    code = "import topology, topology.detect, topology.fuse, topology.model, topology.describe"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60,
                   cwd=os.path.dirname(os.path.dirname(FIXTURE_DIR)))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- describe + CLI
def test_describe_fixture_text():
    text = fixture("3hosts_uneven").describe()
    assert text.startswith("topology: 6 ranks on 3 hosts (uneven: 3+2+1)\n")
    lines = text.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("path kinds")))
    assert lines[head].split()[2:] == [f"r{i}" for i in range(6)]
    assert lines[head + 3].split() == ["r2", "HOST", "HOST", "X", "SW", "SW", "NET"]
    for label in ("SOC", "HOST", "SW", "NET"):
        assert any(line.split()[:1] == [label] for line in lines[head + 7:head + 14]), label
    assert "  nic eth0  198.18.1.1/24  1 Gbit/s  up  default route" in lines
    assert "  rank 2 (local 2): cpus 8-15  socket 1  numa 1  nic eth0 198.18.0.1" in lines
    assert any(line.startswith("  NET ") and "0.125 GB/s" in line for line in lines)
    gpu = fixture("4hosts_8gpus_nvlink").describe()
    assert "NV18" in gpu and "ib mlx5_0: port 1 ACTIVE 400 Gb/s InfiniBand  netdevs ib0" in gpu


def cli(capsys, *argv):
    from comms.cli import main
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_topo_this_machine(capsys):
    rc, out, _ = cli(capsys, "topo")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "# this machine, as a 1-rank group"
    assert "path kinds  r0" in lines and "  r0         X" in lines
    assert "link classes (GB/s one direction, us one-way small message)" in lines
    assert lines[-1].startswith("data path: ")
    rc, out, _ = cli(capsys, "topo", "--json")
    topo = Topology.from_json(out)
    assert rc == 0 and topo.size == 1 and topo.host_nodes[0].host_id == topology.host_id()


def test_cli_topo_fixture_and_files(capsys, monkeypatch, tmp_path):
    rc, out, _ = cli(capsys, "topo", "--fixture", "2hosts_2ranks")
    assert rc == 0 and out.splitlines()[0] == "# fixture 2hosts_2ranks"
    assert ["  r0         X SOC  SW  SW", "  r3        SW  SW SOC   X"] == [
        line for line in out.splitlines() if line.startswith(("  r0 ", "  r3 "))]
    assert "data path" not in out
    rc, out, _ = cli(capsys, "topo", "--fixture", "4hosts_8gpus_nvlink", "--json")
    assert Topology.from_json(out) == fixture("4hosts_8gpus_nvlink")
    path = tmp_path / "t.json"
    path.write_text(fixture("3hosts_uneven").to_json())
    rc, out, _ = cli(capsys, "topo", "--file", str(path))
    assert rc == 0 and "(uneven: 3+2+1)" in out
    monkeypatch.setenv("TOPOCOMM_TOPO_FILE", str(path))
    rc, out, _ = cli(capsys, "topo")
    assert rc == 0 and out.splitlines()[0] == f"# {path}"
    rc, out, err = cli(capsys, "topo", "--fixture", "nope")
    assert rc == 2 and out == "" and "unknown 'nope'" in err
    rc, out, err = cli(capsys, "topo", "--file", str(tmp_path / "missing.json"))
    assert rc == 2 and "missing.json" in err

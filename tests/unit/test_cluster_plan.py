"""`topocomm explain --cluster SPEC` (comms/plan/cluster.py): the spec parser, the estimates
against a MultiHostSelector over an equivalent fused Topology, monotonic estimates, and the
100k-rank case's time."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comms import cli
from comms.plan import cluster, cost
from comms.plan.select import MultiHostSelector
from topology.fixtures.build import cluster_topology
from topology.model import DEFAULT_LINKS, LinkClass, PathKind

ROOT = Path(__file__).resolve().parents[2]
KIB, MIB = 1 << 10, 1 << 20
BIG = "hosts=12500,ranks=8,intra=nvlink:900GB/s:2us,nics=4x200gbit,net_us=5"
SIZES = [8, 4 * KIB, 64 * KIB, 1 * MIB, 16 * MIB, 256 * MIB]


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    monkeypatch.delenv("TOPOCOMM_ALGO", raising=False)
    monkeypatch.delenv("TOPOCOMM_SOCKET_NSTREAMS", raising=False)


# ---- the spec --------------------------------------------------------------------------------
def test_the_example_spec():
    s = cluster.parse_cluster(BIG)
    assert (s.hosts, s.ranks, s.size, s.cores, s.streams) == (12500, 8, 100000, 8, None)
    assert s.intra.kind == PathKind.NVLINK and (s.intra.gbs, s.intra.us) == (900.0, 2.0)
    assert (s.nics, s.nic_gbs, s.net_us) == (4, 25.0, 5.0)
    link = s.net_link
    assert (link.gbs, link.us) == (100.0, 5.0) and "aggregate" in link.source


def test_defaults_are_the_librarys():
    s = cluster.parse_cluster("hosts=4,ranks=2")
    assert s.intra == DEFAULT_LINKS[PathKind.SAME_SOCKET]
    net = DEFAULT_LINKS[PathKind.NETWORK]
    assert (s.net_link.gbs, s.net_link.us) == (net.gbs, net.us)
    assert s.cores == 2 and s.streams is None


@pytest.mark.parametrize("text,gbs", [
    ("900GB/s", 900.0), ("25 GB/s", 25.0), ("1500MB/s", 1.5), ("1TB/s", 1000.0),
    ("200gbit", 25.0), ("200Gbit/s", 25.0), ("400Gbps", 50.0), ("100Gb/s", 12.5),
    ("800mbit", 0.1), ("12GBps", 12.0)])
def test_rates(text, gbs):
    assert cluster.parse_rate("nics", text) == pytest.approx(gbs)


@pytest.mark.parametrize("text,us", [("2us", 2.0), ("500ns", 0.5), ("0.01ms", 10.0), ("5", 5.0)])
def test_latencies(text, us):
    assert cluster.parse_latency("net_us", text) == pytest.approx(us)


def test_intra_kinds_and_defaults():
    assert cluster.parse_cluster("hosts=2,ranks=2,intra=pcie").intra == DEFAULT_LINKS[PathKind.PCIE]
    s = cluster.parse_cluster("hosts=2,ranks=2,intra=host:20GB/s")
    assert s.intra.kind == PathKind.SAME_HOST and (s.intra.gbs, s.intra.us) == (20.0, 1.3)
    assert cluster.parse_cluster("hosts=2,ranks=2,nics=100gbit").nics == 1


def test_several_host_counts():
    specs = cluster.parse_clusters("hosts=128/1250/12500,ranks=8,nics=4x200gbit")
    assert [s.size for s in specs] == [1024, 10000, 100000]
    assert specs[1].text == "hosts=1250,ranks=8,nics=4x200gbit"
    with pytest.raises(cluster.SpecError, match="^--cluster: hosts:"):
        cluster.parse_cluster("hosts=128/1250,ranks=8")


@pytest.mark.parametrize("spec,field", [
    ("", "spec"),
    ("ranks=8", "hosts"),
    ("hosts=1024", "ranks"),
    ("hosts=1,ranks=8", "hosts"),
    ("hosts=10x,ranks=8", "hosts"),
    ("hosts=4/1,ranks=8", "hosts"),
    ("hosts=200000,ranks=8", "hosts"),
    ("hosts=4,ranks=0", "ranks"),
    ("hosts=4,ranks=8,ranks=4", "ranks"),
    ("hosts=4,ranks=8,intra=nvlnk", "intra"),
    ("hosts=4,ranks=8,intra=nvlink:900", "intra"),
    ("hosts=4,ranks=8,intra=nvlink:900GB/s:2parsecs", "intra"),
    ("hosts=4,ranks=8,intra=nvlink:9GB/s:2us:x", "intra"),
    ("hosts=4,ranks=8,nics=4x", "nics"),
    ("hosts=4,ranks=8,nics=0x200gbit", "nics"),
    ("hosts=4,ranks=8,nics=200", "nics"),
    ("hosts=4,ranks=8,nics=0GB/s", "nics"),
    ("hosts=4,ranks=8,net_us=fast", "net_us"),
    ("hosts=4,ranks=8,cores=0", "cores"),
    ("hosts=4,ranks=8,streams=-1", "streams"),
    ("hosts=4,ranks=8,hots=3", "hots"),
    ("hosts=4,ranks=8,bogus", "bogus"),
])
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(cluster.SpecError) as info:
        cluster.parse_clusters(spec)
    assert info.value.field == field
    assert str(info.value).startswith(f"--cluster: {field}: ")
    assert isinstance(info.value, ValueError)


# ---- the same model as a real group ----------------------------------------------------------
def _same_choices(a, b):
    for coll in cluster.COLLECTIVES:
        for n in SIZES:
            x, y = a.choose(coll, n), b.choose(coll, n)
            assert (x.algorithm, x.why) == (y.algorithm, y.why), (coll, n)
            assert list(x.estimates) == list(y.estimates)
            for algo in x.estimates:
                tx, ty = a.model.time(coll, algo, n), b.model.time(coll, algo, n)
                assert tx.total_us == pytest.approx(ty.total_us, rel=1e-12), (coll, n, algo)
                assert tx.latency_us == pytest.approx(ty.latency_us, rel=1e-12)
                assert tx.bandwidth_us == pytest.approx(ty.bandwidth_us, rel=1e-12)


@pytest.mark.parametrize("spec,nic_mbps,cores,links", [
    # no override: the topology's link is its NIC rate with the default TCP latency
    ("hosts=4,ranks=2,nics=10gbit", [10000], None, None),
    ("hosts=4,ranks=2,nics=1x1gbit,cores=1", [1000], 1, None),
    ("hosts=2,ranks=3,nics=25GB/s", [200000], None, None),
    ("hosts=3,ranks=1,nics=100gbit", [100000], None, None),
    # 4 x 200 Gbit/s aggregated = one 800 Gbit/s link; latencies only through overrides
    ("hosts=4,ranks=2,intra=socket:20GB/s:1us,nics=4x200gbit,net_us=5", [800000], None,
     {PathKind.SAME_SOCKET: LinkClass(PathKind.SAME_SOCKET, 20.0, 1.0, "test"),
      PathKind.SAME_SWITCH: LinkClass(PathKind.SAME_SWITCH, 100.0, 5.0, "test")}),
    ("hosts=8,ranks=2,intra=nvlink:900GB/s:2us,nics=4x200gbit,net_us=5,streams=4", [800000],
     None, {PathKind.SAME_SOCKET: LinkClass(PathKind.SAME_SOCKET, 900.0, 2.0, "test"),
            PathKind.SAME_SWITCH: LinkClass(PathKind.SAME_SWITCH, 100.0, 5.0, "test")}),
])
def test_estimates_equal_a_fused_topologys(spec, nic_mbps, cores, links):
    """The cluster's choices, why and every estimate's terms equal those of a
    MultiHostSelector over a Topology fused from views of the same machine."""
    s = cluster.parse_cluster(spec)
    topo = cluster_topology(s.hosts, s.ranks, nic_mbps, cores, links)
    streams = s.streams or 2
    real = MultiHostSelector(topo.hosts, topo, num_streams=streams)
    mine = cluster.selector(s)
    assert mine.model.num_streams == streams
    assert (real.model.link.gbs, real.model.link.us) == (mine.model.link.gbs, mine.model.link.us)
    _same_choices(mine, real)


def test_the_library_takes_one_nic_of_several():
    """What the output says of NICs: on a fused 4-NIC host the library's link is one NIC's
    rate; --cluster gives the model the aggregate."""
    topo = cluster_topology(2, 2, [200000] * 4)
    real = MultiHostSelector(topo.hosts, topo, num_streams=2)
    assert real.model.link.gbs == 25.0
    assert cluster.selector(cluster.parse_cluster("hosts=2,ranks=2,nics=4x200gbit")).model.link.gbs == 100.0


# ---- behaviour ---------------------------------------------------------------------------------
GRID = sorted({int(m * (1 << k)) for k in range(31) for m in (1, 1.25, 1.5, 1.75)})


@pytest.mark.parametrize("spec", [
    "hosts=4,ranks=2,streams=1", "hosts=16,ranks=1,nics=100gbit,streams=1",
    "hosts=1024,ranks=16,cores=4,streams=1",
    "hosts=128,ranks=8,nics=4x200gbit,net_us=5,streams=1", BIG + ",streams=1"])
def test_more_bytes_never_take_less_time(spec):
    """Every algorithm's estimate and the chosen one, 1 B .. 1.75 GiB."""
    sel = cluster.selector(cluster.parse_cluster(spec))
    for coll in cluster.COLLECTIVES:
        prev = {}
        for n in GRID:
            c = sel.choose(coll, n)
            for algo, us in list(c.estimates.items()) + [("chosen", c.estimate_us)]:
                if algo in prev:
                    assert us >= prev[algo][1], (coll, algo, prev[algo], (n, us))
                prev[algo] = (n, us)


def test_striping_is_the_one_step_down():
    """With 2+ streams per peer the model stripes transfers from STRIPE_MIN_BYTES (as the TCP
    transport does), at 0.94 of the link rate instead of one stream's 0.80: the leaders'
    all-reduce just above it takes less time than just below. Nowhere else."""
    sel = cluster.selector(cluster.parse_cluster("hosts=4,ranks=2,streams=2"))
    below, at = cost.STRIPE_MIN_BYTES - 128 * KIB, cost.STRIPE_MIN_BYTES
    t = [sel.model.time("allreduce", "leaders", n).total_us for n in (below, at)]
    assert t[1] < t[0] < t[1] * 0.94 / 0.80
    for coll in cluster.COLLECTIVES:
        prev = {}
        for n in GRID:
            for algo, us in sel.choose(coll, n).estimates.items():
                if algo in prev and us < prev[algo][1]:
                    assert (coll, algo, n) == ("allreduce", "leaders", at)
                prev[algo] = (n, us)


def test_a_large_cluster_picks_by_latency():
    """12500 hosts (not a power of 2): the network all-reduce is a ring of 2(H-1) steps, whose
    fixed costs dominate small sizes; the output says so."""
    s = cluster.parse_cluster(BIG)
    sel = cluster.selector(s)
    text = cluster.explain(sel, s, "allreduce", 8)
    assert "ring 24998 step(s)" in text and "not a power of 2" in text
    assert sel.choose("allreduce", 8).estimate_us > 24998 * (5 + cost.NET_STEP_US.value)
    s2 = cluster.parse_cluster(BIG.replace("12500", "16384"))
    text = cluster.explain(cluster.selector(s2), s2, "allreduce", 64 * MIB)
    assert "halving_doubling 28 step(s)" in text


# ---- the command and its time --------------------------------------------------------------------
def test_cli_prints_each_collective_and_size(capsys):
    rc = cli.main(["explain", "allreduce,all_to_all", "8", "64M", "--cluster",
                   "hosts=4/8,ranks=2,nics=4x200gbit,net_us=5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("# cluster ") == 2
    assert "one link per host" in out and "4 x 200 Gbit/s = 100 GB/s" in out
    assert "allreduce of 64 MiB (float32) on 16 ranks over 8 hosts" in out
    assert "all_to_all of 8 B (float32) on 8 ranks over 4 hosts" in out
    assert out.count("  why: ") == 8 and "latency" in out and "bandwidth" in out
    assert "# summary" in out


@pytest.mark.parametrize("argv,said", [
    (["--cluster", "hosts=4,ranks=x"], "--cluster: ranks:"),
    (["--cluster", "hosts=4,ranks=2", "--np", "4"], "leave out --np"),
    (["--cluster", "hosts=4,ranks=2,speed=1"], "--cluster: speed: unknown field"),
])
def test_cli_bad_spec(capsys, argv, said):
    assert cli.main(["explain", "allreduce", "8"] + argv) == 2
    assert said in capsys.readouterr().err


def test_100k_ranks_in_time():
    """Building the 12500 x 8 model and explaining 5 collectives x 3 sizes; the bound is
    generous for a loaded 2-core machine (under 0.1 s on an idle one)."""
    t0 = time.perf_counter()
    s = cluster.parse_cluster(BIG)
    sel = cluster.selector(s)
    text = [cluster.explain(sel, s, c, n) for c in cluster.COLLECTIVES
            for n in (8, 64 * KIB, 64 * MIB)]
    took = time.perf_counter() - t0
    print(f"12500 x 8 ranks: model + 15 explains in {took:.3f} s")
    assert len(text) == 15 and took < 10.0


def test_100k_ranks_command_in_time():
    """The whole command in a fresh interpreter (imports included)."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "comms.cli", "explain", "all", "8", "64K", "64M",
                          "--cluster", BIG], cwd=ROOT, capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    print(f"topocomm explain all 8 64K 64M --cluster {BIG}: {took:.3f} s")
    assert run.returncode == 0, run.stderr
    assert "on 100000 ranks over 12500 hosts" in run.stdout and took < 10.0

"""topology/probe.py: a ping-pong per link class over two threads (threads transport) gives
the same corrections on every rank, caches them per machine, and they land in a Topology's
link overrides, from which the cost model builds its tables."""
import json

import pytest

import topology
from comms.plan import cost
from comms.testing import ThreadWorld
from topology import probe
from topology.model import DEFAULT_LINKS, PathKind

SMALL = dict(large_bytes=256 << 10, small_iters=5, large_iters=2)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPOCOMM_PROBE_CACHE", str(tmp_path))
    return tmp_path


def test_pingpong_corrects_the_shm_link_class(cache_dir):
    with ThreadWorld(2) as w:
        out = w.run(lambda c: probe.measure(c, hostname="testhost", **SMALL))
    assert out[0] == out[1]                       # every rank gets rank 0's numbers
    link = out[0][PathKind.SAME_SOCKET]
    assert link.gbs > 0 and link.us > 0 and "probe on testhost" in link.source
    assert "threads send/recv" in link.source   # compared with the threads reference
    cached = json.loads((cache_dir / "probe-testhost.json").read_text())
    (entry,) = cached.values()
    assert entry["SAME_SOCKET"]["us"] > 0 and entry["SAME_SOCKET"]["gbs"] > 0


def test_second_probe_uses_the_cache(cache_dir):
    with ThreadWorld(2) as w:
        first = w.run(lambda c: probe.measure(c, hostname="testhost", **SMALL))
        second = w.run(lambda c: probe.measure(c, hostname="testhost", **SMALL))
    a, b = first[0][PathKind.SAME_SOCKET], second[1][PathKind.SAME_SOCKET]
    assert (a.gbs, a.us) == (b.gbs, b.us) and "(cached)" in b.source


def test_emulated_hosts_probe_the_network_kind(cache_dir, monkeypatch):
    monkeypatch.setenv("TOPOCOMM_SOCKET_IFNAME", "lo")
    with ThreadWorld(2, hosts="AB") as w:
        out = w.run(lambda c: probe.measure(c, hostname="testhost", use_cache=False, **SMALL))
    assert list(out[0]) == [PathKind.NETWORK] and out[0] == out[1]
    assert out[0][PathKind.NETWORK].gbs > 0


def test_corrections_feed_the_model():
    topo = topology.fixture("1host_2ranks")
    base = topo.link(0, 1, gpu=False)
    ref_us, ref_gbs = probe.REFERENCE["shm"][PathKind.SAME_SOCKET]
    slow = probe.correct(PathKind.SAME_SOCKET, base, 2 * ref_us, ref_gbs / 2, "h", "2026-11-23")
    assert slow.gbs == pytest.approx(base.gbs / 2, rel=1e-3)
    assert slow.us == pytest.approx(2 * base.us, rel=1e-3)
    fixed = probe.apply(topo, {PathKind.SAME_SOCKET: slow})
    assert fixed.link(0, 1, gpu=False) == slow
    assert topology.Topology.from_json(fixed.to_json()).link(0, 1, gpu=False).gbs == slow.gbs
    fast = cost.shm_model_for(topo, [0, 1]).time("allreduce", "ring", 256 << 20).total_us
    slower = cost.shm_model_for(fixed, [0, 1]).time("allreduce", "ring", 256 << 20).total_us
    assert slower > 1.5 * fast


def test_network_measurement_is_the_link_class():
    lk = probe.correct(PathKind.NETWORK, DEFAULT_LINKS[PathKind.NETWORK], 80.0, 0.117, "h", "d")
    assert (lk.gbs, lk.us) == (0.117, 80.0)


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv("TOPOCOMM_PROBE", raising=False)
    assert not probe.is_enabled()
    monkeypatch.setenv("TOPOCOMM_PROBE", "1")
    assert probe.is_enabled()

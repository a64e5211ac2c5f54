"""Golden selection table: for every topology fixture, a sweep of sizes per collective, the
algorithm comms/plan/select.py picks, the cost model's estimate of every candidate and why.
A change of the model or of a fixture shows up here as a readable diff.

    TOPOCOMM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_select_golden.py
rewrites tests/unit/golden/selection.txt (review the diff, then commit it)."""
import difflib
import os
from pathlib import Path

import pytest

import topology
from comms.plan.select import MultiHostSelector, Selector, fmt_us

GOLDEN = Path(__file__).resolve().parent / "golden" / "selection.txt"
SIZES = [8, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20]
GROUP_COLLECTIVES = ["allreduce", "all_to_all", "broadcast", "allgather", "reduce_scatter"]
HOST_COLLECTIVES = ["allreduce", "all_to_all", "broadcast", "allgather"]


def _size(nbytes):
    for shift, unit in ((20, "MiB"), (10, "KiB")):
        if nbytes >= 1 << shift:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def _rows(sel, collectives):
    out = []
    for coll in collectives:
        for nbytes in SIZES:
            c = sel.choose(coll, nbytes)
            others = "  ".join(f"{a} {fmt_us(us)}" for a, us in c.estimates.items()
                               if a != c.algorithm)
            out.append("%-15s %8s  %-13s %9s   %s" % (coll, _size(nbytes), c.algorithm,
                                                       fmt_us(c.estimate_us), others or "-"))
            out.append(f"    why: {c.why}")
    return out


def render() -> str:
    lines = ["# Selection golden table (comms/plan/select.py + comms/plan/cost.py over topology/fixtures).",
             "# Per fixture: the group's choice (multi-host model when it spans hosts), then the",
             "# one-host choice of host 0. Columns: collective, size (bytes per rank as the",
             "# Communicator passes them), chosen algorithm, its estimate, the other estimates.",
             "# Regenerate: TOPOCOMM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q "
             "tests/unit/test_select_golden.py", ""]
    for name in topology.fixture_names():
        topo = topology.fixture(name)
        lines.append(f"## {name}: {topo.size} ranks on {topo.num_hosts} host(s) {topo.hosts}")
        if topo.num_hosts > 1:
            sel = MultiHostSelector(topo.hosts, topo, num_streams=2)
            m = sel.model
            lines.append(f"# group: network {m.link.kind.name} {m.link.gbs:g} GB/s {m.link.us:g} us, "
                         f"2 TCP streams per peer")
            lines += _rows(sel, GROUP_COLLECTIVES)
        host = Selector.for_topology(topo, 0)
        m = host.model
        lines.append(f"# host 0: {m.ranks} ranks on {m.cores:g} cores, {m.link.kind.name} "
                     f"{m.link.gbs:g} GB/s {m.link.us:g} us, small all-reduce up to "
                     f"{host.small_limit} B")
        if m.ranks > 1:
            lines += _rows(host, HOST_COLLECTIVES)
        lines.append("")
    return "\n".join(lines)


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("TOPOCOMM_ALGO", "TOPOCOMM_SOCKET_NSTREAMS", "TOPOCOMM_SOCKET_IFNAME"):
        monkeypatch.delenv(var, raising=False)


def test_selection_matches_golden(clean_env):
    text = render()
    if os.environ.get("TOPOCOMM_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), f"{GOLDEN} missing: run with TOPOCOMM_UPDATE_GOLDEN=1"
    old = GOLDEN.read_text()
    if text != old:
        diff = "\n".join(difflib.unified_diff(old.splitlines(), text.splitlines(),
                                              "golden", "now", lineterm="", n=1))
        pytest.fail("the selection table changed; if intended, rerun with "
                    f"TOPOCOMM_UPDATE_GOLDEN=1 and commit the file:\n{diff}")


def test_golden_covers_every_fixture(clean_env):
    text = GOLDEN.read_text()
    for name in topology.fixture_names():
        assert f"## {name}:" in text

"""`topocomm topo | explain | bench`."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * mult)


def cmd_topo(args) -> int:
    import topology
    from comms.kernels import native
    path = args.file or os.environ.get("TOPOCOMM_TOPO_FILE")
    try:
        if args.fixture:
            topo, what = topology.fixture(args.fixture), f"fixture {args.fixture}"
        elif path:
            topo, what = topology.Topology.load(path), path
        else:
            from topology.detect import local_view
            topo, what = topology.fuse([local_view(0)]), "this machine, as a 1-rank group"
    except (OSError, ValueError) as exc:
        print(f"topocomm topo: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(topo.to_dict(), indent=1))
        return 0
    print(f"# {what}")
    print(topo.describe(), end="")
    if not (args.fixture or path):
        native.impl()
        print("data path: " + ("native C" if native.is_native
                               else f"numpy fallback ({native.why_not_native})"))
    return 0


def cmd_explain(args) -> int:
    """The cost model's estimates and choice for each size: this machine's host with --np
    ranks, or a topology (--fixture NAME, --file PATH; multi-host ones use the group model)."""
    from comms.core.layout import SegmentLayout
    from comms.plan.select import MultiHostSelector, Selector
    import topology
    path = args.file or os.environ.get("TOPOCOMM_TOPO_FILE")
    try:
        sizes = [_parse_size(s) for s in args.sizes]
        if args.fixture or path:
            topo = topology.fixture(args.fixture) if args.fixture else topology.Topology.load(path)
            what = f"fixture {args.fixture}" if args.fixture else path
            if topo.num_hosts > 1:
                sel = MultiHostSelector(topo.hosts, topo)
            else:
                sel = Selector.for_topology(topo, small_bytes=SegmentLayout(topo.size).small_bytes)
            print(f"# {what}: {topo.size} ranks on {topo.num_hosts} host(s) {topo.hosts}")
        else:
            sel = Selector(args.np, SegmentLayout(args.np).small_bytes)
            print(f"# this machine, {args.np} ranks on one host (shared memory)")
        for i, size in enumerate(sizes):
            if i:
                print()
            print(sel.explain(args.collective, size, args.dtype))
    except (OSError, ValueError) as exc:
        print(f"topocomm explain: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "bench", "main.py")
    if not os.path.exists(script):
        print("topocomm bench: bench/main.py is not installed with the package; run it from a "
              "source checkout (make bench)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, script] + args.rest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="topocomm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("topo", help="what was detected: hosts, sockets, NICs, GPUs, link classes")
    t.add_argument("--json", action="store_true", help="print the topology as JSON")
    t.add_argument("--file", help="describe this topology JSON file (default: TOPOCOMM_TOPO_FILE)")
    t.add_argument("--fixture", help="describe a canned machine from topology/fixtures, "
                   "e.g. 2hosts_2ranks")
    t.set_defaults(fn=cmd_topo)
    e = sub.add_parser("explain", help="which algorithm a collective of a size gets, the "
                       "model's estimates, and why")
    e.add_argument("collective")
    e.add_argument("sizes", nargs="+", help="bytes, e.g. 8 64K 64M")
    e.add_argument("--np", type=int, default=2, help="world size")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--fixture", help="explain for a canned machine from topology/fixtures "
                   "(e.g. 2hosts_2ranks); its ranks replace --np")
    e.add_argument("--file", help="explain for this topology JSON file (default: "
                   "TOPOCOMM_TOPO_FILE)")
    e.set_defaults(fn=cmd_explain)
    b = sub.add_parser("bench", help="run the benchmark job (bench/main.py)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

"""`topocomm topo | explain | calibrate | bench`."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from topology import env


def _parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * mult)


def cmd_topo(args) -> int:
    import topology
    from comms.kernels import native
    path = args.file or env.get("TOPOCOMM_TOPO_FILE")
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


def _collectives(text: str) -> list:
    """'allreduce', 'allreduce,all_to_all' or 'all' (comms.plan.cluster.COLLECTIVES)."""
    from comms.plan.cluster import COLLECTIVES
    if text.strip().lower() == "all":
        return list(COLLECTIVES)
    return [c.strip() for c in text.split(",") if c.strip()]


def cmd_explain(args) -> int:
    """The cost model's estimates and choice for each size: this machine's host with --np
    ranks, a topology (--fixture NAME, --file PATH; multi-host ones use the group model), or
    synthetic clusters (--cluster SPEC, comms/plan/cluster.py)."""
    from comms.core.layout import SegmentLayout
    from comms.plan.select import MultiHostSelector, Selector
    import topology
    path = args.file or env.get("TOPOCOMM_TOPO_FILE")
    try:
        sizes = [_parse_size(s) for s in args.sizes]
        collectives = _collectives(args.collective)
        if args.cluster:
            if args.fixture or args.file or args.np is not None:
                raise ValueError("--cluster describes the whole group: leave out --np, "
                                 "--fixture and --file")
            return _explain_clusters(args, collectives, sizes)
        np_ = args.np if args.np is not None else 2
        if args.fixture or path:
            topo = topology.fixture(args.fixture) if args.fixture else topology.Topology.load(path)
            what = f"fixture {args.fixture}" if args.fixture else path
            if topo.num_hosts > 1:
                sel = MultiHostSelector(topo.hosts, topo)
            else:
                sel = Selector.for_topology(topo, small_bytes=SegmentLayout(topo.size).small_bytes)
            print(f"# {what}: {topo.size} ranks on {topo.num_hosts} host(s) {topo.hosts}")
        else:
            from comms.plan import calibrate
            sel = Selector(np_, SegmentLayout(np_).small_bytes,
                           calibration=calibrate.current())
            print(f"# this machine, {np_} ranks on one host (shared memory)")
        for i, (coll, size) in enumerate((c, s) for c in collectives for s in sizes):
            if i:
                print()
            print(sel.explain(coll, size, args.dtype))
    except (OSError, ValueError) as exc:
        print(f"topocomm explain: {exc}", file=sys.stderr)
        return 2
    return 0


def _explain_clusters(args, collectives: list, sizes: list) -> int:
    """Every --cluster spec: the cluster as the model sees it, then each collective and size;
    a summary table when there is more than one row."""
    from comms.plan import cluster
    specs = [spec for text in args.cluster for spec in cluster.parse_clusters(text)]
    rows = []
    for k, spec in enumerate(specs):
        sel = cluster.selector(spec)
        if k:
            print()
        print("\n".join(cluster.describe(spec, sel.model)))
        for coll in collectives:
            for size in sizes:
                print()
                print(cluster.explain(sel, spec, coll, size, args.dtype))
                rows.append((spec, coll, size, sel.choose(coll, size)))
    if len(rows) > 1:
        print()
        print("\n".join(cluster.summary(rows)))
    return 0


_CLUSTER_HELP = """\
--cluster SPEC: a synthetic cluster, comma-separated FIELD=VALUE (hosts, ranks required):
  hosts=H            hosts (2+); H1/H2/... for one cluster each, e.g. hosts=128/1250/12500
  ranks=R            ranks per host
  intra=KIND[:RATE[:LAT]]  link inside a host, KIND socket|host|nvlink|pcie (default socket)
  nics=[Kx]RATE      K NICs per host; the model has one network link per host at K x RATE
  net_us=US          network one-way latency in us (default 60)
  cores=C            cores per host (default R)
  streams=S          TCP connections per peer (default TOPOCOMM_SOCKET_NSTREAMS or 2)
RATE: 900GB/s, 25MB/s (bytes, capital B) or 200gbit, 400Gbps, 100Gb/s (bits); LAT: 2us,
500ns (bare: us). e.g.
  topocomm explain all 8 64K 64M --cluster hosts=12500,ranks=8,intra=nvlink:900GB/s:2us,nics=4x200gbit,net_us=5
"""


def cmd_calibrate(args) -> int:
    """Measure this machine's rates for the cost model (comms/plan/calibrate.py), write the
    cache every later group on this machine uses, and print them beside the written-in
    fallbacks."""
    from comms.kernels import native
    from comms.plan import calibrate, cost
    native.impl()
    if not native.is_native:
        print(f"topocomm calibrate: the C helpers are not loaded ({native.why_not_native}); "
              "the rates they move data at cannot be measured", file=sys.stderr)
        return 2
    cal = calibrate.measure(trials=args.trials)
    path = "(not written: --dry-run)" if args.dry_run else calibrate.save(cal)
    calibrate.forget()
    m = cal.machine
    print(f"# {m['cpu']}, {m['cpus']} CPUs, kernel {m['kernel']}, host {m['host']}: "
          f"measured in {cal.seconds:g} s at {cal.when}")
    print(f"# cache: {path}")
    print(f"{'rate':<10} {'measured':>12} {'fallback':>12}  spread")
    for name, const in cost.CALIBRATED.items():
        value = cal.values.get(name)
        unit = const.unit
        fmt = (lambda v: f"{v / (1 << 20):g} MiB") if unit == "B" else (lambda v: f"{v:g} {unit}")
        seen = sorted(cal.trials.get(name, []))
        trials = (f"{len(seen)} trials, {seen[0]:g} .. {seen[-1]:g}" if seen else "")
        print(f"{name:<10} {fmt(value) if value else 'not measured':>12} "
              f"{fmt(const.value):>12}  {trials}")
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
                       "model's estimates, and why", epilog=_CLUSTER_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("collective", help="e.g. allreduce; several comma-separated; all: "
                   "allreduce, reduce_scatter, allgather, broadcast, all_to_all")
    e.add_argument("sizes", nargs="+", help="bytes, e.g. 8 64K 64M")
    e.add_argument("--np", type=int, help="world size (default 2)")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--fixture", help="explain for a canned machine from topology/fixtures "
                   "(e.g. 2hosts_2ranks); its ranks replace --np")
    e.add_argument("--file", help="explain for this topology JSON file (default: "
                   "TOPOCOMM_TOPO_FILE)")
    e.add_argument("--cluster", action="append", metavar="SPEC",
                   help="explain for a synthetic cluster of any size, e.g. hosts=1024,ranks=8,"
                   "nics=4x200gbit (syntax below); repeat for several")
    e.set_defaults(fn=cmd_explain)
    c = sub.add_parser("calibrate", help="measure this machine's copy, cross-core, memory and "
                       "process_vm_readv rates for the cost model and cache them")
    c.add_argument("--trials", type=int, default=7, help="trials per rate (median)")
    c.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    c.set_defaults(fn=cmd_calibrate)
    b = sub.add_parser("bench", help="run the benchmark job (bench/main.py)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

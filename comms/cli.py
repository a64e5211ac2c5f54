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
    from topology.host import local_facts
    from comms import native
    native.impl()
    facts = local_facts()
    facts["data_path"] = "native C" if native.is_native else f"numpy fallback ({native.why_not_native})"
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"host      {facts['hostname']}  (id {facts['host_id']})")
    print(f"cpus      {len(facts['cpus'])} usable of {facts['num_cpus']}: {facts['cpus']}")
    print("transport shm between ranks with this host id; other hosts: not supported yet")
    print(f"data path {facts['data_path']}")
    return 0


def cmd_explain(args) -> int:
    from comms.select import Selector
    from comms.layout import SegmentLayout
    sel = Selector(args.np, SegmentLayout(args.np).small_bytes)
    for size in args.sizes:
        print(sel.explain(args.collective, _parse_size(size), args.dtype))
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
    t = sub.add_parser("topo", help="what was detected about this host")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_topo)
    e = sub.add_parser("explain", help="which algorithm a collective of a size gets, and why")
    e.add_argument("collective")
    e.add_argument("sizes", nargs="+", help="bytes, e.g. 8 64K 64M")
    e.add_argument("--np", type=int, default=2, help="world size")
    e.add_argument("--dtype", default="float32")
    e.set_defaults(fn=cmd_explain)
    b = sub.add_parser("bench", help="run the benchmark job (bench/main.py)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

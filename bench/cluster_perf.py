#!/usr/bin/env python3
"""cluster_perf: topocomm vs gloo on an emulated 2-host cluster (network namespaces, tbf links).

    sudo .venv/bin/python bench/cluster_perf.py                 # 2 hosts x 2 ranks, 1gbit, ~3 min
    sudo .venv/bin/python bench/cluster_perf.py -t 1 --placements interleaved --backends gloo

For each placement (contiguous: ranks 0,1 on host 0 and 2,3 on host 1; interleaved: 0,2 on
host 0 and 1,3 on host 1) it builds the cluster once (bench/cluster.py), times one raw TCP
stream across the shaped link, then runs bench/all_reduce_perf.py (64 MiB) and
bench/alltoall_perf.py (16 MiB) as the cluster's ranks, once per backend (topocomm, gloo):
the harness ignores --vs under an external launcher, so each backend is its own launch, one
after the other on the same links. Rows give busbw (out-of-place, nccl-tests conventions),
busbw / link rate (the tbf rate of one host link, one way) and the speed-up of topocomm over
gloo (gloo time / topocomm time). Expected for gloo (/work/shared/BASELINES.md): all-reduce
busbw 0.95 x link contiguous, 0.47 x interleaved; a hierarchical all-reduce can reach ~1.5 x.

A backend that fails is a FAILED (or TIMEOUT) row with the error's last line; the other rows
still run. A run that measured wrong values is a WRONG row (with its timings). MPI is not run
(see MPI_NOTE). Writes <out>/cluster.json and per-rank logs under <out>/cluster/.
Exit status: 0 all rows ok, 1 wrong values or gloo failed, 2 topocomm failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import cluster as cl  # noqa: E402

MPI_NOTE = ("mpi: not run. MPICH's mpiexec starts every rank from one launcher on this machine "
            "and treats ranks with the same host name as node-local (shared memory); all "
            "namespaces share the host name, so MPI traffic would bypass the shaped link. A "
            "faithful run needs one hydra proxy per namespace (manual launcher), not done here.")
COLLECTIVES = {"all_reduce": "all_reduce_perf.py", "alltoall": "alltoall_perf.py"}
_ERR_LINE = re.compile(r"^(?:# rank \d+: )?\S*(?:Error|Exception|Interrupt)\b.*")


def last_error_line(result: dict, output: str, reason: str) -> str:
    """The error's last line: rank 0's reported error, else the failing rank's last
    exception line, else the launcher's reason."""
    err = (result or {}).get("error")
    if err:
        return err.strip().splitlines()[-1]
    lines = [ln.strip() for ln in (output or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _ERR_LINE.match(ln):
            return ln
    return lines[-1] if lines else reason


def run_one(c: cl.Cluster, coll: str, backend: str, size: str, args, out_dir: Path) -> dict:
    tag = f"{c.placement}-{coll}-{backend}"
    result_file = out_dir / f"{tag}.result.json"
    if result_file.exists():
        result_file.unlink()
    cmd = [sys.executable, str(BENCH_DIR / COLLECTIVES[coll]), "-b", size, "-e", size,
           "-t", str(args.trials), "--backend", backend, "--timeout", str(args.timeout),
           "--result-file", str(result_file)]
    if args.iters:
        cmd += ["-n", str(args.iters)]
    t0 = time.monotonic()
    res = c.run(cmd, timeout=args.timeout + 30, log_dir=out_dir / tag, grace=5.0)
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        result = {}
    row = {"placement": c.placement, "collective": coll, "backend": backend,
           "size": cl._parse_bytes(size), "wall_s": round(time.monotonic() - t0, 1),
           "rank_rcs": res.rank_rcs, "logs": str(out_dir / tag)}
    rows = result.get("rows") or []
    r = rows[0] if rows and result.get("complete") else None
    wrong = sum((r[m].get("wrong") or 0) for m in ("oop", "ip") if r.get(m)) if r else 0
    # the harness exits 1 when it measured wrong values: still a measured (WRONG) row
    if r is not None and (res.rc == 0 or (res.rc == 1 and wrong)):
        row.update(status="wrong" if wrong else "ok", wrong=wrong,
                   time_us=r["oop"]["time_us"], algbw_gbs=r["oop"]["algbw_gbs"],
                   busbw_gbs=r["oop"]["busbw_gbs"], ip_time_us=r["ip"]["time_us"],
                   ip_busbw_gbs=r["ip"]["busbw_gbs"], size=r["size"])
        if result.get("model"):  # the topocomm cost model's estimate (bench/harness.py)
            row["model"] = result["model"]
    else:
        failed = res.first_failed_rank if res.first_failed_rank is not None else 0
        row.update(status="timeout" if res.timed_out else "failed",
                   error=last_error_line(result, res.outputs[failed], res.reason),
                   reason=res.reason)
    return row


def format_rows(rows: list, link_gbs: float) -> list:
    head = "# %-11s  %-10s  %9s  %-8s  %8s  %8s  %7s  %10s  %8s" % (
        "placement", "collective", "size(B)", "backend", "time(us)", "algbw", "busbw",
        "busbw/link", "vs gloo")
    lines = [head]
    by_key = {(r["placement"], r["collective"], r["backend"]): r for r in rows}
    for r in rows:
        pre = "  %-11s  %-10s  %9d  %-8s" % (r["placement"], r["collective"], r["size"],
                                           r["backend"])
        if r["status"] in ("ok", "wrong"):
            gloo = by_key.get((r["placement"], r["collective"], "gloo"))
            vs = "-"
            if r["backend"] != "gloo" and gloo and gloo.get("time_us"):
                vs = "%.2fx" % (gloo["time_us"] / r["time_us"])
            line = pre + "  %8.0f  %8.3f  %7.3f  %9.2fx  %8s" % (
                r["time_us"], r["algbw_gbs"], r["busbw_gbs"], r["busbw_gbs"] / link_gbs, vs)
            if r["status"] == "wrong":
                line += "  WRONG (%d elements)" % r["wrong"]
        else:
            line = pre + "  %s: %s" % (r["status"].upper(), r["error"])
        lines.append(line)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--ranks-per-host", type=int, default=2)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--placements", default="contiguous,interleaved")
    p.add_argument("--backends", default="topocomm,gloo")
    p.add_argument("--collectives", default="all_reduce,alltoall")
    p.add_argument("--ar-size", default="64M", help="all-reduce size per rank (>= 64M)")
    p.add_argument("--a2a-size", default="16M", help="all-to-all size per rank")
    p.add_argument("--tcp-size", default="64M", help="raw TCP probe bytes (0: skip)")
    p.add_argument("-t", "--trials", type=int, default=3)
    p.add_argument("-n", "--iters", type=int, default=None, help="timed iterations per trial")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per backend run")
    p.add_argument("--out", default=str(BENCH_DIR / "out"))
    args = p.parse_args(argv)
    placements = [x.strip() for x in args.placements.split(",") if x.strip()]
    backends = [x.strip() for x in args.backends.split(",") if x.strip()]
    colls = [x.strip() for x in args.collectives.split(",") if x.strip()]
    for x in colls:
        if x not in COLLECTIVES:
            p.error(f"--collectives: unknown {x!r}; use {list(COLLECTIVES)}")
    ok, why = cl.Cluster.available()
    if not ok:
        print(f"# cluster_perf: skipped: cannot build an emulated cluster here: {why}")
        return 0
    out = Path(args.out)
    log_root = out / "cluster"
    log_root.mkdir(parents=True, exist_ok=True)
    rate_bps = cl.parse_rate(args.rate)
    link_gbs = rate_bps / 8 / 1e9
    sizes = {"all_reduce": args.ar_size, "alltoall": args.a2a_size}
    rows, tcp = [], {}
    t_start = time.monotonic()
    print(f"# cluster_perf: {args.hosts} hosts x {args.ranks_per_host} ranks, link {args.rate} "
          f"({link_gbs:.3f} GB/s each way), backends {backends}, trials {args.trials}", flush=True)
    print("# " + MPI_NOTE, flush=True)
    for placement in placements:
        with cl.Cluster(hosts=args.hosts, ranks_per_host=args.ranks_per_host, rate=args.rate,
                        placement=placement) as c:
            print(f"# ===== {c.describe()}", flush=True)
            if cl._parse_bytes(args.tcp_size) > 0 and args.hosts > 1:
                try:
                    t = cl.measure_tcp(c, cl._parse_bytes(args.tcp_size))
                    tcp[placement] = t
                    print(f"# raw TCP stream h0 -> h1: {t['gbit_s']:.3f} Gbit/s "
                          f"({t['ratio']:.2f} x link rate)", flush=True)
                except cl.ClusterError as e:
                    tcp[placement] = {"error": str(e)}
                    print(f"# raw TCP stream: FAILED: {e}", flush=True)
            for coll in colls:
                for backend in backends:
                    row = run_one(c, coll, backend, sizes[coll], args, log_root)
                    rows.append(row)
                    print(format_rows([row], link_gbs)[1] + f"   ({row['wall_s']} s)",
                          flush=True)
                    for line in (row.get("model") or {}).get("lines", []):
                        print(line, flush=True)
    print()
    print(f"# ===== side by side: out-of-place busbw (GB/s); link = {link_gbs:.3f} GB/s each "
          f"way; vs gloo = gloo time / topocomm time =====")
    for line in format_rows(rows, link_gbs):
        print(line)
    for placement, t in tcp.items():
        if "gbit_s" in t:
            print(f"# raw TCP {placement}: {t['gbit_s']:.3f} Gbit/s = {t['ratio']:.2f} x link")
    print("# " + MPI_NOTE)
    report = {"bench": "cluster_perf", "host": platform.node(), "cpus": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hosts": args.hosts,
              "ranks_per_host": args.ranks_per_host, "rate": args.rate, "rate_bps": rate_bps,
              "link_gbs": link_gbs, "args": vars(args), "tcp": tcp, "rows": rows,
              "methodology": "harness (bench/harness.py) run as the cluster's ranks, one "
                             "backend per launch; busbw out-of-place; busbw/link = busbw / "
                             "(rate / 8)", "mpi": MPI_NOTE,
              "wall_s": round(time.monotonic() - t_start, 1)}
    path = out / "cluster.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    print(f"# wrote {path} ({report['wall_s']} s)")
    if any(r["status"] == "wrong" for r in rows) or any(
            r["status"] != "ok" for r in rows if r["backend"] != "topocomm"):
        return 1
    return 2 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

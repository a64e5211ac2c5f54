"""Output: the nccl-tests table (header, rows, the footer with the cost model's estimate per
size), rank 0's printer, the side-by-side summary of --vs, the JSON report (--json, and the
result file a launched rank 0 leaves) and the busbw-vs-size plot (--plot)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness import CollSpec


def format_time(time_us: float) -> str:
    """nccl-tests: %7.0f above 10 ms, %7.1f above 100 us, else %7.2f."""
    if time_us >= 10000.0:
        return "%7.0f" % time_us
    if time_us >= 100.0:
        return "%7.1f" % time_us
    return "%7.2f" % time_us


HEADER_TITLE = ("# %10s  %12s  %8s  %6s  %6s" % ("", "", "", "", "")
                + "           out-of-place                       in-place")
HEADER_NAMES = ("# %10s  %12s  %8s  %6s  %6s" % ("size", "count", "type", "redop", "root")
                + ("  %7s  %6s  %6s %6s" % ("time", "algbw", "busbw", "#wrong")) * 2)
HEADER_UNITS = ("# %10s  %12s  %8s  %6s  %6s" % ("(B)", "(elements)", "", "", "")
                + ("  %7s  %6s  %6s %6s" % ("(us)", "(GB/s)", "(GB/s)", "")) * 2).rstrip()


def header_lines() -> list:
    return [HEADER_TITLE, HEADER_NAMES, HEADER_UNITS]


def _format_half(res) -> str:
    if res is None:
        return "  %7s  %6s  %6s %6s" % ("N/A", "N/A", "N/A", "N/A")
    wrong = "N/A" if res.get("wrong") is None else str(res["wrong"])
    return "  %7s  %6.2f  %6.2f %6s" % (format_time(res["time_us"]), res["algbw_gbs"],
                                        res["busbw_gbs"], wrong)


def format_row(row: dict) -> str:
    return ("%12d  %12d  %8s  %6s  %6d" % (row["size"], row["count"], row["type"], row["redop"],
                                             row["root"])
            + _format_half(row.get("oop")) + _format_half(row.get("ip")))


def footer_lines(rows: list, check: bool) -> list:
    wrong = sum((r[m].get("wrong") or 0) for r in rows for m in ("oop", "ip") if r.get(m))
    bws = [r[m]["busbw_gbs"] for r in rows for m in ("oop", "ip") if r.get(m)]
    avg = sum(bws) / len(bws) if bws else 0.0
    status = ("OK" if wrong == 0 else "FAILED") if check else "(not checked)"
    return ["# Out of bounds values : %d %s" % (wrong, status),
            "# Avg bus bandwidth    : %g " % avg, "#"]


MODEL_MIN_BYTES = 1 << 20
MODEL_TOLERANCE = 0.30


def model_check(points: list) -> dict | None:
    """points: [(size, estimate_us, measured_us)] -> the cost model's accuracy over the sizes
    >= MODEL_MIN_BYTES: median |estimate - measured| / measured, and the footer lines."""
    pts = [(s, e, m) for s, e, m in points if s >= MODEL_MIN_BYTES and e and m and m > 0]
    if not pts:
        return None
    errs = [(e - m) / m for _, e, m in pts]
    med = statistics.median(abs(x) for x in errs)
    detail = "  ".join("%s %s/%s us %+.0f%%" % (_short_size(s), format_time(e).strip(),
                                                format_time(m).strip(), 100 * x)
                       for (s, e, m), x in zip(pts, errs))
    return {"median_abs_error": med, "num_sizes": len(pts), "within": med <= MODEL_TOLERANCE,
            "points": [{"size": s, "estimate_us": e, "measured_us": m} for s, e, m in pts],
            "lines": ["# Model estimate per size (estimate/measured): " + detail,
                      "# Model estimate vs measured: median |error| %.0f%% over %d sizes >= 1 MiB "
                      "(within %d%%: %s)" % (100 * med, len(pts), 100 * MODEL_TOLERANCE,
                                             "yes" if med <= MODEL_TOLERANCE else "no")]}


def _short_size(nbytes: int) -> str:
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return "%d%s" % (nbytes >> shift, unit)
    return str(nbytes)


def summary_table(primary: str, backends: dict, mode: str = "oop") -> list:
    """Side-by-side lines: size | time per backend | busbw per backend | speed-up vs each.

    backends: name -> {"status", "rows"}; speed-up = baseline time / primary time.
    """
    names = [primary] + [b for b in backends if b != primary]
    others = names[1:]
    index = {}
    keys = []
    for name in names:
        for row in (backends.get(name) or {}).get("rows", []):
            key = (row["size"], row["redop"], row["type"])
            if key not in index:
                index[key] = {}
                keys.append(key)
            index[key][name] = row.get(mode)
    keys.sort(key=lambda k: (k[1], k[2], k[0]))
    width = max(10, max(len(n) for n in names) + 3)
    head = "# %10s  %6s" % ("size", "redop")
    head += "".join("  %*s" % (width, n + " us") for n in names)
    head += "".join("  %*s" % (width, n + " GB/s") for n in names)
    head += "".join("  %*s" % (max(9, len(o) + 3), "vs " + o) for o in others)
    lines = [head]
    for key in keys:
        cells = index[key]
        line = "  %10d  %6s" % (key[0], key[1])
        line += "".join("  %*s" % (width, format_time(cells[n]["time_us"]).strip()
                                  if cells.get(n) else "-") for n in names)
        line += "".join("  %*s" % (width, "%.3f" % cells[n]["busbw_gbs"] if cells.get(n) else "-")
                        for n in names)
        for o in others:
            p, b = cells.get(primary), cells.get(o)
            if p and b and p["time_us"] > 0:
                txt = "%.2fx" % (b["time_us"] / p["time_us"])
            else:
                txt = "-"
            line += "  %*s" % (max(9, len(o) + 3), txt)
        lines.append(line)
    for name in names:
        info = backends.get(name) or {"status": "missing", "reason": "not run"}
        if info.get("status") != "ok":
            lines.append("# %s: %s%s" % (name, info.get("status", "missing").upper(),
                                         (" - " + info["reason"]) if info.get("reason") else ""))
    return lines


def summary_records(primary: str, backends: dict) -> list:
    """The side-by-side table as JSON records (both modes)."""
    out = {}
    for name, info in backends.items():
        for row in (info or {}).get("rows", []):
            key = (row["size"], row["redop"], row["type"])
            rec = out.setdefault(key, {"size": key[0], "redop": key[1], "type": key[2]})
            for mode in ("oop", "ip"):
                if row.get(mode):
                    rec[f"{name}_{mode}_time_us"] = row[mode]["time_us"]
                    rec[f"{name}_{mode}_busbw_gbs"] = row[mode]["busbw_gbs"]
    for rec in out.values():
        for name in backends:
            if name == primary:
                continue
            for mode in ("oop", "ip"):
                p, b = rec.get(f"{primary}_{mode}_time_us"), rec.get(f"{name}_{mode}_time_us")
                rec[f"speedup_vs_{name}_{mode}"] = (b / p) if (p and b) else None
    return [out[k] for k in sorted(out, key=lambda k: (k[1], k[2], k[0]))]


class Rank0Printer:
    def __init__(self, rank: int, hold: bool = False):
        self.rank, self.held = rank, [] if hold else None

    def __call__(self, line: str = "") -> None:
        if self.rank != 0:
            return
        if self.held is not None:
            self.held.append(line)
        else:
            print(line, flush=True)

    def flush(self) -> None:
        """Print what was held (the tables of the backends measured beside the primary)."""
        for line in self.held or ():
            print(line, flush=True)
        self.held = None


def sweep_header(out, spec, args, be, n, minbytes: int, maxbytes: int) -> None:
    out("# topocomm bench: %s  backend: %s  nranks: %d" % (spec.name, be.name, n))
    out("# nThread 1 nGpus 0 minBytes %d maxBytes %d step: %g(factor) warmup iters: %s "
        "iters: %s trials: %d validation: %d" % (
            minbytes, maxbytes, args.stepfactor,
            args.warmup_iters if args.warmup_iters is not None else "auto",
            args.iters if args.iters is not None else "auto", args.trials, args.check))
    out("#")
    out("# Rank %2d Pid %6d on %10s device cpu (%s)" % (be.rank, os.getpid(),
                                                      platform.node(), be.name))
    if be.notes:
        out("# notes: %s" % be.notes)
    out("#")
    for line in header_lines():
        out(line)


def sweep_footer(out, spec, be, result, check: bool) -> None:
    rows = result["rows"]
    for line in footer_lines(rows, check):
        out(line)
    estimate = getattr(be, "estimate_us", None)
    if estimate is not None and spec.model_collective and rows:
        first_op = rows[0]["redop"]
        model = model_check([(r["size"], estimate(spec.model_collective, r["size"]),
                              r[spec.model_mode]["time_us"])
                             for r in rows if r["redop"] == first_op and r.get(spec.model_mode)])
        if model:
            model["mode"] = spec.model_mode
            result["model"] = model
            for line in model["lines"]:
                out(line)
    wrong_total = sum((r[m]["wrong"] or 0) for r in rows for m in ("oop", "ip"))
    bws = [r[m]["busbw_gbs"] for r in rows for m in ("oop", "ip")]
    result["wrong_total"] = wrong_total
    result["avg_busbw_gbs"] = sum(bws) / len(bws) if bws else 0.0
    result["complete"] = True


def stats_line(stats: dict) -> str:
    """One line of Communicator.stats(): who arrived last how often, and the waits."""
    parts = [f"rank {q} last {v['last_share']:.0%} (wait p50 <= {v['wait_p50_us']:g} us, "
             f"p99 <= {v['wait_p99_us']:g} us)" for q, v in stats["ranks"].items()]
    return f"{stats['arrivals']} arrivals ({stats['where']}): " + "; ".join(parts)


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def plot(path, spec: CollSpec, backends: dict, nranks: int, dt_name: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib unavailable ({e})"
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for name, info in backends.items():
        rows = (info or {}).get("rows") or []
        for op in sorted({r["redop"] for r in rows}):
            pts = [(r["size"], r["oop"]["busbw_gbs"]) for r in rows
                   if r["redop"] == op and r["size"] > 0 and r.get("oop")]
            if not pts:
                continue
            label = name if op in ("none", "sum") and len({r["redop"] for r in rows}) == 1 \
                else f"{name} {op}"
            if info.get("status") != "ok":
                label += f" ({info.get('status')}, partial)"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
            drawn += 1
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size per rank (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s), out-of-place")
    ax.set_title(f"{spec.name}, {nranks} ranks, {dt_name}, {platform.node()}")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def device_copy_rate_gbs(nbytes: int = 256 << 20, trials: int = 5) -> float | None:
    """This machine's GPU copy rate (GB/s, bytes read + written, best of `trials` device-to-
    device copies of nbytes, timed with CUDA events), or None without torch or a GPU."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = None
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        best = ms if best is None else min(best, ms)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (best * 1e-3) / 1e9


def hbm_lines(spec: CollSpec, backends: dict, nranks: int, rate_gbs: float) -> list:
    """Every rank on one GPU: the HBM limit of each size from 64 KiB (each rank's input read
    once and its output written once: 2 x ranks x size bytes at rate_gbs) and each backend's
    time as a multiple of it, in place and out of place."""
    names = [n for n, b in backends.items() if (b or {}).get("rows")]
    lines = [f"# ===== {spec.name}, {nranks} ranks on one GPU: HBM limit = 2 x {nranks} x size "
             f"/ {rate_gbs:.0f} GB/s (device copy rate, this run); time / limit per backend "
             "(1.0 = at the limit) =====",
             "%12s %12s  " % ("size", "limit us") +
             "  ".join("%18s" % f"{n} oop/ip" for n in names)]
    # below 64 KiB the limit is a few ns: latency, not bandwidth, decides there
    sizes = sorted({r["size"] for n in names for r in backends[n]["rows"]
                    if r["size"] >= 1 << 16})
    for size in sizes:
        limit_us = 2 * nranks * size / (rate_gbs * 1e9) * 1e6
        cells = []
        for n in names:
            row = next((r for r in backends[n]["rows"] if r["size"] == size), None)
            ratios = []
            for mode in ("oop", "ip"):
                t = (row or {}).get(mode, {}) or {}
                ratios.append(f"{t['time_us'] / limit_us:.1f}" if t.get("time_us") and
                              limit_us > 0 else "-")
            cells.append("%18s" % "/".join(ratios))
        lines.append("%12d %12.2f  " % (size, limit_us) + "  ".join(cells))
    return lines


def write_report(spec: CollSpec, args, backends: dict, nranks: int, dt_name: str, vs: list,
                 t_start: float) -> None:
    """After the launches of `--np N`: the side-by-side summary (with --vs), the report written
    to --json and the plot written to --plot. dt_name: the datatype's nccl-tests name;
    t_start: time.monotonic() before the first launch."""
    if vs:
        for mode, words in (("oop", "out-of-place"), ("ip", "in-place")):
            print(f"# ===== side by side: {spec.name}, {nranks} ranks, {args.datatype}, "
                  f"{words}; speed-up = baseline time / {args.backend} time =====")
            for line in summary_table(args.backend, backends, mode):
                print(line)
            print(flush=True)
    hbm = None
    if getattr(args, "device", "cpu") == "cuda" and spec.name in ("all_reduce", "alltoall"):
        rate = device_copy_rate_gbs()
        if rate:
            hbm = {"copy_rate_gbs": rate}
            for line in hbm_lines(spec, backends, nranks, rate):
                print(line)
            print(flush=True)
    report = {"collective": spec.name, "nranks": nranks, "datatype": dt_name,
              "primary": args.backend, "host": platform.node(), "cpus": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "methodology": "size = one rank's buffer (B); time = median over trials of max over "
                             "ranks of per-op mean (us); algbw = size/time (GB/s, 1e9); "
                             f"busbw = algbw x {spec.name} factor; " + (
                                 "backends run one after the other, each in its own launch"
                                 if args.separate or not vs else
                                 "backends share the same ranks (mpiexec) and every trial of a "
                                 "size and mode is taken on each backend in turn (rotating who "
                                 "goes first), so the speed-ups compare the same noise window"),
              "args": {k: v for k, v in vars(args).items() if k != "result_file"},
              "backends": backends, "summary": summary_records(args.backend, backends),
              "hbm": hbm,
              "wall_s": time.monotonic() - t_start}
    if args.json:
        write_json(args.json, report)
        print(f"# wrote {args.json}")
    if args.plot:
        err = plot(args.plot, spec, backends, nranks, report["datatype"])
        print(f"# plot not written: {err}" if err else f"# wrote {args.plot}", flush=True)

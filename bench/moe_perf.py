#!/usr/bin/env python3
"""moe_perf: MoE dispatch / combine, comms.moe vs the plain per-expert pipeline, one run.

    python bench/moe_perf.py --np 2                  # 4096 tokens/rank, hidden 2048, float32,
                                                     # top-8 of 64 experts (the issue's line)
    python bench/moe_perf.py --np 2 --config 1024:1024:8:64 --config 4096:2048:8:64 -d bf16
    python bench/moe_perf.py --np 4 --device cuda --config 4096:4096:8:64 -d bfloat16
    python bench/cluster.py --hosts 2 --ranks-per-host 2 --rate 1gbit -- \
        python bench/moe_perf.py --json bench/out/moe_2x2.json      # emulated hosts (root)

Rows per configuration (tokens per rank : hidden : k : experts, ranks = --np), all measured
in the same spawned ranks with trials interleaved across implementations (the machine is
noisy, so they are compared side by side):
  topocomm moe           comms.moe.dispatch (+ expert_x, the expert-grouped tokens, so its
                         output matches the reference's) / combine / both, on the topocomm group
  topocomm moe, no expert_x   dispatch alone (deduplicated recv_x + index lists)
  ref gloo               comms.moe.refs pipeline (permute, all_to_all_single of counts and of
                         tokens, regroup; no dedup) over torch gloo
  ref topocomm a2a       the same pipeline over topocomm's own all_to_all_single
  topocomm moe, one stage   (groups spanning hosts) comms.moe with hosts=[all ranks]: no
                         host level, a token crosses the network once per destination rank
Columns: time (us) = median over trials of the max over ranks of the per-op mean; routed =
bytes of token rows that crossed to another rank, per rank (mean over ranks); GB/s = routed /
time; saved = reference routed - comms.moe routed (dedup; own-rank rows never count);
speed-ups = reference time / comms.moe time for the same phase; net = bytes that crossed to
another host (per rank). The expert is the identity
(combine gets expert_x back), so only communication and data movement are timed.
Check: comms.moe's dispatch+combine output vs the reference's (max abs difference; the
reference sums in another order, so a few ulps are expected).
Ranks run with OMP_NUM_THREADS=1 (as torchrun sets it) and THP_MEM_ALLOC_ENABLE=1 (torch's
allocator then asks for transparent huge pages, as numpy does; page faults of fresh 256 MiB
buffers otherwise dominate the reference). Writes JSON to bench/out/moe.json (or --json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

DEFAULT_CONFIG = "4096:2048:8:64"
IMPLS = ("topocomm moe", "ref gloo", "ref topocomm a2a")
PHASES = ("dispatch", "combine", "dispatch+combine")


def parse_config(text):
    try:
        t, h, k, e = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"--config: expected TOKENS:HIDDEN:K:EXPERTS, got {text!r}") from None
    if min(t, h, k, e) < 1 or k > e:
        raise SystemExit(f"--config: need positive values and k <= experts, got {text!r}")
    return {"tokens": t, "hidden": h, "topk": k, "experts": e}


# ------------------------------------------------------------------------------ one rank

def _routing(torch, rank, cfg, dtype):
    g = torch.Generator().manual_seed(1234 + rank)
    T, H, k, E = cfg["tokens"], cfg["hidden"], cfg["topk"], cfg["experts"]
    x = torch.randn(T, H, generator=g).to(dtype)
    scores = torch.rand(T, E, generator=g)
    top = scores.topk(k, dim=1)                         # k distinct experts per token, uniform
    return x, top.indices, torch.softmax(top.values, dim=1)


def run_rank(args):
    import torch
    import torch.distributed as dist
    import comms.moe as moe                          # importing comms registers "topocomm"
    from comms.moe import refs
    rank, n = harness.world_from_env()
    dist.init_process_group("topocomm", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=args.timeout))
    topo = dist.group.WORLD
    gloo = dist.new_group(backend="gloo")
    dtype = {"float": torch.float32, "bfloat16": torch.bfloat16}[args.datatype]
    device = torch.device("cpu")
    if args.device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    es = torch.empty(0, dtype=dtype).element_size()

    def max_over_ranks(v):
        t = torch.tensor([float(v)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=gloo)
        return float(t.item())

    def mean_over_ranks(v):
        t = torch.tensor([float(v)], dtype=torch.float64)
        dist.all_reduce(t, group=gloo)
        return float(t.item()) / n

    from comms.moe.exchange import Exchange
    hosts = Exchange(topo).hosts
    host_of = {r: h for h, rs in enumerate(hosts) for r in rs}
    out_rows = []
    for cfg in [parse_config(c) for c in args.config]:
        H, E = cfg["hidden"], cfg["experts"]
        L = E // n
        x, idx, w = (t.to(device) for t in _routing(torch, rank, cfg, dtype))
        # bytes this rank sends to other ranks (routed) and to other hosts (net), per impl
        lay = moe.layout(idx, E, topo)
        per_rank = lay.num_tokens_per_rank.tolist()
        per_expert = lay.num_tokens_per_expert.tolist()
        rows = {"flat": (sum(per_rank) - per_rank[rank],
                         sum(c for q, c in enumerate(per_rank) if host_of[q] != host_of[rank])),
                "ref": (sum(per_expert) - sum(per_expert[rank * L:(rank + 1) * L]),
                        sum(c for e, c in enumerate(per_expert)
                            if host_of[e // L] != host_of[rank]))}
        route = moe.dispatch(x, idx, w, E, topo).handle.route
        if hasattr(route, "a_send_idx"):            # two stages: A crosses hosts, B stays
            rows["ours"] = (route.a_send_idx.size + sum(route.b_send_counts),
                            route.a_send_idx.size)
        else:
            rows["ours"] = rows["flat"]
        del route

        def ours(phase, expert_x=True, hosts=None):
            def disp():
                return moe.dispatch(x, idx, w, E, topo, hosts=hosts)
            if phase == "combine":
                res = disp()
                y = res.expert_x
                return lambda: moe.combine(y, res.handle)
            if phase == "dispatch":
                return (lambda: disp().expert_x) if expert_x else disp

            def both():
                res = disp()
                return moe.combine(res.expert_x, res.handle)
            return both

        def ref(group):
            def make(phase):
                if phase == "combine":
                    r = refs.reference_dispatch(x, idx, w, E, group)
                    return lambda: refs.reference_combine(r.expert_x, r)
                if phase == "dispatch":
                    return lambda: refs.reference_dispatch(x, idx, w, E, group)

                def both():
                    r = refs.reference_dispatch(x, idx, w, E, group)
                    return refs.reference_combine(r.expert_x, r)
                return both
            return make

        impls = {"topocomm moe": (ours, "ours")}
        if len(hosts) > 1:                           # the same without the host level
            impls["topocomm moe, one stage"] = (
                lambda phase: ours(phase, hosts=[list(range(n))]), "flat")
        impls.update({"ref gloo": (ref(gloo), "ref"), "ref topocomm a2a": (ref(topo), "ref")})
        cases = [(impl, phase) for impl in impls for phase in PHASES]
        cases.insert(1, ("topocomm moe, no expert_x", "dispatch"))
        kind = {c: impls[c[0]][1] if c[0] in impls else "ours" for c in cases}
        fns = {}
        for impl, phase in cases:
            if impl == "topocomm moe, no expert_x":
                fns[(impl, phase)] = ours(phase, expert_x=False)
            else:
                fns[(impl, phase)] = impls[impl][0](phase)
        # correctness: comms.moe vs the reference (plain order: a few ulps apart)
        got = fns[("topocomm moe", "dispatch+combine")]()
        r = refs.reference_dispatch(x, idx, w, E, topo)
        want = refs.reference_combine(r.expert_x, r)
        max_diff = max_over_ranks((got.double() - want.double()).abs().max().item()
                                  if got.numel() else 0.0)
        del r, want, got
        for fn in fns.values():                         # warm-up
            for _ in range(args.warmup):
                fn()
        trials = {c: [] for c in cases}
        for _ in range(args.trials):                    # interleaved: one noise window
            for c in cases:
                iters = args.iters if not c[0].startswith("ref gloo") else max(1, args.iters // 2)
                dist.barrier(group=gloo)
                t0 = time.perf_counter()
                for _ in range(iters):
                    fns[c]()
                sync()
                trials[c].append(max_over_ranks((time.perf_counter() - t0) / iters) * 1e6)
        nbytes = {key: tuple(mean_over_ranks(v * H * es) for v in vals)
                  for key, vals in rows.items()}
        for impl, phase in cases:
            t_us = statistics.median(trials[(impl, phase)])
            times = 2 if phase == "dispatch+combine" else 1
            routed, net = (v * times for v in nbytes[kind[(impl, phase)]])
            is_ours = impl.startswith("topocomm moe")
            row = dict(cfg, ranks=n, hosts=len(hosts), dtype=args.datatype, impl=impl,
                       phase=phase, time_us=t_us, trials_us=trials[(impl, phase)],
                       routed_bytes=routed, net_bytes=net,
                       gbs=routed / (t_us * 1e-6) / 1e9 if t_us > 0 else 0.0,
                       saved_bytes=(nbytes["ref"][0] * times - routed) if is_ours else 0.0,
                       max_abs_diff_vs_ref=max_diff if impl == "topocomm moe" else None)
            out_rows.append(row)
        del fns
    return {"rows": out_rows, "complete": True, "nranks": n}


# ------------------------------------------------------------------------------ launcher

def format_table(rows):
    lines = []
    by_cfg = {}
    for r in rows:
        by_cfg.setdefault((r["tokens"], r["hidden"], r["topk"], r["experts"], r["ranks"],
                           r["dtype"], r.get("hosts", 1)), []).append(r)
    for (T, H, k, E, n, d, nh), rs in by_cfg.items():
        lines.append(f"# {n} ranks on {nh} host(s), {d}, {T} tokens/rank, hidden {H}, "
                     f"top-{k} of {E} experts")
        lines.append("# %-27s %-17s %10s %10s %7s %10s %9s %9s %8s" % (
            "impl", "phase", "time_us", "routed_MB", "GB/s", "saved_MB", "vs_gloo", "vs_topo",
            "net_MB"))
        t = {(r["impl"], r["phase"]): r["time_us"] for r in rs}
        for r in rs:
            sp = ["-", "-"]
            if r["impl"].startswith("topocomm moe"):
                for i, ref in enumerate(("ref gloo", "ref topocomm a2a")):
                    if (ref, r["phase"]) in t and r["time_us"] > 0:
                        sp[i] = "%.2fx" % (t[(ref, r["phase"])] / r["time_us"])
            lines.append("  %-27s %-17s %10.0f %10.1f %7.2f %10.1f %9s %9s %8.1f" % (
                r["impl"], r["phase"], r["time_us"], r["routed_bytes"] / 1e6, r["gbs"],
                r["saved_bytes"] / 1e6, sp[0], sp[1], r.get("net_bytes", 0.0) / 1e6))
        diff = [r["max_abs_diff_vs_ref"] for r in rs if r["max_abs_diff_vs_ref"] is not None]
        if diff:
            lines.append(f"# check: max |comms.moe - reference| over ranks = {diff[0]:.3g}")
    return lines


def orchestrate(args):
    fd, result_file = tempfile.mkstemp(prefix="topocomm-moe-", suffix=".json")
    os.close(fd)
    os.unlink(result_file)
    port = harness.free_port()
    base = dict(os.environ)
    for keys in harness._LAUNCH_ENVS:
        for key in keys:
            base.pop(key, None)
    base.setdefault("OMP_NUM_THREADS", "1")          # as torchrun does for several ranks
    # huge pages for torch's allocations too (numpy, which comms.moe allocates with, asks for
    # them already): a fresh 256 MiB buffer faults in ~30 ms instead of ~160 ms here, and the
    # reference allocates several per call; without this the baseline would be handicapped
    base.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    base["PYTHONUNBUFFERED"] = "1"
    argv = ["-d", args.datatype, "-n", str(args.iters), "-w", str(args.warmup), "-t",
            str(args.trials), "--timeout", repr(args.timeout), "--device", args.device]
    for c in args.config:
        argv += ["--config", c]
    cmds = []
    for r in range(args.np):
        env = dict(base, RANK=str(r), WORLD_SIZE=str(args.np), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(args.np), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmds.append(([sys.executable, str(Path(__file__).resolve())] + argv
                     + ["--result-file", result_file], env))
    t0 = time.monotonic()
    status, reason = harness.run_procs(cmds, args.timeout)
    try:
        result = json.loads(Path(result_file).read_text())
        os.unlink(result_file)
    except (OSError, ValueError):
        result = {"rows": []}
        if status == "ok":
            status, reason = "failed", "rank 0 wrote no result"
    for line in format_table(result.get("rows", [])):
        print(line)
    tol = {"float": 1e-4, "bfloat16": 0.25}[args.datatype]   # outputs are O(1)
    diffs = [r["max_abs_diff_vs_ref"] for r in result.get("rows", [])
             if r.get("max_abs_diff_vs_ref") is not None]
    if status == "ok" and any(d > tol for d in diffs):
        status, reason = "wrong", f"comms.moe differs from the reference by more than {tol}"
    report = {"bench": "moe", "status": status, "reason": reason, "host": platform.node(),
              "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "args": {k: v for k, v in vars(args).items() if k != "result_file"},
              "methodology": __doc__.split("\n\n", 2)[2].strip(),
              "rows": result.get("rows", []), "wall_s": time.monotonic() - t0}
    path = args.json or str(harness.BENCH_DIR / "out" / "moe.json")
    harness.write_json(path, report)
    print(f"# {status}{': ' + reason if reason else ''}; wrote {path}")
    return {"ok": 0, "wrong": 1}.get(status, 2)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2, help="local ranks to spawn")
    p.add_argument("--config", action="append", default=None,
                   help=f"TOKENS:HIDDEN:K:EXPERTS (repeatable; default {DEFAULT_CONFIG})")
    p.add_argument("-d", "--datatype", default="float", choices=("float", "bfloat16"))
    p.add_argument("-n", "--iters", type=int, default=4, help="timed iterations per trial "
                   "(halved for the gloo reference)")
    p.add_argument("-w", "--warmup", type=int, default=1)
    p.add_argument("-t", "--trials", type=int, default=3, help="median over this many trials")
    p.add_argument("--json", default=None, help="default bench/out/moe.json")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where x, topk_idx and topk_weights live (cuda: rank r on GPU "
                        "LOCAL_RANK mod the GPU count; gloo then moves CUDA tensors itself)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument("--result-file", dest="result_file", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.config = args.config or [DEFAULT_CONFIG]
    for c in args.config:
        parse_config(c)
    if args.np < 1 or args.iters < 1 or args.trials < 1:
        raise SystemExit("--np, --iters, --trials: must be >= 1")
    if args.result_file:
        try:
            result = run_rank(args)
        except Exception as exc:
            import traceback
            traceback.print_exc()
            if harness.world_from_env()[0] == 0:
                harness.write_json(args.result_file, {"rows": [], "error": repr(exc)[:2000]})
            return 4
        if harness.world_from_env()[0] == 0:
            harness.write_json(args.result_file, result)
        return 0
    launched = harness.world_from_env(required=False)
    if launched:      # a rank of torchrun / bench/cluster.py: rank 0 reports
        result = run_rank(args)
        if launched[0] == 0:
            for line in format_table(result["rows"]):
                print(line, flush=True)
            path = args.json or str(harness.BENCH_DIR / "out" / "moe.json")
            harness.write_json(path, {"bench": "moe", "status": "ok", "host": platform.node(),
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      "args": vars(args), "rows": result["rows"]})
            print(f"# wrote {path}", flush=True)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

"""One rank of tests/netns/test_topocomm_cluster.py, started by bench/cluster.py inside a host
namespace (torchrun-style env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...).

    python tests/netns/_rank_script.py equal <barrier_dir> <numpy_port> [p2p]
        default group "topocomm" (its ranks on 2 emulated hosts) beside a gloo group: every
        check feeds both the same inputs and compares exactly; then the numpy comms.init()
        path; then an uneven topocomm group (2+1+1 ranks, hosts forced with TOPOCOMM_HOST_ID
        while the group is created) checked against gloo again; with p2p, last, a large
        batch_isend_irecv ring on a fresh topocomm group with a short timeout.
    python tests/netns/_rank_script.py kill torch|numpy <victim_rank> <delay_s> <size_bytes>
        an all_reduce (torch: the default topocomm group; numpy: comms.init()) during
        which the victim SIGKILLs itself (delay_s < 0: right before it); survivors report
        what they raised and how long it took, and exit with EXIT_RAISED.

Output: one line per result, "RESULT {json}", parsed by the test. Inside a check, mismatches
are collected rather than raised, and every gloo call of a check comes before its topocomm
calls, so the gloo sequence is the same on every rank whatever topocomm does.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings

torch = dist = R = comms = None   # imported in main(): the test imports this file for names

EXIT_RAISED = 3               # kill mode: a survivor raised a CommError subclass
EXIT_WRONG_ERROR = 4          # kill mode: a survivor raised something else
EXIT_NO_ERROR = 5             # kill mode: the all_reduce returned
GROUP_TIMEOUT_S = 40          # topocomm gets torch's timeout; bounded so a bug fails, not hangs
BIG = 2 * 1024 * 1024 + 3     # ~8 MiB of float32, odd: pieces, padding in the host step
SIZES = (0, 1, 7, 1000003)
# the uneven group: host key per rank for each placement of the 2x2 cluster
#   contiguous  (h0: 0,1  h1: 2,3)  ->  A={0,1}  B={2}  C={3}
#   interleaved (h0: 0,2  h1: 1,3)  ->  A={0,2}  B={1}  C={3}   (a host's ranks not adjacent)
UNEVEN_HOST_IDS = {"contiguous": ["A", "A", "B", "C"], "interleaved": ["A", "B", "A", "C"]}


def emit(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


# ------------------------------------------------------------------------------ inputs
def values(n, dtype, rank, salt=0, kind="unique"):
    """Inputs unique per (rank, index) (for float32: for the first 2**20 indices, then
    periodic), every partial sum of <= 4 ranks an exact integer in float32 and int64."""
    i = torch.arange(n, dtype=torch.int64)
    if kind == "prod":   # products of <= 4 values in {1, 2, -1} stay exact
        return torch.tensor([1, 2, -1])[(i + rank + salt) % 3].to(dtype)
    if dtype == torch.int64:
        return rank * 10**12 + i * 7 + salt * 1000003
    return (((i + salt * 7919) * 4 + rank) % (1 << 22) - (1 << 21)).to(dtype)


class Ctx:
    def __init__(self, label, rank, ws, topo, gloo, rank_host):
        self.label, self.rank, self.ws = label, rank, ws
        self.topo, self.gloo, self.rank_host = topo, gloo, rank_host
        self.errors = []

    def expect(self, ok, what):
        if not ok:
            self.errors.append(what)

    def equal(self, got, want, what):
        if isinstance(got, (list, tuple)):
            self.expect(len(got) == len(want), f"{what}: {len(got)} tensors, want {len(want)}")
            for i, (g, w) in enumerate(zip(got, want)):
                self.equal(g, w, f"{what}[{i}]")
            return
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            bad = ""
            if got.shape == want.shape and got.dtype == want.dtype:
                wrong = (got != want).reshape(-1).nonzero()
                bad = f" ({wrong.numel()} wrong, first at {wrong[0].item()})"
            self.errors.append(f"{what}: got {_short(got)}, want {_short(want)}{bad}")


def _short(t):
    flat = t.reshape(-1)
    return f"{t.dtype} {tuple(t.shape)} {flat[:5].tolist()}{'...' if flat.numel() > 5 else ''}"


# ------------------------------------------------------------------------------ checks
# Each check: gloo calls first (the reference), then the same calls on topocomm.
def check_all_reduce(c):
    f32, i64 = torch.float32, torch.int64
    sizes = SIZES if c.label == "world" else SIZES[:-1] + (100003,)   # keep the file fast
    cases = [(f32, n, op) for n in sizes for op in (R.SUM, R.MAX, R.MIN, R.PRODUCT)]
    cases += [(i64, n, R.SUM) for n in sizes] + [(i64, sizes[-1], R.MAX)]
    cases += [(f32, BIG, R.SUM)] + ([(f32, BIG, R.MIN)] if c.label == "world" else [])
    inputs = [values(n, dt, c.rank, k, "prod" if op == R.PRODUCT else "unique")
              for k, (dt, n, op) in enumerate(cases)]
    wants = [t.clone() for t in inputs]
    for (dt, n, op), w in zip(cases, wants):
        if n:   # gloo and a 0-element tensor: the expectation is the empty tensor anyway
            dist.all_reduce(w, op=op, group=c.gloo)
    for (dt, n, op), t, w in zip(cases, inputs, wants):
        dist.all_reduce(t, op=op, group=c.topo)
        c.equal(t, w, f"all_reduce {dt} n={n} {op}")
    # out of the shape torch users pass: 2-D, non-contiguous (copied back into the view)
    base = values(64 * 33, f32, c.rank, 5).view(64, 33)
    want = base.t().contiguous()
    dist.all_reduce(want, group=c.gloo)
    view = base.t()
    dist.all_reduce(view, group=c.topo)
    c.equal(view.contiguous(), want, "all_reduce non-contiguous 33x64")


def _roots(c):
    return (1, 2)   # non-zero roots: a host's non-first rank and a host's first, any placement


def check_broadcast(c):
    cases = [(dt, n, root) for dt in (torch.float32, torch.int64) for n in (1, 7)
             for root in _roots(c)] + [(torch.float32, 1000003, 2), (torch.int64, 300007, 1)]
    wants = [values(n, dt, c.rank, root) for dt, n, root in cases]
    for (dt, n, root), w in zip(cases, wants):
        dist.broadcast(w, root, group=c.gloo)
    for (dt, n, root), w in zip(cases, wants):
        got = values(n, dt, c.rank, root)
        dist.broadcast(got, root, group=c.topo)
        c.equal(got, w, f"broadcast {dt} n={n} root={root}")


def check_reduce(c):
    cases = [(dt, n, root, op) for dt in (torch.float32, torch.int64) for n in (1, 7)
             for root in _roots(c) for op in (R.SUM, R.MAX)]
    cases += [(torch.float32, 7, 1, R.PRODUCT), (torch.float32, 7, 2, R.MIN),
              (torch.float32, 1000003, 1, R.SUM), (torch.int64, 300007, 2, R.MAX)]
    kinds = ["prod" if op == R.PRODUCT else "unique" for _, _, _, op in cases]
    wants = [values(n, dt, c.rank, root + 3, k) for (dt, n, root, op), k in zip(cases, kinds)]
    for (dt, n, root, op), w in zip(cases, wants):
        dist.reduce(w, root, op=op, group=c.gloo)
    for (dt, n, root, op), w, k in zip(cases, wants, kinds):
        got = values(n, dt, c.rank, root + 3, k)
        dist.reduce(got, root, op=op, group=c.topo)
        if c.rank == root:  # gloo leaves scratch in non-root buffers: compare on the root
            c.equal(got, w, f"reduce {dt} n={n} root={root} {op}")


def check_all_gather(c):
    cases = [(dt, n) for dt in (torch.float32, torch.int64) for n in (1, 7, 100003)]
    ins = [values(n, dt, c.rank, n) for dt, n in cases]
    wants = []
    for (dt, n), inp in zip(cases, ins):
        w = [torch.empty(n, dtype=dt) for _ in range(c.ws)]
        dist.all_gather(w, inp, group=c.gloo)
        wants.append(w)
    flat_want = torch.empty(c.ws * 7, dtype=torch.float32)
    dist.all_gather_into_tensor(flat_want, values(7, torch.float32, c.rank, 99), group=c.gloo)
    for (dt, n), inp, w in zip(cases, ins, wants):
        got = [torch.full((n,), 99, dtype=dt) for _ in range(c.ws)]
        dist.all_gather(got, inp, group=c.topo)
        c.equal(got, w, f"all_gather {dt} n={n}")
        out = torch.full((c.ws * n,), 99, dtype=dt)
        dist.all_gather_into_tensor(out, inp, group=c.topo)
        c.equal(out, torch.cat(w), f"all_gather_into_tensor {dt} n={n}")
    out = torch.empty(c.ws * 7, dtype=torch.float32)
    dist.all_gather_into_tensor(out, values(7, torch.float32, c.rank, 99), group=c.topo)
    c.equal(out, flat_want, "all_gather_into_tensor (gloo reference)")
    # closed form too, in case both backends were wrong the same way
    c.equal(out, torch.cat([values(7, torch.float32, p, 99) for p in range(c.ws)]),
            "all_gather_into_tensor closed form")


def check_reduce_scatter(c):
    cases = [(dt, n, op) for dt in (torch.float32, torch.int64) for n in (1, 7)
             for op in (R.SUM, R.MIN)]
    cases += [(torch.float32, 7, R.PRODUCT), (torch.float32, 250001, R.SUM),
              (torch.int64, 100003, R.MAX)]
    kinds = ["prod" if op == R.PRODUCT else "unique" for _, _, op in cases]
    ins = [values(c.ws * n, dt, c.rank, n, k) for (dt, n, op), k in zip(cases, kinds)]
    wants = []
    for (dt, n, op), inp in zip(cases, ins):
        w = torch.empty(n, dtype=dt)
        dist.reduce_scatter_tensor(w, inp.clone(), op=op, group=c.gloo)
        wants.append(w)
    for (dt, n, op), inp, w in zip(cases, ins, wants):
        got = torch.full((n,), 99, dtype=dt)
        dist.reduce_scatter_tensor(got, inp, op=op, group=c.topo)
        c.equal(got, w, f"reduce_scatter_tensor {dt} n={n} {op}")
        if n < 1000:
            got = torch.full((n,), 99, dtype=dt)
            dist.reduce_scatter(got, list(inp.chunk(c.ws)), op=op, group=c.topo)
            c.equal(got, w, f"reduce_scatter (list) {dt} n={n} {op}")


def _splits(rank, ws, salt):
    """rows rank -> peer: uneven, with zeros (some ranks send nothing to some peers)."""
    return [(rank + 2 * peer + salt) % 3 for peer in range(ws)]


def check_all_to_all(c):
    a2a = dist.all_to_all_single
    cases = []   # (what, input, out_shape, out_splits, in_splits)
    for dt in (torch.float32, torch.int64):
        for per_peer in (1, 5, 65537):
            inp = values(per_peer * c.ws, dt, c.rank, per_peer)
            cases.append((f"even {dt} per_peer={per_peer}", inp, inp.shape, None, None))
        for salt, cols in ((0, 3), (1, 1), (2, 9000), (4, 70001)):
            ins_ = _splits(c.rank, c.ws, salt)
            outs_ = [_splits(p, c.ws, salt)[c.rank] for p in range(c.ws)]
            inp = values(sum(ins_) * cols, dt, c.rank, salt).view(-1, cols)
            cases.append((f"uneven {dt} cols={cols} in={ins_} out={outs_}", inp,
                          (sum(outs_), cols), outs_, ins_))
    # only the block to the rank itself is non-empty: nothing crosses the network
    ins_ = [2 if p == c.rank else 0 for p in range(c.ws)]
    cases.append(("self-only", values(2, torch.float32, c.rank).view(2, 1), (2, 1), ins_, ins_))
    # one rank receives everything, the rest nothing (zero splits on both sides)
    ins_ = [5 if p == 1 else 0 for p in range(c.ws)]
    outs_ = [5] * c.ws if c.rank == 1 else [0] * c.ws
    cases.append(("all to rank 1", values(5, torch.int64, c.rank, 8).view(5, 1),
                  (sum(outs_), 1), outs_, ins_))
    wants = []
    for what, inp, shape, o, i in cases:
        w = torch.empty(shape, dtype=inp.dtype)
        a2a(w, inp, o, i, group=c.gloo)
        wants.append(w)
    for (what, inp, shape, o, i), w in zip(cases, wants):
        got = torch.full(shape, 99, dtype=inp.dtype)
        a2a(got, inp, o, i, group=c.topo)
        c.equal(got, w, f"all_to_all_single {what}")


def check_gather_scatter(c):
    cases = [(dt, n, root) for dt in (torch.float32, torch.int64) for n in (7, 100003)
             for root in _roots(c)]
    g_wants, s_wants = [], []
    for dt, n, root in cases:
        is_root = c.rank == root
        w = [torch.empty(n, dtype=dt) for _ in range(c.ws)] if is_root else None
        dist.gather(values(n, dt, c.rank, root), w, dst=root, group=c.gloo)
        g_wants.append(w)
        chunks = [values(n, dt, c.rank, p + 10) for p in range(c.ws)] if is_root else None
        w = torch.empty(n, dtype=dt)
        dist.scatter(w, chunks, src=root, group=c.gloo)
        s_wants.append(w)
    for (dt, n, root), gw, sw in zip(cases, g_wants, s_wants):
        is_root = c.rank == root
        got = [torch.full((n,), 99, dtype=dt) for _ in range(c.ws)] if is_root else None
        dist.gather(values(n, dt, c.rank, root), got, dst=root, group=c.topo)
        if is_root:
            c.equal(got, gw, f"gather {dt} n={n} root={root}")
        chunks = [values(n, dt, c.rank, p + 10) for p in range(c.ws)] if is_root else None
        got = torch.full((n,), 99, dtype=dt)
        dist.scatter(got, chunks, src=root, group=c.topo)
        c.equal(got, sw, f"scatter {dt} n={n} root={root}")


def check_barrier(c):
    """A rank leaves barrier k only after every rank entered it: each rank drops a marker
    file before barrier k; after it, all markers of round k must be there."""
    d = c.barrier_dir
    for k in range(4):
        if c.rank == k % c.ws and k:     # one rank arrives late (work, not a wait)
            sum(range(200000))
        open(os.path.join(d, f"{c.label}-{k}-{c.rank}"), "w").close()
        dist.barrier(group=c.topo)
        missing = [p for p in range(c.ws)
                   if not os.path.exists(os.path.join(d, f"{c.label}-{k}-{p}"))]
        c.expect(not missing, f"barrier {k}: left before ranks {missing} arrived")


def check_send_recv(c):
    """Every ordered pair in turn (same host and across hosts), blocking send/recv, then a
    ring of isend/irecv posted at once."""
    kinds = {}
    for n in (7, 300001):          # 300001 x 4 B is striped over the TCP streams
        for src in range(c.ws):
            for dst in range(c.ws):
                if src == dst:
                    continue
                kind = "same host" if c.rank_host[src] == c.rank_host[dst] else "cross host"
                kinds[kind] = kinds.get(kind, 0) + 1
                tag = src * 10 + dst
                if c.rank == src:
                    dist.send(values(n, torch.float32, src, dst), dst, group=c.topo, tag=tag)
                elif c.rank == dst:
                    got = torch.full((n,), 99, dtype=torch.float32)
                    dist.recv(got, src, group=c.topo, tag=tag)
                    c.equal(got, values(n, torch.float32, src, dst),
                            f"send/recv {kind} {src}->{dst} n={n}")
    c.expect(set(kinds) == {"same host", "cross host"}, f"pairs cover {kinds}")
    nxt, prv = (c.rank + 1) % c.ws, (c.rank - 1) % c.ws
    out = values(1000, torch.int64, c.rank, 4)
    got = torch.full((1000,), 99, dtype=torch.int64)
    works = [dist.isend(out, nxt, group=c.topo), dist.irecv(got, prv, group=c.topo)]
    for w in works:
        w.wait()
    c.equal(got, values(1000, torch.int64, prv, 4), "isend/irecv ring n=1000")


def check_zero_sizes(c):
    """0-element tensors through every collective: nothing moves, nothing breaks."""
    f32 = torch.float32
    e = torch.empty(0, dtype=f32)
    dist.broadcast(e, 1, group=c.topo)
    dist.reduce(e, 2, group=c.topo)
    out = torch.empty(0, dtype=f32)
    dist.all_gather_into_tensor(out, e, group=c.topo)
    dist.reduce_scatter_tensor(out, torch.empty(0, dtype=f32), group=c.topo)
    dist.all_to_all_single(out, e, [0] * c.ws, [0] * c.ws, group=c.topo)
    dist.all_to_all_single(out, e, group=c.topo)
    outs = [torch.empty(0, dtype=f32) for _ in range(c.ws)]
    dist.all_gather(outs, e, group=c.topo)
    dist.gather(e, outs if c.rank == 1 else None, dst=1, group=c.topo)
    dist.scatter(out, outs if c.rank == 2 else None, src=2, group=c.topo)
    t = values(3, f32, c.rank)
    dist.all_reduce(t, group=c.topo)      # and the group still works
    c.equal(t, sum(values(3, f32, p) for p in range(c.ws)), "all_reduce after 0-element calls")


def check_bad_args(c):
    """Ranks that disagree (sizes, roots) make every rank raise before data moves, across
    hosts too, and the group stays usable (README: Errors)."""
    for what, fn in (
            ("all_reduce sizes differ", lambda: dist.all_reduce(
                torch.ones(3 + c.rank), group=c.topo)),
            ("large all_reduce sizes differ", lambda: dist.all_reduce(
                torch.ones(100000 + c.rank), group=c.topo)),
            ("broadcast roots differ", lambda: dist.broadcast(
                torch.ones(4), c.rank % 2, group=c.topo))):
        try:
            fn()
            c.errors.append(f"{what}: did not raise")
        except (ValueError, TypeError, RuntimeError) as exc:
            c.expect(not isinstance(exc, comms.CommError),
                     f"{what}: raised {type(exc).__name__} (breaks the group): {exc}")
    t = values(1000, torch.int64, c.rank)
    dist.all_reduce(t, group=c.topo)
    c.equal(t, sum(values(1000, torch.int64, p) for p in range(c.ws)),
            "all_reduce after argument errors")


def check_layout(c):
    """The topocomm group really spans the hosts it should."""
    comm = c.topo.communicator
    c.expect(getattr(comm, "is_multihost", False), f"{type(comm).__name__} is not multi-host")
    hosts = [sorted(hs) for hs in getattr(comm, "hosts", [])]
    want = {}
    for r, h in enumerate(c.rank_host):
        want.setdefault(h, []).append(r)
    c.expect(sorted(hosts) == sorted(want.values()), f"hosts {hosts}, want {list(want.values())}")


CHECKS = [check_layout, check_all_reduce, check_broadcast, check_reduce, check_all_gather,
          check_reduce_scatter, check_all_to_all, check_gather_scatter, check_barrier,
          check_send_recv, check_zero_sizes, check_bad_args]
CHECK_NAMES = [f.__name__[len("check_"):] for f in CHECKS]
NUMPY_CHECKS = ["numpy_layout", "numpy_allreduce", "numpy_all_to_all", "numpy_broadcast",
                "numpy_allgather"]
GROUPS = ("world", "uneven")     # labels of the topocomm groups checked against gloo


def run_checks(label, rank, ws, topo, gloo, rank_host, barrier_dir):
    for check, name in zip(CHECKS, CHECK_NAMES):
        c = Ctx(label, rank, ws, topo, gloo, rank_host)
        c.barrier_dir = barrier_dir
        t0 = time.perf_counter()
        try:
            check(c)
        except Exception:
            c.errors.append(traceback.format_exc())
        emit(group=label, check=name, rank=rank, errors=c.errors,
             seconds=round(time.perf_counter() - t0, 3))
        dist.barrier(group=gloo)  # resynchronise between checks


P2P_RING_TIMEOUT_S = 4
P2P_RING_NUMEL = 1 << 20      # 4 MiB of float32: more than a socket buffer or a shm slot


def run_p2p_ring(rank, ws, gloo):
    """The ring exchange of torch's batch_isend_irecv docs (every rank sends to the next and
    receives from the previous, all posted before any wait), large, on a fresh topocomm group
    with a short timeout: gloo completes it; see the test for what topocomm does."""
    n = P2P_RING_NUMEL
    nxt, prv = (rank + 1) % ws, (rank - 1) % ws
    out = values(n, torch.float32, rank, 6)
    want = torch.empty(n, dtype=torch.float32)
    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, out, nxt, gloo),
                                     dist.P2POp(dist.irecv, want, prv, gloo)]):
        w.wait()
    errors = []
    if not torch.equal(want, values(n, torch.float32, prv, 6)):
        errors.append("gloo reference wrong")
    group = dist.new_group(backend="topocomm",
                           timeout=datetime.timedelta(seconds=P2P_RING_TIMEOUT_S))
    got = torch.full((n,), 99.0)
    t0 = time.monotonic()
    try:
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, out, nxt, group),
                                         dist.P2POp(dist.irecv, got, prv, group)]):
            w.wait()
        if not torch.equal(got, want):
            errors.append("topocomm result differs from gloo")
    except Exception as exc:
        errors.append(f"batch_isend_irecv ring of {n * 4} B: {type(exc).__name__} after "
                      f"{time.monotonic() - t0:.1f} s: {exc}")
    emit(group="p2p", check="batch_isend_irecv_ring", rank=rank, errors=errors,
         seconds=round(time.monotonic() - t0, 3))
    dist.destroy_process_group(group)


# ------------------------------------------------------------------------------ numpy path
def run_numpy(rank, ws, rank_host, port):
    """comms.init() from the launcher's env (own rendezvous port: torch holds MASTER_PORT)."""
    import numpy as np

    os.environ["MASTER_PORT"] = str(port)
    comm = comms.init()
    results = {name: [] for name in NUMPY_CHECKS}

    def run(name, fn):
        try:
            fn(results[name])
        except Exception:
            results[name].append(traceback.format_exc())

    def layout(err):
        want = {}
        for r, h in enumerate(rank_host):
            want.setdefault(h, []).append(r)
        if not comm.is_multihost or sorted(map(sorted, comm.hosts)) != sorted(want.values()):
            err.append(f"is_multihost={comm.is_multihost} hosts={getattr(comm, 'hosts', None)}")

    def val(n, r, salt=0):
        return (((np.arange(n) + salt * 7919) * 4 + r) % (1 << 22) - (1 << 21)).astype(np.float32)

    def allreduce(err):
        for n in (7, 1000003):
            x = val(n, rank, n)
            comm.allreduce(x)
            want = sum(val(n, p, n).astype(np.float64) for p in range(ws)).astype(np.float32)
            if not np.array_equal(x, want):
                err.append(f"allreduce sum n={n}: {int((x != want).sum())} wrong")
            y = np.empty_like(x)
            comm.allreduce(val(n, rank, 1), op="max", out=y)
            want = np.max([val(n, p, 1) for p in range(ws)], axis=0)
            if not np.array_equal(y, want):
                err.append(f"allreduce max out= n={n}: {int((y != want).sum())} wrong")

    def all_to_all(err):
        cols = 1000
        sc = [s * cols for s in _splits(rank, ws, 1)]
        rc = [_splits(p, ws, 1)[rank] * cols for p in range(ws)]
        send = np.arange(sum(sc), dtype=np.int64) + rank * 10**9
        recv = np.full(sum(rc), -1, dtype=np.int64)
        comm.all_to_all(send, recv, sc, rc)
        parts = []
        for p in range(ws):
            psc = [s * cols for s in _splits(p, ws, 1)]
            lo = sum(psc[:rank])
            parts.append(np.arange(lo, lo + psc[rank], dtype=np.int64) + p * 10**9)
        want = np.concatenate(parts)
        if not np.array_equal(recv, want):
            err.append(f"all_to_all uneven: got {recv[:5]}.. want {want[:5]}..")

    def broadcast(err):
        x = val(300001, rank, 3) if rank == 3 else np.zeros(300001, np.float32)
        comm.broadcast(x, root=3)
        if not np.array_equal(x, val(300001, 3, 3)):
            err.append("broadcast root=3 wrong")

    def allgather(err):
        recv = np.zeros(ws * 5, np.float32)
        comm.allgather(val(5, rank, 2), recv)
        want = np.concatenate([val(5, p, 2) for p in range(ws)])
        if not np.array_equal(recv, want):
            err.append(f"allgather: got {recv} want {want}")

    for name, fn in zip(NUMPY_CHECKS, (layout, allreduce, all_to_all, broadcast, allgather)):
        run(name, fn)
    comm.barrier()
    comm.close()
    for name in NUMPY_CHECKS:
        emit(group="numpy", check=name, rank=rank, errors=results[name])


# ------------------------------------------------------------------------------ modes
def main_equal(barrier_dir, numpy_port, p2p_ring):
    rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    placement = os.environ["CLUSTER_PLACEMENT"]
    hosts = int(os.environ["CLUSTER_NUM_HOSTS"])
    rank_host = ([r // (ws // hosts) for r in range(ws)] if placement == "contiguous"
                 else [r % hosts for r in range(ws)])
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    dist.init_process_group("topocomm", timeout=timeout)
    gloo = dist.new_group(backend="gloo", timeout=timeout)
    topo = dist.group.WORLD
    emit(group="world", check="started", rank=rank, errors=[], pid=os.getpid())
    run_checks("world", rank, ws, topo, gloo, rank_host, barrier_dir)

    try:
        run_numpy(rank, ws, rank_host, numpy_port)
    except Exception:
        for name in NUMPY_CHECKS:
            emit(group="numpy", check=name, rank=rank, errors=[traceback.format_exc()])
    dist.barrier(group=gloo)

    # uneven hosts: the host key is read when a group is created, so forcing it here gives a
    # 2+1+1 layout; ranks 'B' and 'C' share a namespace but talk TCP like separate hosts
    ids = UNEVEN_HOST_IDS[placement]
    os.environ["TOPOCOMM_HOST_ID"] = f"uneven-{ids[rank]}"
    try:
        uneven = dist.new_group(backend="topocomm", timeout=timeout)
    finally:
        del os.environ["TOPOCOMM_HOST_ID"]
    uneven_host = [ids.index(k) for k in ids]
    run_checks("uneven", rank, ws, uneven, gloo, uneven_host, barrier_dir)
    dist.destroy_process_group(uneven)
    if p2p_ring:
        dist.barrier(group=gloo)
        run_p2p_ring(rank, ws, gloo)
    dist.barrier(group=gloo)
    dist.destroy_process_group()
    emit(group="world", check="done", rank=rank, errors=[])
    return 0


def main_kill(api, victim, delay_s, nbytes):
    """api "torch": dist.all_reduce on the default topocomm group; "numpy": comms.init()."""
    rank = int(os.environ["RANK"])
    timeout_s = float(os.environ["TOPOCOMM_TIMEOUT"])
    if api == "torch":
        dist.init_process_group("topocomm", timeout=datetime.timedelta(seconds=timeout_s))
        t = torch.ones(nbytes // 4, dtype=torch.float32)
        barrier, all_reduce = dist.barrier, dist.all_reduce
    else:
        import numpy as np
        comm = comms.init()         # TOPOCOMM_TIMEOUT
        t = np.ones(nbytes // 4, dtype=np.float32)
        barrier, all_reduce = comm.barrier, comm.allreduce
    barrier()                       # everyone is at the all_reduce together
    emit(check="started", rank=rank, pid=os.getpid())
    if rank == victim:
        if delay_s < 0:             # dead before the call: the others find a dead peer
            os.kill(os.getpid(), signal.SIGKILL)
        killer = threading.Timer(delay_s, os.kill, (os.getpid(), signal.SIGKILL))
        killer.daemon = True
        killer.start()
    t0 = time.monotonic()
    try:
        all_reduce(t)
    except BaseException as exc:   # noqa: B902 - reported to the test
        emit(check="raised", rank=rank, type=type(exc).__name__, message=str(exc)[-300:],
             seconds=round(time.monotonic() - t0, 3), mro=[k.__name__ for k in type(exc).__mro__])
        return EXIT_RAISED if isinstance(exc, comms.CommError) else EXIT_WRONG_ERROR
    emit(check="returned", rank=rank, seconds=round(time.monotonic() - t0, 3))
    return EXIT_NO_ERROR


def main(argv):
    global torch, dist, R, comms
    warnings.simplefilter("ignore")
    import faulthandler
    faulthandler.dump_traceback_later(80, exit=False)   # where a hang sits, before the kill
    import comms as _comms
    comms = _comms
    if argv[0] == "kill" and argv[1] == "numpy":        # no torch: starts in a fraction
        return main_kill("numpy", int(argv[2]), float(argv[3]), int(argv[4]))
    import torch as _torch
    import torch.distributed as _dist

    comms.register()
    torch, dist, R = _torch, _dist, _dist.ReduceOp
    if argv[0] == "equal":
        return main_equal(argv[1], int(argv[2]), argv[3:] == ["p2p"])
    if argv[0] == "kill":
        return main_kill(argv[1], int(argv[2]), float(argv[3]), int(argv[4]))
    raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Soak: rounds of 4 rank processes running random collectives with every result checked,
while faults are injected; after each round, nothing may be left behind.

    python bench/soak.py --minutes 10          # the reliability run (#ranks 4 by default)
    python bench/soak.py --minutes 0.3 --round 10

Each round starts `--ranks` fresh processes (comms.init, rank 0 serves the store). They
draw the same random schedule (one seed per round, and a new one after each shrink, so
survivors that fell out of step by one operation agree again) and run collectives of
random kind, dtype, op and size, each result compared with the value every rank can
compute on its own. Faults, drawn from the same schedule:

    kill     a rank other than 0 SIGKILLs itself inside a collective: the survivors must
             raise CommError, shrink and go on (survived) - only while 3 or more ranks live
    badarg   one rank passes a buffer of the wrong size: it raises ValueError naming the
             argument, every other rank ArgumentMismatch, and the group goes on (reported)
    slow     one rank sleeps up to 200 ms before a collective: everyone completes (survived)
    stranger the driver sends garbage frames to the store (reported in its log, survived)

After each round the driver checks that every process ended (a killed one with -9, the
others with 0), that no shared-memory segment of any of them is left in /dev/shm, that the
ranks had no thread left after close(), and that nothing listens on the store's port. The
shrink_s column is the longest time from a survivor's CommError to its new group. Exit code
1 on any wrong result, unexpected error or leak.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))
from comms.testing import collect  # noqa: E402

RANK_CODE = textwrap.dedent(r"""
    import json, os, signal, sys, threading, time
    import numpy as np
    import comms

    ROUND, ROUND_S = int(sys.argv[1]), float(sys.argv[2])
    me0 = int(os.environ["RANK"])
    out = {"rank": me0, "pid": os.getpid(), "ops": 0, "wrong": 0, "unexpected": [],
           "shrink_max_s": 0.0, "shrinks": 0, "badarg": 0, "slow": 0, "reported": 0}
    print("PID", os.getpid(), flush=True)
    comm = comms.init(timeout=30)
    gen = 0
    rng = np.random.default_rng([ROUND, gen])
    DTYPES = [np.float32, np.float64, np.int32, np.int64]
    t_end = time.monotonic() + ROUND_S

    def data(kind, n, dtype, rank, it):
        # small integers: every sum is exact in every dtype
        return ((np.arange(n) % 7 + it % 5 + 1) * (rank + 1)).astype(dtype)

    def one(it):
        r, n = comm.rank, comm.size
        kind = rng.choice(["allreduce", "allgather", "reduce_scatter", "broadcast",
                           "all_to_all", "reduce", "gather", "barrier"])
        dtype = DTYPES[rng.integers(len(DTYPES))]
        count = int(rng.choice([1, 7, 1000, 1 << 14, 1 << 18, 1 << 20]))
        root = int(rng.integers(n))
        fault = rng.random()
        victim = int(rng.integers(1, n)) if n > 1 else 0
        delay = float(rng.random()) * 0.05
        if fault < 0.004 and n >= 3 and r == victim:
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        bad = 0.004 <= fault < 0.014 and r == victim and kind not in ("barrier", "broadcast")
        if 0.014 <= fault < 0.034 and r == victim:
            time.sleep(delay * 4)
            out["slow"] += 1
        x = data(kind, count, dtype, r, it)
        want_sum = lambda c, k=0: sum(data(kind, c, dtype, q, it + k) for q in range(n))
        try:
            if kind == "allreduce":
                buf = x[:-1] if bad and count > 1 else (np.ones(2, dtype) if bad else x)
                comm.allreduce(buf, op="sum")
                ok = (x == want_sum(count)).all()
            elif kind == "allgather":
                recv = np.empty(n * count + (1 if bad else 0), dtype)
                comm.allgather(x, recv)
                ok = (recv == np.concatenate([data(kind, count, dtype, q, it)
                                              for q in range(n)])).all()
            elif kind == "reduce_scatter":
                send = np.concatenate([data(kind, count, dtype, r, it + b) for b in range(n)])
                recv = np.empty(count + (1 if bad else 0), dtype)
                comm.reduce_scatter(send, recv)
                ok = (recv == want_sum(count, r)).all()
            elif kind == "broadcast":
                comm.broadcast(x, root=root)
                ok = (x == data(kind, count, dtype, root, it)).all()
            elif kind == "all_to_all":
                counts = [(count + 3 * (q + s)) % 1000 + 1 for s in range(n) for q in range(n)]
                sc = counts[r * n:(r + 1) * n]                    # row r: what r sends to q
                rc = [counts[p * n + r] for p in range(n)]
                send = np.concatenate([np.full(sc[q], 100 * r + q, dtype) for q in range(n)])
                recv = np.empty(sum(rc) + (1 if bad else 0), dtype)
                comm.all_to_all(send, recv, sc, rc + ([1] if bad else []))
                ok = (recv == np.concatenate([np.full(rc[p], 100 * p + r, dtype)
                                              for p in range(n)])).all()
            elif kind == "reduce":
                out_buf = np.empty(count + (1 if bad else 0), dtype)
                comm.reduce(x, root=root, op="max", out=out_buf)
                ok = r != root or (out_buf == data(kind, count, dtype, n - 1, it)).all()
            elif kind == "gather":
                recv = np.empty(n * count + (1 if bad else 0), dtype) if r == root else None
                sent = x if not bad or r == root else np.concatenate([x, x[:1]])
                comm.gather(sent, recv, root=root)
                ok = r != root or (recv == np.concatenate([data(kind, count, dtype, q, it)
                                                           for q in range(n)])).all()
            else:
                comm.barrier()
                ok = True
        except (ValueError, TypeError) as exc:
            if bad:                                   # this rank's injected bad argument
                out["badarg"] += 1
            elif isinstance(exc, comms.ArgumentMismatch):
                out["reported"] += 1                  # another rank's, reported here
            else:
                out["unexpected"].append(f"{kind}: {type(exc).__name__}: {exc}")
            return
        out["ops"] += 1
        if bad:
            out["unexpected"].append(f"{kind}: a bad argument was accepted")
        elif not ok:
            out["wrong"] += 1
            out["unexpected"].append(f"{kind} {np.dtype(dtype).name} x{count} wrong at op {it}")

    it = 0
    try:
        while True:
            it += 1
            try:
                if it % 16 == 0:           # every rank stops at the same operation
                    flag = np.array([time.monotonic() > t_end], np.int32)
                    comm.allreduce(flag, op="max")
                    if flag[0]:
                        break
                one(it)
            except comms.CommError:
                t_err = time.monotonic()
                comm = comm.shrink()
                out["shrink_max_s"] = max(out["shrink_max_s"], time.monotonic() - t_err)
                out["shrinks"] += 1
                gen += 1
                rng = np.random.default_rng([ROUND, gen])
                it = 0
    except Exception as exc:
        out["unexpected"].append(f"{type(exc).__name__}: {exc}")
    finally:
        try:
            comm.close()
        except Exception as exc:
            out["unexpected"].append(f"close: {type(exc).__name__}: {exc}")
    out["size_at_end"] = comm.size
    out["threads"] = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    print("RESULT", json.dumps(out), flush=True)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stranger(port, rounds=3):
    """Hostile frames to the store: an unknown command, a key length far over the limit,
    a frame cut off. The server must log each, close that connection, and go on."""
    frames = [struct.pack("!BII", 9, 3, 0) + b"abc",
              struct.pack("!BII", 1, 1 << 30, 0),
              struct.pack("!BII", 1, 10, 5) + b"short"]
    sent = 0
    for frame in frames[:rounds]:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(frame)
                sent += 1
        except OSError:
            pass
    return sent


def run_round(k, ranks, round_s, log):
    port = _free_port()
    env = dict(os.environ, WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONPATH=str(REPO) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    env.pop("TOPOCOMM_ALGO", None)
    procs = [subprocess.Popen([sys.executable, "-c", RANK_CODE, str(k), str(round_s)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(ranks)]
    try:
        time.sleep(min(2.0, round_s / 3))      # the store is up: send it garbage once
        strangers = _stranger(port)
    finally:
        outs = collect(procs, time.monotonic() + round_s + 120, "soak")   # no orphans
    row = {"round": k, "ops": 0, "wrong": 0, "kills": 0, "shrinks": 0, "badarg": 0,
           "reported": 0, "slow": 0, "strangers": strangers, "shrink_max_s": 0.0, "unexpected": [], "leaks": []}
    pids = []
    for r, (rc, so, se) in enumerate(outs):
        pid = next((ln.split()[1] for ln in so.splitlines() if ln.startswith("PID")), None)
        pids.append(pid)
        res = next((json.loads(ln[7:]) for ln in so.splitlines() if ln.startswith("RESULT ")),
                   None)
        if rc == -9:
            row["kills"] += 1
            continue
        if rc != 0 or res is None:
            row["unexpected"].append(f"rank {r} exit {rc}: {se.strip()[-800:]}")
            continue
        for key in ("ops", "wrong", "shrinks", "badarg", "reported", "slow"):
            row[key] += res[key]
        row["shrink_max_s"] = max(row["shrink_max_s"], res["shrink_max_s"])
        row["unexpected"] += [f"rank {r}: {u}" for u in res["unexpected"]]
        if res["threads"]:
            row["leaks"].append(f"rank {r} threads after close: {res['threads']}")
    for pid in filter(None, pids):
        left = glob.glob(f"/dev/shm/topocomm-{pid}-*")
        if left:
            row["leaks"].append(f"segments of pid {pid}: {left}")
    try:
        with socket.socket() as s:      # no listener left (connections in TIME_WAIT are)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1)
    except OSError:
        row["leaks"].append(f"store port {port} still bound")
    if any("Traceback" in se and "RESULT" not in so for _, so, se in outs):
        log.write("".join(se for _, _, se in outs))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="total run time")
    ap.add_argument("--round", type=float, default=60.0, help="seconds per round")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # runs run_round's cleanup
    t_end = time.monotonic() + args.minutes * 60
    rows, k = [], 0
    print(f"# soak: {args.ranks} ranks, {args.minutes:g} min, rounds of {args.round:g} s, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"# {'round':>5} {'ops':>7} {'wrong':>5} {'kills':>5} {'shrinks':>7} {'badarg':>6} "
          f"{'reported':>8} {'slow':>5} {'stranger':>8} {'shrink_s':>8} {'unexpected':>10} "
          f"{'leaks':>5}")
    while True:
        k += 1
        round_s = max(5.0, min(args.round, t_end - time.monotonic()))
        row = run_round(k, args.ranks, round_s, sys.stderr)
        rows.append(row)
        print(f"  {k:>5} {row['ops']:>7} {row['wrong']:>5} {row['kills']:>5} "
              f"{row['shrinks']:>7} {row['badarg']:>6} {row['reported']:>8} {row['slow']:>5} "
              f"{row['strangers']:>8} {row['shrink_max_s']:>8.3f} {len(row['unexpected']):>10} "
              f"{len(row['leaks']):>5}",
              flush=True)
        for u in row["unexpected"] + row["leaks"]:
            print(f"#   {u}")
        if time.monotonic() >= t_end:
            break
    total = {key: sum(r[key] for r in rows) for key in
             ("ops", "wrong", "kills", "shrinks", "badarg", "reported", "slow", "strangers")}
    total["shrink_max_s"] = round(max(r["shrink_max_s"] for r in rows), 3)
    bad = sum(len(r["unexpected"]) + len(r["leaks"]) for r in rows) + total["wrong"]
    print(f"# total: {total}; unexpected errors and leaks: {bad}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "total": total}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

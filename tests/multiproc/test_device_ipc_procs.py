"""The CUDA IPC path (comms/algorithms/device/ipc.py) between processes, with host memory
standing in for device memory (tests/multiproc/ipc_standin.py): every collective against
numpy, one GPU and several, the handles exchanged over the shared-memory host group and
opened once per peer buffer (a repeated call reuses its plan)."""
import contextlib
import glob
import json
import os
import textwrap

import pytest

from comms.testing import run_procs

pytestmark = pytest.mark.timeout(150)

CODE = textwrap.dedent("""
    import json, os, numpy as np
    from tests.multiproc import ipc_standin as S
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ipc, copies = S.install(gpu=os.environ["GPU_OF"].split(",")[rank])
    import comms
    made = []

    def dev(values):
        d = S.ShmDevice(values)
        made.append(d)
        return d

    def inputs(r, count):
        return np.random.default_rng(1000 * r + count).integers(-8, 8, count).astype(np.float32)

    c = comms.init(timeout=60)
    bad = []
    count = 2 * n * 64         # every rank has a block of an all-reduce split over GPUs
    ins = [inputs(r, count) for r in range(n)]
    stack = np.stack(ins)
    total, blocks = stack.sum(0), count // n
    try:
        x = dev(ins[rank])
        for _ in range(3):                  # the same buffer: one plan, its handles opened once
            c.allreduce(x)
        if not np.array_equal(x.host, total * n * n):
            bad.append(("allreduce x3", x.host.tolist()))
        opens_after = ipc.opens
        x, y = dev(ins[rank]), dev(np.zeros(count))
        c.allreduce(x, op="max", out=y)
        if not (np.array_equal(y.host, stack.max(0)) and np.array_equal(x.host, ins[rank])):
            bad.append(("allreduce max out",))
        x = dev(ins[rank])
        c.reduce(x, root=1, op="min")
        if not np.array_equal(x.host, stack.min(0) if rank == 1 else ins[rank]):
            bad.append(("reduce",))
        y = dev(np.zeros(blocks))
        c.reduce_scatter(dev(ins[rank]), y)
        if not np.array_equal(y.host, total[rank * blocks:(rank + 1) * blocks]):
            bad.append(("reduce_scatter",))
        b = dev(ins[rank])
        c.broadcast(b, root=n - 1)
        if not np.array_equal(b.host, ins[n - 1]):
            bad.append(("broadcast",))
        g = dev(np.zeros(count * n))
        c.allgather(dev(ins[rank]), g)
        if not np.array_equal(g.host, stack.reshape(-1)):
            bad.append(("allgather",))
        s = dev(np.zeros(blocks))
        c.scatter(dev(ins[1]) if rank == 1 else None, s, root=1)
        if not np.array_equal(s.host, ins[1][rank * blocks:(rank + 1) * blocks]):
            bad.append(("scatter",))
        a = dev(ins[rank])
        c.all_to_all(a, a)
        want = np.concatenate([ins[p][rank * blocks:(rank + 1) * blocks] for p in range(n)])
        if not np.array_equal(a.host, want):
            bad.append(("all_to_all in place",))
        sc = [(rank + q) % 3 for q in range(n)]
        rc = [(p + rank) % 3 for p in range(n)]
        a = dev(np.zeros(sum(rc)))
        c.all_to_all(dev(np.arange(sum(sc)) + 100 * rank), a, sc, rc)
        pieces = []
        for p in range(n):
            sc_p = [(p + q) % 3 for q in range(n)]
            start = sum(sc_p[:rank])
            pieces.append(np.arange(sum(sc_p))[start:start + sc_p[rank]] + 100 * p)
        if not np.array_equal(a.host, np.concatenate(pieces)):
            bad.append(("all_to_all uneven",))
        group = c._memory_groups["cuda"]
        ran = (group.path(), group.ipc.last)
        if copies.copies:
            bad.append(("the staged path ran", copies.copies))
    finally:
        c.close()
        for d in made:
            d.unlink()
    print("OK " + json.dumps({"path": ran[0], "how": ran[1], "opens": opens_after})
          if not bad else f"BAD {bad}")
""")


@pytest.mark.parametrize("gpus", ["one", "several"])
def test_every_collective_by_ipc_between_processes(gpus):
    n = 3
    gpu_of = ",".join("gpu-0" if gpus == "one" else f"gpu-{r}" for r in range(n))
    try:
        res = run_procs(n, CODE, timeout=120, env={"GPU_OF": gpu_of})
    finally:        # ranks killed at the timeout leave their files behind
        for path in glob.glob("/dev/shm/tc-ipc-test-*"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    for r, (rc, so, se) in enumerate(res):
        assert rc == 0 and so.startswith("OK"), (r, rc, so[-2000:], se[-3000:])
    for r, (_, so, _) in enumerate(res):
        got = json.loads(so.strip()[3:])
        assert got["path"] == "ipc" and got["how"] == ("one GPU" if gpus == "one" else
                                                       "several GPUs"), (r, so)
        # three all-reduces of one buffer: each peer buffer the rank works on opened once
        # (one GPU: rank 0 opens its 2 peers' buffers, send and recv being one; several
        # GPUs: every rank opens its 2 peers')
        assert got["opens"] == (2 if r == 0 or gpus == "several" else 0), (r, so)

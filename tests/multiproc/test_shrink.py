"""A rank SIGKILLed in the middle of a 64 MiB all-reduce: the survivors raise, shrink to a
group of three and go on with 100 more correct 64 MiB all-reduces, the first within 2 s of
the error; nothing of the old group is left (no shared-memory segment, no thread)."""
import glob
import textwrap

import pytest

from comms.testing import run_procs

pytestmark = pytest.mark.timeout(240)

# {setup} makes the group and defines allreduce(x), size(), rank(); {shrink} replaces them
COMMON = textwrap.dedent("""
    import os, signal, threading, time
    import numpy as np
    import comms
    {setup}
    me = int(os.environ["RANK"])
    print("PID", os.getpid(), flush=True)
    big = np.empty(16 << 20, np.float32)                    # 64 MiB
    try:
        for it in range(1, 1000):
            big[:] = me + it
            if me == 1 and it == 3:     # die inside the third all-reduce
                threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGKILL)).start()
            allreduce(big)
            assert big[0] == sum(q + it for q in range(4)), (it, big[0])
        print("NO ERROR")
    except comms.CommError as exc:
        t_err = time.monotonic()
        {shrink}
        wrong, first = 0, None
        for it in range(100):
            big[:] = me * 10 + it
            allreduce(big)
            first = first or time.monotonic() - t_err
            want = sum(q * 10 + it for q in (0, 2, 3))
            wrong += int(not (big == want).all())
        print("SHRUNK", type(exc).__name__, rank(), size(), round(first, 3), wrong, flush=True)
        {close}
        print("THREADS", [t.name for t in threading.enumerate()
                          if t is not threading.main_thread()])
""")

NUMPY = COMMON.format(
    setup="c = comms.init(timeout=60)\nallreduce = c.allreduce\nrank = lambda: c.rank\n"
          "size = lambda: c.size",
    shrink="c = c.shrink()\n    allreduce = c.allreduce\n"
           "    print('MAP', c.ranks_before, sorted(c.rank_map.items()))",
    close="c.close()")

TORCH = COMMON.format(
    setup="import torch, torch.distributed as dist\n"
          "dist.init_process_group('topocomm', timeout=__import__('datetime').timedelta(seconds=60))\n"
          "allreduce = lambda a: dist.all_reduce(torch.from_numpy(a))\n"
          "rank = dist.get_rank\nsize = dist.get_world_size",
    shrink="comms.shrink()",
    close="dist.destroy_process_group()")


def _check(res):
    assert res[1][0] == -9, res[1]
    pids = [out.split()[1] for _, out, _ in res]
    left = [p for p in glob.glob("/dev/shm/topocomm-*") if p.split("-")[1] in pids]
    assert not left, left
    for r, new_rank in ((0, 0), (2, 1), (3, 2)):
        rc, out, err = res[r]
        line = [ln for ln in out.splitlines() if ln.startswith("SHRUNK")]
        assert rc == 0 and line, (r, out, err[-3000:])
        _, kind, got_rank, got_size, first, wrong = line[0].split()
        assert kind in ("PeerDeadError", "PeerAbortedError"), line
        assert (int(got_rank), int(got_size)) == (new_rank, 3), line
        assert int(wrong) == 0, line
        assert float(first) < 2.0, line
        assert "THREADS []" in out, (r, out)
    return res


def test_numpy_survivors_shrink_and_go_on():
    res = _check(run_procs(4, NUMPY, timeout=200))
    assert "MAP [0, 2, 3] [(0, 0), (2, 1), (3, 2)]" in res[0][1], res[0][1]


def test_torch_survivors_shrink_and_go_on():
    pytest.importorskip("torch")
    _check(run_procs(4, TORCH, timeout=200))


SUBGROUP = textwrap.dedent("""
    import datetime, os, signal, threading, time
    import torch, torch.distributed as dist
    import comms
    dist.init_process_group("topocomm", timeout=datetime.timedelta(seconds=60))
    sub = dist.new_group([1, 2, 3], backend="topocomm")
    me = dist.get_rank()
    store = dist.distributed_c10d._get_default_store()
    if me == 0:       # not in the sub-group; serves the store until the survivors are done
        store.wait(["done/1", "done/3"], datetime.timedelta(seconds=100))
        print("IDLE")
        os._exit(0)
    t = torch.ones(4)
    dist.all_reduce(t, group=sub)
    if me == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        for _ in range(50):
            dist.all_reduce(t, group=sub)
        print("NO ERROR")
    except comms.CommError as exc:
        new = comms.shrink(sub)
        x = torch.full((3,), float(me))
        dist.all_reduce(x, group=new)
        print("SUB", type(exc).__name__, dist.get_rank(new), new.size(), x[0].item(),
              dist.get_process_group_ranks(new), flush=True)
    store.set(f"done/{me}", "1")
    os._exit(0)
""")


def test_torch_sub_group_shrinks_and_keeps_global_ranks():
    pytest.importorskip("torch")
    res = run_procs(4, SUBGROUP, timeout=120)
    assert res[2][0] == -9, res[2]
    for r, sub_rank in ((1, 0), (3, 1)):
        rc, out, err = res[r]
        assert rc == 0 and f"SUB PeerDeadError {sub_rank} 2 4.0 [1, 3]" in out, (r, out, err[-2000:])

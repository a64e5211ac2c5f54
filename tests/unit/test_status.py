"""One table of codes: comms/core/status.py (Status, AllToAllAlgorithm, Collective) agrees with
the C side (native/src/tc_internal.h, as text and as the extension's STATUS / A2A_ALGORITHMS
dicts), and the data-path helpers return its values: the numpy twins always, the C helpers
too when the extension is built (also under TOPOCOMM_PURE_PYTHON=1: they are called directly). The helpers run on small fake segments in this process (a peer is
a few words of memory the test writes), so no group or thread is needed."""
from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from comms.core import dtypes as dt
from comms.core.status import AllToAllAlgorithm, Collective, Status
from comms.kernels import native
from comms.kernels import reference

HEADER = pathlib.Path(__file__).resolve().parents[2] / "native" / "src" / "tc_internal.h"
COMMS = pathlib.Path(__file__).resolve().parents[2] / "comms"


def _header_enum(enum_name, prefix):
    """{NAME: value} of `enum <enum_name> { <prefix>NAME = value, ... }` in tc_internal.h."""
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is not here (an installed copy without the C sources)")
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    body = re.search(r"enum\s+%s\s*\{(.*?)\}" % enum_name, text, flags=re.S)
    assert body, f"enum {enum_name} not found in {HEADER}"
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"\b%s(\w+)\s*=\s*(-?\d+)" % prefix, body.group(1))}


def _members(cls):
    return {m.name: m.value for m in cls}


# ---- the tables agree -------------------------------------------------------------------

def test_header_statuses_equal_python_enum():
    assert _header_enum("tc_status", "TC_STATUS_") == _members(Status)


def test_header_a2a_algorithms_equal_python_enum():
    assert _header_enum("tc_a2a_algorithm", "TC_A2A_") == _members(AllToAllAlgorithm)


def test_extension_exposes_the_same_codes():
    native.impl()
    if not native.is_native:
        pytest.skip(f"C extension not loaded: {native.why_not_native}")
    from comms.kernels import _native
    assert _native.STATUS == _members(Status)
    assert _native.A2A_ALGORITHMS == _members(AllToAllAlgorithm)


def test_facade_exposes_the_codes_in_either_mode():
    impl = native.impl()
    assert impl.STATUS == _members(Status)
    assert impl.A2A_ALGORITHMS == _members(AllToAllAlgorithm)


def test_codes_are_distinct_and_named():
    for cls in (Status, AllToAllAlgorithm, Collective):
        assert len({m.value for m in cls}) == len(cls), cls
    assert Status.OK == 0  # `if st:` means "failed" everywhere
    assert Status.read_errno(Status.read_failed(errno.EFAULT)) == errno.EFAULT
    assert Status.read_failed(1) < Status.READ_FAILED


def test_collective_codes_keep_their_context_names():
    from comms.core.context import COLL_CODES, COLL_NAMES
    assert COLL_CODES == {c.name.lower(): c.value for c in Collective}
    assert all(COLL_NAMES[v] == k for k, v in COLL_CODES.items())
    assert COLL_CODES["allreduce"] == 1 and COLL_CODES["barrier"] == 9


def test_a2a_algorithm_names_follow_the_enum():
    """The selector's one-host all-to-all names, and the Communicator's table of what runs
    each number, name AllToAllAlgorithm members."""
    import importlib

    from comms.plan.select import ALGORITHMS
    for name in ALGORITHMS["all_to_all"] + ("pairwise-streamed",):
        assert AllToAllAlgorithm.by_label(name).label == name
    for modname in ("comms.api.host", "comms.api.communicator"):
        try:
            runs = getattr(importlib.import_module(modname), "_A2A_RUNS", None)
        except ImportError:
            continue
        if runs is not None:
            assert sorted(AllToAllAlgorithm(k) for k in runs) == list(AllToAllAlgorithm), modname
            return
    pytest.skip("no _A2A_RUNS table in comms.api.host or comms.api.communicator")


def test_no_raw_status_numbers_in_comparisons():
    """The modules that call the data-path helpers (or are them) name statuses."""
    pat = re.compile(r"\b(st|status)\s*(==|!=|<=|>=|<|>)\s*-?\d")
    calls = re.compile(r"\bnat\.|\b_nat\.|impl\(\)\.")
    files = [p for p in sorted(COMMS.rglob("*.py"))
             if p.parent.name == "kernels" or calls.search(p.read_text())]
    hits = [f"{p.relative_to(COMMS.parent)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if pat.search(line)]
    assert not hits, "compare statuses with comms.core.status.Status:\n" + "\n".join(hits)


# ---- the helpers return the enum's values -----------------------------------------------

def _impls():
    out = [pytest.param(reference, id="numpy")]
    try:
        from comms.kernels import _native
        out.append(pytest.param(_native, id="C"))
    except ImportError as exc:
        out.append(pytest.param(None, id="C", marks=pytest.mark.skip(
            reason=f"C extension not built or not importable: {exc}")))
    return out


IMPLS = _impls()

# a fake 2-rank group: this process is rank 1, rank 0 is words the test writes
SEG = 4096
ARRIVED, ABORT, WAITERS, POSTED, DONE = 0, 8, 16, 24, 32
HDR = (64, 192)
SMALL = (320, 640)
DATA = 1024
CTRL = (POSTED, DONE, ABORT, WAITERS)


class Fake:
    def __init__(self, mod, pid0=0, timeout=5.0):
        self.mod = mod
        self.bufs = [np.zeros(SEG // 8, np.int64) for _ in range(2)]
        self.seg = [b.ctypes.data for b in self.bufs]
        self.g = mod.group_new(1, 2, self.seg, (pid0, 0), timeout, ARRIVED, ABORT, WAITERS,
                               HDR[0], HDR[1], SMALL[0], SMALL[1])

    def peer(self, op_id, words=(), arrived=True, aborted=False):
        """Rank 0 arrived at op_id with header words (coll, count, dtype, op, root, 0, error, extra)."""
        b = self.bufs[0]
        b[ARRIVED // 8] = op_id if arrived else 0
        b[ABORT // 8] = int(aborted)
        h = HDR[op_id & 1] // 8
        b[h] = op_id
        b[h + 1:h + 1 + len(words)] = words


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


I32 = dt.I32
MASK = sum(1 << f for f in (1, 2, 3, 4, 5))


def _arrive(f, count=4):
    return f.mod.arrive_g(f.g, 1, Collective.ALLREDUCE, count, I32, 0, -1, 0, 0, MASK, 0, None)


@pytest.mark.parametrize("mod", IMPLS)
def test_arrive_statuses(mod):
    f = Fake(mod)
    f.peer(1, (Collective.ALLREDUCE, 4, I32, 0, -1))
    assert _arrive(f) == (Status.OK, -1)
    f = Fake(mod)
    f.peer(1, (Collective.ALLREDUCE, 5, I32, 0, -1))
    assert _arrive(f)[0] == Status.MISMATCH
    f = Fake(mod, timeout=0.2)
    f.peer(1, arrived=False)
    assert _arrive(f) == (Status.TIMEOUT, 0)
    f = Fake(mod)
    f.peer(1, arrived=False, aborted=True)
    assert _arrive(f) == (Status.ABORTED, 0)
    f = Fake(mod, pid0=_dead_pid())
    f.peer(1, arrived=False)
    assert _arrive(f) == (Status.DEAD, 0)


def _a2a(f, mine, direct_mode=2, count=2):
    send, recv = np.arange(count, dtype=np.int32), np.zeros(count, np.int32)
    return f.mod.alltoall_even_g(f.g, 1, Collective.ALL_TO_ALL, send.ctypes.data, recv.ctypes.data,
                                 count, I32, sum(1 << x for x in (1, 2, 3, 4)), CTRL, DATA, 64, 2,
                                 mine, direct_mode)


@pytest.mark.parametrize("mod", IMPLS)
def test_alltoall_even_statuses(mod):
    f = Fake(mod)
    f.peer(1, (Collective.ALL_TO_ALL, 2, I32, 1, AllToAllAlgorithm.STAGED, 0, 0, 0))
    assert _a2a(f, AllToAllAlgorithm.PAIRWISE) == (Status.OTHER_ALGORITHM, AllToAllAlgorithm.STAGED)
    # rank 0 runs direct reads from a buffer at an unmapped address: the read fails (EFAULT)
    f = Fake(mod, pid0=os.getpid())
    f.peer(1, (Collective.ALL_TO_ALL, 2, I32, 1, AllToAllAlgorithm.DIRECT, 0, 0, 4096))
    st, idx = _a2a(f, AllToAllAlgorithm.DIRECT, direct_mode=1)
    assert st <= Status.READ_FAILED and idx == 0
    assert Status.read_errno(st) == errno.EFAULT


@pytest.mark.parametrize("mod", IMPLS)
def test_wait_all_statuses(mod):
    word = np.zeros(2, np.uint64)
    addr, abort = word.ctypes.data, word.ctypes.data + 8
    assert mod.wait_all((0, addr), 0, (0, 0), (0, 0), (0, 0), 1.0) == (Status.OK, -1)
    assert mod.wait_all((0, addr), 1, (0, 0), (0, 0), (0, 0), 0.2) == (Status.TIMEOUT, 1)
    word[1] = 1
    assert mod.wait_all((0, addr), 1, (0, abort), (0, 0), (0, 0), 5.0) == (Status.ABORTED, 1)
    assert mod.wait_all((0, addr), 1, (0, 0), (0, _dead_pid()), (0, 0), 5.0) == (Status.DEAD, 1)


@pytest.mark.parametrize("mod", IMPLS)
def test_tcp_exchange_statuses(mod):
    out, inp = np.arange(4, dtype=np.uint8), np.zeros(4, np.uint8)
    a, b = socket.socketpair()
    try:
        for s in (a, b):
            s.setblocking(False)
        A, B = a.fileno(), b.fileno()
        send = (A, 0, out.ctypes.data, 4, 7)
        assert mod.tcp_exchange([send, (B, 1, inp.ctypes.data, 4, 7)], 5.0, [])[0] == Status.OK
        assert inp.tolist() == [0, 1, 2, 3]
        assert mod.tcp_exchange([send, (B, 1, inp.ctypes.data, 4, 8)], 5.0, [])[0] == Status.MISMATCH
        assert mod.tcp_exchange([(A, 1, inp.ctypes.data, 4, 7)], 0.2, [])[:2] == (Status.TIMEOUT, 0)
        flag = np.ones(1, np.uint64)
        assert mod.tcp_exchange([(A, 1, inp.ctypes.data, 4, 7)], 5.0,
                                [flag.ctypes.data])[:2] == (Status.ABORTED, 0)
        b.close()
        assert mod.tcp_exchange([(A, 1, inp.ctypes.data, 4, 7)], 5.0, [])[0] == Status.CLOSED
    finally:
        a.close()
        b.close()
    import resource
    bad_fd = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1 << 20) + 7
    st, _idx, err, *_ = mod.tcp_exchange([(bad_fd, 1, inp.ctypes.data, 4, 7)], 1.0, [])
    assert (st, err) == (Status.ERRNO, errno.EBADF)

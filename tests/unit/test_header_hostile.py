"""A rank writing garbage into its arrival header (comms/core/context.py, comms/core/layout.py):
huge or negative counts, unknown collective, dtype or op codes, garbage all-to-all counts.
The other ranks raise ArgumentMismatch or CommError naming that rank, within the timeout,
and never crash or index out of range (bounded random, fixed seed)."""
import random

import numpy as np
import pytest

from comms.core import layout as L
from comms.core.context import ArgumentMismatch, Context
from comms.core.errors import CommError
from comms.core.status import Collective, Status
from comms.kernels import native
from comms.testing import ThreadWorld

pytestmark = pytest.mark.timeout(120)

N = 3
native.impl()
TIMEOUT = 1.0 if native.is_native else 2.0
HOSTILE_INTS = [0, 1, -1, 2, 7, 255, 256, 1 << 31, -(1 << 31), 1 << 40, (1 << 63) - 1, -(1 << 63),
                12345678901, -987654321]


def hostile_int(rng):
    return rng.choice(HOSTILE_INTS) if rng.random() < 0.6 else rng.randrange(-(1 << 63), 1 << 63)


def publish(c, words, meta=None):
    """Arrive at the group's next op with `words` (coll, count, dtype, op, root, error,
    extra) as this rank's header, and `meta` (int64 words) as its all-to-all counts."""
    ctx = c.group.ctx
    k = ctx.next_op()
    if meta is not None:
        meta = [int(v) % (1 << 64) for v in meta]
    try:
        ctx.nat.arrive_g(ctx.group, k, *words, 0b111110, ctx.meta_offs[k & 1], meta)
    except (OverflowError, ValueError):
        pass


def honest(kind, c):
    n = c.size
    if kind == "allreduce":
        x = np.ones(8, np.float32)
        c.allreduce(x)
    elif kind == "allreduce_large":
        c.allreduce(np.ones(20000, np.float32))
    elif kind == "broadcast":
        c.broadcast(np.ones(16, np.int32), root=0)
    elif kind == "allgather":
        c.allgather(np.ones(4, np.float64), np.empty(4 * n, np.float64))
    elif kind == "all_to_all":
        c.all_to_all(np.ones(6 * n, np.int32), np.empty(6 * n, np.int32))
    elif kind == "all_to_all_counts":
        counts = [2] * n
        c.all_to_all(np.ones(2 * n, np.int32), np.empty(2 * n, np.int32), counts, counts)
    elif kind == "barrier":
        c.barrier()


KINDS = ["allreduce", "allreduce_large", "broadcast", "allgather", "all_to_all",
         "all_to_all_counts", "barrier"]


def run_case(kind, bad, words, meta, warm):
    """Every rank but `bad` runs `kind`; `bad` publishes `words`/`meta`. Returns the
    honest ranks' outcomes."""
    with ThreadWorld(N, timeout=TIMEOUT) as w:
        if warm:   # the same call once, together: the next one takes the one-call paths
            w.run(lambda c: honest(kind, c))

        def body(c):
            if c.rank == bad:
                publish(c, words, meta)
                return "hostile"
            try:
                honest(kind, c)
            except (ArgumentMismatch, CommError) as exc:
                return exc
            return "no error"
        res = w.run(body, raise_errors=False)
    return [r for q, r in enumerate(res) if q != bad]


def check(outcomes, bad, case):
    for got in outcomes:
        assert isinstance(got, (ArgumentMismatch, CommError)), (case, got)
        # the culprit is named (rank 0's header is the reference the others are compared to,
        # so a mismatch with it names rank 0 as well)
        assert f"rank {bad}" in str(got), (case, got)


def test_fuzz_garbage_headers_raise_naming_the_rank():
    rng = random.Random(20240601)
    for i in range(14):
        kind = KINDS[i % len(KINDS)]
        bad = rng.randrange(N)
        coll = rng.choice([hostile_int(rng), 0, 10, 99, int(Collective.ALLREDUCE)])
        words = [coll, hostile_int(rng), rng.choice([hostile_int(rng), 200, -3]),
                 hostile_int(rng), hostile_int(rng), rng.choice([0, hostile_int(rng)]),
                 hostile_int(rng)]
        meta = [hostile_int(rng) for _ in range(2 * N)] if rng.random() < 0.5 else None
        case = (i, kind, bad, words, meta)
        check(run_case(kind, bad, words, meta, warm=i % 2 == 1), bad, case)


@pytest.mark.parametrize("field", ["coll", "count", "dtype", "op", "error"])
def test_one_garbage_word_on_the_latency_path(field):
    """The one-call paths (a repeated small all-reduce, a repeated even all-to-all) compare
    headers in C; a rank whose single word is garbage is named, not a crash or a KeyError."""
    good = {"coll": int(Collective.ALLREDUCE), "count": 8, "dtype": 0, "op": 0, "error": 0}
    value = {"coll": 77, "count": -(1 << 62), "dtype": 1 << 40, "op": -5, "error": 3}[field]
    for kind in ("allreduce", "all_to_all"):
        words = [good["coll"], good["count"], good["dtype"], good["op"], -1, good["error"], 0]
        words[["coll", "count", "dtype", "op", "root", "error"].index(field)] = value
        check(run_case(kind, 1, words, None, warm=True), 1, (field, kind))


def test_garbage_all_to_all_counts_are_refused():
    """Counts that disagree with the peers' expectations: ArgumentMismatch naming the rank.
    A rank's counts to itself, which no peer can check (negative or huge): the honest ranks
    neither crash nor hang, they raise CommError within the timeout."""
    rng = random.Random(7)
    for i in range(8):
        bad = i % N
        meta = [2] * (2 * N)
        if i < 4:   # only its own pair, which both its rows carry
            meta[bad] = meta[N + bad] = rng.choice([-1, -(1 << 40), 1 << 60, (1 << 63) - 1])
        else:
            meta = [hostile_int(rng) for _ in range(2 * N)]

        with ThreadWorld(N, timeout=TIMEOUT) as w:
            def body(c, bad=bad, meta=meta):
                if c.rank == bad:
                    # the honest ranks' header with this rank's garbage counts
                    publish_like_counts(c, meta)
                    return "hostile"
                try:
                    honest("all_to_all_counts", c)
                except (ArgumentMismatch, CommError) as exc:
                    return exc
                return "no error"
            res = w.run(body, raise_errors=False)
        honest_res = [r for q, r in enumerate(res) if q != bad]
        if i < 4:
            # counts no peer can check: the honest ranks go on to move data and the culprit
            # never comes; each raises within its timeout, naming the culprit or the honest
            # rank that gave up first (PeerAbortedError)
            assert all(isinstance(r, CommError) and "rank " in str(r) for r in honest_res), \
                (i, meta, honest_res)
        else:
            check(honest_res, bad, (i, meta))


def publish_like_counts(c, meta):
    """An all-to-all-with-counts arrival whose words are what an honest rank publishes
    (read from the dtype table of the int32 it would send), with `meta` as the counts."""
    from comms.core import dtypes as dt
    code = next(k for k, v in dt.DTYPE_NAMES.items() if v == "int32")
    publish(c, [int(Collective.ALL_TO_ALL), 0, code, 0, -1, 0, 0], meta)


def test_check_headers_never_indexes_out_of_range():
    """Context.check_headers on any garbage in any rank's words: ArgumentMismatch naming a
    rank or None (agreement), never KeyError / IndexError / OverflowError."""
    rng = random.Random(99)

    class Fake:
        pass
    for _ in range(300):
        ctx = Fake()
        ctx.rank, ctx.size, ctx.names = 0, N, None
        rows = [np.zeros(L.NUM_HEADER_WORDS, np.int64) for _ in range(N)]
        for r in rows:
            r[L.H_COLL] = int(Collective.ALLREDUCE)
        q = rng.randrange(1, N)
        for f in range(L.NUM_HEADER_WORDS):
            if rng.random() < 0.4:
                rows[q][f] = hostile_int(rng)
        ctx.headers = rows
        ctx.who = lambda idx: idx
        coll = rng.choice([int(c) for c in Collective] + [hostile_int(rng)])
        try:
            got = Context.check_headers(ctx, coll)
        except ArgumentMismatch as exc:
            assert f"rank {q}" in str(exc), exc
        else:
            assert got is None


def test_a_mismatch_the_words_no_longer_show_is_an_error_naming_the_rank():
    """The C check reports a mismatch with rank 2, but by the time the words are re-read
    for the message they agree (a header rewritten while it was read): an error naming
    rank 2 and a broken group, not a silent success."""
    with ThreadWorld(N, timeout=TIMEOUT) as w:
        ctx1 = w.comms[1].group.ctx
        real = ctx1.nat

        class Rewritten:
            def __getattr__(self, name):
                return getattr(real, name)

            def arrive_g(self, *args):
                st, _idx = real.arrive_g(*args)
                return (st or Status.MISMATCH), 2

        ctx1.nat = Rewritten()
        res = w.run(lambda c: c.barrier(), raise_errors=False)
    assert isinstance(res[1], CommError) and "rank 2" in str(res[1]), res
    assert ctx1.broken

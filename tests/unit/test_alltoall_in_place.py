"""The even all-to-all in place (send is recv) on an even number of ranks runs paired rounds
without copying the buffer aside: each rank's proposal of PAIRED wins over rank 0's, so a
mix of in-place and separate-buffer ranks (the latter on the one-C-call path after their
first call) still agree, on the general path and on the one-C-call path (a size seen
before), in place or not. Every result against numpy, across chunk boundaries."""
import numpy as np
import pytest

from comms.core.status import AllToAllAlgorithm as A2A
from comms.kernels.reference import pair_partner
from comms.testing import ThreadWorld

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("n", [2, 4, 6, 8, 16])
def test_paired_rounds_meet_every_peer_once_in_pairs(n):
    met = set()
    for r in range(n - 1):
        partners = [pair_partner(me, r, n) for me in range(n)]
        assert all(partners[partners[me]] == me != partners[me] for me in range(n)), partners
        met |= {(me, partners[me]) for me in range(n)}
    assert met == {(a, b) for a in range(n) for b in range(n) if a != b}


def test_any_rank_proposing_paired_rounds_wins():
    assert A2A.agreed([A2A.DIRECT, A2A.PAIRWISE, A2A.PAIRED]) == A2A.PAIRED
    assert A2A.agreed([A2A.PAIRED, A2A.DIRECT]) == A2A.PAIRED
    assert A2A.agreed([A2A.DIRECT, A2A.PAIRWISE]) == A2A.DIRECT


PATTERNS = {"all": lambda r, i: True, "rank 0": lambda r, i: r == 0,
            "last rank": lambda r, i: r == 1, "alternating": lambda r, i: (r + i) % 2 == 0}


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_in_place_even_all_to_all_matches_numpy(n, pattern):
    in_place = PATTERNS[pattern]
    sizes = [1, 7, 1000, 16384, 65536 + 3, 150000, 5]       # 64 KiB chunks: many per block
    with ThreadWorld(n, timeout=30, data_bytes=256 << 10) as w:
        def body(c):
            wrong = 0
            for it, per in enumerate(sizes * 2):      # each size again: the one-call path
                send = np.arange(n * per, dtype=np.float32) + 1000 * c.rank + it
                want = np.concatenate([np.arange(c.rank * per, (c.rank + 1) * per,
                                                 dtype=np.float32) + 1000 * q + it
                                       for q in range(n)])
                if in_place(c.rank, it):
                    got = send.copy()
                    c.all_to_all(got, got)
                else:
                    got = np.empty_like(send)
                    c.all_to_all(send, got)
                wrong += int((got != want).sum())
            return wrong
        assert w.run(body) == [0] * n


@pytest.mark.parametrize("n", [2, 3])
def test_overlapping_views_read_a_copy_of_send(n):
    """recv overlapping send other than exactly (shifted by one element): the result is the
    all-to-all of send as it was before the call, on the general path and the one-call path."""
    per = 1000
    with ThreadWorld(n, timeout=30, data_bytes=64 << 10) as w:
        def body(c):
            wrong = 0
            for it in range(3):
                big = np.zeros(n * per + 1, np.float32)
                big[:n * per] = np.arange(n * per, dtype=np.float32) + 1000 * c.rank + it
                want = np.concatenate([np.arange(c.rank * per, (c.rank + 1) * per,
                                                 dtype=np.float32) + 1000 * q + it
                                       for q in range(n)])
                c.all_to_all(big[:n * per], big[1:])
                wrong += int((big[1:] != want).sum())
            return wrong
        assert w.run(body) == [0] * n

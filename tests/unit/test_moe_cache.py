"""comms.moe.cache: output blocks are handed out again only when nothing refers to them (no
array, view or torch tensor), reused when free, capped by TOPOCOMM_MOE_CACHE_MB; and MoE
outputs held by the caller stay intact while later calls reuse free blocks."""
import numpy as np
import pytest

from comms.moe import cache

MiB = 1 << 20


@pytest.fixture(autouse=True)
def clean_cache(monkeypatch):
    monkeypatch.delenv("TOPOCOMM_MOE_CACHE_MB", raising=False)
    cache.empty_cache()
    yield
    cache.empty_cache()


def addr(a) -> int:
    return a.__array_interface__["data"][0]


def test_block_in_use_is_never_handed_out_and_free_one_is_reused():
    a = cache.empty(2 * MiB)
    b = cache.empty(2 * MiB)
    assert addr(a) != addr(b)
    assert cache.cached_bytes() == (4 * MiB, 0)
    where = addr(a)
    del a
    assert cache.cached_bytes() == (2 * MiB, 2 * MiB)
    c = cache.empty(2 * MiB - 4096)          # fits the free block: reused
    assert addr(c) == where and c.nbytes == 2 * MiB - 4096
    d = cache.empty(2 * MiB)                 # both blocks in use: a new one
    assert addr(d) not in (addr(b), addr(c))


@pytest.mark.parametrize("keep", ["slice", "reshaped view", "torch tensor"])
def test_any_view_keeps_the_block_in_use(keep):
    a = cache.empty(2 * MiB)
    where = addr(a)
    if keep == "slice":
        holder = a[MiB:]
    elif keep == "reshaped view":
        holder = a.view(np.float32).reshape(-1, 256)[3:]
    else:
        torch = pytest.importorskip("torch")
        holder = torch.from_numpy(a.view(np.float32))[10:]
    del a
    b = cache.empty(2 * MiB)
    assert addr(b) != where
    del holder
    c = cache.empty(2 * MiB)
    assert addr(c) == where


def test_small_and_oversized_requests_bypass_the_cache(monkeypatch):
    cache.empty(cache.MIN_BYTES - 1)
    assert cache.cached_bytes() == (0, 0)
    monkeypatch.setenv("TOPOCOMM_MOE_CACHE_MB", "1")
    cache.empty(2 * MiB)                     # larger than the cap
    assert cache.cached_bytes() == (0, 0)
    monkeypatch.setenv("TOPOCOMM_MOE_CACHE_MB", "0")
    cache.empty(MiB)
    assert cache.cached_bytes() == (0, 0)


def test_cap_drops_least_recently_used_free_blocks(monkeypatch):
    monkeypatch.setenv("TOPOCOMM_MOE_CACHE_MB", "4")
    a, b = cache.empty(2 * MiB), cache.empty(2 * MiB)
    where_a = addr(a)
    del a, b                                 # 4 MiB free: within the cap
    assert cache.cached_bytes() == (0, 4 * MiB)
    c = cache.empty(3 * MiB)                 # no free block is big enough: a new one
    del c                                    # 7 MiB free until the next call trims
    e = cache.empty(MiB + MiB // 2)          # reuses a's block (least recently used first)
    assert addr(e) == where_a
    assert cache.cached_bytes() == (2 * MiB, 3 * MiB)   # b's block dropped, c's kept
    assert cache.empty_cache() == 3 * MiB
    assert cache.cached_bytes() == (2 * MiB, 0)


def test_bad_cap_names_the_variable(monkeypatch):
    monkeypatch.setenv("TOPOCOMM_MOE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="TOPOCOMM_MOE_CACHE_MB"):
        cache.empty(2 * MiB)


def test_held_outputs_stay_intact_while_later_calls_reuse_memory(worlds, monkeypatch):
    """Every MoE output goes through the cache here (MIN_BYTES 0; the ranks are threads
    sharing it): a result the caller keeps is never overwritten by later dispatches and
    combines, while dropped ones are reused."""
    torch = pytest.importorskip("torch")
    import comms.moe as moe
    monkeypatch.setattr(cache, "MIN_BYTES", 0)
    w = worlds(2)

    def body(comm):
        g = torch.Generator().manual_seed(comm.rank)
        E, T, H = 8, 64, 16
        idx = torch.randint(0, E, (T, 2), generator=g)
        wt = torch.rand(T, 2, generator=g)
        x1, x2 = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
        r1 = moe.dispatch(x1, idx, wt, E, comm)
        kept_recv, kept_rows = r1.recv_x.clone(), r1.expert_x.clone()
        out1 = moe.combine(r1.expert_x, r1.handle)
        kept_out = out1.clone()
        r2 = moe.dispatch(x2, idx, wt, E, comm)          # r1 and out1 are still held
        out2 = moe.combine(r2.expert_x * 3, r2.handle)
        intact = torch.equal(r1.recv_x, kept_recv) and torch.equal(r1.expert_x, kept_rows) \
            and torch.equal(out1, kept_out)
        second_ok = torch.allclose(out2, 3 * moe.combine(r2.expert_x, r2.handle))
        del r2, out2
        for _ in range(3):                               # reusing the dropped blocks
            r = moe.dispatch(x2 * 2, idx, wt, E, comm)
            moe.combine(r.expert_x, r.handle)
        intact = intact and torch.equal(r1.recv_x, kept_recv) and \
            torch.equal(r1.expert_x, kept_rows) and torch.equal(out1, kept_out)
        return intact, second_ok
    assert w.run(body) == [(True, True)] * 2
    assert cache.cached_bytes()[1] > 0

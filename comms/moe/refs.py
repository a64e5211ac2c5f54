"""The plain MoE pipeline frameworks run today: the reference for tests, the baseline for
bench/moe_perf.py. Works through any backend (gloo included).

dispatch: permute (token, slot) pairs by expert, all_to_all_single of the per-expert counts,
all_to_all_single of the permuted tokens (one row per (token, expert): no dedup; rows for
this rank's own experts go through the collective too), then regroup the received chunks
from (source rank, expert) to (expert, source rank) order.
combine: the same steps backwards, then the weighted sum per token on the source.

Row order of `expert_x` = (local expert, source rank, source token, topk slot), the same as
comms.moe's rows, so both pipelines can be fed one expert_out.

exact_order=True writes the final weighted sum as comms.moe sums it (per destination rank a
fold over the slots in topk order, rounded to the dtype; per host a fold of those over its
ranks ascending, rounded; then a fold over the hosts in order; float32 accumulation, float64
for float64): the result equals comms.moe.combine bit for bit. It costs k x world passes over [tokens, hidden], so the benchmark uses the
default (exact_order=False): the usual weighted index_add_ of the rows, in the data dtype.

The exchanges are autograd-aware (the backward of an all_to_all_single is the reverse one),
so gradients of the reference are torch's own.
"""
from __future__ import annotations

import torch

from comms.api.communicator import Communicator


def _world(group):
    if isinstance(group, Communicator):
        return group.size
    import torch.distributed as dist
    return dist.get_world_size(group)


def all_to_all_single(out, inp, out_splits, in_splits, group):
    """Rows of inp (in_splits[q] to rank q) -> out (out_splits[p] from rank p), on dim 0."""
    if isinstance(group, Communicator):
        row = inp[0].numel() if inp.dim() > 1 and inp.shape[0] else (
            out[0].numel() if out.dim() > 1 and out.shape[0] else 1)
        if inp.dim() == 1:
            row = 1
        group.all_to_all(inp.contiguous().reshape(-1), out.reshape(-1),
                         [int(s) * row for s in in_splits], [int(s) * row for s in out_splits])
    else:
        import torch.distributed as dist
        dist.all_to_all_single(out, inp.contiguous(), [int(s) for s in out_splits],
                               [int(s) for s in in_splits], group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = inp.new_empty((sum(out_splits),) + tuple(inp.shape[1:]))
        return all_to_all_single(out, inp, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        gi = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        all_to_all_single(gi, grad.contiguous(), in_splits, out_splits, ctx.group)
        return gi, None, None, None


class RefDispatch:
    """expert_x [rows, H]; num_tokens_per_expert [L] int64 (list: ..._list); the rest is
    what reference_combine needs."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def reference_dispatch(x, topk_idx, topk_weights, num_experts, group=None) -> RefDispatch:
    """x [T, H] torch CPU; topk_idx [T, k] (-1: not routed); topk_weights [T, k] float;
    group: comms.Communicator or torch process group (any backend); None = default group."""
    n = _world(group)
    T, k = topk_idx.shape
    L = num_experts // n
    flat = topk_idx.reshape(-1).to(torch.int64)
    valid_pos = torch.nonzero(flat >= 0).squeeze(1)
    experts = flat[valid_pos]
    perm_pos = valid_pos[torch.argsort(experts, stable=True)]       # permute by expert
    send_x = x.index_select(0, torch.div(perm_pos, k, rounding_mode="floor"))
    per_expert = torch.bincount(experts, minlength=num_experts).to(torch.int64)
    recv_per_expert = torch.empty_like(per_expert)
    all_to_all_single(recv_per_expert, per_expert, [L] * n, [L] * n, group)   # the counts
    send_splits = per_expert.view(n, L).sum(1).tolist()
    sizes = recv_per_expert.view(n, L)
    recv_splits = sizes.sum(1).tolist()
    recv = _AllToAll.apply(send_x, recv_splits, send_splits, group)       # the tokens
    # regroup (source rank, expert) chunks into (expert, source rank) order
    starts = torch.zeros(n * L, dtype=torch.int64)
    starts[1:] = torch.cumsum(sizes.reshape(-1), 0)[:-1]
    starts, sz = starts.view(n, L).tolist(), sizes.tolist()
    pieces = [torch.arange(starts[q][e], starts[q][e] + sz[q][e]) for e in range(L)
              for q in range(n)]
    regroup = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    expert_x = recv.index_select(0, regroup)
    counts = sizes.sum(0)
    return RefDispatch(expert_x=expert_x, num_tokens_per_expert=counts,
                       num_tokens_per_expert_list=counts.tolist(), group=group, n=n, L=L,
                       T=T, k=k, perm_pos=perm_pos, regroup=regroup, send_splits=send_splits,
                       recv_splits=recv_splits, topk_idx=topk_idx.to(torch.int64),
                       topk_weights=topk_weights, dtype=x.dtype)


def reference_combine(expert_out, ref: RefDispatch, exact_order: bool = False, hosts=None):
    """expert_out [rows, H] in expert_x's row order -> [T, H] on the source ranks:
    sum over slots of topk_weights * expert output (unpermute + weighted sum).

    exact_order: sum as comms.moe does (see the module text); hosts (lists of ranks; None:
    the group's, i.e. a comms.Communicator's `hosts`, else one host) gives the host level."""
    inv = torch.empty_like(ref.regroup)
    inv[ref.regroup] = torch.arange(ref.regroup.numel())
    back = _AllToAll.apply(expert_out.index_select(0, inv), ref.send_splits, ref.recv_splits,
                           ref.group)                              # rows in perm_pos order
    T, k, H = ref.T, ref.k, expert_out.shape[1]
    tok = torch.div(ref.perm_pos, k, rounding_mode="floor")
    if not exact_order:
        w = ref.topk_weights.reshape(-1).index_select(0, ref.perm_pos).to(back.dtype)
        out = back.new_zeros((T, H))
        return out.index_add(0, tok, back * w[:, None])
    if hosts is None:
        hosts = getattr(ref.group, "hosts", None) or [list(range(ref.n))]
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    y = back.new_zeros((T * k, H)).index_copy(0, ref.perm_pos, back).view(T, k, H)
    idx = ref.topk_idx
    dst = torch.where(idx >= 0, torch.div(idx, ref.L, rounding_mode="floor"),
                      torch.full_like(idx, ref.n))
    w = ref.topk_weights.to(acc)

    def rounded(t):
        return t.to(ref.dtype).to(acc)

    out = torch.zeros((T, H), dtype=acc)
    for ranks in hosts:
        host = torch.zeros((T, H), dtype=acc)
        for r in sorted(ranks):
            part = torch.zeros((T, H), dtype=acc)
            for s in range(k):
                on_r = (dst[:, s] == r)[:, None]
                part = torch.where(on_r, part + w[:, s:s + 1] * y[:, s].to(acc), part)
            host = torch.where((dst == r).any(1)[:, None], host + rounded(part), host)
        in_host = torch.zeros(T, dtype=torch.bool)
        for r in ranks:
            in_host |= (dst == r).any(1)
        out = torch.where(in_host[:, None], out + rounded(host), out)
    return out.to(ref.dtype)

"""Who sends what to whom: the routing plan of dispatch and combine, in plain numpy.

`send_plan` runs on the source rank from topk_idx alone (no communication; it is what
`comms.moe.layout` returns); `recv_plan` runs on the receiving rank once the per-token
metadata arrived. Both are vectorised (nonzero, cumsum, a stable radix argsort): no Python
loop over tokens, only over ranks.

Orders (every rank derives the same ones, so no order travels on the wire):
- send order: destination rank ascending, then source token ascending; a token goes to a
  rank at most once (dedup), whatever number of that rank's experts it chose.
- receive order ("recv order"): this rank's own tokens first, then the other ranks' blocks
  in rank order. Own tokens never touch a transport; the other blocks land where the
  all-to-all writes them (one contiguous buffer).
- row order ("grouped by local expert"): (local expert, source rank, source token, topk
  slot) ascending: the order the reference pipeline produces (comms/moe/refs.py).
- fold orders (combine): on the receiver, a token's rows in topk-slot order; on the source,
  the per-rank partial rows in rank order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SendPlan:
    num_ranks: int
    rank: int
    num_experts: int
    num_tokens: int
    topk: int
    hosts: list                    # list of lists of ranks
    topk_idx: np.ndarray           # [T, k] int64 expert ids, -1 = not routed
    dst_of_slot: np.ndarray        # [T, k] int64, num_ranks where not routed (-1)
    is_token_in_rank: np.ndarray   # [T, n] bool
    num_tokens_per_rank: np.ndarray  # [n] int64 (deduplicated)
    num_tokens_per_expert: np.ndarray  # [E] int64 ((token, slot) entries)
    num_tokens_per_host: np.ndarray   # [num_hosts] int64
    send_token_idx: np.ndarray     # [sum counts] int64, send order
    send_offsets: np.ndarray       # [n + 1] int64
    send_local_expert: np.ndarray  # [sum counts, k] int32, -1 where the slot is elsewhere
    src_pos: np.ndarray            # [T, n] int64: row of (token, rank)'s partial, -1 if none
    src_offsets: np.ndarray        # [T + 1] int64: source fold plan (entries per token)
    src_entries: np.ndarray        # [sum] int64: rows of [self partials; received partials]
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_self(self) -> int:
        return int(self.num_tokens_per_rank[self.rank])

    def self_token_idx(self) -> np.ndarray:
        r = self.rank
        return self.send_token_idx[self.send_offsets[r]:self.send_offsets[r + 1]]

    def remote_token_idx(self) -> np.ndarray:
        """Tokens sent to other ranks, in send order (the dispatch pack list)."""
        got = self._cache.get("remote")
        if got is None:
            r, o = self.rank, self.send_offsets
            got = np.concatenate([self.send_token_idx[:o[r]], self.send_token_idx[o[r + 1]:]])
            self._cache["remote"] = got
        return got

    def remote_counts(self) -> list:
        """Tokens per peer (0 for this rank): the dispatch send counts."""
        c = [int(v) for v in self.num_tokens_per_rank]
        c[self.rank] = 0
        return c


def host_of_rank(hosts, n) -> np.ndarray:
    out = np.full(n, -1, np.int64)
    for h, ranks in enumerate(hosts):
        out[list(ranks)] = h
    return out


def send_plan(topk_idx: np.ndarray, num_experts: int, num_ranks: int, rank: int,
              hosts) -> SendPlan:
    """topk_idx: [T, k] int64 with values in [-1, num_experts) (checked by the caller)."""
    n = num_ranks
    T, k = topk_idx.shape
    per_rank = num_experts // n
    valid = topk_idx >= 0
    dst = np.where(valid, topk_idx // per_rank, n)
    hit = np.zeros((T, n + 1), np.bool_)
    hit[np.arange(T)[:, None], dst] = True
    in_rank = np.ascontiguousarray(hit[:, :n])
    counts = in_rank.sum(0).astype(np.int64)
    d_idx, t_idx = np.nonzero(in_rank.T)            # rank-major, tokens ascending
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    local = topk_idx[t_idx] - d_idx[:, None] * per_rank
    local[dst[t_idx] != d_idx[:, None]] = -1
    # source fold plan: per token, its partial rows in rank order. Rows index the virtual
    # concatenation [own partials (first num_self rows of the receive buffer); partials
    # received from the other ranks, in rank order].
    n_self = int(counts[rank])
    base = np.empty(n, np.int64)
    acc = n_self
    for r in range(n):
        if r == rank:
            base[r] = 0
        else:
            base[r] = acc
            acc += int(counts[r])
    pos = np.cumsum(in_rank, axis=0, dtype=np.int64) - 1 + base[None, :]
    pos[~in_rank] = -1
    src_offsets = np.zeros(T + 1, np.int64)
    np.cumsum(in_rank.sum(1), out=src_offsets[1:])
    hosts = [list(h) for h in hosts]
    hor = host_of_rank(hosts, n)
    in_host = np.zeros((T, len(hosts)), np.bool_)
    for h in range(len(hosts)):
        in_host[:, h] = in_rank[:, hor == h].any(1)
    return SendPlan(
        num_ranks=n, rank=rank, num_experts=num_experts, num_tokens=T, topk=k, hosts=hosts,
        topk_idx=topk_idx,
        dst_of_slot=dst, is_token_in_rank=in_rank, num_tokens_per_rank=counts,
        num_tokens_per_expert=np.bincount(topk_idx[valid], minlength=num_experts).astype(np.int64),
        num_tokens_per_host=in_host.sum(0).astype(np.int64),
        send_token_idx=t_idx.astype(np.int64), send_offsets=offsets,
        send_local_expert=local.astype(np.int32), src_pos=pos, src_offsets=src_offsets,
        src_entries=pos[in_rank])


def send_meta(sp: SendPlan, weights: np.ndarray) -> np.ndarray:
    """Per sent (token, rank): [token index, k local experts (-1: elsewhere), k weights as
    float32 bits], int32 [sum counts, 1 + 2k], in send order."""
    k = sp.topk
    meta = np.empty((sp.send_token_idx.size, 1 + 2 * k), np.int32)
    meta[:, 0] = sp.send_token_idx
    meta[:, 1:1 + k] = sp.send_local_expert
    w = weights[sp.send_token_idx]
    w[sp.send_local_expert < 0] = 0.0
    meta[:, 1 + k:] = w.view(np.int32)
    return meta


@dataclass
class RecvPlan:
    num_recv_tokens: int
    num_self: int
    recv_counts: list              # tokens from each rank (0 for this rank)
    recv_src_rank: np.ndarray      # [R] int64, recv order
    recv_src_token: np.ndarray     # [R] int64
    num_rows_per_expert: np.ndarray  # [L] int64
    row_recv_token: np.ndarray     # [rows] int64: row -> recv_x row
    row_slot: np.ndarray           # [rows] int64: topk slot on the source
    row_expert: np.ndarray         # [rows] int64: local expert
    row_weight: np.ndarray         # [rows] float32
    recv_offsets: np.ndarray       # [R + 1] int64: receiver fold plan (rows per recv token)
    recv_entries: np.ndarray       # [rows] int64: rows, slot order within a token
    recv_entry_weight: np.ndarray  # [rows] float32

    @property
    def num_rows(self) -> int:
        return int(self.row_recv_token.size)


def recv_plan(sp: SendPlan, recv_counts, meta_recv: np.ndarray, meta_self: np.ndarray) -> RecvPlan:
    """recv_counts[q]: tokens rank q sent here (0 for this rank); meta_recv: their metadata
    in rank order; meta_self: this rank's metadata for itself."""
    n, rank, k = sp.num_ranks, sp.rank, sp.topk
    n_self = meta_self.shape[0]
    order = [rank] + [q for q in range(n) if q != rank]           # recv order of blocks
    sizes = [n_self] + [int(recv_counts[q]) for q in range(n) if q != rank]
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=starts[1:])
    R = int(starts[-1])
    meta = np.concatenate([meta_self, meta_recv]) if meta_recv.size else meta_self
    meta = meta.reshape(R, 1 + 2 * k)
    src_rank = np.repeat(np.asarray(order, np.int64), sizes)
    # rank order of the received tokens: the blocks sorted by source rank
    by_rank = sorted(range(n), key=lambda b: order[b])
    ro_perm = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in by_rank]) \
        if R else np.zeros(0, np.int64)
    return items_plan(n_self, recv_counts, src_rank, meta[:, 0].astype(np.int64),
                      meta[:, 1:1 + k], np.ascontiguousarray(meta[:, 1 + k:]).view(np.float32),
                      ro_perm, sp.num_local_experts)


def items_plan(n_self, recv_counts, src_rank, src_token, le, w, ro_perm, L) -> RecvPlan:
    """The rows of R received items (recv order: the first n_self stayed on this rank, the
    rest came from recv_counts[q] per rank q in rank order): src_rank, src_token [R];
    le [R, k] local expert per slot (-1: not here), w [R, k] float32; ro_perm [R]: the items
    listed by (source rank, source token)."""
    R, k = le.shape
    le_ro = le[ro_perm]
    valid_ro = le_ro >= 0
    flat = np.flatnonzero(valid_ro)                  # entries, rank order, slot order
    tok_ro, slot = flat // max(k, 1), flat % max(k, 1)
    le_e = le_ro.reshape(-1)[flat]
    key = le_e.astype(np.int16) if L < (1 << 15) else le_e
    g = np.argsort(key, kind="stable")               # radix sort for int16
    num_rows = flat.size
    row_recv_token = ro_perm[tok_ro[g]]
    row_slot = slot[g].astype(np.int64)
    row_weight = w[row_recv_token, row_slot] if num_rows else np.zeros(0, np.float32)
    # receiver fold: rows of each received item (recv order), in slot order
    entry_row = np.empty(num_rows, np.int64)
    entry_row[g] = np.arange(num_rows, dtype=np.int64)
    cnt_ro = valid_ro.sum(1)
    off_ro = np.zeros(R + 1, np.int64)
    np.cumsum(cnt_ro, out=off_ro[1:])
    # entries of item ro_perm[p] are entry_row[off_ro[p]:off_ro[p + 1]]: list them in recv order
    inv = np.empty(R, np.int64)
    inv[ro_perm] = np.arange(R, dtype=np.int64)
    cnt = cnt_ro[inv]
    recv_offsets = np.zeros(R + 1, np.int64)
    np.cumsum(cnt, out=recv_offsets[1:])
    firsts = np.repeat(off_ro[:-1][inv] - recv_offsets[:-1], cnt)
    entries = entry_row[np.arange(num_rows, dtype=np.int64) + firsts] if num_rows else \
        np.zeros(0, np.int64)
    return RecvPlan(
        num_recv_tokens=R, num_self=int(n_self), recv_counts=[int(c) for c in recv_counts],
        recv_src_rank=np.asarray(src_rank, np.int64), recv_src_token=src_token,
        num_rows_per_expert=np.bincount(le_e, minlength=L).astype(np.int64)[:L],
        row_recv_token=row_recv_token, row_slot=row_slot,
        row_expert=le_e[g].astype(np.int64), row_weight=np.ascontiguousarray(row_weight,
                                                                              np.float32),
        recv_offsets=recv_offsets, recv_entries=entries,
        recv_entry_weight=np.ascontiguousarray(row_weight[entries], np.float32))

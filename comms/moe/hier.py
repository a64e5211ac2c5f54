"""Two-stage dispatch / combine for a group spanning hosts: each token crosses the network
once per destination host, and is forwarded inside that host.

Hosts: lists of ranks (the group's topology, or a `hosts=` override). Rank s's forwarder on
host h is the rank of h with s's index in its own host (modulo h's size), so with equal
hosts every rank pairs with one peer per remote host and the links carry balanced loads.

dispatch (token rows; metadata travels the same way first):
  stage A (network)   s sends each token once to its forwarder on every remote host that
                      holds one of its experts: [token, k global expert ids (-1 elsewhere),
                      k weights]
  stage B (in host)   every rank delivers, to each rank of its own host that needs it, its
                      own tokens and the tokens it received in stage A (own rows first);
                      what it keeps for itself is copied, never sent
combine (one partial row per hop back):
  stage B'            each receiver sends its partial row per item back to the deliverer
  deliverer fold      per (source, token): the host's partials folded in rank order, rounded
                      to the dtype -> one "host partial" row
  stage A'            host partials cross the network back to the sources
  final fold          per token, the host partials folded in host order (own host included)
So the combine sum is: over hosts in host order, of (over the host's ranks ascending, of
(over the token's slots on that rank, in slot order, of w * y)). With one host this is the
one-stage order. comms.moe.refs.reference_combine(exact_order=True, hosts=...) sums alike.

Bytes on the network per rank: sum over remote hosts of the tokens needing that host (x H x
element size) each way, instead of one row per (token, remote rank) (one stage) or per
(token, remote expert) (the reference).
"""
from __future__ import annotations

import zlib

import numpy as np

from comms.moe.ops import gather_rows, reduce_rows
from comms.moe.plan import items_plan


def hosts_fingerprint(hosts) -> int:
    return zlib.crc32(repr([list(h) for h in hosts]).encode()) & 0x7FFFFFFF


class HostMap:
    def __init__(self, hosts, n, rank):
        self.lists = [sorted(int(r) for r in h) for h in hosts]
        self.m = len(self.lists)
        self.host_of = np.empty(n + 1, np.int64)
        self.host_of[n] = self.m                     # "not routed" maps past the last host
        self.lidx = np.empty(n, np.int64)
        for h, ranks in enumerate(self.lists):
            for i, r in enumerate(ranks):
                self.host_of[r], self.lidx[r] = h, i
        self.me = int(self.host_of[rank])
        self.local = self.lists[self.me]

    def forwarder(self, s, h) -> int:
        ranks = self.lists[h]
        return ranks[int(self.lidx[s]) % len(ranks)]


def _counts_to(n, pairs):
    c = [0] * n
    for r, v in pairs:
        c[r] += int(v)
    return c


def _masked(values, mask, fill):
    out = values.copy()
    out[~mask] = fill
    return out


class HierRoute:
    """The two-stage route of one dispatch (see the module text). Built in two steps:
    __init__ (source side, from the send plan, before the header) and prepare() (the
    metadata exchanges; returns the receive plan)."""

    def __init__(self, ex, sp, hosts):
        self.ex, self.sp = ex, sp
        n, rank = sp.num_ranks, sp.rank
        hm = self.hm = HostMap(hosts, n, rank)
        T = sp.num_tokens
        hslot = hm.host_of[sp.dst_of_slot]                       # [T, k], m = not routed
        hit = np.zeros((T, hm.m + 1), np.bool_)
        hit[np.arange(T)[:, None], hslot] = True
        in_host = self.in_host = np.ascontiguousarray(hit[:, :hm.m])
        self.hslot = hslot
        # stage A: tokens per remote host, hosts in forwarder-rank order (the a2a's order)
        remote = [h for h in range(hm.m) if h != hm.me]
        self.a_hosts = sorted(remote, key=lambda h: hm.forwarder(rank, h))
        a_tok = [np.flatnonzero(in_host[:, h]) for h in self.a_hosts]
        self.a_send_idx = np.concatenate(a_tok) if a_tok else np.zeros(0, np.int64)
        self.a_send_counts = _counts_to(n, [(hm.forwarder(rank, h), t.size)
                                            for h, t in zip(self.a_hosts, a_tok)])
        # own tokens for this host's ranks (host partial rows DP[:n_own])
        own = self.own_all = np.flatnonzero(in_host[:, hm.me])
        self.n_own = own.size
        # final fold: per token, host partials in host order
        fpos = np.full((T, hm.m), -1, np.int64)
        fpos[own, hm.me] = np.arange(own.size)
        base = self.n_own
        for h, t in zip(self.a_hosts, a_tok):
            fpos[t, h] = base + np.arange(t.size)
            base += t.size
        self.final_pos = fpos
        self.final_offsets = np.zeros(T + 1, np.int64)
        np.cumsum(in_host.sum(1), out=self.final_offsets[1:])
        self.final_entries = fpos[in_host]
        # stage B own items: per local rank d, the tokens it needs
        self.own_tok = {d: np.flatnonzero(sp.is_token_in_rank[:, d]) for d in hm.local}

    def counts_for_header(self):
        return self.a_send_counts

    def prepare(self, weights, a_recv_counts, what="dispatch"):
        """Metadata: stage A, then stage B counts and metadata. Returns the RecvPlan."""
        ex, sp, hm = self.ex, self.sp, self.hm
        n, rank, k, L = sp.num_ranks, sp.rank, sp.topk, sp.num_local_experts
        self.a_recv_counts = [int(c) for c in a_recv_counts]
        # A metadata: [token, k global experts on that host (-1 elsewhere), k weights]
        idx_full = sp.topk_idx
        metas = []
        for h in self.a_hosts:
            t = np.flatnonzero(self.in_host[:, h])
            on_h = self.hslot[t] == h
            m = np.empty((t.size, 1 + 2 * k), np.int32)
            m[:, 0] = t
            m[:, 1:1 + k] = _masked(idx_full[t], on_h, -1)
            m[:, 1 + k:] = _masked(weights[t], on_h, 0.0).view(np.int32)
            metas.append(m)
        a_meta = np.concatenate(metas) if metas else np.zeros((0, 1 + 2 * k), np.int32)
        a_recv = np.empty((sum(self.a_recv_counts), 1 + 2 * k), np.int32)
        ex.rows(what, a_meta, self.a_send_counts, a_recv, self.a_recv_counts, 4 * (1 + 2 * k))
        # forwarded items (stage A receive order: sources ascending)
        fsrc = np.repeat(np.arange(n, dtype=np.int64), self.a_recv_counts)
        ftok = a_recv[:, 0].astype(np.int64)
        fglob = a_recv[:, 1:1 + k].astype(np.int64)
        fw = np.ascontiguousarray(a_recv[:, 1 + k:]).view(np.float32)
        fdst = np.where(fglob >= 0, fglob // L, n)
        self.n_fwd = ftok.size
        # stage B lists per local rank d: own tokens first, then forwarded items
        own_w, idx_own = weights, idx_full
        b_meta, self.b_own, self.b_fwd = {}, {}, {}
        for d in hm.local:
            t = self.own_tok[d]
            on_d = sp.dst_of_slot[t] == d
            f = np.flatnonzero((fdst == d).any(1)) if self.n_fwd else np.zeros(0, np.int64)
            on_fd = fdst[f] == d
            m = np.empty((t.size + f.size, 2 + 2 * k), np.int32)
            m[:t.size, 0] = rank
            m[:t.size, 1] = t
            m[:t.size, 2:2 + k] = _masked(idx_own[t] - d * L, on_d, -1)
            m[:t.size, 2 + k:] = _masked(own_w[t], on_d, 0.0).view(np.int32)
            m[t.size:, 0] = fsrc[f]
            m[t.size:, 1] = ftok[f]
            m[t.size:, 2:2 + k] = _masked(fglob[f] - d * L, on_fd, -1)
            m[t.size:, 2 + k:] = _masked(fw[f], on_fd, 0.0).view(np.int32)
            b_meta[d], self.b_own[d], self.b_fwd[d] = m, t, f
        others = [d for d in hm.local if d != rank]
        self.b_send_counts = _counts_to(n, [(d, b_meta[d].shape[0]) for d in others])
        cnt_send = np.array([[b_meta[d].shape[0]] for d in others], np.int64).reshape(-1, 1)
        cnt_recv = np.empty((len(others), 1), np.int64)
        one = _counts_to(n, [(d, 1) for d in others])
        ex.rows_local(what, cnt_send, one, cnt_recv, one, 8, hm.local)
        self.b_recv_counts = _counts_to(n, [(d, c) for d, c in zip(others, cnt_recv[:, 0])])
        send_meta = np.concatenate([b_meta[d] for d in others]) if others else \
            np.zeros((0, 2 + 2 * k), np.int32)
        recv_meta = np.empty((sum(self.b_recv_counts), 2 + 2 * k), np.int32)
        ex.rows_local(what, send_meta, self.b_send_counts, recv_meta, self.b_recv_counts,
                      4 * (2 + 2 * k), hm.local)
        # deliverer fold plan: DP rows = own tokens (in_host[:, me] order), then forwarded
        # items; entries = partial rows [own partials (self block); stage B' receive buffer]
        self.n_self_b = b_meta[rank].shape[0]
        own_row = np.full(sp.num_tokens, -1, np.int64)
        own_row[self.own_all] = np.arange(self.n_own)
        nl = len(hm.local)
        pos = np.full((self.n_own + self.n_fwd, nl), -1, np.int64)
        base = self.n_self_b
        for j, d in enumerate(hm.local):
            t, f = self.b_own[d], self.b_fwd[d]
            start = 0 if d == rank else base
            pos[own_row[t], j] = start + np.arange(t.size)
            pos[self.n_own + f, j] = start + t.size + np.arange(f.size)
            if d != rank:
                base += t.size + f.size
        has = pos >= 0
        self.deliver_offsets = np.zeros(pos.shape[0] + 1, np.int64)
        np.cumsum(has.sum(1), out=self.deliver_offsets[1:])
        self.deliver_entries = pos[has]
        self.deliver_pos = pos
        # the receive plan: self block (what this rank delivered to itself), then stage B
        items = np.concatenate([b_meta[rank], recv_meta])
        src_rank = items[:, 0].astype(np.int64)
        src_token = items[:, 1].astype(np.int64)
        ro_perm = np.lexsort((src_token, src_rank)) if items.shape[0] else \
            np.zeros(0, np.int64)
        self.rp = items_plan(self.n_self_b, self.b_recv_counts, src_rank, src_token,
                             items[:, 2:2 + k], np.ascontiguousarray(items[:, 2 + k:]).view(
                                 np.float32), ro_perm.astype(np.int64), L)
        return self.rp

    # ------------------------------------------------------------------ data
    def forward_rows(self, x, out, what="dispatch") -> None:
        ex, hm, rank = self.ex, self.hm, self.sp.rank
        H, dt = x.shape[1], x.dtype
        rb = H * x.itemsize
        send = ex.scratch("send", (self.a_send_idx.size, H), dt)
        gather_rows(send, x, self.a_send_idx)
        fwd = ex.scratch("fwd", (self.n_fwd, H), dt)
        ex.rows(what, send, self.a_send_counts, fwd, self.a_recv_counts, rb)
        others = [d for d in hm.local if d != rank]
        send2 = ex.scratch("send2", (sum(self.b_send_counts), H), dt)
        at = 0
        for d in others:
            t, f = self.b_own[d], self.b_fwd[d]
            gather_rows(send2[at:at + t.size], x, t)
            gather_rows(send2[at + t.size:at + t.size + f.size], fwd, f)
            at += t.size + f.size
        ex.rows_local(what, send2, self.b_send_counts, out[self.n_self_b:], self.b_recv_counts,
                      rb, hm.local)
        t, f = self.b_own[rank], self.b_fwd[rank]
        gather_rows(out[:t.size], x, t)
        gather_rows(out[t.size:t.size + f.size], fwd, f)

    def return_rows(self, partials, out, dtype, what="combine") -> None:
        ex, hm = self.ex, self.hm
        H, dt = partials.shape[1], partials.dtype
        rb = H * partials.itemsize
        back = ex.scratch("back", (sum(self.b_send_counts), H), dt)
        ex.local_then_group(lambda: ex.rows_local(what, partials[self.n_self_b:],
                                                  self.b_recv_counts, back,
                                                  self.b_send_counts, rb, hm.local), hm.local)
        dp = ex.scratch("dp", (self.n_own + self.n_fwd, H), dt)
        reduce_rows(dp, self.deliver_offsets, self.deliver_entries, None, partials,
                    self.n_self_b, back, dtype)
        back2 = ex.scratch("back2", (self.a_send_idx.size, H), dt)
        ex.rows(what, dp[self.n_own:], self.a_recv_counts, back2, self.a_send_counts, rb)
        reduce_rows(out, self.final_offsets, self.final_entries, None, dp, self.n_own, back2,
                    dtype)

    def weights_back(self, per_item, what="dispatch backward") -> np.ndarray:
        ex, hm, sp = self.ex, self.hm, self.sp
        k = sp.topk
        back = np.empty((sum(self.b_send_counts), k), np.float32)
        ex.local_then_group(lambda: ex.rows_local(what, per_item[self.n_self_b:],
                                                  self.b_recv_counts, back,
                                                  self.b_send_counts, 4 * k, hm.local), hm.local)
        both = np.concatenate([per_item[:self.n_self_b], back])
        dp = np.zeros((self.n_own + self.n_fwd, k), np.float32)
        rows = np.repeat(np.arange(dp.shape[0]), np.diff(self.deliver_offsets))
        np.add.at(dp, rows, both[self.deliver_entries])   # slots are disjoint: exact
        back2 = np.empty((self.a_send_idx.size, k), np.float32)
        ex.rows(what, dp[self.n_own:], self.a_recv_counts, back2, self.a_send_counts, 4 * k)
        src = np.concatenate([dp[:self.n_own], back2])
        out = np.zeros((sp.num_tokens, k), np.float32)
        t, s = np.nonzero(self.hslot < hm.m)
        out[t, s] = src[self.final_pos[t, self.hslot[t, s]], s]
        return out

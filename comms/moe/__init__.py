"""MoE expert-parallel dispatch and combine: each token crosses to each rank once.

    import comms.moe as moe
    res = moe.dispatch(x, topk_idx, topk_weights, num_experts, group)   # collective
    y = torch.cat([experts[e](xe) for e, xe in enumerate(res.expert_chunks(res.expert_x))])
    out = moe.combine(y, res.handle)                                    # [num_tokens, hidden]

`group` is a comms.Communicator (numpy arrays or torch tensors) or a torch.distributed
process group whose backend is "topocomm" (None: the default group). CUDA tensors stay on
their GPU when every rank's x is on one, the group is on one host and no gradient is wanted
(comms/moe/device.py: torch gathers and folds on the device, the rows moved by CUDA IPC);
otherwise dispatch and combine copy them to the host (differentiably) and return their
results on the input's GPU. Either way the values are those of CPU tensors. Under torch autograd
both are differentiable (dispatch's backward is a combine of the gradients and vice versa),
so an MoE layer trains through them; torch.float32, torch.bfloat16 and float64 are handled.

Experts are split evenly and contiguously over the ranks: expert e lives on rank
e // (num_experts / world size), so num_experts must be a multiple of the group size.

What moves (per rank, hidden H, element size s):
- dispatch: every token goes once to each rank holding at least one of its experts (dedup),
  with its topk slots and weights for that rank (2k + 1 int32 words); a token for this rank's
  own experts is copied locally and never touches a transport. Three all-to-alls: a header
  (counts, and the fields all ranks must agree on: hidden, dtype, experts, k, autograd), the
  per-token metadata, the token rows.
- combine: the receiving rank first folds its local experts' weighted outputs per received
  token, then sends ONE row per (token, source rank) back; the source folds those rows.
- across hosts (the group's topology, e.g. a multi-host Communicator's `hosts`, or the
  `hosts=` override): two stages (hier.py). A token crosses the network once per destination
  host, to one forwarder there, which delivers it inside its host; on the way back the
  forwarder folds its host's partial rows first, so one row per (token, host) crosses back.

Layout of what a rank receives, and why: the received tokens are kept deduplicated
(`recv_x` [R, H], R = distinct (source rank, token)), with per-local-expert index lists
(`row_token_idx`, `expert_offsets`): rows = (token, local expert) pairs grouped by local
expert, then source rank, source token and topk slot, which is the reference pipeline's order.
On 2 ranks with top-8 of 64 experts a token has ~4 rows per rank: an expert-grouped copy
(`expert_x` [rows, H]) costs 4x the received bytes in memory traffic, so it is built only
when asked for, by one vectorised gather (cached; an expert that can consume index lists,
e.g. `recv_x[idx]` inside its own gather, never needs it). combine takes expert outputs in
row order, so the fold happens where the rows are and only R rows travel back.

Summation order (exact and reproducible): for token t,
    out[t] = sum over hosts h in order of round(sum over h's ranks r ascending of
                 round(sum over t's slots s on rank r, s ascending, of w[t, s] * y[t, s])))
each sum a left fold from +0 with the product rounded before the add (no FMA), accumulated in
float32 (float64 for float64 data), each partial rounded to the data dtype before it
travels (with one host: the ranks in order, then the single host). comms.moe.refs.reference_combine(exact_order=True) sums in this order, so the
two agree bit for bit; a plain `(w * y).sum(1)` differs in the last bits.

Bad arguments (topk_idx out of range, wrong shapes or dtypes, weights not matching topk_idx,
a handle from another group or with other shapes) raise ValueError / TypeError naming the
argument on every rank before token data moves: the rank that found it makes the pending
all-to-all of its peers fail; fields that must agree across ranks travel in the header.

Memory: large outputs (recv_x, expert_x, combine's result, the gradients) reuse the blocks of
earlier outputs that nothing refers to any more (cache.py; TOPOCOMM_MOE_CACHE_MB caps what is
kept, empty_cache() releases it): no page faults on the next step.

Files: api.py (the functions, checks), cache.py (output memory kept across calls), plan.py
(who sends what: pure numpy), ops.py (the row kernels and the one-stage route), hier.py (the
two-stage route across hosts), exchange.py (the all-to-all of rows, group -> Communicator,
reusable scratch), autograd.py (torch Functions), refs.py (the plain per-expert pipeline,
reference and baseline), comms/kernels/reference_moe.py holds the numpy twins of native/src/moe.c.
"""
from comms.moe.api import (DispatchHandle, DispatchResult, MoeLayout, combine, dispatch,  # noqa: F401
                  layout)
from comms.moe.cache import empty_cache  # noqa: F401

__all__ = ["layout", "dispatch", "combine", "MoeLayout", "DispatchResult", "DispatchHandle",
           "empty_cache"]

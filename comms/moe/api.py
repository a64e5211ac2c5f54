"""comms.moe public functions: layout, dispatch, combine (see comms/moe/__init__.py)."""
from __future__ import annotations

import numpy as np

from comms.core import dtypes as dt
from comms.moe import cache, ops
from comms.moe.cache import output, storage
from comms.moe import plan as P
from comms.moe.exchange import Exchange
from comms.moe.hier import HierRoute, hosts_fingerprint

_HEADER_MAGIC = 0x4D6F45          # "MoE": first word of the dispatch header
# header words per peer: magic, tokens for that peer, then fields every rank must agree on
_AGREE = ("hidden", "dtype", "num_experts", "topk", "autograd", "hosts")


# ----------------------------------------------------------------------------- arrays

def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")


def _np_dtype_code(a):
    """comms dtype code of a numpy array / torch tensor, or None."""
    if isinstance(a, np.ndarray):
        return {np.dtype(np.float32): dt.F32, np.dtype(np.float64): dt.F64}.get(a.dtype)
    import torch
    return {torch.float32: dt.F32, torch.float64: dt.F64, torch.bfloat16: dt.BF16}.get(a.dtype)


def _as_kind(a: np.ndarray, like_torch: bool):
    if like_torch:
        import torch
        return torch.from_numpy(a)
    return a


def _device_of(a):
    """The GPU device of a torch CUDA tensor, else None. dispatch and combine keep CUDA
    tensors on their device (comms/moe/device.py) where every rank can and no gradient is
    wanted; otherwise they take the CPU path: inputs copied to the host (differentiable),
    outputs copied back to this device (comms/moe/__init__.py)."""
    if _is_torch(a) and getattr(a, "is_cuda", False):
        return a.device
    return None


def _to_host(a):
    return a.cpu() if _device_of(a) is not None else a


def _dense(a, name, like_torch, device_ok=False):
    """A C-contiguous CPU array/tensor of the caller's kind (copied only if needed); with
    device_ok, a tensor may be on its GPU (it stays there)."""
    if like_torch:
        import torch
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor (x is one), got {type(a).__name__}")
        if a.device.type != "cpu" and not (device_ok and _device_of(a) is not None):
            raise ValueError(f"{name}: tensor on {a.device}; comms.moe handles CPU and CUDA "
                             "tensors")
        return a if a.is_contiguous() else a.contiguous()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array (x is one), got {type(a).__name__}")
    return np.ascontiguousarray(a)


def _index_array(topk_idx, name="topk_idx") -> np.ndarray:
    """topk_idx as a numpy int64 [T, k] array (a copy for torch tensors)."""
    if _is_torch(topk_idx):
        import torch
        if topk_idx.is_floating_point() or topk_idx.is_complex() or topk_idx.dtype == torch.bool:
            raise TypeError(f"{name}: must be an integer tensor, got {topk_idx.dtype}")
        if topk_idx.device.type != "cpu":
            raise ValueError(f"{name}: tensor on {topk_idx.device}; comms.moe handles CPU and "
                             "CUDA tensors")
        arr = topk_idx.detach().to(torch.int64).contiguous().numpy()
    elif isinstance(topk_idx, np.ndarray):
        if topk_idx.dtype.kind not in "iu":
            raise TypeError(f"{name}: must be an integer array, got {topk_idx.dtype}")
        arr = np.ascontiguousarray(topk_idx, dtype=np.int64)
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got "
                        f"{type(topk_idx).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"{name}: must be 2-D [num_tokens, k], got shape {tuple(arr.shape)}")
    return arr


def _check_experts(num_experts, n):
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) \
            or num_experts < 1:
        raise ValueError(f"num_experts: must be a positive int, got {num_experts!r}")
    if num_experts % n:
        raise ValueError(f"num_experts: {num_experts} experts do not split evenly over {n} "
                         f"ranks (expert e lives on rank e // (num_experts / world size))")
    return int(num_experts)


def _check_idx_range(idx, num_experts, name="topk_idx"):
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            raise ValueError(f"{name}: value {bad} out of range; experts are 0..{num_experts - 1} "
                             f"and -1 means not routed")


def _check_hosts(hosts, n, ex=None):
    if hosts is None:
        return ex.hosts if ex is not None else [list(range(n))]
    try:
        hs = [[int(r) for r in h] for h in hosts]
    except TypeError:
        raise ValueError(f"hosts: must be a list of lists of ranks, got {hosts!r}") from None
    flat = sorted(r for h in hs for r in h)
    if flat != list(range(n)) or any(not h for h in hs):
        raise ValueError(f"hosts: must split ranks 0..{n - 1} into non-empty lists, each rank "
                         f"once, got {hosts!r}")
    return hs


# ----------------------------------------------------------------------------- layout

class MoeLayout:
    """Where tokens go, computed locally from topk_idx (no communication).

    num_tokens_per_rank   [world] int64: tokens sent to each rank, once per rank (dedup)
    num_tokens_per_expert [num_experts] int64: (token, slot) entries per expert
    num_tokens_per_host   [num_hosts] int64: tokens sent to at least one rank of each host
    is_token_in_rank      [num_tokens, world] bool
    Arrays are torch tensors when topk_idx is one, else numpy arrays.
    """

    def __init__(self, sp: P.SendPlan, like_torch: bool, comm):
        self._plan, self._comm = sp, comm
        self.num_ranks, self.num_experts = sp.num_ranks, sp.num_experts
        self.num_tokens, self.topk = sp.num_tokens, sp.topk
        self.hosts = sp.hosts
        self.num_tokens_per_rank = _as_kind(sp.num_tokens_per_rank, like_torch)
        self.num_tokens_per_expert = _as_kind(sp.num_tokens_per_expert, like_torch)
        self.num_tokens_per_host = _as_kind(sp.num_tokens_per_host, like_torch)
        self.is_token_in_rank = _as_kind(sp.is_token_in_rank, like_torch)

    def __repr__(self):
        return (f"MoeLayout(num_tokens={self.num_tokens}, topk={self.topk}, "
                f"num_experts={self.num_experts}, num_ranks={self.num_ranks}, "
                f"num_tokens_per_rank={self._plan.num_tokens_per_rank.tolist()})")


def layout(topk_idx, num_experts, group=None, *, hosts=None) -> MoeLayout:
    """Tokens per rank, per expert and per host, and is_token_in_rank, from the routing.

    topk_idx: [num_tokens, k] integer (numpy or torch), expert ids, -1 = not routed.
    num_experts: total experts, a multiple of the group size; expert e lives on rank
        e // (num_experts / world size) (even, contiguous split).
    group: a comms.Communicator, a torch process group using topocomm, or None (the default
        torch group). hosts: optional list of lists of ranks overriding the topology (tests).
    Local only: no rank waits for another, errors are raised on this rank.
    """
    ex = Exchange(group)
    n = ex.size
    idx = _index_array(_to_host(topk_idx))
    E = _check_experts(num_experts, n)
    _check_idx_range(idx, E)
    sp = P.send_plan(idx, E, n, ex.rank, _check_hosts(hosts, n, ex))
    return MoeLayout(sp, _is_torch(topk_idx), ex.comm)


# ----------------------------------------------------------------------------- results

class DispatchHandle:
    """What combine (and both backward passes) reuse: the group, both plans, the shapes.
    Opaque; valid for the group and the shapes of the dispatch that made it."""

    def __init__(self, ex, sp, rp, route, dtype, hidden, like_torch):
        self.exchange, self.send_plan, self.recv_plan, self.route = ex, sp, rp, route
        self.dtype, self.hidden, self.like_torch = dtype, hidden, like_torch
        self.num_tokens = sp.num_tokens
        self.weights = None            # [rows] float32 row weights combine applies
        self.device = None             # the GPU of the dispatched x (None: the CPU)
        self.device_rows = None        # comms/moe/device.py steps: the rows stayed on the GPU

    @property
    def num_rows(self) -> int:
        return self.recv_plan.num_rows

    def __repr__(self):
        return (f"DispatchHandle(rank={self.exchange.rank}/{self.exchange.size}, "
                f"num_tokens={self.num_tokens}, hidden={self.hidden}, "
                f"num_recv_tokens={self.recv_plan.num_recv_tokens}, rows={self.num_rows}, "
                f"dtype={dt.DTYPE_NAMES[self.dtype]})")


class DispatchResult:
    """What a rank receives from dispatch (arrays are torch tensors for torch input, else
    numpy arrays). R = received tokens (deduplicated), rows = (token, expert) pairs for this
    rank's experts, L = local experts, H = hidden.

    recv_x           [R, H] x.dtype   each received token once: own tokens first, then the
                                      other ranks' in rank order (source token ascending)
    recv_src_rank    [R] int64        source rank of each received token
    recv_src_token   [R] int64        its index in the source's x
    num_tokens_per_expert [L] int64   rows per local expert (also a list: ..._list)
    expert_offsets   [L + 1] int64    rows of local expert e: expert_offsets[e]:expert_offsets[e+1]
    row_token_idx    [rows] int64     row -> recv_x row (rows grouped by local expert, then
                                      source rank, source token, topk slot)
    weights          [rows] float32   the topk weight of each row (combine applies it;
                                      differentiable w.r.t. topk_weights under autograd)
    src_rank, src_token_idx, topk_slot, local_expert   [rows] int64: where each row came from
    expert_x         [rows, H] x.dtype  recv_x gathered into row order (one vectorised
                                      gather on first access, then cached; autograd-aware)
    handle           DispatchHandle for combine
    """

    def __init__(self, handle, recv_x, weights, device=None):
        rp, like = handle.recv_plan, handle.like_torch
        self.handle = handle
        self.device = device           # x's GPU (every tensor here is on it), else None
        self.recv_x = recv_x
        self.weights = weights
        self.recv_src_rank = _as_kind(rp.recv_src_rank, like)
        self.recv_src_token = _as_kind(rp.recv_src_token, like)
        self.num_tokens_per_expert_list = [int(c) for c in rp.num_rows_per_expert]
        self.num_tokens_per_expert = _as_kind(rp.num_rows_per_expert, like)
        offs = np.zeros(rp.num_rows_per_expert.size + 1, np.int64)
        np.cumsum(rp.num_rows_per_expert, out=offs[1:])
        self.expert_offsets = _as_kind(offs, like)
        self.row_token_idx = _as_kind(rp.row_recv_token, like)
        self.src_rank = _as_kind(rp.recv_src_rank[rp.row_recv_token], like)
        self.src_token_idx = _as_kind(rp.recv_src_token[rp.row_recv_token], like)
        self.topk_slot = _as_kind(rp.row_slot, like)
        self.local_expert = _as_kind(rp.row_expert, like)
        self._expert_x = None
        if device is not None:
            for name in ("recv_x", "weights", "recv_src_rank", "recv_src_token",
                         "num_tokens_per_expert", "expert_offsets", "row_token_idx",
                         "src_rank", "src_token_idx", "topk_slot", "local_expert"):
                setattr(self, name, getattr(self, name).to(device))

    @property
    def num_recv_tokens(self) -> int:
        return self.handle.recv_plan.num_recv_tokens

    @property
    def num_rows(self) -> int:
        return self.handle.recv_plan.num_rows

    @property
    def expert_x(self):
        if self._expert_x is None:
            rp, h = self.handle.recv_plan, self.handle
            if h.like_torch and (self.recv_x.requires_grad or self.device is not None):
                self._expert_x = self.recv_x.index_select(0, self.row_token_idx)
            else:
                out = output(h.like_torch, (rp.num_rows, h.hidden), h.dtype)
                ops.gather_rows(storage(out), storage(self.recv_x), rp.row_recv_token)
                self._expert_x = out
        return self._expert_x

    def expert_chunks(self, rows):
        """Split a [rows, ...] array/tensor (e.g. expert_x) into one view per local expert."""
        offs = [0] + list(np.cumsum(self.num_tokens_per_expert_list))
        return [rows[offs[e]:offs[e + 1]] for e in range(len(offs) - 1)]


# ----------------------------------------------------------------------------- dispatch

def _check_dispatch(ex, x, topk_idx, topk_weights, num_experts, lay, hosts, device_ok=False):
    like = _is_torch(x)
    if not like and not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy array or torch tensor, got {type(x).__name__}")
    x = _dense(x, "x", like, device_ok)
    if x.ndim != 2:
        raise ValueError(f"x: must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    code = _np_dtype_code(x)
    if code is None:
        raise TypeError(f"x: dtype {x.dtype} not supported; use float32, bfloat16 (torch) or "
                        "float64")
    idx = _index_array(topk_idx)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx: has {idx.shape[0]} rows but x has {x.shape[0]} tokens")
    n = ex.size
    E = _check_experts(num_experts, n)
    _check_idx_range(idx, E)
    # weights: same shape as topk_idx, float; float32 inside (bfloat16/float64 converted)
    if like != _is_torch(topk_weights) or not (_is_torch(topk_weights)
                                                or isinstance(topk_weights, np.ndarray)):
        raise TypeError(f"topk_weights: expected a {'torch tensor' if like else 'numpy array'} "
                        f"like x, got {type(topk_weights).__name__}")
    if tuple(topk_weights.shape) != tuple(idx.shape):
        raise ValueError(f"topk_weights: shape {tuple(topk_weights.shape)} does not match "
                         f"topk_idx {tuple(idx.shape)}")
    if like:
        import torch
        if not topk_weights.is_floating_point():
            raise TypeError(f"topk_weights: must be floating point, got {topk_weights.dtype}")
        w = topk_weights.detach().to(torch.float32).contiguous().numpy()
    else:
        if topk_weights.dtype.kind != "f":
            raise TypeError(f"topk_weights: must be floating point, got {topk_weights.dtype}")
        w = np.ascontiguousarray(topk_weights, dtype=np.float32)
    if lay is not None:
        if not isinstance(lay, MoeLayout):
            raise TypeError(f"layout: expected a MoeLayout from comms.moe.layout, got "
                            f"{type(lay).__name__}")
        if lay._comm is not ex.comm:
            raise ValueError("layout: was computed for a different group")
        sp = lay._plan
        if (sp.num_tokens, sp.topk, sp.num_experts) != (idx.shape[0], idx.shape[1], E):
            raise ValueError(f"layout: computed for {sp.num_tokens} tokens x top-{sp.topk} of "
                             f"{sp.num_experts} experts, called with {idx.shape[0]} x "
                             f"top-{idx.shape[1]} of {E}")
        if _check_hosts(hosts, n, ex) != sp.hosts:
            raise ValueError(f"hosts: {_check_hosts(hosts, n, ex)} differs from the layout's "
                             f"hosts {sp.hosts}")
    else:
        sp = P.send_plan(idx, E, n, ex.rank, _check_hosts(hosts, n, ex))
    return x, like, code, w, sp


def _wants_grad(like, x, w):
    if not like:
        return False
    import torch
    return torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)


def dispatch(x, topk_idx, topk_weights, num_experts, group=None, *, layout=None,
             hosts=None) -> DispatchResult:
    """Send every token to the ranks holding its experts, once per rank.

    x            [num_tokens, hidden] float32 / bfloat16 (torch) / float64; numpy, or torch
                 on the CPU or a GPU (CUDA: kept on the GPU without autograd on one host,
                 else through the CPU path; results on x's GPU either way)
    topk_idx     [num_tokens, k] integer: expert ids in [0, num_experts), -1 = not routed
    topk_weights [num_tokens, k] float: the weight combine applies to each (token, expert)
    num_experts  total experts; expert e lives on rank e // (num_experts / world size)
    group        comms.Communicator, torch process group using topocomm, or None (default)
    layout       optional MoeLayout from layout(topk_idx, num_experts, group) (saves its work)
    hosts        optional list of lists of ranks overriding the topology (tests)
    Returns a DispatchResult. Collective: every rank of the group calls it; a rank may have
    0 tokens. Bad arguments raise ValueError/TypeError naming the argument on every rank
    before token data moves. Under torch autograd (x or topk_weights requiring grad) the
    backward pass is a combine of the gradients; all ranks must agree on that.
    """
    ex = Exchange(group)
    device = _device_of(x)
    # x may stay on its GPU when no gradient is wanted (every rank must agree: below)
    keep = device is not None and not (
        _is_torch(topk_weights) and _wants_grad(True, x, topk_weights))
    topk_idx, topk_weights = _to_host(topk_idx), _to_host(topk_weights)
    if not keep:
        x = _to_host(x)
    try:
        x, like, code, w, sp = _check_dispatch(ex, x, topk_idx, topk_weights, num_experts,
                                               layout, hosts, device_ok=keep)
    except (TypeError, ValueError):
        ex.reject()
        raise
    n, rank, k, H = ex.size, ex.rank, sp.topk, x.shape[1]
    grad = _wants_grad(like, x, topk_weights)
    route = HierRoute(ex, sp, sp.hosts) if len(sp.hosts) > 1 else None
    keep = keep and route is None
    head = np.empty((n, 3 + len(_AGREE)), np.int64)
    head[:, 0] = _HEADER_MAGIC
    head[:, 1] = route.counts_for_header() if route else sp.num_tokens_per_rank
    head[:, 2:2 + len(_AGREE)] = [H, code, sp.num_experts, k, int(grad),
                                  hosts_fingerprint(sp.hosts)]
    head[:, -1] = int(keep)
    got = ex.words("dispatch", head)
    on_device = bool(got[:, -1].min())      # every rank's x stays on its GPU
    if not on_device and _device_of(x) is not None:
        x = x.cpu()
    for i, name in enumerate(_AGREE):
        col = got[:, 2 + i]
        for q in range(n):
            if col[q] != col[0]:
                a, b = int(col[q]), int(col[0])
                if name == "dtype":
                    a, b = dt.DTYPE_NAMES.get(a, a), dt.DTYPE_NAMES.get(b, b)
                what = {"hidden": "hidden size (x.shape[1])", "dtype": "x dtype",
                        "topk": "k (topk_idx.shape[1])", "hosts": "hosts (fingerprint)",
                        "autograd": "autograd use (x or topk_weights requires grad)"}.get(name, name)
                raise ValueError(f"moe.dispatch: ranks disagree on {what}: rank {q} has {a}, "
                                 f"rank 0 has {b}; no token data was moved")
    recv_counts = [int(c) for c in got[:, 1]]
    recv_counts[rank] = 0
    if route is not None:
        rp = route.prepare(w, recv_counts)
    else:
        meta_remote, meta_self = ops._split_self(P.send_meta(sp, w), sp)
        meta_recv = np.empty((sum(recv_counts), 1 + 2 * k), np.int32)
        ex.rows("dispatch", meta_remote, sp.remote_counts(), meta_recv, recv_counts,
                4 * (1 + 2 * k))
        rp = P.recv_plan(sp, recv_counts, meta_recv, meta_self)
        route = ops.FlatRoute(ex, sp, rp)
    handle = DispatchHandle(ex, sp, rp, route, code, H, like)
    if on_device:
        import torch
        from comms.moe.device import DeviceRows
        handle.device_rows = DeviceRows(ex, sp, rp, x.device)
        recv_x = torch.empty((rp.num_recv_tokens, H), dtype=x.dtype, device=x.device)
        handle.device_rows.forward_rows(x.detach(), recv_x)
        weights = torch.from_numpy(rp.row_weight.copy()).to(x.device)
    elif grad:
        from comms.moe.autograd import DispatchFunction
        recv_x, weights = DispatchFunction.apply(x, topk_weights, handle)
    else:
        recv_x = output(like, (rp.num_recv_tokens, H), code)
        route.forward_rows(storage(x), storage(recv_x))
        weights = _as_kind(rp.row_weight.copy(), like)
    handle.weights = weights
    handle.device = device
    return DispatchResult(handle, recv_x, weights, device)


# ----------------------------------------------------------------------------- combine

def _check_combine(handle, expert_out, group, device_ok=False):
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: expected the DispatchHandle of a dispatch result "
                        f"(result.handle), got {type(handle).__name__}")
    if group is not None and Exchange(group).comm is not handle.exchange.comm:
        raise ValueError("handle: was made by a dispatch on a different group")
    like = handle.like_torch
    if like != _is_torch(expert_out):
        raise TypeError(f"expert_out: expected a {'torch tensor' if like else 'numpy array'} "
                        f"like the dispatched x, got {type(expert_out).__name__}")
    y = _dense(expert_out, "expert_out", like, device_ok)
    want = (handle.num_rows, handle.hidden)
    if tuple(y.shape) != want:
        raise ValueError(f"expert_out: shape {tuple(y.shape)} does not match the handle: "
                         f"[rows, hidden] = {list(want)} (one row per dispatched (token, "
                         "local expert), in the dispatch's row order)")
    if _np_dtype_code(y) != handle.dtype:
        raise TypeError(f"expert_out: dtype {y.dtype} differs from the dispatched x "
                        f"({dt.DTYPE_NAMES[handle.dtype]})")
    return y


def _first_local_step(handle, ex):
    """The ranks of the host-local step a two-stage combine (comms/moe/hier.py) starts with,
    where this rank's peers wait; None when the combine is one group-wide step."""
    if isinstance(handle, DispatchHandle):
        hm = getattr(handle.route, "hm", None)
        return hm.local if hm is not None else None
    hosts = ex.hosts  # no handle to ask: the group's own hosts, as dispatch routes by default
    return next(h for h in hosts if ex.rank in h) if len(hosts) > 1 else None


def combine(expert_out, handle, group=None):
    """Bring expert outputs back to the source ranks, weighted and summed per token.

    expert_out [rows, hidden], the dtype of the dispatched x: one output row per row of the
               dispatch result (row order: by local expert; e.g. f(result.expert_x))
    handle     DispatchResult.handle; group: optional, must be the dispatch's group
    Returns [num_tokens, hidden] on every source rank (torch tensor or numpy array, like x):
        out[t] = sum over the ranks r holding t's experts, in rank order, of
                 (sum over t's topk slots s on r, in slot order, of w[t, s] * y[t, s])
        (across hosts: the ranks' partials are first summed per host, hosts then in order)
    The weights are applied HERE (the topk_weights given to dispatch); pass unweighted expert
    outputs. Sums accumulate in float32 (float64 for float64), each rank's partial is rounded
    to the dtype before it travels, the final sum once. Tokens routed nowhere give zeros.
    Collective; every rank raises on bad arguments (before data moves). Under torch autograd
    the backward pass is a dispatch of the gradients (also giving topk_weights' gradient).
    """
    ex = handle.exchange if isinstance(handle, DispatchHandle) else Exchange(group)
    device = _device_of(expert_out)
    if isinstance(handle, DispatchHandle) and handle.device_rows is not None:
        # the dispatch kept the rows on the GPUs (every rank did): so does combine
        from comms.moe.device import combine_on_device
        try:
            y = _check_combine(handle, expert_out, group, device_ok=True)
            if _device_of(y) != handle.device_rows.device:
                raise ValueError(f"expert_out: on {getattr(y, 'device', 'the CPU')}, but the "
                                 f"dispatch kept its rows on {handle.device_rows.device}")
        except (TypeError, ValueError):
            ex.reject(local=_first_local_step(handle, ex))
            raise
        return combine_on_device(y, handle)
    expert_out = _to_host(expert_out)
    try:
        y = _check_combine(handle, expert_out, group)
    except (TypeError, ValueError):
        ex.reject(local=_first_local_step(handle, ex))
        raise
    sp, rp, like = handle.send_plan, handle.recv_plan, handle.like_torch
    w = _to_host(handle.weights)
    if like:
        import torch
        if torch.is_grad_enabled() and (y.requires_grad or w.requires_grad):
            from comms.moe.autograd import CombineFunction
            out = CombineFunction.apply(y, w, handle)
            return out if device is None else out.to(device)
    out = output(like, (sp.num_tokens, handle.hidden), handle.dtype)
    ops.combine_rows(handle.route, rp, storage(y), storage(w), storage(out), handle.dtype)
    return out if device is None else out.to(device)

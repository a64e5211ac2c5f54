"""dispatch and combine as torch.autograd Functions.

DispatchFunction: (x [T, H], topk_weights [T, k]) -> (recv_x [R, H], row weights [rows])
    backward: the gradient of recv_x goes back like a combine (one row per (token, rank),
    folded per token in rank order, unweighted); the row weights' gradient goes back to its
    (token, slot) of topk_weights.
CombineFunction: (expert_out [rows, H], row weights [rows]) -> out [T, H]
    backward: the gradient of out travels like a dispatch (one row per (token, rank));
    grad expert_out[row] = w[row] * grad_out[token], grad w[row] = <grad_out[token], y[row]>.
Both backward passes always run their exchanges (zeros for a missing gradient), so that
every rank issues the same collectives whatever it needs.
"""
from __future__ import annotations

import numpy as np
import torch

from comms.moe import ops
from comms.moe.cache import output, storage


class DispatchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, handle):
        rp = handle.recv_plan
        recv_x = output(True, (rp.num_recv_tokens, handle.hidden), handle.dtype)
        handle.route.forward_rows(storage(x), storage(recv_x))
        ctx.handle = handle
        ctx.weights_dtype = topk_weights.dtype
        return recv_x, torch.from_numpy(rp.row_weight.copy())

    @staticmethod
    def backward(ctx, grad_recv_x, grad_weights):
        h = ctx.handle
        sp, rp = h.send_plan, h.recv_plan
        if grad_recv_x is None:
            grad_recv_x = output(True, (rp.num_recv_tokens, h.hidden), h.dtype).zero_()
        g = grad_recv_x.contiguous()
        grad_x = output(True, (sp.num_tokens, h.hidden), h.dtype)
        h.route.return_rows(storage(g), storage(grad_x), h.dtype, "dispatch backward")
        gw = np.zeros(rp.num_rows, np.float32) if grad_weights is None else \
            grad_weights.detach().to(torch.float32).contiguous().numpy()
        grad_tw = torch.from_numpy(ops.weights_back(h.route, rp, gw))
        return grad_x, grad_tw.to(ctx.weights_dtype), None


class CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, weights, handle):
        sp, rp = handle.send_plan, handle.recv_plan
        out = output(True, (sp.num_tokens, handle.hidden), handle.dtype)
        ops.combine_rows(handle.route, rp, storage(expert_out), storage(weights),
                         storage(out), handle.dtype)
        ctx.handle = handle
        ctx.save_for_backward(expert_out, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h = ctx.handle
        expert_out, weights = ctx.saved_tensors
        g = grad_out.contiguous()
        grad_y = output(True, (h.num_rows, h.hidden), h.dtype)
        gw = ops.combine_backward(h.route, h.recv_plan, storage(g), storage(expert_out),
                                  storage(weights), storage(grad_y), h.dtype)
        return grad_y, torch.from_numpy(gw), None

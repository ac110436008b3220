"""Differentiable collectives of the context-parallel group: Ulysses all-to-alls and the layout changes.

Gradient convention across CP ranks: a tensor replicated over the CP group (the text stream, temb) carries on
each rank only the gradient of that rank's own use of it, and the true gradient is the sum over the CP ranks.
That is what megatron-core's DDP completes: it sums (scaled) gradients over the DP x CP group, and the
schedule multiplies the loss by the CP size. So a replicated parameter needs no extra handling, a sum over
ranks (`all_reduce_sum`) has an all-reduce as its backward, and a gather of replicated pieces
(`all_gather_heads`) a reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

Group = dist.ProcessGroup


def _a2a(x: Tensor, group: Group, out_rows: int, recv: Sequence[int] | None, send: Sequence[int] | None) -> Tensor:
    out = x.new_empty((out_rows, *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(recv) if recv else None, list(send) if send else None,
                           group=group)
    return out


class _SeqToHeads(torch.autograd.Function):
    """(n, B, h, d) sequence shard with all heads -> (g*n, B, h/g, d): all members' tokens, my head slice."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _seq_to_heads(grad, ctx.group), None


def _seq_to_heads(x: Tensor, group: Group) -> Tensor:
    g = dist.get_world_size(group)
    n, b, h, d = x.shape
    chunks = x.reshape(n, b, g, h // g, d).permute(2, 0, 1, 3, 4).reshape(g * n, b, h // g, d)
    return _a2a(chunks, group, g * n, None, None)


def _heads_to_seq(x: Tensor, group: Group) -> Tensor:
    g = dist.get_world_size(group)
    gn, b, hg, d = x.shape
    out = _a2a(x, group, gn, None, None)  # row block i: my tokens, head slice i
    return out.reshape(g, gn // g, b, hg, d).permute(1, 2, 0, 3, 4).reshape(gn // g, b, g * hg, d)


def seq_to_heads(x: Tensor, group: Group) -> Tensor:
    """Ulysses: scatter heads, gather the sequence (concatenated in group-rank order)."""
    return _SeqToHeads.apply(x, group)


def heads_to_seq(x: Tensor, group: Group) -> Tensor:
    """Ulysses inverse: gather heads, scatter the sequence back."""
    return _HeadsToSeq.apply(x, group)


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan, group: Group) -> Tensor:
        ctx.plan, ctx.group = plan, group
        sent = x.index_select(0, plan.send_order)
        received = _a2a(sent, group, sum(plan.recv_counts), plan.recv_counts, plan.send_counts)
        return received.index_select(0, plan.recv_index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        plan = ctx.plan
        back = torch.empty_like(grad)
        back[plan.recv_index] = grad  # undo the receive-side permutation
        returned = _a2a(back, ctx.group, sum(plan.send_counts), plan.send_counts, plan.recv_counts)
        out = torch.empty_like(returned)
        out[plan.send_order] = returned
        return out, None, None


def redistribute(x: Tensor, plan, group: Group) -> Tensor:
    """Move rows between CP ranks by `plan` (one all-to-all of one tensor): any object with `send_order`,
    `send_counts`, `recv_index` and `recv_counts`, e.g. the SUV model's `skiparse_layout.Redistribution`."""
    return _Redistribute.apply(x, plan, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce_sum(x: Tensor, group: Group) -> Tensor:
    """Sum of per-rank partial results, replicated (backward: the sum of the replicas' partial gradients)."""
    return _AllReduceSum.apply(x, group)


class _AllGatherHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        g = dist.get_world_size(group)
        parts = x.new_empty((g * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(parts, x.contiguous(), group=group)
        parts = parts.reshape(g, *x.shape)
        return parts.permute(*range(1, x.dim() - 1), 0, x.dim() - 1, x.dim()).flatten(-3, -2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        g = dist.get_world_size(group)
        *lead, h, d = grad.shape
        parts = grad.reshape(*lead, g, h // g, d).movedim(-3, 0).contiguous()
        out = parts.new_empty(parts.shape[1:])
        dist.reduce_scatter_tensor(out, parts.flatten(0, 1), group=group)
        return out, None


def all_gather_heads(x: Tensor, group: Group) -> Tensor:
    """(..., h/g, d) head slices -> (..., h, d) replicated (backward: reduce-scatter of the partial grads)."""
    return _AllGatherHeads.apply(x, group)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Group) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows].contiguous(), None


def gather_rows(x: Tensor, group: Group) -> Tensor:
    """All-gather along dim 0 for a result every rank then uses in full (the model output, whose loss every
    CP rank computes whole): the backward keeps this rank's rows of the gradient, no reduction."""
    return _GatherRows.apply(x, group)


__all__ = ["all_gather_heads", "all_reduce_sum", "gather_rows", "heads_to_seq", "redistribute", "seq_to_heads"]

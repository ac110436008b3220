"""Skiparse-aware sequence parallelism over megatron's context-parallel (CP) group, with Ulysses as baseline.

How the SUV model runs under CP (see skiparse_layout.py for the index maps, parallel/ulysses.py for the collectives):
- Every CP rank gets the whole micro-batch (same latent, noise and text as its CP peers). The model embeds it,
  keeps its own video tokens (`split_inputs`) and returns the whole output on every rank (`gather_output`),
  so the loss is computed in full on each rank and the training loop needs no change.
- Each block computes in a layout chosen once per model (`plan_blocks`): for sparsity k with P | k the block's
  own skiparse pattern, so every rank owns whole sub-sequences and attention needs no q/k/v/output
  all-to-all; with k | P (k < P) the same pattern with Ulysses among the P/k ranks of each sub-sequence when
  that moves less; otherwise (k = 1, or k and P coprime-ish) the contiguous layout with Ulysses over all P.
  Between blocks of different layouts (single <-> group skip, a stage change, a long-skip pairing) the video
  stream moves with one all-to-all of one tensor (`BlockContext.block_input`).
- Text is not split: it is replicated on every CP rank (and split over TP under Megatron-SP, as without CP).
  Each rank attends the text queries against its own sub-sequences; the k-copy average is the all-reduced
  sum of the local copies divided by k. Under Ulysses a rank owns all sub-sequences of a head slice, so the
  text output is all-gathered over heads instead.
- RoPE and key validity are computed for the whole (padded) sequence on every rank and indexed by the true
  token ids of the local tokens.
- Gradients: replicated tensors carry partial gradients summed by megatron's DDP over DP x CP (the schedule
  scales the loss by the CP size and DDP divides by DP x CP), so no parameter needs extra reduction.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as mpu
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region
from torch import Tensor, nn

from megatron_video.models.suv_mmdit.config import SUVConfig
from megatron_video.models.suv_mmdit.skiparse import join_text, pad_sequence, split_rows, valid_or_all
from megatron_video.models.suv_mmdit.skiparse_layout import (
    BlockPlan,
    Geometry,
    Layout,
    Redistribution,
    Strategy,
    local_ids,
    period_of,
    redistribution,
    subsequence,
    validate_plan,
)
from megatron_video.parallel.initialize import context_parallel_subgroup
from megatron_video.parallel.ulysses import (
    all_gather_heads,
    all_reduce_sum,
    gather_rows,
    heads_to_seq,
    redistribute,
    seq_to_heads,
)


def validate_context_parallel(model_cfg: SUVConfig, cp: int, tp: int, strategy: Strategy = "skiparse",
                              ) -> list[BlockPlan]:
    """Argument-time check of a CP x TP setting for this model; returns the per-block plan or raises
    ValueError (e.g. heads per TP rank not divisible by the Ulysses group size a block needs)."""
    return validate_plan(model_cfg, cp, tp, strategy)


class ContextParallel:
    """The model-wide CP state that does not depend on the input: groups, geometry, block plans."""

    def __init__(self, cfg: SUVConfig, config: ModelParallelConfig, strategy: Strategy = "skiparse") -> None:
        self.group = mpu.get_context_parallel_group()
        self.size, self.rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
        tp = mpu.get_tensor_model_parallel_world_size()
        self.sequence_parallel = bool(config.sequence_parallel) and tp > 1
        self.tp = tp
        self.slot = mpu.get_tensor_model_parallel_rank() if self.sequence_parallel else 0
        self.geometry = Geometry(self.size, tp if self.sequence_parallel else 1, period_of(cfg))
        self.strategy = strategy
        self.plans = validate_context_parallel(cfg, self.size, tp, strategy)
        sizes = sorted({plan.ulysses for plan in self.plans if plan.ulysses > 1})
        self.subgroups = {size: context_parallel_subgroup(size) for size in sizes}

    def ids(self, layout: Layout, n_pad: int, rank: int | None = None, device: torch.device | None = None) -> Tensor:
        """Token ids a rank holds in `layout` (built once per padded length and device, then reused)."""
        rank = self.rank if rank is None else rank
        if device is None:
            return local_ids(layout, self.geometry, n_pad, rank)
        return _local_ids_on(layout, self.geometry, n_pad, rank, device)

    def local_video_tokens(self, n: int) -> int:
        """Video rows a rank holds between blocks (per TP rank under SP) for n tokens: the pipeline carry."""
        return self.geometry.padded_tokens(n) // (self.size * self.geometry.slots)

    def move(self, x: Tensor, source: Layout, target: Layout, n_pad: int) -> Tensor:
        """This rank's slot of the video stream from layout `source` to `target` (one all-to-all)."""
        if source == target:
            return x
        plan = _redistribution_on(source, target, self.geometry, n_pad, self.rank, self.slot, x.device)
        return redistribute(x, plan, self.group)

    # ---------------------------------------------------------------------------- model entry and exit

    def pad_inputs(self, rope: tuple[Tensor, ...], video_valid: Tensor | None, text_valid: Tensor | None,
                   ) -> tuple[tuple[Tensor, ...], Tensor | None, Tensor | None]:
        """Whole-sequence RoPE and key validity padded to the CP padding (text to the TP multiple under SP).
        A validity of None (every token valid) stays None: the model passes None only for shapes this padding
        leaves unchanged (`SUVMMDiT.key_validity`)."""
        n_pad = self.geometry.padded_tokens(rope[0].shape[0])
        rope = tuple(pad_sequence(r, n_pad) for r in rope)
        if video_valid is not None:
            video_valid = pad_sequence(video_valid.t(), n_pad, False).t()
        if self.sequence_parallel and text_valid is not None:
            text_len = text_valid.shape[1] + (-text_valid.shape[1]) % self.tp
            text_valid = pad_sequence(text_valid.t(), text_len, False).t()
        return rope, video_valid, text_valid

    def split_inputs(self, x: Tensor, c: Tensor, rope: tuple[Tensor, ...], video_valid: Tensor | None,
                     text_valid: Tensor | None,
                     ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor | None, Tensor | None]:
        """Whole embedded streams -> this rank's video tokens in the first block's layout (and its TP slot
        under SP); text stays whole over CP."""
        rope, video_valid, text_valid = self.pad_inputs(rope, video_valid, text_valid)
        n_pad = rope[0].shape[0]
        x = pad_sequence(x, n_pad).index_select(0, self.ids(self.plans[0].layout, n_pad, device=x.device))
        if self.sequence_parallel:
            c = pad_sequence(c, c.shape[0] + (-c.shape[0]) % self.tp)
            x, c = scatter_to_sequence_parallel_region(x), scatter_to_sequence_parallel_region(c)
        return x, c, rope, video_valid, text_valid

    def gather_output(self, out: Tensor, n: int) -> Tensor:
        """This rank's output tokens (last block's layout) -> the whole (n, B, F) output on every rank."""
        if self.sequence_parallel:
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        out = gather_rows(out, self.group)
        return out.index_select(0, _natural_order(self.plans[-1].layout, self.geometry, out.shape[0], n, out.device))


@lru_cache(maxsize=512)
def _local_ids_on(layout: Layout, geo: Geometry, n_pad: int, rank: int, device: torch.device) -> Tensor:
    return local_ids(layout, geo, n_pad, rank).to(device)


@lru_cache(maxsize=64)
def _natural_order(layout: Layout, geo: Geometry, n_pad: int, n: int, device: torch.device) -> Tensor:
    """Rows of the CP-gathered output (rank after rank, each in `layout`'s local order) in token order."""
    order = torch.cat([local_ids(layout, geo, n_pad, rank) for rank in range(geo.cp)])
    return torch.argsort(order)[:n].to(device)


@lru_cache(maxsize=512)
def _redistribution_on(source: Layout, target: Layout, geo: Geometry, n_pad: int, rank: int, slot: int,
                       device: torch.device) -> Redistribution:
    plan = redistribution(source, target, geo, n_pad, rank, slot)
    return Redistribution(plan.send_order.to(device), plan.send_counts, plan.recv_index.to(device),
                          plan.recv_counts)


@lru_cache(maxsize=512)
def _grouping(layout: Layout, geo: Geometry, n_pad: int, rank: int, ulysses: int, k: int, mode: str,
              device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The tokens a rank attends over (its own, or its Ulysses group's in group-rank order) grouped into whole
    sub-sequences of pattern (k, mode): (their ids in grouped order, the grouping permutation, its inverse)."""
    first = rank - rank % ulysses
    ids = torch.cat([local_ids(layout, geo, n_pad, first + m) for m in range(ulysses)])
    order = torch.argsort(subsequence(ids, k, mode) * n_pad + ids)
    return ids[order].to(device), order.to(device), torch.argsort(order).to(device)


class BlockContext:
    """One block's CP behaviour: moving its inputs into its layout and its attention. Static; the index maps
    for a given padded length come from cached pure functions."""

    def __init__(self, cp: ContextParallel, plan: BlockPlan) -> None:
        self.cp, self.plan = cp, plan

    def block_input(self, long_skip: nn.Module | None, x: Tensor, c: Tensor, x_skip: Tensor | None,
                    c_skip: Tensor | None, rope: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """x arrives in the previous block's layout; returns x (and the long skip applied) in this block's
        layout, and RoPE of this rank's tokens. A long skip meets the stream in whichever layout costs one
        all-to-all when possible."""
        cp, plan, n_pad = self.cp, self.plan, rope[0].shape[0]
        if long_skip is None:
            x = cp.move(x, plan.layout_in, plan.layout, n_pad)
        else:
            if x_skip is None or c_skip is None:
                raise ValueError(f"block {plan.index} starts a decoder stage and needs its long-skip input")
            if plan.skip_layout == plan.layout_in:
                x, c = long_skip(x, c, x_skip, c_skip)
                x = cp.move(x, plan.layout_in, plan.layout, n_pad)
            else:
                x = cp.move(x, plan.layout_in, plan.layout, n_pad)
                x_skip = cp.move(x_skip, plan.skip_layout, plan.layout, n_pad)
                x, c = long_skip(x, c, x_skip, c_skip)
        ids = cp.ids(plan.layout, n_pad, device=rope[0].device)
        return x, c, tuple(r.index_select(0, ids) for r in rope)

    def attention(
        self, q_video: Tensor, k_video: Tensor, v_video: Tensor, q_text: Tensor | None, k_text: Tensor,
        v_text: Tensor, video_valid: Tensor | None, text_valid: Tensor | None, *, k: int, mode: str, scale: float,
        attn_fn,
    ) -> tuple[Tensor, Tensor | None]:
        """Drop-in for `skiparse.joint_attention` on this rank's tokens (the block layout's local list) with
        whole-sequence `video_valid` (B, n_pad), or both validities None when every token is valid and nothing
        is padded (the kernel then runs without a mask). Same result as the single-device attention."""
        cp, plan = self.cp, self.plan
        n_pad, d = q_video.shape[0] * cp.size, plan.ulysses  # this rank's tokens (TP-gathered under SP)
        group = cp.subgroups.get(d)
        index = cp.rank % d
        if d > 1:
            q_video, k_video, v_video = (seq_to_heads(t, group) for t in (q_video, k_video, v_video))
            width = q_video.shape[2]
            heads = slice(index * width, (index + 1) * width)
            q_text = q_text[:, :, heads] if q_text is not None else None
            k_text, v_text = k_text[:, :, heads], v_text[:, :, heads]
        sorted_ids, order, inverse = _grouping(plan.layout, cp.geometry, n_pad, cp.rank, d, k, mode,
                                               q_video.device)
        num_sub = sorted_ids.numel() * k // n_pad
        length = sorted_ids.numel() // num_sub
        b = q_video.shape[1]

        def grouped(t: Tensor) -> Tensor:
            """(num_sub, B, length, heads, d): a view of this rank's sub-sequences, gathered by one copy."""
            return t.index_select(0, order).reshape(num_sub, length, *t.shape[1:]).transpose(1, 2)

        key_valid = None
        if video_valid is not None or text_valid is not None:
            video_valid = valid_or_all(video_valid, b, n_pad, q_video.device)
            text_valid = valid_or_all(text_valid, b, k_text.shape[0], q_video.device)
            valid = video_valid[:, sorted_ids].reshape(b, num_sub, length)
            valid = valid.transpose(0, 1).reshape(num_sub * b, length)
            key_valid = torch.cat([valid, text_valid.repeat(num_sub, 1)], dim=1)
        q, key, value = (join_text(grouped(video), text)
                         for video, text in ((q_video, q_text), (k_video, k_text), (v_video, v_text)))
        out_video, out_text = split_rows(attn_fn(q, key, value, key_valid, scale=scale), length, q_text is not None)
        rest = out_video.shape[2:]
        out_video = out_video.reshape(length, num_sub, b, *rest).transpose(0, 1).reshape(num_sub * length, b, *rest)
        out_video = out_video.index_select(0, inverse)
        if out_text is not None:  # this rank's share of the k-copy mean
            out_text = out_text.reshape(out_text.shape[0], num_sub, b, *rest).sum(dim=1) / k
        if d > 1:
            out_video = heads_to_seq(out_video, group)
        if out_text is not None:
            if d == cp.size:  # all sub-sequences of my head slice are here: gather the heads
                out_text = all_gather_heads(out_text, cp.group)
            else:
                if d > 1:  # my head slice of my sub-sequence: zero elsewhere, summed over the CP group
                    width = out_text.shape[2]
                    out_text = F.pad(out_text, (0, 0, index * width, (d - 1 - index) * width))
                out_text = all_reduce_sum(out_text, cp.group)
        return out_video, out_text


def attach_context_parallel(cfg: SUVConfig, config: ModelParallelConfig, blocks: nn.Module,
                            strategy: Strategy = "skiparse") -> ContextParallel | None:
    """Give every block of `blocks` its CP behaviour (None and no change when the CP group has one rank).
    Call on every rank at model construction: it may create process groups."""
    size = mpu.get_context_parallel_world_size()
    declared = getattr(config, "context_parallel_size", 1)
    if declared != size:
        raise ValueError(f"config.context_parallel_size={declared} but the initialised CP group has {size} ranks")
    if size == 1:
        return None
    cp = ContextParallel(cfg, config, strategy)
    for block in blocks:
        context = BlockContext(cp, cp.plans[block.spec.index])
        block.context_parallel = context
        block.attn.layout_fn = context.attention
    return cp


def set_context_parallel_strategy(model: nn.Module, strategy: Strategy) -> None:
    """Rebuild the CP plan of a built SUV model with another strategy (benchmarks: 'ulysses' baseline)."""
    model.context_parallel = attach_context_parallel(model.cfg, model.config, model.blocks, strategy)


__all__ = [
    "BlockContext", "ContextParallel", "attach_context_parallel", "set_context_parallel_strategy",
    "validate_context_parallel",
]

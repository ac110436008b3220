"""Optimizer and EMA state in a checkpoint, each rank writing only the piece it owns.

megatron's distributed optimizer gives every data-parallel rank a contiguous range [start, end) of each flattened
(TP-local) parameter. A flat range of a C-ordered tensor is a union of a few rectangular blocks, each contiguous
in memory (a partial row, whole rows, a partial row, recursively), so every rank saves its range as ShardedTensors
of those blocks at their place in the model-space (global) tensor: no gather, no CPU copy, nothing written twice.
torch distributed-checkpoint matches saved and requested chunks by overlap, so a checkpoint loads at any other
TP / PP / CP / DP layout (and megatron's `fully_reshardable` checkpoints, which use the same keys
`optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<model key>` in full shape, load too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SHARDING_TYPE = "dp_sharded_model_space"


@dataclass(frozen=True)
class Block:
    start: int  # flat range [start, end) of the tensor this block covers
    end: int
    offset: tuple[int, ...]  # its corner and shape in the tensor's own coordinates
    shape: tuple[int, ...]


def flat_range_blocks(shape: tuple[int, ...], start: int, end: int) -> list[Block]:
    """Rectangular, memory-contiguous blocks that together cover elements [start, end) of a C-ordered tensor of
    `shape`, in flat order (at most 2·ndim − 1 of them)."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [Block(start, end, (start,) if shape else (), (end - start,) if shape else ())]
    row = math.prod(shape[1:])
    first, last = start // row, (end - 1) // row
    if start == first * row and end == (last + 1) * row:  # whole rows
        return [Block(start, end, (first,) + (0,) * (len(shape) - 1), (last - first + 1, *shape[1:]))]

    def within(index: int, lo: int, hi: int) -> list[Block]:  # part of one row
        base = index * row
        return [Block(b.start + base, b.end + base, (index, *b.offset), (1, *b.shape))
                for b in flat_range_blocks(shape[1:], lo - base, hi - base)]

    if first == last:
        return within(first, start, end)
    head_end = (first + 1) * row if start != first * row else start
    head = within(first, start, head_end) if head_end > start else []
    tail_start = last * row if end != (last + 1) * row else end
    middle = flat_range_blocks(shape, head_end, tail_start)
    tail = within(last, tail_start, end) if tail_start < end else []
    return head + middle + tail


def range_shards(key: str, flat: torch.Tensor, start: int, end: int, entry: Any,
                 replica_id: Any) -> dict[str, Any]:
    """ShardedTensors (key `key`) for elements [start, end) of the TP-local tensor described by the model's
    ShardedTensor `entry`, by block number; `flat` holds exactly those elements. The data are views of `flat`
    (loaded in place). A dict, not a list: dist_checkpointing merges the loaded values with rank 0's common
    state, and lists of different lengths on different ranks do not merge."""
    from megatron.core.dist_checkpointing import ShardedTensor

    if entry.prepend_axis_num:
        raise NotImplementedError(f"{entry.key}: prepended axes are not supported")
    if flat.numel() != end - start:
        raise ValueError(f"{key}: {flat.numel()} values for the range [{start}, {end})")
    shards = {}
    for number, block in enumerate(flat_range_blocks(tuple(entry.local_shape), start, end)):
        data = flat[block.start - start:block.end - start].view(block.shape)
        offset = tuple(g + o for g, o in zip(entry.global_offset, block.offset, strict=True))
        shards[str(number)] = ShardedTensor(key, data, data.dtype, block.shape, tuple(entry.global_shape), offset,
                                            None, replica_id)
    return shards


def joined(pieces: dict[str, torch.Tensor]) -> torch.Tensor:
    """The flat range that `range_shards` split into blocks, from the loaded blocks."""
    ordered = [pieces[str(i)].reshape(-1) for i in range(len(pieces))]
    return torch.cat(ordered) if len(ordered) > 1 else ordered[0]


def replica_without_dp(replica_id: Any) -> Any:
    """The model entry's replica id with the DP coordinate 0: DP ranks own disjoint ranges, TP peers of a
    replicated parameter own the same one."""
    return (*replica_id[:-1], 0) if isinstance(replica_id, tuple) else replica_id


def _entries_by_param(model_sharded_state_dict: dict[str, Any]) -> dict[int, Any]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {id(entry.data): entry for entry in nested_values(model_sharded_state_dict) if hasattr(entry, "data")}


def _only_leaf(optimizer: Any) -> Any:
    from megatron_video.optim.adaptive_optimizer import leaf_optimizers

    leaves = list(leaf_optimizers(optimizer.optimizer if hasattr(optimizer, "clipper") else optimizer))
    if len(leaves) != 1:
        raise NotImplementedError(f"checkpointing expects one optimizer, found {len(leaves)}")
    return leaves[0]


def is_distributed(leaf: Any) -> bool:
    return hasattr(leaf, "shard_fp32_groups")


def _owned_ranges(leaf: Any) -> list[tuple[torch.nn.Parameter, int, int]]:
    """(model param, start, end) of every parameter range this DP rank's optimizer steps."""
    out = []
    for buffer in leaf.buffers:
        for param in buffer.param_index_map:
            gbuf_index, dtype, bucket = leaf.model_param_gbuf_map.get(param, (None, None, None))
            if gbuf_index is None:
                continue
            ranges = leaf.gbuf_ranges[gbuf_index][dtype][bucket]["param_map"].get(param)
            if ranges is not None and ranges["param"].size > 0:
                out.append((param, ranges["param"].start, ranges["param"].end))
    return out


def _state_tensors(leaf: Any, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    tensors = leaf._get_main_param_and_optimizer_states(param)
    return {("fp32_param" if k == "param" else k): v for k, v in tensors.items() if k != "step"}


def optimizer_sharded_state(optimizer: Any, model_sharded_state_dict: dict[str, Any], loading: bool) -> Any:
    """The optimizer's checkpoint entries. Distributed optimizer: its param groups (plain values, saved once) and
    every rank's own ranges of the main params and Adam moments (see module docstring). Otherwise megatron's own
    sharded state dict (each rank holds the whole TP-local state; replicas are written once)."""
    leaf = _only_leaf(optimizer)
    if not is_distributed(leaf):
        return leaf.sharded_state_dict(model_sharded_state_dict, is_loading=loading)
    if loading:  # allocate the state, as megatron does, so the checkpoint loads into it
        leaf.load_state_dict(leaf.state_dict())
    state = leaf.state_dict()
    entries = _entries_by_param(model_sharded_state_dict)
    param_state: dict[str, dict[str, dict[str, Any]]] = {}
    for param, start, end in _owned_ranges(leaf):
        entry = entries.get(id(param))
        if entry is None:
            raise KeyError("a parameter of the optimizer is not in the model's sharded state dict")
        replica = replica_without_dp(entry.replica_id)
        param_state[entry.key] = {
            name: range_shards(f"optimizer.state.{name}.{entry.key}", tensor.detach().view(-1), start, end,
                               entry, replica)
            for name, tensor in _state_tensors(leaf, param).items()
        }
    state["param_state"] = param_state
    state["param_state_sharding_type"] = SHARDING_TYPE
    return state


@torch.no_grad()
def load_optimizer_state(optimizer: Any, loaded: dict[str, Any], model_sharded_state_dict: dict[str, Any]) -> None:
    """Apply a loaded `optimizer_sharded_state(..., loading=True)`."""
    leaf = _only_leaf(optimizer)
    if not is_distributed(leaf):
        leaf.load_state_dict(loaded)
        return
    state = dict(loaded)
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type", None)
    leaf.load_state_dict(state)  # param groups (and step), grad scaler; keeps the allocated tensors' values
    inner = leaf.optimizer.state
    for entry_state in inner.values():
        if "step" in entry_state:
            # megatron hands every parameter the same `step` tensor; torch's Adam increments it in place per
            # parameter, so a shared one would advance N times per step and skew the bias correction.
            entry_state["step"] = entry_state["step"].detach().clone()
    entries = _entries_by_param(model_sharded_state_dict)
    for param, _, _ in _owned_ranges(leaf):
        pieces = param_state[entries[id(param)].key]
        live = leaf._get_main_param_and_optimizer_states(param)
        source = {("param" if k == "fp32_param" else k): joined(v) for k, v in pieces.items()}
        if "step" in live:
            source["step"] = live["step"]
        leaf._set_main_param_and_optimizer_states(param, source)


def check_optimizer_kind(optimizer: Any) -> Any:
    """A `load_checkpoint(check_saved=...)` that refuses, before loading, a checkpoint whose optimizer state was
    saved by the other kind of optimizer (--use-distributed-optimizer switched): the two keep different
    per-group state (megatron fails with KeyError 'pre_wd_mult' or unexpected keys)."""
    from megatron_video.training.checkpointing import CheckpointError

    distributed = is_distributed(_only_leaf(optimizer))

    def check(directory: Any, common: dict[str, Any]) -> None:
        saved = common.get("optimizer")
        if not isinstance(saved, dict):
            return
        if ("param_state_sharding_type" in saved) != distributed:
            saved_with, run_with = ("without", "with") if distributed else ("with", "without")
            raise CheckpointError(
                f"{directory} was saved {saved_with} --use-distributed-optimizer and this run is "
                f"{run_with} it: the optimizer state cannot be carried over. Pass --no-load-optim to load "
                "the weights and training progress and start the optimizer (and EMA) afresh, or switch "
                "--use-distributed-optimizer back.")

    return check

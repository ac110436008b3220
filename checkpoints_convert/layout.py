"""Parallel layouts of the weights: which pipeline stage holds a released key, and one TP rank's slice.

Pipeline split: blocks are split into contiguous runs, as even as possible, earlier stages taking the extra
blocks (`default_pipeline_split`). The embeddings live on the first stage, the final layer on the last, and a
long-skip linear with the decoder block that owns it (our model puts it in that block).
Tensor split: the released rules (`tp_split_rule`): column tensors split on dim 0, row weights on dim 1, in
contiguous rank-ordered chunks (the 6·hidden modulation rows too, not aligned to the shift/scale/gate chunks).
"""

from __future__ import annotations

import re

import torch

from megatron_video.models.suv_mmdit.config import SUVConfig
from megatron_video.models.suv_mmdit.state_dict_adapter import from_released_key, tp_split_rule

_SPLIT_DIM = {"column": 0, "row": 1}


class LayoutError(ValueError):
    """A parallel layout that these weights cannot take."""


def default_pipeline_split(num_blocks: int, pp: int) -> list[int]:
    """Blocks per pipeline stage: the training stack's own default split (models/suv_mmdit/pipeline.py)."""
    from megatron_video.models.suv_mmdit.pipeline import split_blocks

    try:
        return [len(stage) for stage in split_blocks(num_blocks, pp)]
    except ValueError as exc:
        raise LayoutError(str(exc)) from exc


def stage_bounds(num_blocks: int, pp: int) -> list[tuple[int, int]]:
    """[first, last) global block indices of every pipeline stage."""
    bounds, start = [], 0
    for count in default_pipeline_split(num_blocks, pp):
        bounds.append((start, start + count))
        start += count
    return bounds


def block_of(released_key: str, cfg: SUVConfig) -> int | None:
    """Global block index owning a released key, or None for the embeddings (-> first stage) and the final
    layer (-> last stage); see `pipeline_stage`."""
    ours = from_released_key(released_key, cfg)
    match = re.match(r"^blocks\.(\d+)\.", ours)
    return int(match[1]) if match else None


def pipeline_stage(released_key: str, cfg: SUVConfig, pp: int) -> int:
    block = block_of(released_key, cfg)
    if block is None:
        return pp - 1 if from_released_key(released_key, cfg).startswith("final.") else 0
    for stage, (first, last) in enumerate(stage_bounds(cfg.num_blocks, pp)):
        if first <= block < last:
            return stage
    raise LayoutError(f"block {block} of {released_key} is outside the model")


def split_dim(released_key: str) -> int | None:
    return _SPLIT_DIM.get(tp_split_rule(released_key))


def check_tp(shapes: dict[str, tuple[int, ...] | None], tp: int) -> None:
    """Raise before any work if TP does not divide a dimension that the split rules cut."""
    if tp < 1:
        raise LayoutError(f"tensor-parallel size must be >= 1, got {tp}")
    bad = []
    for key, shape in shapes.items():
        dim = split_dim(key)
        if shape is not None and dim is not None and shape[dim] % tp:
            bad.append(f"{key} dim {dim} = {shape[dim]}")
    if bad:
        raise LayoutError(f"TP size {tp} does not divide {len(bad)} split dimension(s), e.g. {bad[:3]}")


def tp_slice(released_key: str, tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's contiguous chunk (a view; the whole tensor for replicated entries)."""
    dim = split_dim(released_key)
    if dim is None or tp == 1:
        return tensor
    return tensor.chunk(tp, dim=dim)[rank]


def tp_merge(released_key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `tp_slice` over all ranks; replicated tensors must be equal on every rank."""
    dim = split_dim(released_key)
    if dim is not None and len(shards) > 1:
        return torch.cat(shards, dim=dim)
    for rank, shard in enumerate(shards[1:], start=1):
        if not torch.equal(shards[0], shard):
            raise LayoutError(f"replicated tensor {released_key} differs between TP rank 0 and rank {rank}")
    return shards[0]


def tp_shard_shape(released_key: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    dim = split_dim(released_key)
    if dim is None:
        return shape
    return shape[:dim] + (shape[dim] // tp,) + shape[dim + 1:]


__all__ = ["LayoutError", "block_of", "check_tp", "default_pipeline_split", "pipeline_stage", "split_dim",
           "stage_bounds", "tp_merge", "tp_shard_shape", "tp_slice"]

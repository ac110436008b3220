"""Compute once per model replica, share with its peers.

`broadcast_tensors` sends tensors of any shape from one rank of a group (a small header of shapes and dtypes
goes first, so receivers need not know them). `FirstStageSource` picks the one rank of a model replica that
computes (the first rank of the first pipeline stage's tensor x context-parallel group) and hands the result to
every TP/CP peer of that stage and, for the tensors later stages read, through the pipeline group to the other
stages; later stages get the rest as zero-stride placeholders of the right shape and dtype (no memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.bool)
_MAX_DIMS = 8
_HEADER = 2 + _MAX_DIMS  # dtype code, ndim, dims


def placeholder(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros of `shape` that hold one element (a stand-in whose values nobody reads)."""
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def broadcast_tensors(tensors: Sequence[torch.Tensor] | None, count: int, group: dist.ProcessGroup | None,
                      src: int, device: torch.device | str, values: Sequence[bool] | None = None,
                      ) -> list[torch.Tensor]:
    """The `count` tensors of global rank `src` (the others pass None) on every rank of `group`.

    `values[i]` False sends only tensor i's shape and dtype: receivers get a `placeholder`. Bool tensors travel
    as uint8 (not every backend reduces or broadcasts bool)."""
    values = [True] * count if values is None else list(values)
    if len(values) != count:
        raise ValueError(f"values has {len(values)} entries for {count} tensors")
    is_src = dist.get_rank() == src
    if is_src and (tensors is None or len(tensors) != count):
        raise ValueError(f"rank {src} is the source and must pass {count} tensors")
    header = torch.zeros(count * _HEADER, dtype=torch.int64)
    if is_src:
        for i, t in enumerate(tensors):
            if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
                raise ValueError(f"cannot broadcast a {t.dim()}-d {t.dtype} tensor")
            header[i * _HEADER: i * _HEADER + 2 + t.dim()] = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape])
    header = header.to(device)
    dist.broadcast(header, src=src, group=group)
    rows = header.view(count, _HEADER).tolist()  # one host read for the whole header
    out = []
    for i, (code, ndim, *dims) in enumerate(rows):
        shape, dtype = dims[:ndim], _DTYPES[code]
        if not values[i]:
            out.append(tensors[i] if is_src else placeholder(shape, dtype, device))
            continue
        wire = torch.uint8 if dtype == torch.bool else dtype
        buf = (tensors[i].to(device).contiguous() if is_src else torch.empty(shape, dtype=dtype, device=device))
        dist.broadcast(buf.view(wire), src=src, group=group)
        out.append(buf)
    return out


class FirstStageSource:
    """The one rank of a model replica that computes inputs, and their hand-over to the rest of the replica.

    Ranks of a replica (same data-parallel rank) see the same micro-batches. Without megatron's parallel state
    (a single process) this rank is the source and nothing is sent."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device

    @staticmethod
    def _parallel() -> bool:
        from megatron.core import parallel_state as mpu

        return dist.is_initialized() and mpu.model_parallel_is_initialized()

    def is_source(self) -> bool:
        if not self._parallel():
            return True
        from megatron.core import parallel_state as mpu

        stage_source = dist.get_process_group_ranks(mpu.get_tensor_and_context_parallel_group())[0]
        return mpu.get_pipeline_model_parallel_rank() == 0 and dist.get_rank() == stage_source

    def share(self, tensors: Sequence[torch.Tensor] | None, count: int, later_stages: Sequence[bool],
              ) -> list[torch.Tensor]:
        """The source's `count` tensors on every rank of its replica (the others pass None). On pipeline stages
        after the first only tensors with `later_stages[i]` True carry values; the rest are placeholders."""
        if not self._parallel():
            return list(tensors)
        from megatron.core import parallel_state as mpu

        tp_cp = mpu.get_tensor_and_context_parallel_group()
        stage_source = dist.get_process_group_ranks(tp_cp)[0]
        first = mpu.get_pipeline_model_parallel_rank() == 0
        out = list(tensors) if tensors is not None else None
        if mpu.get_pipeline_model_parallel_world_size() > 1 and dist.get_rank() == stage_source:
            out = broadcast_tensors(out, count, mpu.get_pipeline_model_parallel_group(),
                                    mpu.get_pipeline_model_parallel_first_rank(), self.device, later_stages)
        if dist.get_world_size(tp_cp) > 1:
            out = broadcast_tensors(out if dist.get_rank() == stage_source else None, count, tp_cp, stage_source,
                                    self.device, None if first else later_stages)
        return out


__all__ = ["FirstStageSource", "broadcast_tensors", "placeholder"]

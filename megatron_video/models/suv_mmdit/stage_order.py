"""The video stream in stage order: one token order per skiparse stage, changed between stages, not per block.

Everything in a block except the attention is token-wise, so between blocks the video stream may sit in any
token order. Without context parallelism or Megatron-SP the model keeps it, through each stage of sparsity k,
in that stage's order (skiparse.py: the single- and the group-skip sub-sequences are both views of it), padded
to the stage's N_p (n rounded up to a multiple of k^2; pad rows start as zeros, are never valid keys and are
dropped at the end, so they change nothing), and moves it between two stages with one composed gather. RoPE
tables and key validity are moved into each order once per forward (`StageOrders`), not once per block. A long
skip moves from its encoder block's order into its decoder block's (no move when the paired stages have the
same k, as in the released U-shape). The stream and the pending long skips leave a pipeline stage in natural
order, so the carry and the final layer are unchanged.

Under context parallelism the stream already lives in per-block layouts (context_parallel.py), and under
Megatron-SP in TP shards of the natural order; both keep the per-block rearrangement inside the attention
(`skiparse.joint_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from megatron_video.models.suv_mmdit.config import AttentionMode, BlockSpec
from megatron_video.models.suv_mmdit.skiparse import pad_sequence, padded_length, stage_layout_valid, valid_or_all


@dataclass(frozen=True)
class StageOrder:
    """Token order of the video stream in a stage of sparsity k over n real tokens (k = 1: natural, unpadded)."""

    k: int
    n: int

    @property
    def n_pad(self) -> int:
        return padded_length(self.n, self.k)

    def token_ids(self) -> Tensor:
        """Padded token id held by each row (ids >= n are pads), on the host."""
        return _token_ids(self.k, self.n_pad)


@lru_cache(maxsize=64)
def _token_ids(k: int, n_pad: int) -> Tensor:
    ids = torch.arange(n_pad)
    if k == 1:
        return ids
    # token j = n k^2 + m k + u sits at row m (N_p / k) + n k + u
    return ids.reshape(n_pad // (k * k), k, k).transpose(0, 1).reshape(-1)


@lru_cache(maxsize=256)
def move_index(source: StageOrder, target: StageOrder, device: torch.device) -> Tensor | None:
    """For each row of `target`, the row of the `source` stream holding the same token, the source padded at its
    end with zero rows (new pads, in id order) up to the target's length; None when that is the identity prefix
    (a move that only adds or drops pads). Built once per pair of orders and device, then reused."""
    length = max(source.n_pad, target.n_pad)
    ids = torch.cat([source.token_ids(), torch.arange(source.n_pad, length)])
    index = torch.argsort(ids)[target.token_ids()]
    if torch.equal(index, torch.arange(target.n_pad)):
        return None
    return index.to(device)


def move(x: Tensor, source: StageOrder, target: StageOrder) -> Tensor:
    """A (rows, ...) stream in `source` order -> the same tokens in `target` order: one gather (or none)."""
    if source == target:
        return x
    if target.n_pad > source.n_pad:
        x = pad_sequence(x, target.n_pad)
    index = move_index(source, target, x.device)
    return x[:target.n_pad] if index is None else x.index_select(0, index)


class StageOrders:
    """One forward's per-order inputs: RoPE tables, key validity and a controller's features, each moved into an
    order on first use and reused by every later block in that order. Lives for one call of the block loop."""

    def __init__(self, batch: int, rope: tuple[Tensor, Tensor], video_valid: Tensor | None,
                 text_valid: Tensor | None) -> None:
        self.natural = StageOrder(1, rope[0].shape[0])
        self.batch, self.rope_natural = batch, rope
        self.video_valid, self.text_valid = video_valid, text_valid
        self._rope: dict[StageOrder, tuple[Tensor, Tensor]] = {}
        self._valid: dict[tuple[StageOrder, AttentionMode], Tensor] = {}
        self._rows: dict[StageOrder, Tensor] = {}

    def of(self, spec: BlockSpec) -> StageOrder:
        return StageOrder(spec.k, self.natural.n)

    def rope(self, order: StageOrder) -> tuple[Tensor, Tensor]:
        if order not in self._rope:
            cos, sin = (move(r, self.natural, order) for r in self.rope_natural)
            self._rope[order] = (cos, sin)
        return self._rope[order]

    def key_validity(self, order: StageOrder, mode: AttentionMode) -> Tensor | None:
        """Video key validity (k * B, N_p / k) of a `mode` block in `order`; None when no token is invalid and
        the order pads nothing (with a text validity of None, the kernel then runs without a mask)."""
        if self.video_valid is None and self.text_valid is None and order.n_pad == self.natural.n:
            return None
        if (order, mode) not in self._valid:
            device = self.rope_natural[0].device
            valid = valid_or_all(self.video_valid, self.batch, self.natural.n, device).t()
            self._valid[(order, mode)] = stage_layout_valid(move(valid, self.natural, order), order.k, mode)
        return self._valid[(order, mode)]

    def rows(self, features: Tensor, order: StageOrder) -> Tensor:
        """Natural-order (n, B, H) rows (a controller's features) in `order`."""
        if order not in self._rows:
            self._rows[order] = move(features, self.natural, order)
        return self._rows[order]


__all__ = ["StageOrder", "StageOrders", "move", "move_index"]

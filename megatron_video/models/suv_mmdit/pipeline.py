"""Pipeline parallelism for the U-shaped SUV model: stage split and the tensor that travels between stages.

Design (the long skips cross stages by travelling with the activations; the alternative, each skip pair on
one rank, is impossible with contiguous stages: encoder stage 0 pairs with the last decoder stage):
- The blocks are split into contiguous pipeline stages (`split_blocks`: even by default, or an explicit
  `--pipeline-layer-split`). The first stage owns the embeddings, the last the final layer; nothing is tied
  or replicated across stages, so every parameter lives on exactly one PP rank under its global name.
- A stage boundary carries everything the later blocks need that the later rank cannot derive itself: the
  video and text streams, every encoder-stage output still waiting for its decoder stage (the long-skip
  stack, bottom to top) and the conditioning vector `temb`. megatron-core 0.16's p2p moves one
  `(rows, B, H)` tensor of `config.pipeline_dtype` per micro-batch, so these are packed along the sequence
  dim into one tensor (`CarryLayout`). Gradients come back through the same layout.
- `temb` is fp32 while the wire may be 16-bit: it is carried bit-exactly (each fp32 viewed as two 16-bit
  words), forward and backward, so PP changes no value.
- What a rank can derive itself is not sent: RoPE, key-validity masks and the bucket shape come from the
  micro-batch's metadata, which every PP rank of a replica reads (they see the same samples). The receive
  shape of a boundary is therefore known on both sides (`CarryLayout.for_batch`) before the schedule runs,
  for every global batch (buckets may change shape between global batches).
- Virtual stages (interleaved 1F1B): megatron 0.16 takes one p2p shape for all boundaries there, so every
  boundary's carry is padded to the largest number of pending skips (`PipelineStage.carry_slots`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_video.models.suv_mmdit.config import SUVConfig

# ------------------------------------------------------------------------------------------- stage split


def split_blocks(num_blocks: int, pp_size: int, layer_split: Sequence[int] | None = None) -> list[range]:
    """Contiguous block ranges, one per pipeline stage. Default: as even as possible, earlier stages taking
    the remainder (the last stage also holds the final layer)."""
    if pp_size < 1:
        raise ValueError(f"pipeline size must be >= 1, got {pp_size}")
    if layer_split is None:
        if pp_size > num_blocks:
            raise ValueError(f"pipeline size {pp_size} exceeds the number of blocks {num_blocks}")
        base, extra = divmod(num_blocks, pp_size)
        counts = [base + (1 if i < extra else 0) for i in range(pp_size)]
    else:
        counts = [int(n) for n in layer_split]
        if len(counts) != pp_size or min(counts) < 1:
            raise ValueError(f"pipeline layer split {list(layer_split)} must give {pp_size} positive block counts")
        if sum(counts) != num_blocks:
            raise ValueError(f"pipeline layer split {counts} sums to {sum(counts)}, the model has {num_blocks} blocks")
    ranges, start = [], 0
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges


@dataclass(frozen=True)
class PipelineStage:
    """One pipeline rank's part of the model."""

    rank: int
    size: int
    blocks: range  # global block indices
    carried_in: tuple[int, ...]  # blocks whose outputs arrive as pending long skips (stack bottom -> top)
    carried_out: tuple[int, ...]  # blocks whose outputs leave as pending long skips
    # skip slots of every boundary's wire tensor when all boundaries must carry one shape (interleaved 1F1B)
    carry_slots: int | None = None

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1


def whole_model(cfg: SUVConfig) -> PipelineStage:
    return PipelineStage(0, 1, range(cfg.num_blocks), (), ())


def pipeline_stages(cfg: SUVConfig, pp_size: int, layer_split: Sequence[int] | None = None) -> list[PipelineStage]:
    """The stages of `cfg` at pipeline size `pp_size`, with the long skips each boundary carries."""
    ranges = split_blocks(cfg.num_blocks, pp_size, layer_split)
    specs = cfg.block_specs()
    stack: list[int] = []
    pending_after: dict[int, tuple[int, ...]] = {}
    for spec in specs:  # simulate the skip stack of `SUVMMDiT.run_blocks`
        if spec.skip_in is not None:
            stack.pop()
        if spec.skip_out:
            stack.append(spec.index)
        pending_after[spec.index] = tuple(stack)
    stages = []
    for rank, blocks in enumerate(ranges):
        carried_in = pending_after[blocks.start - 1] if rank > 0 else ()
        carried_out = pending_after[blocks.stop - 1] if rank < pp_size - 1 else ()
        stages.append(PipelineStage(rank, pp_size, blocks, carried_in, carried_out))
    return stages


def stage_of(cfg: SUVConfig, pp_size: int, pp_rank: int, layer_split: Sequence[int] | None = None) -> PipelineStage:
    return pipeline_stages(cfg, pp_size, layer_split)[pp_rank]


def virtual_stages(cfg: SUVConfig, pp_size: int, pp_rank: int, vpp_size: int,
                   layer_split: Sequence[int] | None = None) -> list[PipelineStage]:
    """The model chunks of pipeline rank `pp_rank` under interleaved 1F1B with `vpp_size` virtual stages per
    rank: the blocks are split into pp * vpp contiguous virtual stages (`layer_split` has that many entries)
    and rank r holds virtual stages r, r + pp, r + 2 pp, ... (megatron's order)."""
    if vpp_size < 1:
        raise ValueError(f"virtual pipeline size must be >= 1, got {vpp_size}")
    stages = pipeline_stages(cfg, pp_size * vpp_size, layer_split)
    if vpp_size > 1:  # megatron's interleaved schedule sends one shape over every boundary
        slots = max(len(s.carried_out) for s in stages)
        stages = [dataclasses.replace(s, carry_slots=slots) for s in stages]
    return [stages[j * pp_size + pp_rank] for j in range(vpp_size)]


def crossing_skips(cfg: SUVConfig, pp_size: int, layer_split: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(producer block, consumer block) of every long skip whose ends sit on different pipeline ranks."""
    stages = pipeline_stages(cfg, pp_size, layer_split)
    owner = {b: s.rank for s in stages for b in s.blocks}
    stack: list[int] = []
    pairs = []
    for spec in cfg.block_specs():
        if spec.skip_in is not None:
            producer = stack.pop()
            if owner[producer] != owner[spec.index]:
                pairs.append((producer, spec.index))
        if spec.skip_out:
            stack.append(spec.index)
    return pairs


# ------------------------------------------------------------------------------------------ carry layout


@dataclass(frozen=True)
class CarryLayout:
    """Row layout of the tensor sent across one boundary: [x ; c ; (x_skip ; c_skip) per pending skip ;
    temb], each part a run of rows of shape (B, H). Rows are this rank's (sequence-parallel shard) rows."""

    video_rows: int
    text_rows: int
    num_skips: int
    batch: int
    hidden: int
    temb_dim: int
    wire_dtype: torch.dtype
    stream_dtype: torch.dtype
    slot_skips: int | None = None  # skip slots on the wire (>= num_skips; unused ones are zero rows at the end)
    control_rows: int = 0  # rows of a structure controller's features R after the skips (models/control)

    def __post_init__(self) -> None:
        if self.slot_skips is not None and self.slot_skips < self.num_skips:
            raise ValueError(f"{self.num_skips} pending long skips do not fit {self.slot_skips} wire slots")
        wire, stream = self.wire_dtype, self.stream_dtype
        if not (stream == wire or (wire == torch.float32 and stream.itemsize == 2)):
            raise ValueError(f"pipeline dtype {wire} cannot carry {stream} activations exactly; use the "
                             "params dtype (or fp32)")
        if wire.itemsize not in (2, 4) or not wire.is_floating_point:
            raise ValueError(f"pipeline dtype must be a 16- or 32-bit float, got {wire}")

    @classmethod
    def for_batch(cls, cfg: SUVConfig, boundary_skips: int, batch: int, latent_thw: tuple[int, int, int],
                  text_len: int, tp_size: int, sequence_parallel: bool, wire_dtype: torch.dtype,
                  stream_dtype: torch.dtype, slot_skips: int | None = None,
                  video_rows: int | None = None) -> CarryLayout:
        """The layout for a micro-batch of `batch` latents of (T, H, W) with `text_len` text tokens.
        `video_rows` overrides this rank's video-token count (context parallelism splits the video further)."""
        t, h, w = latent_thw
        n = t * (h // cfg.patch_size) * (w // cfg.patch_size)
        if sequence_parallel and tp_size > 1:  # padded to a multiple of TP, one shard per rank
            n, text_len = -(-n // tp_size), -(-text_len // tp_size)
        n = n if video_rows is None else video_rows
        return cls(n, text_len, boundary_skips, batch, cfg.hidden_size, cfg.timestep_embed_dim, wire_dtype,
                   stream_dtype, slot_skips)

    @property
    def temb_words(self) -> int:
        """Wire elements per sample for temb: bit-exact, two 16-bit words per fp32 value."""
        return self.temb_dim * (4 // self.wire_dtype.itemsize)

    @property
    def temb_rows(self) -> int:
        return -(-self.temb_words // self.hidden)

    @property
    def stream_rows(self) -> list[int]:
        control = [self.control_rows] if self.control_rows else []
        return [self.video_rows, self.text_rows] * (1 + self.num_skips) + control

    @property
    def pad_rows(self) -> int:
        unused = (self.slot_skips - self.num_skips) if self.slot_skips is not None else 0
        return unused * (self.video_rows + self.text_rows)

    @property
    def rows(self) -> int:
        return sum(self.stream_rows) + self.temb_rows + self.pad_rows

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.rows, self.batch, self.hidden)

    def nbytes(self) -> int:
        return self.rows * self.batch * self.hidden * self.wire_dtype.itemsize

    # fp32 temb <-> (temb_rows, B, H) wire rows
    def temb_to_wire(self, temb: Tensor) -> Tensor:
        b = temb.shape[0]
        words = temb.float().contiguous()
        if self.wire_dtype.itemsize == 2:
            words = words.view(self.wire_dtype)  # bit reinterpretation, (B, 2E)
        pad = self.temb_rows * self.hidden - self.temb_words
        words = torch.cat([words, words.new_zeros(b, pad)], dim=1) if pad else words
        return words.reshape(b, self.temb_rows, self.hidden).transpose(0, 1)

    def temb_from_wire(self, rows: Tensor) -> Tensor:
        b = rows.shape[1]
        words = rows.transpose(0, 1).reshape(b, -1)[:, : self.temb_words].clone(memory_format=torch.contiguous_format)
        return words.view(torch.float32) if self.wire_dtype.itemsize == 2 else words


class _Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: CarryLayout, *parts: Tensor) -> Tensor:  # type: ignore[override]
        ctx.layout = layout
        *streams, temb = parts
        ctx.stream_dtypes = [s.dtype for s in streams]
        out = torch.empty(layout.shape, dtype=layout.wire_dtype, device=temb.device)
        row = 0
        for part, n in zip(streams, layout.stream_rows):
            if tuple(part.shape) != (n, layout.batch, layout.hidden):
                raise ValueError(f"carried tensor of shape {tuple(part.shape)}, layout expects "
                                 f"{(n, layout.batch, layout.hidden)}")
            out[row:row + n] = part
            row += n
        out[row:row + layout.temb_rows] = layout.temb_to_wire(temb)
        out[row + layout.temb_rows:] = 0
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        layout: CarryLayout = ctx.layout
        grads, row = [], 0
        for n, dtype in zip(layout.stream_rows, ctx.stream_dtypes):
            grads.append(grad[row:row + n].to(dtype))
            row += n
        grads.append(layout.temb_from_wire(grad[row:row + layout.temb_rows]))
        return (None, *grads)


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: CarryLayout, packed: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        if tuple(packed.shape) != layout.shape:
            raise ValueError(f"received a pipeline tensor of shape {tuple(packed.shape)}, expected {layout.shape}")
        ctx.layout = layout
        parts, row = [], 0
        for n in layout.stream_rows:
            parts.append(packed[row:row + n].to(layout.stream_dtype, copy=True))
            row += n
        parts.append(layout.temb_from_wire(packed[row:row + layout.temb_rows]))
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):  # type: ignore[override]
        # One write per part into one buffer: the bit-encoded temb gradient is never summed with anything.
        layout: CarryLayout = ctx.layout
        out = torch.zeros(layout.shape, dtype=layout.wire_dtype, device=next(
            g.device for g in grads if g is not None))
        row = 0
        for n, g in zip(layout.stream_rows, grads[:-1]):
            if g is not None:
                out[row:row + n] = g
            row += n
        if grads[-1] is not None:
            out[row:row + layout.temb_rows] = layout.temb_to_wire(grads[-1])
        return None, out


def pack_carry(layout: CarryLayout, x: Tensor, c: Tensor, skips: Sequence[tuple[Tensor, Tensor]],
               temb: Tensor, control: Tensor | None = None) -> Tensor:
    """Streams, pending long skips (stack order), the controller's features (if the layout has rows for them)
    and temb -> one (rows, B, H) tensor for the next stage."""
    if len(skips) != layout.num_skips:
        raise ValueError(f"{len(skips)} pending long skips, the stage split expects {layout.num_skips}")
    if (control is not None) != bool(layout.control_rows):
        raise ValueError(f"controller features given: {control is not None}, layout has {layout.control_rows} rows")
    parts = [x, c] + [t for pair in skips for t in pair] + ([control] if control is not None else []) + [temb]
    return _Pack.apply(layout, *parts)


def unpack_controlled_carry(layout: CarryLayout, packed: Tensor,
                            ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]], Tensor, Tensor | None]:
    """Inverse of `pack_carry` on the receiving stage: (x, c, skips, temb, controller features or None);
    gradients flow back into `packed`."""
    parts = _Unpack.apply(layout, packed)
    streams, temb = list(parts[:-1]), parts[-1]
    control = streams.pop() if layout.control_rows else None
    skips = [(streams[i], streams[i + 1]) for i in range(2, len(streams), 2)]
    return streams[0], streams[1], skips, temb, control


def unpack_carry(layout: CarryLayout, packed: Tensor) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]], Tensor]:
    """Inverse of `pack_carry` for a carry without controller features."""
    if layout.control_rows:
        raise ValueError("this carry holds controller features: use unpack_controlled_carry")
    return unpack_controlled_carry(layout, packed)[:4]


__all__ = [
    "CarryLayout", "PipelineStage", "crossing_skips", "pack_carry", "pipeline_stages", "split_blocks", "stage_of",
    "unpack_carry", "unpack_controlled_carry", "virtual_stages", "whole_model",
]

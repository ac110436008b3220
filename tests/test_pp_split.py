"""Pipeline stage split of the SUV model and the packed carry tensor (single process, no process group)."""

from __future__ import annotations

import pytest
import torch

from megatron_video.models.suv_mmdit import suv_config
from megatron_video.models.suv_mmdit.pipeline import (
    CarryLayout,
    crossing_skips,
    pack_carry,
    pipeline_stages,
    split_blocks,
    unpack_carry,
    virtual_stages,
)


def test_split_blocks_even_explicit_and_errors() -> None:
    assert [len(r) for r in split_blocks(32, 4)] == [8, 8, 8, 8]
    assert [(r.start, r.stop) for r in split_blocks(10, 4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [(r.start, r.stop) for r in split_blocks(10, 2, [7, 3])] == [(0, 7), (7, 10)]
    with pytest.raises(ValueError, match="sums to 9"):
        split_blocks(10, 2, [6, 3])
    with pytest.raises(ValueError, match="2 positive"):
        split_blocks(10, 2, [10, 0])
    with pytest.raises(ValueError, match="exceeds"):
        split_blocks(3, 4)


def test_8p5b_stages_carry_the_pending_skips() -> None:
    """Encoder stages 0, 1, 2 end at blocks 1, 5, 11; decoder stages start at 20 (pops 11), 26 (5), 30 (1)."""
    cfg = suv_config("osp-v1.5-8.5b")
    stages = pipeline_stages(cfg, 4)
    assert [(s.blocks.start, s.blocks.stop) for s in stages] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert [s.carried_out for s in stages] == [(1, 5), (1, 5, 11), (1, 5), ()]
    assert [s.carried_in for s in stages] == [(), (1, 5), (1, 5, 11), (1, 5)]
    assert [s.first for s in stages] == [True, False, False, False]
    assert [s.last for s in stages] == [False, False, False, True]
    assert crossing_skips(cfg, 4) == [(11, 20), (5, 26), (1, 30)]
    # a split that keeps every skip pair on one rank carries nothing
    assert crossing_skips(cfg, 1) == [] and pipeline_stages(cfg, 2, [31, 1])[0].carried_out == ()


def _parts(layout: CarryLayout, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h = layout.batch, layout.hidden
    streams = [torch.randn(n, b, h, generator=g).to(layout.stream_dtype) for n in layout.stream_rows]
    temb = torch.randn(b, layout.temb_dim, generator=g) * 1e3  # fp32 values a 16-bit wire cannot hold
    return [s.requires_grad_() for s in streams], temb.requires_grad_()


@pytest.mark.parametrize("wire,stream", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                         (torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
def test_carry_roundtrip_is_bit_exact_both_ways(wire, stream) -> None:
    layout = CarryLayout(video_rows=5, text_rows=3, num_skips=2, batch=2, hidden=8, temb_dim=12,
                         wire_dtype=wire, stream_dtype=stream)
    streams, temb = _parts(layout)
    skips = [(streams[2], streams[3]), (streams[4], streams[5])]
    packed = pack_carry(layout, streams[0], streams[1], skips, temb)
    assert tuple(packed.shape) == layout.shape and packed.dtype == wire
    received = packed.detach().requires_grad_()  # what the next rank's schedule holds
    x, c, skips_in, temb_in = unpack_carry(layout, received)
    got = [x, c] + [t for pair in skips_in for t in pair]
    for a, b in zip(got, streams):
        assert a.dtype == stream and torch.equal(a, b)
    assert temb_in.dtype == torch.float32 and torch.equal(temb_in, temb)
    # gradients: fp32 temb gradient crosses back bit-exactly too
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(t.shape, generator=g).to(t.dtype) for t in got] + [torch.randn(temb.shape, generator=g)]
    torch.autograd.backward(got + [temb_in], upstream)
    packed.backward(received.grad)
    for s, u in zip(streams, upstream):
        assert torch.equal(s.grad, u)
    assert torch.equal(temb.grad, upstream[-1])


def test_carry_rejects_mismatches() -> None:
    with pytest.raises(ValueError, match="cannot carry"):
        CarryLayout(4, 2, 0, 1, 8, 4, wire_dtype=torch.bfloat16, stream_dtype=torch.float32)
    layout = CarryLayout(4, 2, 1, 1, 8, 4, wire_dtype=torch.float32, stream_dtype=torch.float32)
    x, c, temb = torch.zeros(4, 1, 8), torch.zeros(2, 1, 8), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="pending long skips"):
        pack_carry(layout, x, c, [], temb)
    with pytest.raises(ValueError, match="expected"):
        unpack_carry(layout, torch.zeros(3, 1, 8))


def test_layout_rows_follow_sequence_parallel_shards() -> None:
    cfg = suv_config("small")  # hidden 64, temb 32
    dense = CarryLayout.for_batch(cfg, 2, 2, (3, 6, 4), 7, 1, False, torch.bfloat16, torch.bfloat16)
    assert (dense.video_rows, dense.text_rows, dense.temb_rows) == (18, 7, 1)
    assert dense.rows == 3 * (18 + 7) + 1
    sp = CarryLayout.for_batch(cfg, 2, 2, (3, 6, 4), 7, 4, True, torch.bfloat16, torch.bfloat16)
    assert (sp.video_rows, sp.text_rows) == (5, 2)  # ceil(18 / 4), ceil(7 / 4)


def test_virtual_stages_interleave_and_share_one_wire_shape() -> None:
    """PP = 2 x 2 virtual stages of the small preset (blocks 3, 3, 2, 2): rank 0 holds virtual stages 0 and 2,
    rank 1 holds 1 and 3; every boundary's wire has the slots of the fullest one (2 skips)."""
    cfg = suv_config("small")
    rank0, rank1 = virtual_stages(cfg, 2, 0, 2), virtual_stages(cfg, 2, 1, 2)
    assert [(s.blocks.start, s.blocks.stop) for s in rank0] == [(0, 3), (6, 8)]
    assert [(s.blocks.start, s.blocks.stop) for s in rank1] == [(3, 6), (8, 10)]
    assert rank0[0].first and rank1[1].last and not rank0[1].first and not rank0[1].last
    assert {s.carry_slots for s in rank0 + rank1} == {2}
    assert virtual_stages(cfg, 2, 0, 1)[0].carry_slots is None  # plain 1F1B: exact shapes per boundary
    shapes = set()
    for stage in (rank0[0], rank1[0], rank0[1]):  # carries 1, 2, 1 skips
        layout = CarryLayout.for_batch(cfg, len(stage.carried_out), 2, (3, 6, 4), 7, 1, False, torch.float32,
                                       torch.float32, stage.carry_slots)
        shapes.add(layout.shape)
        streams, temb = _parts(layout)
        skips = [(streams[i], streams[i + 1]) for i in range(2, len(streams), 2)]
        packed = pack_carry(layout, streams[0], streams[1], skips, temb)
        assert packed[sum(layout.stream_rows) + layout.temb_rows:].abs().sum() == 0  # unused slots are zeros
        x, c, skips_in, temb_in = unpack_carry(layout, packed)
        assert torch.equal(x, streams[0]) and len(skips_in) == layout.num_skips and torch.equal(temb_in, temb)
    assert shapes == {(3 * 25 + 1, 2, 64)}

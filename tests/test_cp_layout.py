"""Context-parallel index logic without processes: token ownership per layout, layout-change all-to-alls
(simulated in one process), the per-block plan, argument validation and the planned traffic."""

from __future__ import annotations

import pytest
import torch

from megatron_video.models.suv_mmdit import suv_config
from megatron_video.models.suv_mmdit.context_parallel import validate_context_parallel
from megatron_video.models.suv_mmdit.cp_comm import planned_cp_traffic, summarize
from megatron_video.models.suv_mmdit.skiparse_layout import (
    CONTIGUOUS,
    Geometry,
    Layout,
    local_ids,
    plan_blocks,
    redistribution,
    slot_of,
    subsequence,
)

LAYOUTS = [CONTIGUOUS, Layout(2, "single"), Layout(2, "group"), Layout(4, "single"), Layout(4, "group")]
GEOMETRIES = [Geometry(2, 1, 16), Geometry(2, 2, 16), Geometry(4, 1, 16), Geometry(4, 2, 16)]


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_token_has_one_owner_and_slots_are_balanced(layout: Layout, geo: Geometry):
    n_pad = geo.padded_tokens(37)
    assert n_pad % (geo.period * geo.slots * geo.cp) == 0 and n_pad >= 37
    lists = [local_ids(layout, geo, n_pad, r) for r in range(geo.cp)]
    assert torch.equal(torch.sort(torch.cat(lists)).values, torch.arange(n_pad))
    chunk = n_pad // (geo.cp * geo.slots)
    for ids in lists:
        assert ids.numel() == n_pad // geo.cp
        # TP rank t holds the t-th chunk: exactly the tokens of slot t
        assert torch.equal(slot_of(ids, geo), torch.arange(geo.slots).repeat_interleave(chunk))


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ranks_hold_whole_subsequences_or_share_them_with_their_ulysses_group(layout: Layout, geo: Geometry):
    n_pad = geo.padded_tokens(50)
    k, p = layout.k, geo.cp
    size = n_pad // k  # tokens per sub-sequence
    subs = [subsequence(local_ids(layout, geo, n_pad, r), k, layout.mode) for r in range(p)]
    if k >= p:  # whole sub-sequences, k / P of them per rank
        for sub in subs:
            counts = torch.bincount(sub, minlength=k)
            assert sorted(counts.tolist()) == [0] * (k - k // p) + [size] * (k // p)
    else:  # sub-sequence s lives on the d = P / k consecutive ranks s*d .. s*d + d - 1
        d = p // k
        for r, sub in enumerate(subs):
            assert torch.all(sub == r // d)


def _simulate(a: Layout, b: Layout, geo: Geometry, n_pad: int) -> None:
    """Run the all-to-all of every (slot, rank) in one process on token ids and check what arrives."""
    chunk = n_pad // (geo.cp * geo.slots)
    for slot in range(geo.slots):
        plans = [redistribution(a, b, geo, n_pad, r, slot) for r in range(geo.cp)]
        outgoing = []
        for r, plan in enumerate(plans):
            mine = local_ids(a, geo, n_pad, r)[slot * chunk:(slot + 1) * chunk]
            outgoing.append(list(mine[plan.send_order].split(list(plan.send_counts))))
        for r, plan in enumerate(plans):
            received = torch.cat([outgoing[src][r] for src in range(geo.cp)])
            assert [outgoing[src][r].numel() for src in range(geo.cp)] == list(plan.recv_counts)
            expected = local_ids(b, geo, n_pad, r)[slot * chunk:(slot + 1) * chunk]
            assert torch.equal(received[plan.recv_index], expected)


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_layout_changes_deliver_every_token_to_its_new_place(geo: Geometry):
    n_pad = geo.padded_tokens(40)
    for a in LAYOUTS:
        for b in LAYOUTS:
            _simulate(a, b, geo, n_pad)


def test_plan_of_the_released_model():
    cfg = suv_config("osp-v1.5-8.5b")
    specs = cfg.block_specs()
    for cp in (2, 4, 8):
        plans = plan_blocks(cfg, cp, 1)
        for spec, plan in zip(specs, plans):
            if spec.k >= cp:  # local skiparse attention in the block's own pattern
                assert plan.layout == Layout(spec.k, spec.mode) and plan.ulysses == 1
            elif spec.k == 1:
                assert plan.layout == CONTIGUOUS and plan.ulysses == cp
        assert all(p.layout == CONTIGUOUS and p.ulysses == cp for p in plan_blocks(cfg, cp, 1, "ulysses"))
    eight = {spec.k: plan for spec, plan in zip(specs, plan_blocks(cfg, 8, 1))}
    assert eight[4].layout.k == 4 and eight[4].ulysses == 2  # k < P: Ulysses inside each sub-sequence
    assert eight[2].layout == CONTIGUOUS  # there plain Ulysses moves less than pairs of four ranks
    # long skips: decoder stage starts know the layout their paired encoder output is in
    first_decoder = next(p for s, p in zip(specs, plan_blocks(cfg, 2, 1)) if s.skip_in is not None)
    assert first_decoder.skip_layout == Layout(4, "group")


def test_impossible_settings_are_refused_with_a_reason():
    big, small = suv_config("osp-v1.5-8.5b"), suv_config("small")
    validate_context_parallel(big, 8, 1)
    validate_context_parallel(big, 2, 4)
    with pytest.raises(ValueError, match="heads"):
        validate_context_parallel(big, 8, 4)  # 6 heads per TP rank, Ulysses over 8 at k = 1
    with pytest.raises(ValueError, match="heads"):
        validate_context_parallel(small, 8, 1)  # 4 heads
    with pytest.raises(ValueError, match="heads"):
        validate_context_parallel(small, 3, 1)
    with pytest.raises(ValueError, match=">= 1"):
        validate_context_parallel(small, 0, 1)
    with pytest.raises(ValueError, match="strategy"):
        validate_context_parallel(small, 2, 1, strategy="ring")


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_skiparse_layout_moves_far_less_than_ulysses_at_121x576x1024(cp: int):
    cfg = suv_config("osp-v1.5-8.5b")
    grid = (16, 36, 64)
    totals = {s: summarize(planned_cp_traffic(cfg, cp, 1, False, grid, 1, 512, 2, s), cfg, cp)
              for s in ("ulysses", "skiparse")}
    ulysses, skiparse = totals["ulysses"], totals["skiparse"]
    assert skiparse["a2a_wire_k_ge_p"] <= 0.3 * ulysses["a2a_wire_k_ge_p"]
    assert skiparse["a2a_wire"] < ulysses["a2a_wire"]
    # Ulysses: 8 all-to-alls of the local q/k/v/out per block, each crossing (P - 1) / P
    blocks = cfg.num_blocks
    per = 36864 // cp * 3072 * 2
    assert ulysses["a2a_payload"] == 8 * blocks * per

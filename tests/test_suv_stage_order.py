"""The video stream kept in each skiparse stage's token order (stage_order.py) equals the per-block
rearrangement (`to_skiparse` / `from_skiparse` inside every attention): index maps, attention, and the whole model
forward + backward, with skiparse padding (N not a multiple of k^2) and invalid video and text tokens.

Tolerances: fp32 on CPU. Inside a single-skip sub-sequence the stage order lists the tokens in another order
than `to_skiparse`, so the kernel sums over keys in another order, and weight gradients sum over tokens in
another order: equal up to rounding (rtol 1e-5, atol 1e-6, as tests/test_attention_unmasked.py).
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.models.attention import attention
from megatron_video.models.suv_mmdit.skiparse import (
    from_subsequences,
    joint_attention,
    joint_attention_in_order,
    pad_sequence,
    padded_length,
    subsequences,
    to_skiparse,
)
from megatron_video.models.suv_mmdit.stage_order import StageOrder, StageOrders, move

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _ids(n: int, batch: int) -> torch.Tensor:
    """(n, B) float tensor whose entry is 1 + token id (pads added later are 0)."""
    return (torch.arange(n, dtype=torch.float32) + 1)[:, None].expand(n, batch).contiguous()


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("mode", ["single", "group"])
def test_stage_order_views_hold_the_skiparse_subsequences(k: int, mode: str) -> None:
    """Sub-sequence r of sample b in the stage order holds exactly the tokens of `to_skiparse`'s sub-sequence r
    (same order for group skip, reordered inside the sub-sequence for single skip); pads likewise."""
    n, batch = 2 * k * k + 3, 2
    natural = _ids(n, batch)
    order = StageOrder(k, n)
    in_order = move(natural, StageOrder(1, n), order)
    assert in_order.shape[0] == padded_length(n, k)
    laid = subsequences(in_order, k, mode)  # (N_p / k, k, B)
    reference = to_skiparse(pad_sequence(natural, order.n_pad), k, mode).reshape(laid.shape)
    if mode == "group":
        assert torch.equal(laid, reference)
    else:
        assert not torch.equal(laid, reference)  # same members, another order inside the sub-sequence
        assert torch.equal(laid.sort(dim=0).values, reference.sort(dim=0).values)
    assert torch.equal(from_subsequences(laid, mode), in_order)


@pytest.mark.parametrize("n", [18, 32])
def test_composed_moves_equal_moves_through_natural_order(n: int) -> None:
    """One gather between any two stage orders = back to natural order, then into the target; pad rows of a
    padded order are zero when created; moving back to natural order restores the stream exactly."""
    natural_order = StageOrder(1, n)
    orders = [natural_order, StageOrder(2, n), StageOrder(3, n), StageOrder(4, n)]
    x = _ids(n, 2)
    for a in orders:
        in_a = move(x, natural_order, a)
        expected_a = torch.where(a.token_ids() < n, a.token_ids() + 1.0, 0.0)
        assert torch.equal(in_a[:, 0], expected_a)
        for b in orders:
            composed = move(in_a, a, b)
            assert torch.equal(composed, move(move(in_a, a, natural_order), natural_order, b))
        assert torch.equal(move(in_a, a, natural_order), x)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("mode", ["single", "group"])
def test_attention_in_stage_order_equals_per_block_rearrangement(k: int, mode: str) -> None:
    """Stream moved into the stage order once, RoPE-free q/k/v and key validity from `StageOrders`: the same
    video (moved back) and text outputs as `joint_attention` with its per-call padding and rearrangement."""
    mode = "full" if k == 1 else mode
    g = torch.Generator().manual_seed(k)
    n, batch, text_len, heads, dim = 21, 2, 5, 2, 8
    video = [torch.randn(n, batch, heads, dim, generator=g) for _ in range(3)]
    text = [torch.randn(text_len, batch, heads, dim, generator=g) for _ in range(3)]
    video_valid = torch.rand(batch, n, generator=g) > 0.3
    text_valid = torch.ones(batch, text_len, dtype=torch.bool)
    text_valid[1, 3:] = False
    rope = (torch.zeros(n, dim), torch.zeros(n, dim))
    for valid in ((video_valid, text_valid), (None, None)):
        expected = joint_attention(*video, *text, *valid, k=k, mode=mode, scale=0.3, attn_fn=attention)
        orders = StageOrders(batch, rope, *valid)
        order = StageOrder(k, n)
        moved = [move(t, orders.natural, order) for t in video]
        out, out_text = joint_attention_in_order(*moved, *text, orders.key_validity(order, mode), valid[1],
                                                 k=k, mode=mode, scale=0.3, attn_fn=attention)
        assert out.shape[0] == order.n_pad
        torch.testing.assert_close(move(out, order, orders.natural), expected[0], **TOL)
        torch.testing.assert_close(out_text, expected[1], **TOL)


def _model_run(model, inputs: dict, stage_order: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.use_stage_order(stage_order)
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sparse_n", [(1, 2, 4, 2, 1), (2, 3, 4, 1, 2)])
def test_model_in_stage_order_equals_per_block_rearrangement(tp1, sparse_n: tuple[int, ...]) -> None:
    """Whole model, forward + backward: 18 video tokens (padded per stage to 20, 27 or 32), masked latents and
    text, long skips between stages of equal k and (second config) of different k (3 -> 1, 2 -> 2), an odd
    stage; with and without masks; parameters drawn non-trivially so that every block matters."""
    from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
    from megatron_video.models.suv_mmdit.config import megatron_config

    cfg = suv_config("small", sparse_n=sparse_n, num_layers=(2, 3, 2, 2, 2))
    torch.manual_seed(0)
    model = SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    assert model.stage_order  # the default without CP and Megatron-SP
    g = torch.Generator().manual_seed(1)
    b, t, h, w, text_len = 2, 3, 6, 4, 7
    mask = torch.ones(b, t, h, w)
    mask[1, 2:] = 0
    text_mask = torch.ones(b, 1, text_len)
    text_mask[0, 0, 5:] = 0
    inputs = {"hidden_states": torch.randn(b, cfg.in_channels, t, h, w, generator=g),
              "timestep": torch.tensor([250.0, 700.0]),
              "encoder_hidden_states": torch.randn(b, 1, text_len, cfg.caption_channels, generator=g),
              "pooled_projections": torch.randn(b, 1, cfg.pooled_projection_dim, generator=g),
              "attention_mask": mask, "encoder_attention_mask": text_mask}
    for masks in (True, False):
        batch = inputs if masks else {**inputs, "attention_mask": None, "encoder_attention_mask": None}
        new, old = _model_run(model, batch, True), _model_run(model, batch, False)
        torch.testing.assert_close(new[0], old[0], **TOL)
        assert new[1].keys() == old[1].keys() and len(new[1]) > 100
        for name in new[1]:
            torch.testing.assert_close(new[1][name], old[1][name], **TOL, msg=name)

"""The stand-in text encoder (data/cache_builder.py stub_encoders) tells captions apart as a model needs: by
their words and by the words' order. The MMDiT's text tokens carry no positional encoding, so word order has to
be in the states themselves; before the position vectors, "left to right" and "right to left" reached the
denoiser as the same set of states and it sampled both directions alike."""

from __future__ import annotations

import torch

from megatron_video.data.cache_builder import stub_encoders

FORWARD = "A red circle moves left to right across a black background."
BACKWARD = "A red circle moves right to left across a black background."


def _rows(hidden: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, ...]]:
    """The valid states as a sorted list: what an order-free reader (attention without positions) can see."""
    return sorted(tuple(row.tolist()) for row in hidden[mask])


def test_word_order_reaches_the_states_and_pooled_stays_order_free() -> None:
    _, text = stub_encoders()
    hidden, mask, pooled = text([FORWARD, BACKWARD])
    assert torch.equal(mask[0], mask[1]) and int(mask[0].sum()) == 12  # eleven words and the end token
    assert _rows(hidden[0], mask[0]) != _rows(hidden[1], mask[1])  # not a permutation of each other
    torch.testing.assert_close(pooled[0], pooled[1])  # the pooled vector is a bag of words
    assert not hidden[~mask].any()


def test_same_caption_same_states_case_and_punctuation_ignored() -> None:
    _, text = stub_encoders()
    first = text([FORWARD])
    again = stub_encoders()[1]([FORWARD.upper().replace(".", " !")])
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = text(["A blue circle moves left to right across a black background."])
    assert not torch.equal(first[0][0, 1], other[0][0, 1]) and torch.equal(first[0][0, 2], other[0][0, 2])
    hidden, mask, _ = text([""])
    assert int(mask.sum()) == 1 and hidden[0, 0].abs().sum() > 0  # the end token alone


def test_the_denoiser_sees_the_direction(tp1) -> None:
    """A denoiser with random weights predicts differently for the two directions (it predicted the same before)."""
    from megatron_video.models.suv_mmdit.config import suv_config
    from tests.test_suv_model import build

    cfg = suv_config("tiny", caption_channels=16, pooled_projection_dim=8)
    model = build(cfg).eval()
    hidden, mask, pooled = stub_encoders()[1]([FORWARD, BACKWARD])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 3, 4, 4, generator=g).expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        out = model(hidden_states=x, timestep=torch.full((2,), 900.0), encoder_hidden_states=hidden[:, None],
                    pooled_projections=pooled[:, None], attention_mask=torch.ones(2, 3, 4, 4, dtype=torch.bool),
                    encoder_attention_mask=mask[:, None])
    assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()

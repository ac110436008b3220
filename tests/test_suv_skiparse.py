"""Skiparse index math and skiparse joint attention against a brute-force dense reference."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_video.models.attention import attention
from megatron_video.models.suv_mmdit.skiparse import (
    average_text,
    from_skiparse,
    join_text,
    joint_attention,
    joint_attention_in_order,
    natural_subsequences,
    pad_sequence,
    padded_length,
    repeat_text,
    stage_layout_valid,
    to_skiparse,
)


def _group_of(j: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    return (j // k) % k if mode == "group" else j % k


@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["single", "group"])
def test_layout_follows_index_math(k: int, mode: str) -> None:
    n, batch = 2 * k * k, 3
    tokens = torch.arange(n)[:, None].expand(n, batch) * 10 + torch.arange(batch)  # value = 10 j + b
    laid = to_skiparse(tokens, k, mode)
    assert laid.shape == (n // k, k * batch)
    for r in range(k):
        for b in range(batch):
            column = laid[:, r * batch + b]  # sub-sequence r of sample b
            positions = column // 10
            assert torch.equal(column % 10, torch.full_like(column, b))
            assert torch.equal(_group_of(positions, k, mode), torch.full_like(positions, r))
            assert torch.all(positions[1:] > positions[:-1]), "tokens keep their order inside a group"
    assert torch.equal(from_skiparse(laid, k, mode), tokens)


def test_padding_and_text_helpers() -> None:
    assert [padded_length(n, 3) for n in (1, 9, 10, 27)] == [9, 9, 18, 27]
    x = torch.randn(5, 2, 3)
    padded = pad_sequence(x, 9)
    assert padded.shape == (9, 2, 3) and torch.equal(padded[:5], x) and not padded[5:].any()
    with pytest.raises(ValueError, match="not a multiple"):
        to_skiparse(x, 2, "single")
    with pytest.raises(ValueError, match="mode"):
        to_skiparse(padded[:8], 2, "strided")
    c = torch.randn(4, 2, 3)
    rep = repeat_text(c, 3)
    assert torch.equal(rep[:, 2 * 2 + 1], c[:, 1])  # batch index r * B + b
    torch.testing.assert_close(average_text(rep * 2, 3), c * 2)


def brute_force(qv, kv, vv, qt, kt, vt, video_valid, text_valid, k, mode, scale):
    """Dense attention over the unpadded [video ; text] with an explicit allowed-pairs mask, in float64."""
    n, batch = qv.shape[0], qv.shape[1]
    q = torch.cat([qv, qt]).double()
    key = torch.cat([kv, kt]).double()
    value = torch.cat([vv, vt]).double()
    groups = _group_of(torch.arange(n), k, mode)
    out_video = torch.zeros_like(qv, dtype=torch.float64)
    out_text = torch.zeros_like(qt, dtype=torch.float64)
    for b in range(batch):
        scores = torch.einsum("qhd,khd->hqk", q[:, b], key[:, b]) * scale
        key_ok = torch.cat([video_valid[b], text_valid[b]])
        for r in range(k):
            in_group = torch.cat([groups == r, torch.ones(qt.shape[0], dtype=torch.bool)])
            allowed = key_ok & in_group  # keys of sub-sequence r: its video tokens and all text
            probs = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1)
            out = torch.einsum("hqk,khd->qhd", probs, value[:, b])
            rows = groups == r
            out_video[rows, b] = out[:n][rows]
            out_text[:, b] += out[n:] / k
    return out_video, out_text


CASES = [(1, "full")] + [(k, mode) for k in (2, 3, 4, 8) for mode in ("single", "group")]


@pytest.mark.parametrize(("k", "mode"), CASES)
def test_skiparse_attention_equals_brute_force(k: int, mode: str) -> None:
    """k = 1 is plain dense joint attention; k > 1 both patterns, with skiparse and key padding."""
    g = torch.Generator().manual_seed(k)
    batch, heads, dim, text_len = 2, 2, 8, 5
    n = k * k + 3 if k > 1 else 7  # never a multiple of k^2
    qv, kv, vv = (torch.randn(n, batch, heads, dim, generator=g) for _ in range(3))
    qt, kt, vt = (torch.randn(text_len, batch, heads, dim, generator=g) for _ in range(3))
    video_valid = torch.ones(batch, n, dtype=torch.bool)
    video_valid[1, n - 4:] = False  # sample 1 has fewer valid video tokens
    video_valid[0, 1] = False
    text_valid = torch.ones(batch, text_len, dtype=torch.bool)
    text_valid[1, 3:] = False
    scale = dim ** -0.5
    out_video, out_text = joint_attention(
        qv, kv, vv, qt, kt, vt, video_valid, text_valid, k=k, mode=mode, scale=scale, attn_fn=attention,
    )
    ref_video, ref_text = brute_force(qv, kv, vv, qt, kt, vt, video_valid, text_valid, k, mode, scale)
    torch.testing.assert_close(out_video.double(), ref_video, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_text.double(), ref_text, rtol=1e-5, atol=1e-5)
    # Without text queries (last block) the video output is unchanged.
    video_only, none = joint_attention(
        qv, kv, vv, None, kt, vt, video_valid, text_valid, k=k, mode=mode, scale=scale, attn_fn=attention,
    )
    assert none is None
    torch.testing.assert_close(video_only, out_video)


def test_attention_never_sees_a_square_mask() -> None:
    """The kernel gets a per-key validity vector (B', S_k), not an S x S mask."""
    seen = []

    def recording_attention(q, k, v, key_valid, *, scale):
        seen.append(tuple(key_valid.shape))
        return attention(q, k, v, key_valid, scale=scale)

    n, batch, k = 20, 2, 4
    x = torch.randn(n, batch, 2, 8)
    t = torch.randn(3, batch, 2, 8)
    joint_attention(x, x, x, t, t, t, torch.ones(batch, n, dtype=torch.bool), torch.ones(batch, 3, dtype=torch.bool),
                    k=k, mode="group", scale=0.3, attn_fn=recording_attention)
    assert seen == [(k * batch, padded_length(n, k) // k + 3)]


@pytest.mark.parametrize("k, mode", [(1, "full"), (2, "single"), (3, "group"), (4, "single"), (4, "group")])
def test_joined_sub_sequences_follow_to_skiparse(k: int, mode: str) -> None:
    """`join_text` over `natural_subsequences` = [to_skiparse(video) ; repeat_text(text)], and its gradients
    (float64 gradcheck) are those of that reference, with and without text rows."""
    g = torch.Generator().manual_seed(k)
    n_p, batch, heads, dim, text_len = 2 * k * k, 2, 2, 3, 4
    video = torch.randn(n_p, batch, heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(text_len, batch, heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    layout = to_skiparse(video, k, mode) if k > 1 else video
    joined = join_text(natural_subsequences(video, k, mode), text)
    assert torch.equal(joined, torch.cat([layout, repeat_text(text, k)], dim=0))
    assert torch.equal(join_text(natural_subsequences(video, k, mode), None), layout)
    assert torch.autograd.gradcheck(lambda v, t: join_text(natural_subsequences(v, k, mode), t), (video, text))
    assert torch.autograd.gradcheck(lambda v: join_text(natural_subsequences(v, k, mode), None), (video,))


@pytest.mark.parametrize("k, mode", [(1, "full"), (2, "single"), (4, "group")])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_gets_batch_major_inputs(k: int, mode: str, masked: bool) -> None:
    """Both attention paths hand the kernel q/k/v whose (B', S, heads, d) transpose is contiguous, so
    flash-attn's varlen and the NPU's TND packing reshape them without a copy (models/attention.py)."""
    seen = []

    def recording_attention(q, key, value, key_valid, *, scale):
        seen.append([t.transpose(0, 1).is_contiguous() for t in (q, key, value)])
        return attention(q, key, value, key_valid, scale=scale)

    n, batch = 2 * k * k, 2
    x, t = torch.randn(n, batch, 2, 8), torch.randn(3, batch, 2, 8)
    video_valid = torch.ones(batch, n, dtype=torch.bool) if masked else None
    text_valid = torch.ones(batch, 3, dtype=torch.bool) if masked else None
    joint_attention(x, x, x, t, t, t, video_valid, text_valid, k=k, mode=mode, scale=0.3,
                    attn_fn=recording_attention)
    in_order_valid = stage_layout_valid(video_valid.t(), k, mode) if masked else None
    joint_attention_in_order(x, x, x, t, t, t, in_order_valid, text_valid, k=k, mode=mode, scale=0.3,
                             attn_fn=recording_attention)
    assert seen == [[True] * 3] * 2

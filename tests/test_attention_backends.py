"""The flash-attn varlen and torch_npu fusion-attention wrappers (models/attention.py), run against stand-ins
that honour the libraries' documented contracts, equal SDPA in the skiparse joint attention with text padding
and masked latents: outputs, and gradients of q, k, v (exactly zero for invalid keys).

Contracts the stand-ins check:
- flash-attention, flash_attn/flash_attn_interface.py `flash_attn_varlen_func(q, k, v, cu_seqlens_q,
  cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal)`: q/k/v (total, heads, d);
  cu_seqlens (batch + 1,) torch.int32 cumulative lengths indexing into q / k; max_seqlen_* a Python int no
  smaller than any sequence. Rows past cu_seqlens_k[-1] are never read; the stand-in's backward fills their
  gradient with NaN (the kernel allocates dk with empty_like and writes only the rows it reads).
- torch_npu (https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000850.html)
  `npu_fusion_attention(query, key, value, head_num, input_layout, ..., scale, keep_prob, actual_seq_qlen,
  actual_seq_kvlen)`: input_layout "TND" (total tokens, heads, d) needs actual_seq_qlen / actual_seq_kvlen,
  host int arrays of cumulative lengths whose last entry is the number of tokens; returns a tuple whose first
  element is the attention output (T, N, D).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_video.models import attention as attn
from megatron_video.models.suv_mmdit.skiparse import joint_attention
from megatron_video.training.host_sync import HostSyncCounter


class _NaNTailGrad(torch.autograd.Function):
    """Identity; the gradient of rows >= `used` is NaN (what an unread kernel gradient row may hold)."""

    @staticmethod
    def forward(ctx, x, used):
        ctx.used = used
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.used:] = float("nan")
        return grad, None


def _segments(q, k, v, cu_q, cu_k, scale):
    outs = []
    for b in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]
        scores = torch.einsum("qhd,khd->hqk", qs.float(), ks.float()) * scale
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs.float()).to(q.dtype))
    return torch.cat(outs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    for t in (q, k, v):
        assert t.dim() == 3
    for cu, rows, bound in ((cu_seqlens_q, q.shape[0], max_seqlen_q), (cu_seqlens_k, k.shape[0], max_seqlen_k)):
        assert cu.dtype == torch.int32 and cu.dim() == 1 and isinstance(bound, int)
        values = cu.tolist()
        assert values[0] == 0 and all(a <= b for a, b in zip(values, values[1:])) and values[-1] <= rows
        assert max(b - a for a, b in zip(values, values[1:])) <= bound
    assert dropout_p == 0.0 and not causal and len(cu_seqlens_q) == len(cu_seqlens_k)
    used = int(cu_seqlens_k[-1])
    k, v = _NaNTailGrad.apply(k, used), _NaNTailGrad.apply(v, used)
    return _segments(q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), softmax_scale)


def npu_fusion_attention(query, key, value, head_num, input_layout, *, scale=1.0, keep_prob=1.0,
                         actual_seq_qlen=None, actual_seq_kvlen=None, **unused):
    assert input_layout == "TND" and head_num == query.shape[1] and keep_prob == 1.0 and not unused
    for lens, tokens in ((actual_seq_qlen, query.shape[0]), (actual_seq_kvlen, key.shape[0])):
        assert isinstance(lens, list) and all(isinstance(x, int) for x in lens)
        assert all(a <= b for a, b in zip(lens, lens[1:])) and lens[-1] == tokens  # cumulative
    out = _segments(query, key, value, [0, *actual_seq_qlen], [0, *actual_seq_kvlen], scale)
    return out, None, None, None, 0, 0, 0


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    monkeypatch.setitem(sys.modules, "torch_npu",
                        types.SimpleNamespace(npu_fusion_attention=npu_fusion_attention))


def _inputs(n=18, text=5, b=2, heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(n, b, heads, d, generator=g, requires_grad=True) for _ in range(3)]
    qkv_text = [torch.randn(text, b, heads, d, generator=g, requires_grad=True) for _ in range(3)]
    video_valid = torch.ones(b, n, dtype=torch.bool)
    video_valid[1, n - 7:] = False  # masked latents
    text_valid = torch.ones(b, text, dtype=torch.bool)
    text_valid[0, 3:] = False  # caption padding
    return qkv, qkv_text, video_valid, text_valid


@pytest.mark.parametrize("backend", ["flash_varlen", "npu_fusion"])
@pytest.mark.parametrize(("k", "mode"), [(1, "single"), (2, "single"), (4, "group")])
def test_varlen_wrappers_equal_sdpa(stand_ins, backend, k, mode):
    wrapper = {"flash_varlen": attn._flash_varlen, "npu_fusion": attn._npu_fusion}[backend]
    results = []
    for kernel in (attn._sdpa, wrapper):
        qkv, qkv_text, video_valid, text_valid = _inputs()
        out, out_text = joint_attention(*qkv, *qkv_text, video_valid, text_valid, k=k, mode=mode, scale=0.3,
                                        attn_fn=lambda q, key, v, valid, scale, f=kernel: f(q, key, v, valid, scale))
        (out.square().sum() + out_text.square().sum()).backward()
        results.append((out, out_text, [t.grad for t in qkv + qkv_text]))
    (ref, ref_text, ref_grads), (got, got_text, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # fp32; only the summation order differs
    torch.testing.assert_close(got_text, ref_text, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    _, _, video_valid, text_valid = _inputs()
    for key_grad in (grads[1], grads[2]):  # invalid video keys: exactly zero
        assert (key_grad.permute(1, 0, 2, 3)[~video_valid] == 0).all()
    for key_grad in (grads[4], grads[5]):
        assert (key_grad.permute(1, 0, 2, 3)[~text_valid] == 0).all()


def test_flash_wrapper_reads_nothing_on_the_host(monkeypatch):
    """cu_seqlens, the packing and max_seqlen come without a device -> host read (a kernel stand-in that
    reads nothing itself)."""
    seen = {}

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        seen.update(cu_k=cu_k, max_k=max_k, k=k)
        return q.clone()

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=kernel))
    (q, k, v), _, video_valid, _ = _inputs()
    with HostSyncCounter() as syncs:
        attn._flash_varlen(q, k, v, video_valid, 0.3)
    assert syncs.total == 0, syncs.counts
    assert seen["cu_k"].tolist() == [0, 18, 29] and seen["max_k"] == 18
    # sample 1's valid keys follow sample 0's, in order
    torch.testing.assert_close(seen["k"][18:29], k[:11, 1])


def test_attention_dispatches_to_the_wrappers(stand_ins, monkeypatch):
    """`attention(..., backend=...)` reaches each wrapper once its capability check passes."""
    monkeypatch.setattr(attn, "select_backend", lambda device, dtype, requested=None: requested)
    (q, k, v), _, video_valid, _ = _inputs()
    expected = attn.attention(q, k, v, video_valid, scale=0.3, backend="sdpa")
    for name in ("flash_varlen", "npu_fusion"):
        got = attn.attention(q, k, v, video_valid, scale=0.3, backend=name)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

"""The attention function: backend selection on this machine and the key-packing used by the varlen kernels."""

from __future__ import annotations

import pytest
import torch

from megatron_video.models import attention as attn


def test_cpu_selects_sdpa_and_refuses_unavailable_backends() -> None:
    cpu = torch.device("cpu")
    assert attn.select_backend(cpu, torch.float32) == "sdpa"
    assert attn.select_backend(cpu, torch.bfloat16) == "sdpa"
    for name in ("flash_varlen", "npu_fusion"):
        with pytest.raises(RuntimeError, match="cannot run on cpu"):
            attn.select_backend(cpu, torch.bfloat16, name)
    with pytest.raises(ValueError, match="must be one of"):
        attn.select_backend(cpu, torch.float32, "xformers")


def test_sdpa_masks_keys_only() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 3, 8, generator=g) for _ in range(3))
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    out = attn.attention(q, k, v, valid, scale=0.25)
    for b in range(2):
        keep = valid[b]
        scores = torch.einsum("qhd,khd->hqk", q[:, b], k[keep, b]) * 0.25
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[keep, b])
        torch.testing.assert_close(out[:, b], ref)
    with pytest.raises(ValueError, match="key_valid must be"):
        attn.attention(q, k, v, valid[:, :5], scale=0.25)


def test_packed_keys_give_the_same_attention() -> None:
    """The varlen backends drop invalid keys by packing; per sample the packed keys reproduce SDPA."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 3, 2, 4, generator=g) for _ in range(3))
    valid = torch.rand(3, 5, generator=g) > 0.4
    valid[:, 0] = True
    k_packed, v_packed, cu, max_len = attn._pack_keys(k, v, valid)
    assert cu.tolist() == [0, *valid.sum(1).cumsum(0).tolist()] and max_len == int(valid.sum(1).max())
    expected = attn.attention(q, k, v, valid, scale=0.5)
    for b in range(3):
        kb, vb = k_packed[cu[b]:cu[b + 1]], v_packed[cu[b]:cu[b + 1]]
        out = attn.attention(q[:, b:b + 1], kb[:, None], vb[:, None], None, scale=0.5)
        torch.testing.assert_close(out[:, 0], expected[:, b])

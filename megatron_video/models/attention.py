"""The attention kernel behind one function, with the same semantics on every backend.

`attention(q, k, v, key_valid, scale=...)`: softmax(q k^T * scale) v per head, where key j of sample b takes
part only if `key_valid[b, j]`. Queries are never masked. Layout is sequence-first (S, B, heads, head_dim).

Backends (each optional package is imported lazily, behind a capability check):
- "sdpa": torch.nn.functional.scaled_dot_product_attention with a (B, 1, 1, S_k) boolean key mask that
  broadcasts over queries (no S_q x S_k mask is built). CPU and GPU.
- "flash_varlen": flash-attn's varlen kernel on CUDA in fp16/bf16; invalid keys are dropped by packing.
- "npu_fusion": torch_npu.npu_fusion_attention in the varlen (TND) layout on Ascend.

A sample must have at least one valid key per attention problem; the model guarantees it by requiring one
valid text token per sample.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash_varlen", "npu_fusion")


@cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def select_backend(device: torch.device, dtype: torch.dtype, requested: str | None = None) -> str:
    """The backend for tensors on `device` of `dtype`; `requested` forces one (error if it cannot run)."""
    half = dtype in (torch.float16, torch.bfloat16)
    usable = {
        "sdpa": device.type in ("cpu", "cuda"),
        "flash_varlen": device.type == "cuda" and half and _has_module("flash_attn"),
        "npu_fusion": device.type == "npu" and half and _has_module("torch_npu"),
    }
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}")
        if not usable[requested]:
            raise RuntimeError(f"attention backend {requested!r} cannot run on {device.type} with {dtype}")
        return requested
    for name in ("npu_fusion", "flash_varlen", "sdpa"):
        if usable[name]:
            return name
    raise RuntimeError(f"no attention backend for device {device.type!r} and dtype {dtype}")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, *,
    scale: float, backend: str | None = None,
) -> torch.Tensor:
    """q: (S_q, B, h, d), k/v: (S_k, B, h, d), key_valid: (B, S_k) bool or None -> (S_q, B, h, d)."""
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_valid is not None and tuple(key_valid.shape) != (k.shape[1], k.shape[0]):
        raise ValueError(f"key_valid must be (B, S_k) = {(k.shape[1], k.shape[0])}, got {tuple(key_valid.shape)}")
    name = select_backend(q.device, q.dtype, backend)
    if name == "sdpa":
        return _sdpa(q, k, v, key_valid, scale)
    if name == "flash_varlen":
        return _flash_varlen(q, k, v, key_valid, scale)
    return _npu_fusion(q, k, v, key_valid, scale)


def _sdpa(q, k, v, key_valid, scale):
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (B, h, S, d)
    mask = key_valid[:, None, None, :] if key_valid is not None else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.permute(2, 0, 1, 3)


def _pack_keys(k, v, key_valid):
    """Drop invalid keys: (S_k, B, h, d) -> (total_valid, h, d) plus int32 cumulative lengths (B + 1)."""
    b, s_k = k.shape[1], k.shape[0]
    if key_valid is None:
        key_valid = torch.ones(b, s_k, dtype=torch.bool, device=k.device)
    keep = key_valid.reshape(-1)
    k_packed = k.transpose(0, 1).reshape(b * s_k, *k.shape[2:])[keep]
    v_packed = v.transpose(0, 1).reshape(b * s_k, *v.shape[2:])[keep]
    lengths = key_valid.sum(dim=1, dtype=torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return k_packed, v_packed, cu, int(lengths.max())


def _flash_varlen(q, k, v, key_valid, scale):
    flash_attn = importlib.import_module("flash_attn")
    s_q, b = q.shape[0], q.shape[1]
    q_packed = q.transpose(0, 1).reshape(b * s_q, *q.shape[2:])
    cu_q = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32, device=q.device)
    k_packed, v_packed, cu_k, max_k = _pack_keys(k, v, key_valid)
    out = flash_attn.flash_attn_varlen_func(
        q_packed, k_packed, v_packed, cu_q, cu_k, s_q, max_k, dropout_p=0.0, softmax_scale=scale, causal=False,
    )
    return out.reshape(b, s_q, *q.shape[2:]).transpose(0, 1)


def _npu_fusion(q, k, v, key_valid, scale):
    torch_npu = importlib.import_module("torch_npu")
    s_q, b, heads = q.shape[0], q.shape[1], q.shape[2]
    q_packed = q.transpose(0, 1).reshape(b * s_q, *q.shape[2:])
    k_packed, v_packed, cu_k, _ = _pack_keys(k, v, key_valid)
    out = torch_npu.npu_fusion_attention(
        q_packed, k_packed, v_packed, heads, input_layout="TND", scale=scale, keep_prob=1.0,
        actual_seq_qlen=[s_q * (i + 1) for i in range(b)], actual_seq_kvlen=cu_k[1:].tolist(),
    )[0]
    return out.reshape(b, s_q, *q.shape[2:]).transpose(0, 1)


__all__ = ["BACKENDS", "attention", "select_backend"]

"""The attention kernel behind one function, with the same semantics on every backend.

`attention(q, k, v, key_valid, scale=...)`: softmax(q k^T * scale) v per head, where key j of sample b takes
part only if `key_valid[b, j]`. Queries are never masked. Layout is sequence-first (S, B, heads, head_dim).

Backends (each optional package is imported lazily, behind a capability check):
- "sdpa": torch.nn.functional.scaled_dot_product_attention with a (B, 1, 1, S_k) boolean key mask that
  broadcasts over queries (no S_q x S_k mask is built). CPU and GPU.
- "flash_varlen": flash-attn's varlen kernel on CUDA in fp16/bf16; invalid keys are dropped by packing.
- "npu_fusion": torch_npu.npu_fusion_attention in the varlen (TND) layout on Ascend.

`key_valid=None` means every key is valid (nothing padded, known on the host): no mask is built or passed, so
SDPA may pick its flash kernel and flash-attn runs its dense (non-varlen) path.

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
    """Valid keys first, sample after sample, without reading anything on the host:
    (S_k, B, h, d) -> (B * S_k, h, d) packed k and v, int32 cumulative valid lengths (B + 1), and the longest
    sample's valid length as a 0-d device tensor (the kernels get the static bound S_k instead; reading it
    would synchronise).

    A stable sort of the flattened keys by (invalid, sample) gathers each sample's valid keys in order, then every
    invalid key after the last sample, where the kernels never look (they read rows cu[b]:cu[b+1] only). Those
    tail rows are zeroed with `where`, whose backward gives them an exact zero gradient whatever the kernel
    leaves in its gradient rows past cu[-1]."""
    s_k, b = k.shape[0], k.shape[1]
    flat_k = k.transpose(0, 1).reshape(b * s_k, *k.shape[2:])
    flat_v = v.transpose(0, 1).reshape(b * s_k, *v.shape[2:])
    if key_valid is None:
        cu = torch.arange(0, (b + 1) * s_k, s_k, dtype=torch.int32, device=k.device)
        return flat_k, flat_v, cu, torch.tensor(s_k, device=k.device)
    keep = key_valid.reshape(-1)
    sample = torch.arange(b, device=k.device).repeat_interleave(s_k)
    order = torch.sort(torch.where(keep, sample, b), stable=True).indices
    kept = keep.index_select(0, order)[:, None, None]
    k_packed = torch.where(kept, flat_k.index_select(0, order), 0)
    v_packed = torch.where(kept, flat_v.index_select(0, order), 0)
    lengths = key_valid.sum(dim=1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return k_packed, v_packed, cu, lengths.max()


def _flash_varlen(q, k, v, key_valid, scale):
    """flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...): q/k/v
    (total, heads, d), int32 cumulative lengths (B + 1); max_seqlen_* only bound the kernel grid, so the static
    S_q / S_k serve without a host read (flash-attention flash_attn/flash_attn_interface.py). With every key
    valid (`key_valid` None) the dense flash_attn_func(q, k, v, dropout_p, softmax_scale, causal) on
    (B, S, heads, d) runs instead: no packing, no cumulative lengths (same interface file)."""
    flash_attn = importlib.import_module("flash_attn")
    if key_valid is None:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (B, S, h, d)
        out = flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False)
        return out.transpose(0, 1)
    s_q, b = q.shape[0], q.shape[1]
    q_packed = q.transpose(0, 1).reshape(b * s_q, *q.shape[2:])
    cu_q = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32, device=q.device)
    k_packed, v_packed, cu_k, _ = _pack_keys(k, v, key_valid)
    out = flash_attn.flash_attn_varlen_func(
        q_packed, k_packed, v_packed, cu_q, cu_k, s_q, k.shape[0], dropout_p=0.0, softmax_scale=scale, causal=False,
    )
    return out.reshape(b, s_q, *q.shape[2:]).transpose(0, 1)


def _npu_fusion(q, k, v, key_valid, scale):
    """torch_npu.npu_fusion_attention in the TND layout: q/k/v (total, heads, d); actual_seq_qlen and
    actual_seq_kvlen are host lists of *cumulative* lengths (one per sample, the last = total). The key list
    needs one host read per call when some keys are invalid; with every key valid both lists are static."""
    torch_npu = importlib.import_module("torch_npu")
    s_q, b, heads = q.shape[0], q.shape[1], q.shape[2]
    q_packed = q.transpose(0, 1).reshape(b * s_q, *q.shape[2:])
    k_packed, v_packed, cu_k, _ = _pack_keys(k, v, key_valid)
    kv_lens = [k.shape[0] * (i + 1) for i in range(b)] if key_valid is None else cu_k[1:].tolist()
    if key_valid is not None:  # TND: the packed key tensor holds exactly the valid keys
        k_packed, v_packed = k_packed[:kv_lens[-1]], v_packed[:kv_lens[-1]]
    out = torch_npu.npu_fusion_attention(
        q_packed, k_packed, v_packed, heads, input_layout="TND", scale=scale, keep_prob=1.0,
        actual_seq_qlen=[s_q * (i + 1) for i in range(b)], actual_seq_kvlen=kv_lens,
    )[0]
    return out.reshape(b, s_q, *q.shape[2:]).transpose(0, 1)


__all__ = ["BACKENDS", "attention", "select_backend"]

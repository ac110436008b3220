"""The SUV block's elementwise regions, in the compute dtype, eager or compiled (`--compile`).

Every region works on the stream dtype (bf16 in training) without fp32 copies of the activations:
- LayerNorm and the per-head RMSNorm are torch's kernels, which accumulate the statistics in fp32 and round
  once (on CPU the result is bit-identical to upcasting first, tests/test_suv_elementwise.py);
- GELU-tanh likewise (the kernel computes in fp32 and rounds once);
- modulation x * (1 + scale) + shift, the gated residual x + gate * branch and RoPE u * cos + rot(u) * sin use
  `addcmul` (one kernel, fp32 arithmetic inside, one rounding) after rounding the per-sample (B, H) vectors
  and cos/sin to the stream dtype: at most about one extra bf16 rounding of the result.
What stays fp32: temb and the modulation vectors (silu, the Linear with its fp32 weight copy, + bias) as the
released run computed them (tiny (B, n*H) tensors; 1 + scale and the gates scale every token), the timestep
sinusoid, the norms' statistics (inside the kernels), the attention softmax (inside the kernels) and the loss.

`block_elementwise(backend)` returns the same functions wrapped in `torch.compile` (one fused kernel per region
under inductor, intermediates kept in fp32 registers); the functions take tensors only (no module), so every
block shares one compiled graph per shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_video.models.suv_mmdit.rope import apply_rope


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """normed * (1 + scale) + shift over (S, B, H) with per-sample (B, H) vectors, in normed's dtype."""
    return torch.addcmul(shift[None].to(normed.dtype), normed, (1 + scale[None]).to(normed.dtype))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + gate * branch in x's dtype."""
    return torch.addcmul(x, gate[None].to(x.dtype), branch.to(x.dtype))


def norm_modulate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, shift: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """modulate(LayerNorm(x)): the adaLN input of an attention or FFN half."""
    normed = F.layer_norm(x, weight.shape, weight.to(x.dtype), bias.to(x.dtype), eps)
    return modulate(normed, shift, scale)


def rms_norm_rope(u: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor | None,
                  sin: torch.Tensor | None) -> torch.Tensor:
    """Per-head RMSNorm of q or k (N, B, heads, head_dim), then RoPE if `cos`/`sin` are given (video)."""
    normed = F.rms_norm(u, weight.shape, weight.to(u.dtype), eps)
    return normed if cos is None else apply_rope(normed, cos, sin)


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


@dataclass(frozen=True)
class BlockElementwise:
    norm_modulate: Callable[..., torch.Tensor] = norm_modulate
    rms_norm_rope: Callable[..., torch.Tensor] = rms_norm_rope
    gated_residual: Callable[..., torch.Tensor] = gated_residual
    gelu: Callable[..., torch.Tensor] = gelu_tanh


EAGER = BlockElementwise()


@functools.cache
def block_elementwise(backend: str | None = None) -> BlockElementwise:
    """The block's elementwise functions: eager (None) or compiled with the torch.compile `backend`
    ("inductor" for fused kernels; "aot_eager" captures the same graphs and autograd without code generation)."""
    if backend is None:
        return EAGER
    compiled = functools.partial(torch.compile, backend=backend, dynamic=None)
    return BlockElementwise(*(compiled(fn) for fn in (norm_modulate, rms_norm_rope, gated_residual, gelu_tanh)))


__all__ = ["EAGER", "BlockElementwise", "block_elementwise", "gated_residual", "gelu_tanh", "modulate",
           "norm_modulate", "rms_norm_rope"]

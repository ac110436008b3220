"""3D rotary position embedding of the video tokens (forward spec section 5).

Each head vector is split into (t, h, w) blocks of 4/16, 6/16 and 6/16 of head_dim (32:48:48 at 128). Inside a
block of size D, dim j pairs with dim j + D/2 (rotate-half) at frequency base^(-2j/D), and the position is the
integer grid index of the token along that axis. Angles in float64, cos/sin in the requested dtype; applied
before the skiparse layout so every token keeps its true position.
"""

from __future__ import annotations

import functools

import torch


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    unit = head_dim // 16
    return 4 * unit, 6 * unit, 6 * unit


def rope_cos_sin(
    grid: tuple[int, int, int], head_dim: int, base: float, device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (N, head_dim) in `dtype` (angles in float64), for tokens flattened in (t, h, w) order.
    Built once per (grid, head_dim, base, device, dtype) and shared: treat the tensors as read-only."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    return _rope_cos_sin(tuple(grid), head_dim, float(base), device, dtype)


@functools.lru_cache(maxsize=64)
def _rope_cos_sin(grid: tuple[int, int, int], head_dim: int, base: float, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):  # a first call under inference mode must not cache inference tensors
        return _build(grid, head_dim, base, device, dtype)


def _build(grid: tuple[int, int, int], head_dim: int, base: float, device: torch.device,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    t, h, w = grid
    axes = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij",
    )
    angles = []
    for pos, size in zip(axes, rope_sections(head_dim)):
        freqs = base ** (-torch.arange(0, size, 2, device=device, dtype=torch.float64) / size)
        ang = pos.reshape(-1, 1).to(torch.float64) * freqs  # (N, size/2)
        angles.append(torch.cat([ang, ang], dim=-1))
    angle = torch.cat(angles, dim=-1)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _rotate_half_blocks(u: torch.Tensor, sections: tuple[int, ...]) -> torch.Tensor:
    out = []
    for block in u.split(list(sections), dim=-1):
        first, second = block.chunk(2, dim=-1)
        out += [-second, first]
    return torch.cat(out, dim=-1)


def apply_rope(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate u (N, B, heads, head_dim) by positions (N, head_dim) in u's dtype: u * cos + rot(u) * sin with one
    rounding of the sum (addcmul); build cos/sin in that dtype (`rope_cos_sin(dtype=...)`) to avoid a cast."""
    cos, sin = cos[:, None, None, :].to(u.dtype), sin[:, None, None, :].to(u.dtype)
    return torch.addcmul(u * cos, _rotate_half_blocks(u, rope_sections(u.shape[-1])), sin)


__all__ = ["apply_rope", "rope_cos_sin", "rope_sections"]

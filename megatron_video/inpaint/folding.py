"""Frame keep-masks at latent resolution, without the VAE.

The WF-VAE compresses time causally by s = 8: T = s*n + 1 frames give T' = n + 1 latent frames; latent frame 0
encodes frame 0 alone and latent frame j >= 1 encodes frames s*(j-1)+1 .. s*j. The mask is folded the same way:
frame 0's value is repeated s - 1 times in front, giving s*(n+1) values, which are cut into T' groups of s and
laid on the channel axis:

    folded[:, c, 0]  = keep[0]               for every c   (the first frame fills latent frame 0's s channels)
    folded[:, c, j]  = keep[s*(j-1) + 1 + c]  for j >= 1   (channel c = c-th frame of the group, in time order)

Spatially the mask is broadcast to the latent grid (H/8, W/8); a per-pixel mask (B, T, H, W) is averaged over
each 8x8 cell (the channel then holds the kept fraction of the cell).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TIME_STRIDE = 8  # WF-VAE temporal compression
SPACE_STRIDE = 8  # WF-VAE spatial compression


def latent_frames(num_frames: int, stride: int = TIME_STRIDE) -> int:
    if num_frames < 1 or (num_frames - 1) % stride:
        raise ValueError(f"frame count must be {stride}n+1, got {num_frames}")
    return (num_frames - 1) // stride + 1


def _grouped(keep: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, T, ...) -> (B, T', stride, ...): frame 0 repeated stride - 1 times in front, then cut into groups."""
    latent_frames(keep.shape[1], stride)
    padded = torch.cat([keep[:, :1].expand(-1, stride - 1, *keep.shape[2:]), keep], dim=1)
    return padded.reshape(keep.shape[0], -1, stride, *keep.shape[2:])


def fold_mask(keep: torch.Tensor, latent_hw: tuple[int, int], stride: int = TIME_STRIDE) -> torch.Tensor:
    """Keep-mask (B, T) or (B, T, H, W) -> folded float mask (B, stride, T', H', W') on the latent grid."""
    if keep.dim() not in (2, 4):
        raise ValueError(f"keep-mask must be (B, T) or (B, T, H, W), got {tuple(keep.shape)}")
    h, w = latent_hw
    keep = keep.float()
    if keep.dim() == 4:
        b, t = keep.shape[:2]
        keep = F.adaptive_avg_pool2d(keep.reshape(b * t, 1, *keep.shape[2:]), (h, w)).reshape(b, t, h, w)
        return _grouped(keep, stride).transpose(1, 2).contiguous()
    folded = _grouped(keep, stride).transpose(1, 2)  # (B, stride, T')
    return folded[..., None, None].expand(-1, -1, -1, h, w).contiguous()


def latent_keep(keep: torch.Tensor, stride: int = TIME_STRIDE) -> torch.Tensor:
    """Frame keep-mask (B, T) -> (B, T') bool: a latent frame is kept when all of its frames are kept."""
    return _grouped(keep.bool(), stride).all(dim=2)


def frames_from_latent(keep: torch.Tensor, stride: int = TIME_STRIDE) -> torch.Tensor:
    """Latent keep-mask (B, T') -> frame keep-mask (B, stride*(T'-1)+1): every frame of a group takes its value."""
    return torch.cat([keep[:, :1], keep[:, 1:].repeat_interleave(stride, dim=1)], dim=1)


__all__ = ["SPACE_STRIDE", "TIME_STRIDE", "fold_mask", "frames_from_latent", "latent_frames", "latent_keep"]

"""A space-to-depth stand-in "VAE": NOT a learned autoencoder. Each frame's f x f pixel blocks become channels
(3·f² latent channels, no temporal compression), so encode and decode are exact inverses. It lets the CPU
quickstart train in a latent space it can decode back to a video a person can watch, where no WF-VAE weights
can be had. Same call signature as the WF-VAE's encode / decode."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class SpaceToDepthVAE:
    """video (B, 3, T, H, W) in [-1, 1] <-> latents (B, 3·f², T, H/f, W/f)."""

    def __init__(self, factor: int = 4) -> None:
        if factor < 1:
            raise ValueError(f"space-to-depth factor must be >= 1, got {factor}")
        self.factor = factor

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor ** 2

    def encode(self, video: Tensor, *, chunk_size: int | None = None, sample: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
        b, c, t, h, w = video.shape
        if c != 3 or h % self.factor or w % self.factor:
            raise ValueError(f"space-to-depth x{self.factor} needs (B, 3, T, H, W) with H, W multiples of "
                             f"{self.factor}, got {tuple(video.shape)}")
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        latents = F.pixel_unshuffle(frames, self.factor)
        return latents.reshape(b, t, *latents.shape[1:]).transpose(1, 2).contiguous()

    def decode(self, latents: Tensor, *, chunk_size: int | None = None) -> Tensor:
        b, c, t, h, w = latents.shape
        if c != self.latent_channels:
            raise ValueError(f"space-to-depth x{self.factor} decodes {self.latent_channels} channels, got {c}")
        frames = F.pixel_shuffle(latents.transpose(1, 2).reshape(b * t, c, h, w), self.factor)
        return frames.reshape(b, t, *frames.shape[1:]).transpose(1, 2).contiguous()


def quickstart_encoders(config: Any = None, factor: int = 4) -> tuple[Any, Any]:
    """`tools/cache_features.py --encoders megatron_video.models.space_to_depth:quickstart_encoders`: the
    space-to-depth video encoder and the deterministic stub text encoder (16-d states, 8-d pooled)."""
    from megatron_video.data.cache_builder import stub_encoders

    vae = SpaceToDepthVAE(factor)
    _, text = stub_encoders()

    def video(x: Tensor) -> Tensor:
        return vae.encode(x)

    return video, text


__all__ = ["SpaceToDepthVAE", "quickstart_encoders"]

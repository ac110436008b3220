"""WF-VAE encoder: input Haar transform, a conv backbone, and two energy-flow paths that feed the
low-frequency Haar bands of deeper levels into the backbone (spec section 4). Registration order follows the
released state dict."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_video.models.wfvae.cache import CausalState
from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.layers import (
    AttnBlock,
    CausalConv3d,
    ChannelLayerNorm,
    Downsample3D,
    ResnetBlock2D,
    ResnetBlock3D,
    Upsample3D,
    per_frame,
)
from megatron_video.models.wfvae.wavelet import HaarWavelet3D

HAAR_CHANNELS = 24  # 8 sub-bands x RGB


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, state: CausalState | None, trail: int) -> torch.Tensor:
    """Run a stage: plain Conv2d entries apply per frame, the rest take the causal state. `trail` (lookahead
    frames at the stage input) doubles after a 2x temporal up-sampler."""
    for block in blocks:
        x = per_frame(block, x) if isinstance(block, nn.Conv2d) else block(x, state, trail)
        if isinstance(block, Upsample3D):
            trail *= 2
    return x


class Encoder(nn.Module):
    def __init__(self, cfg: WFVAEConfig) -> None:
        super().__init__()
        c, e, n = cfg.base_channels, cfg.encoder_energy_flow_hidden_size, cfg.encoder_num_resblocks
        self.down1 = nn.ModuleList(
            [nn.Conv2d(HAAR_CHANNELS, c, 3, padding=1)] + [ResnetBlock2D(c, c) for _ in range(n)]
            + [Downsample3D(c)]
        )
        self.down2 = nn.ModuleList(
            [nn.Conv2d(c + e, 2 * c, 3, padding=1)] + [ResnetBlock3D(2 * c, 2 * c) for _ in range(n)]
            + [Downsample3D(2 * c)]
        )
        self.connect_l1 = nn.Conv2d(HAAR_CHANNELS, e, 3, padding=1)
        self.connect_l2 = nn.Conv2d(HAAR_CHANNELS, e, 3, padding=1)
        mid: list[nn.Module] = [ResnetBlock3D(2 * c + e, 4 * c)]
        if cfg.use_attention:
            mid.append(AttnBlock(4 * c))
        mid.append(ResnetBlock3D(4 * c, 4 * c))
        self.mid = nn.ModuleList(mid)
        self.norm_out = ChannelLayerNorm(4 * c)
        self.conv_out = CausalConv3d(4 * c, 2 * cfg.latent_dim, 3, padding=1)
        self.wavelet_transform_in = HaarWavelet3D()
        self.wavelet_transform_l1 = HaarWavelet3D()
        self.wavelet_transform_l2 = HaarWavelet3D()

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) video chunk -> (B, 2*latent_dim, T', H/8, W/8) moments (mean, then logvar)."""
        coeffs = self.wavelet_transform_in(x, state)
        l1_coeffs = self.wavelet_transform_l1(coeffs[:, :3], state)  # the lll band of RGB flows on
        l1 = per_frame(self.connect_l1, l1_coeffs)
        l2 = per_frame(self.connect_l2, self.wavelet_transform_l2(l1_coeffs[:, :3], state))
        h = run_blocks(self.down1, coeffs, state, 0)
        h = run_blocks(self.down2, torch.cat([h, l1], dim=1), state, 0)
        h = run_blocks(self.mid, torch.cat([h, l2], dim=1), state, 0)
        return self.conv_out(F.silu(self.norm_out(h)), state)

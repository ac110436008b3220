"""WF-VAE decoder: a conv backbone that up-samples 2x in space-time twice, with two energy-flow branches that
predict Haar coefficients which are added to the lll band of the next level before each inverse Haar."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_video.models.wfvae.cache import CausalState
from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.encoder import HAAR_CHANNELS, run_blocks
from megatron_video.models.wfvae.layers import (
    AttnBlock,
    CausalConv3d,
    ChannelLayerNorm,
    ResnetBlock3D,
    Upsample3D,
    per_frame,
)
from megatron_video.models.wfvae.wavelet import InverseHaarWavelet3D


def _add_low_band(coeffs: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """coeffs[:, :3] += low, without in-place writes."""
    return torch.cat([coeffs[:, :3] + low, coeffs[:, 3:]], dim=1)


class Decoder(nn.Module):
    def __init__(self, cfg: WFVAEConfig) -> None:
        super().__init__()
        c, e, n = cfg.base_channels, cfg.decoder_energy_flow_hidden_size, cfg.decoder_num_resblocks
        if n < 1:
            raise ValueError("the decoder needs decoder_num_resblocks >= 1")
        self.energy_flow_size = e
        self.conv_in = CausalConv3d(cfg.latent_dim, 4 * c, 3, padding=1)
        mid: list[nn.Module] = [ResnetBlock3D(4 * c, 4 * c)]
        if cfg.use_attention:
            mid.append(AttnBlock(4 * c))
        mid.append(ResnetBlock3D(4 * c, 4 * c + e))
        self.mid = nn.ModuleList(mid)
        self.up2 = nn.ModuleList(
            [ResnetBlock3D(4 * c, 4 * c) for _ in range(n)]
            + [Upsample3D(4 * c), ResnetBlock3D(4 * c, 4 * c + e)]
        )
        self.up1 = nn.ModuleList(
            [ResnetBlock3D(4 * c, 2 * c)] + [ResnetBlock3D(2 * c, 2 * c) for _ in range(n - 1)]
            + [Upsample3D(2 * c), ResnetBlock3D(2 * c, 2 * c)]
        )
        # Always two blocks, whatever decoder_num_resblocks says: upstream builds this stage with range(2)
        # (Open-Sora-Plan opensora/models/causalvideovae/model/vae/modeling_wfvae.py, Decoder.layer), so
        # only this count loads its weights.
        self.layer = nn.ModuleList([ResnetBlock3D(2 * c, c), ResnetBlock3D(c, c)])
        self.connect_l1 = self._flow_branch(e, cfg.connect_res_layer_num)
        self.connect_l2 = self._flow_branch(e, cfg.connect_res_layer_num)
        self.norm_out = ChannelLayerNorm(c)
        self.conv_out = nn.Conv2d(c, HAAR_CHANNELS, 3, padding=1)
        self.inverse_wavelet_transform_out = InverseHaarWavelet3D()
        self.inverse_wavelet_transform_l1 = InverseHaarWavelet3D()
        self.inverse_wavelet_transform_l2 = InverseHaarWavelet3D()

    @staticmethod
    def _flow_branch(width: int, num_res: int) -> nn.ModuleList:
        return nn.ModuleList([ResnetBlock3D(width, width) for _ in range(num_res)]
                             + [nn.Conv2d(width, HAAR_CHANNELS, 3, padding=1)])

    def forward(self, z: torch.Tensor, state: CausalState | None = None, lookahead: int = 0) -> torch.Tensor:
        """(B, latent_dim, T, h, w) un-normalised latents -> (B, 3, 8(T-1)+1, 8h, 8w) in direct mode.

        In chunked mode the last `lookahead` latent frames are context for the up-samplers' time
        interpolation: their 8 * lookahead output frames are returned too and must be dropped by the caller,
        who feeds those latent frames again at the start of the next chunk.
        """
        e = self.energy_flow_size
        h = run_blocks(self.mid, self.conv_in(z, state, lookahead), state, lookahead)
        # The energy-flow branch always takes the LAST e channels.
        h, g2 = h[:, :-e], h[:, -e:]
        l2 = self.inverse_wavelet_transform_l2(run_blocks(self.connect_l2, g2, state, lookahead), state)
        h = run_blocks(self.up2, h, state, lookahead)
        h, g1 = h[:, :-e], h[:, -e:]
        l1_coeffs = _add_low_band(run_blocks(self.connect_l1, g1, state, 2 * lookahead), l2)
        l1 = self.inverse_wavelet_transform_l1(l1_coeffs, state)
        h = run_blocks(self.up1, h, state, 2 * lookahead)
        h = run_blocks(self.layer, h, state, 4 * lookahead)
        out = per_frame(self.conv_out, F.silu(self.norm_out(h)))
        return self.inverse_wavelet_transform_out(_add_low_band(out, l1), state)

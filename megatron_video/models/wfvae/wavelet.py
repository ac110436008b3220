"""Haar wavelet transforms of the WF-VAE (3D, causal in time).

Filters: f_k[dt][dy][dx] = 0.3536 * s_bt[dt] * s_bh[dy] * s_bw[dx] with s_0 = (1, 1), s_1 = (1, -1), sub-band
k = 4*bt + 2*bh + bw. The literal 0.3536 (not 1/sqrt(8)) is what the released model uses, so analysis followed
by synthesis has gain 8 * 0.3536**2 = 1.000264. Channels are sub-band-major: out_channel = k * C_in + c.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_video.models.wfvae.cache import CausalState
from megatron_video.models.wfvae.layers import CausalConv3d

HAAR_VALUE = 0.3536
# Upstream names of the eight sub-bands, in index order k = 4*bt + 2*bh + bw.
SUBBAND_NAMES = ("h", "g", "hh", "gh", "h_v", "g_v", "hh_v", "gh_v")


def haar_filters(dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The eight 2x2x2 analysis filters, shape (8, 1, 2, 2, 2)."""
    sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    bands = []
    for k in range(8):
        bt, bh, bw = (k >> 2) & 1, (k >> 1) & 1, k & 1
        bands.append(torch.einsum("i,j,l->ijl", sign[bt], sign[bh], sign[bw]))
    # The released filters are fp32 parameters: the literal rounds through fp32 (0.35359999537467957) even
    # when the model is later cast to another dtype.
    value = torch.tensor(HAAR_VALUE, dtype=torch.float32).to(torch.float64)
    filt = (torch.stack(bands).unsqueeze(1) * value).to(dtype)
    return filt.to(device) if device is not None else filt


class HaarWavelet3D(nn.Module):
    """Depthwise causal 3D Haar analysis: (B, C, T, H, W) -> (B, 8C, T', H/2, W/2).

    One replica of frame 0 is prepended (first chunk / direct), so T' = (T + 1) // 2 for odd T. The eight
    filters are frozen parameters `<name>_conv.conv.weight` so the full upstream state dict loads unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        filt = haar_filters()
        for k, name in enumerate(SUBBAND_NAMES):
            conv = CausalConv3d(1, 1, 2, stride=2, bias=False)
            conv.conv.weight.requires_grad_(False)
            if not conv.conv.weight.is_meta:
                with torch.no_grad():
                    conv.conv.weight.copy_(filt[k: k + 1])
            self.add_module(f"{name}_conv", conv)

    def filters(self) -> torch.Tensor:
        return torch.cat([getattr(self, f"{n}_conv").conv.weight for n in SUBBAND_NAMES], dim=0)

    def forward(self, x: torch.Tensor, state: CausalState | None = None, trail: int = 0) -> torch.Tensor:
        b, c, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Haar analysis needs even H and W, got {h}x{w}")
        # All eight filters share the causal padding and cache, so one CausalConv3d handles the time axis.
        lead = self.h_conv
        padded = lead.pad_front(x, state)
        lead.remember(padded, state, trail)
        y = F.conv3d(padded.reshape(b * c, 1, *padded.shape[2:]), self.filters(), stride=2)
        return y.unflatten(0, (b, c)).transpose(1, 2).flatten(1, 2)  # sub-band-major channels


class InverseHaarWavelet3D(nn.Module):
    """3D Haar synthesis: (B, 8c, T, H, W) -> (B, c, 2T, 2H, 2W); drops output frame 0 in direct mode / the
    first chunk (the inverse of the analysis' causal front pad). Filters are buffers named like upstream."""

    def __init__(self) -> None:
        super().__init__()
        filt = haar_filters()
        for k, name in enumerate(SUBBAND_NAMES):
            self.register_buffer(name, filt[k: k + 1].clone())

    def filters(self) -> torch.Tensor:
        return torch.cat([getattr(self, n) for n in SUBBAND_NAMES], dim=0)

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        b, c8, t, h, w = x.shape
        if c8 % 8:
            raise ValueError(f"inverse Haar needs a multiple of 8 channels, got {c8}")
        c = c8 // 8
        bands = x.reshape(b, 8, c, t, h, w).transpose(1, 2).reshape(b * c, 8, t, h, w)
        y = F.conv_transpose3d(bands, self.filters().to(x.dtype), stride=2)
        y = y.reshape(b, c, 2 * t, 2 * h, 2 * w)
        return y[:, :, 1:] if state is None or state.first else y

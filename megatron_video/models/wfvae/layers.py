"""WF-VAE building blocks: causal 3D conv, channel LayerNorm, per-frame 2D conv, resnet and attention
blocks, and the 2x space-time down/up-samplers. Layouts are (B, C, T, H, W); parameter names follow the
released checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_video.models.wfvae.cache import CausalState


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class CausalConv3d(nn.Module):
    """Conv3d that is causal in time: frame 0 is replicated (k_t - 1) times in front; no padding at the end.

    In chunked mode (`state` given and not first) the front is filled with the frames this conv cached from
    the previous chunk. `trail` frames at the end of the input are lookahead that the next chunk feeds again,
    so the cache is taken from before them.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        k, s = _triple(kernel_size), _triple(stride)
        self.kernel_t, self.stride_t = k[0], s[0]
        self.conv = nn.Conv3d(in_channels, out_channels, k, stride=s, padding=(0, padding, padding),
                              bias=bias)

    def pad_front(self, x: torch.Tensor, state: CausalState | None) -> torch.Tensor:
        if state is None or state.first:
            if self.kernel_t == 1:
                return x
            return torch.cat([x[:, :, :1]] * (self.kernel_t - 1) + [x], dim=2)
        cached = state.get(self)
        return x if cached is None else torch.cat([cached, x], dim=2)

    def remember(self, padded: torch.Tensor, state: CausalState | None, trail: int) -> None:
        if state is None:
            return
        committed = padded.shape[2] - trail
        # Keep the padded frames from where the next output window starts, up to the lookahead.
        n_out = (committed - self.kernel_t) // self.stride_t + 1 if committed >= self.kernel_t else 0
        state.put(self, padded[:, :, n_out * self.stride_t: committed])

    def forward(self, x: torch.Tensor, state: CausalState | None = None, trail: int = 0) -> torch.Tensor:
        padded = self.pad_front(x, state)
        self.remember(padded, state, trail)
        return self.conv(padded)


def per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of a (B, C, T, H, W) tensor."""
    b, _, t, _, _ = x.shape
    y = module(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis at every (b, t, h, w) position (upstream "layernorm"/"aelayernorm")."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ResnetBlock3D(nn.Module):
    """y = shortcut(x) + conv2(SiLU(N2(conv1(SiLU(N1(x)))))) with causal 3x3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels
                             else None)

    def forward(self, x: torch.Tensor, state: CausalState | None = None, trail: int = 0) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), state, trail)
        h = self.conv2(F.silu(self.norm2(h)), state, trail)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x, state, trail)
        return skip + h


class ResnetBlock2D(nn.Module):
    """The same block with per-frame 3x3 Conv2d (no temporal mixing, so no causal state)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, state: CausalState | None = None, trail: int = 0) -> torch.Tensor:
        h = per_frame(self.conv1, F.silu(self.norm1(x)))
        h = per_frame(self.conv2, F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else per_frame(self.nin_shortcut, x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention within each frame (tokens = h*w positions, features = channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor, state: CausalState | None = None, trail: int = 0) -> torch.Tensor:
        n = self.norm(x)
        b, c, t, h, w = x.shape

        def tokens(y: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B*T, 1, H*W, C)
            return y.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)

        o = F.scaled_dot_product_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        o = o.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return x + self.proj_out(o)


class Downsample3D(nn.Module):
    """Spatial2xTime2x3DDownsample: zero-pad right/bottom by 1, then a causal 3x3x3 conv with stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, state: CausalState | None = None, trail: int = 0) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)), state, trail)


def _interp_time_space(x: torch.Tensor) -> torch.Tensor:
    """Linear x2 in time (half-pixel centres, edge clamp) and bilinear x2 in space, computed in fp32."""
    return F.interpolate(x.float(), scale_factor=(2.0, 2.0, 2.0), mode="trilinear",
                         align_corners=False).to(x.dtype)


def _interp_space(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x.float(), scale_factor=(1.0, 2.0, 2.0), mode="trilinear",
                         align_corners=False).to(x.dtype)


class Upsample3D(nn.Module):
    """CachedCausal3DUpsample: frame 0 is upsampled in space only; frames 1.. are interpolated x2 in time
    among themselves (so T -> 2T - 1), then a causal 3x3x3 conv.

    Chunked mode: a chunk continues the interpolation of the previous one through one cached input frame (the
    frame before the `trail` lookahead frames); the two outputs belonging to that cached frame are dropped.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, padding=1)

    def upsample(self, x: torch.Tensor, state: CausalState | None, trail: int) -> torch.Tensor:
        if state is None or state.first:
            if x.shape[2] == 1:
                return _interp_space(x)
            return torch.cat([_interp_space(x[:, :, :1]), _interp_time_space(x[:, :, 1:])], dim=2)
        prev = state.get(self)
        state.put(self, x[:, :, x.shape[2] - trail - 1: x.shape[2] - trail])
        if prev is None:  # first chunk after frame 0: clamps at its own first frame, as direct mode does
            return _interp_time_space(x)
        return _interp_time_space(torch.cat([prev, x], dim=2))[:, :, 2:]

    def forward(self, x: torch.Tensor, state: CausalState | None = None, trail: int = 0) -> torch.Tensor:
        # `trail` lookahead frames at the input rate become 2 * trail frames at the output rate.
        return self.conv(self.upsample(x, state, trail), state, 2 * trail)

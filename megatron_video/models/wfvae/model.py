"""The WF-VAE model: direct and chunked (causal-cache) encode/decode, the diagonal Gaussian posterior and the
per-channel latent normalisation the DiT trains on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_video.models.wfvae.cache import CausalState
from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.decoder import Decoder
from megatron_video.models.wfvae.encoder import Encoder

COMPRESSION = 8  # in t (as 8n+1 -> n+1), h and w
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def latent_shape(video_shape: tuple[int, ...] | torch.Size,
                 latent_dim: int = 32) -> tuple[int, int, int, int, int]:
    """(B, 3, T, H, W) -> (B, latent_dim, (T-1)/8 + 1, H/8, W/8), validating the shape rules."""
    check_video_shape(video_shape)
    b, _, t, h, w = video_shape
    return (b, latent_dim, (t - 1) // COMPRESSION + 1, h // COMPRESSION, w // COMPRESSION)


def check_video_shape(shape: tuple[int, ...] | torch.Size) -> None:
    if len(shape) != 5 or shape[1] != 3:
        raise ValueError(f"expected a video of shape (B, 3, T, H, W), got {tuple(shape)}")
    _, _, t, h, w = shape
    if t < 1 or (t - 1) % COMPRESSION:
        raise ValueError(f"the 8x8x8 WF-VAE needs T = 8n+1 frames (1, 9, 17, ...), got T={t}")
    if h % COMPRESSION or w % COMPRESSION or h == 0 or w == 0:
        raise ValueError(f"the 8x8x8 WF-VAE needs H and W to be positive multiples of 8, got {h}x{w}")


@dataclass
class DiagonalGaussian:
    """Posterior from the encoder moments: channels [0, L) are the mean, [L, 2L) the logvar (clamped)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Noise in the parameters' dtype, as upstream (so torch.manual_seed reproduces upstream samples).
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=self.mean.device)
        return self.mean + self.std * noise


def encoder_chunks(num_frames: int, chunk_size: int) -> list[tuple[int, int]]:
    """[0, 1), [1, 1 + c), ...: the first frame alone, then chunk_size frames (the last may be shorter)."""
    return [(0, 1)] + [(s, min(s + chunk_size, num_frames)) for s in range(1, num_frames, chunk_size)]


class WFVAE(nn.Module):
    """Wavelet-Flow VAE, 8x8x8 compression. Inputs are (B, 3, 8n+1, H, W) videos in [-1, 1].

    `encode`/`decode` work on the normalised latents the DiT sees; pass `chunk_size` to run the
    causal-cache chunked path, which gives the same result as the direct path (to fp32 round-off) with
    memory bounded by the chunk. Caches live in a per-call `CausalState`, never on the modules.
    """

    def __init__(self, config: WFVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or WFVAEConfig.released()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        # Not part of the released state dict: they come from the config.
        shape = (1, -1, 1, 1, 1)
        self.register_buffer("latent_scale", torch.tensor(self.config.scale).view(shape), persistent=False)
        self.register_buffer("latent_shift", torch.tensor(self.config.shift).view(shape), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    # ---- encoder side -------------------------------------------------------------------------------------

    def encode_moments(self, video: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Raw encoder output (B, 2L, T', H/8, W/8): mean then (unclamped) logvar."""
        check_video_shape(video.shape)
        video = video.to(device=self.latent_scale.device, dtype=self.dtype)
        if chunk_size is None:
            return self.encoder(video)
        if chunk_size <= 0 or chunk_size % COMPRESSION:
            raise ValueError(f"encode chunk_size must be a positive multiple of 8 frames, got {chunk_size}")
        state = CausalState()
        outs = []
        for start, stop in encoder_chunks(video.shape[2], chunk_size):
            outs.append(self.encoder(video[:, :, start:stop], state))
            state.first = False
        return torch.cat(outs, dim=2)

    def posterior(self, video: torch.Tensor, chunk_size: int | None = None) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.encode_moments(video, chunk_size))

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latent_shift.to(latents.dtype)) * self.latent_scale.to(latents.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.latent_scale.to(latents.dtype) + self.latent_shift.to(latents.dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, chunk_size: int | None = None, sample: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents (sample - shift) * scale, shape (B, 32, (T-1)/8+1, H/8, W/8), without grad.

        `sample=True` is what OSP v1.5 trains on; `sample=False` uses the posterior mean.
        """
        post = self.posterior(video, chunk_size)
        return self.normalize(post.sample(generator) if sample else post.mode())

    # ---- decoder side -------------------------------------------------------------------------------------

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 5 or latents.shape[1] != self.config.latent_dim or latents.shape[2] < 1:
            raise ValueError(
                f"expected latents (B, {self.config.latent_dim}, T, h, w), got {tuple(latents.shape)}")

    def decode_raw(self, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Decode un-normalised latents (B, L, T, h, w) -> (B, 3, 8(T-1)+1, 8h, 8w), not clamped."""
        self._check_latents(latents)
        z = latents.to(device=self.latent_scale.device, dtype=self.dtype)
        if chunk_size is None:
            return self.decoder(z)
        if chunk_size <= 0:
            raise ValueError(f"decode chunk_size must be a positive number of latent frames, "
                             f"got {chunk_size}")
        t = z.shape[2]
        state = CausalState()
        outs = [self.decoder(z[:, :, :1], state)]
        state.first = False
        for start in range(1, t, chunk_size):
            stop = min(start + chunk_size, t)
            # One latent frame of lookahead feeds the up-samplers' time interpolation; its frames are redone.
            lookahead = 1 if stop < t else 0
            out = self.decoder(z[:, :, start: stop + lookahead], state, lookahead)
            outs.append(out[:, :, : out.shape[2] - COMPRESSION * lookahead])
        return torch.cat(outs, dim=2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """Decode normalised latents (as produced by `encode`) to a video in about [-1, 1], without grad."""
        self._check_latents(latents)
        z = latents.to(device=self.latent_scale.device, dtype=self.dtype)
        return self.decode_raw(self.denormalize(z), chunk_size)

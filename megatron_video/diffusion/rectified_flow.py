"""Open-Sora Plan v1.5 objective: rectified flow with logit-normal σ and resolution-dependent shift.

σ ~ sigmoid(N(m, s²)); the shift depends on the spatial token count per latent frame
s = H_lat·W_lat / (patch_h·patch_w): mu is linear in s through (base_tokens, base_shift) and
(max_tokens, max_shift), shift = e^mu, σ' = shift·σ / (1 + (shift − 1)·σ). The denoiser sees
x_t = σ'·ε + (1 − σ')·x0 at timestep 1000·σ' and predicts the velocity ε − x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_video.diffusion.base import DiffusionSample, Objective, check_inputs


@dataclass(frozen=True)
class RectifiedFlowConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_tokens: int = 256
    max_tokens: int = 4096
    patch_hw: tuple[int, int] = (2, 2)
    num_train_timesteps: int = 1000
    dynamic_shift: bool = True

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.max_tokens <= self.base_tokens or self.base_tokens <= 0:
            raise ValueError(f"need 0 < base_tokens < max_tokens, got {self.base_tokens}, {self.max_tokens}")
        if any(p <= 0 for p in self.patch_hw) or len(self.patch_hw) != 2:
            raise ValueError(f"patch_hw must be two positive ints, got {self.patch_hw}")
        if self.num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be > 0, got {self.num_train_timesteps}")


def spatial_tokens(h_lat: int, w_lat: int, patch_hw: tuple[int, int] = (2, 2)) -> float:
    """Video tokens per latent frame after patchify."""
    if h_lat <= 0 or w_lat <= 0:
        raise ValueError(f"latent size must be positive, got {h_lat}x{w_lat}")
    return h_lat * w_lat / (patch_hw[0] * patch_hw[1])


def dynamic_shift(tokens: float, cfg: RectifiedFlowConfig | None = None) -> float:
    """shift = exp(mu), mu linear in the token count through the two anchor points (extrapolated outside)."""
    cfg = cfg or RectifiedFlowConfig()
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_tokens - cfg.base_tokens)
    return math.exp(cfg.base_shift + slope * (tokens - cfg.base_tokens))


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = shift·σ / (1 + (shift − 1)·σ): maps [0, 1] onto itself; shift > 1 moves mass to high noise."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


class RectifiedFlow(Objective):
    """v1.5 rectified flow (the default objective)."""

    def __init__(self, config: RectifiedFlowConfig | None = None) -> None:
        self.config = config or RectifiedFlowConfig()

    def shift_for(self, h_lat: int, w_lat: int) -> float:
        if not self.config.dynamic_shift:
            return 1.0
        return dynamic_shift(spatial_tokens(h_lat, w_lat, self.config.patch_hw), self.config)

    def sample_sigma(self, batch: int, generator: torch.Generator, device: torch.device | str = "cpu"
                     ) -> torch.Tensor:
        """Logit-normal σ in (0, 1), fp32, before the shift."""
        normal = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
        return torch.sigmoid(self.config.logit_mean + self.config.logit_std * normal)

    def sample(self, x0: torch.Tensor, generator: torch.Generator) -> DiffusionSample:
        check_inputs(x0, generator)
        b, _, _, h_lat, w_lat = x0.shape
        # σ first, then ε: a fixed draw order keeps the noise reproducible from the seed alone.
        sigma = shift_sigma(self.sample_sigma(b, generator, x0.device), self.shift_for(h_lat, w_lat))
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x0f = x0.float()
        s = sigma.view(b, 1, 1, 1, 1)
        x_t = s * noise + (1.0 - s) * x0f
        return DiffusionSample(
            x_t=x_t.to(x0.dtype),
            timestep=sigma * self.config.num_train_timesteps,
            target=noise - x0f,
            weight=None,
        )

    def at_level(self, x0: torch.Tensor, noise: torch.Tensor, level: float) -> DiffusionSample:
        """σ = `level` exactly (no shift: fixed evaluation timesteps are the same σ for every resolution)."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"level must be in [0, 1], got {level}")
        b = x0.shape[0]
        x0f = x0.float()
        sigma = torch.full((b,), float(level), dtype=torch.float32, device=x0.device)
        return DiffusionSample(x_t=(level * noise.float() + (1.0 - level) * x0f).to(x0.dtype),
                               timestep=sigma * self.config.num_train_timesteps, target=noise.float() - x0f,
                               weight=None)

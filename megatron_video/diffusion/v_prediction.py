"""Open-Sora Plan v1.3 objective (option): DDPM v-prediction, zero-terminal-SNR betas, min-SNR weighting.

Integer timesteps t ~ U{0, …, T−1}; x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; target v = √ᾱ_t·ε − √(1−ᾱ_t)·x0.
Zero terminal SNR (Lin et al. 2024) rescales √ᾱ so that its last value is exactly 0 while keeping the first.
Min-SNR-γ weight for v-prediction: min(SNR, γ) / (SNR + 1), SNR = ᾱ / (1 − ᾱ) (finite at SNR = 0: weight 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_video.diffusion.base import DiffusionSample, Objective, check_inputs

BETA_SCHEDULES = ("linear", "scaled_linear")


@dataclass(frozen=True)
class VPredictionConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    rescale_zero_terminal_snr: bool = True
    snr_gamma: float | None = 5.0

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 or None, got {self.snr_gamma}")


def make_betas(cfg: VPredictionConfig) -> torch.Tensor:
    """The DDPM beta schedule in float64."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so the last step has SNR exactly 0 and the first step is unchanged."""
    sqrt_ab = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab.square()
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


class VPrediction(Objective):
    """v1.3 v-prediction objective. Buffers are float64 on CPU; per-batch values are gathered in fp32."""

    def __init__(self, config: VPredictionConfig | None = None) -> None:
        self.config = config or VPredictionConfig()
        betas = make_betas(self.config)
        if self.config.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod[timesteps.cpu().long()]
        return (ab / (1.0 - ab)).float().to(timesteps.device)

    def min_snr_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min(SNR, γ) / (SNR + 1); all ones when min-SNR weighting is off."""
        if self.config.snr_gamma is None:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        ab = self.alphas_cumprod[timesteps.cpu().long()]
        snr = ab / (1.0 - ab)  # inf at t = 0 only if ᾱ_0 == 1, which a beta_start > 0 rules out
        return (torch.clamp(snr, max=self.config.snr_gamma) / (snr + 1.0)).float().to(timesteps.device)

    def sample(self, x0: torch.Tensor, generator: torch.Generator) -> DiffusionSample:
        check_inputs(x0, generator)
        b = x0.shape[0]
        t = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        ab = self.alphas_cumprod[t.cpu()].to(device=x0.device, dtype=torch.float32).view(b, 1, 1, 1, 1)
        a, s = ab.sqrt(), (1.0 - ab).sqrt()
        x0f = x0.float()
        return DiffusionSample(
            x_t=(a * x0f + s * noise).to(x0.dtype),
            timestep=t.float(),
            target=a * noise - s * x0f,
            weight=self.min_snr_weight(t) if self.config.snr_gamma is not None else None,
        )

    def at_level(self, x0: torch.Tensor, noise: torch.Tensor, level: float) -> DiffusionSample:
        """Integer timestep round(level·(T − 1)); no min-SNR weight (evaluation compares plain errors)."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"level must be in [0, 1], got {level}")
        b = x0.shape[0]
        t = round(level * (self.config.num_train_timesteps - 1))
        ab = float(self.alphas_cumprod[t])
        a, s = ab ** 0.5, (1.0 - ab) ** 0.5
        x0f, nf = x0.float(), noise.float()
        return DiffusionSample(x_t=(a * x0f + s * nf).to(x0.dtype),
                               timestep=torch.full((b,), float(t), dtype=torch.float32, device=x0.device),
                               target=a * nf - s * x0f, weight=None)

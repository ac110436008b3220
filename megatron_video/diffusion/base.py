"""The objective interface shared by the rectified-flow (v1.5) and v-prediction (v1.3) objectives.

An objective turns clean latents x0 (B, C, T, H, W) into a training example with `sample` and scores the
model output with `loss`. Randomness comes only from the generator passed in (see `seeding.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DiffusionSample:
    """One noised batch. `timestep` (B,) is what the denoiser is conditioned on; `weight` (B,) or None."""

    x_t: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None


def check_inputs(x0: torch.Tensor, generator: torch.Generator) -> None:
    """Latents must be (B, C, T, H, W) floats; the generator must live on the latents' device type."""
    if not isinstance(x0, torch.Tensor) or x0.dim() != 5:
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"latents must be a (B, C, T, H, W) tensor, got {shape}")
    if not x0.is_floating_point():
        raise ValueError(f"latents must be floating point, got {x0.dtype}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"need a torch.Generator (see diffusion.seeding), got {type(generator).__name__}")
    if generator.device.type != x0.device.type:
        raise ValueError(f"generator is on {generator.device.type} but the latents are on {x0.device.type}; "
                         "build it with noise_generator(..., device=latents.device)")


def masked_mse_sum(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted squared errors over valid positions, number of valid scalar positions), in fp32.

    pred/target are (B, C, T, H, W); `valid_mask` is (B, T, H, W) at latent resolution (True/1 = real latent,
    False/0 = padding), broadcast over channels; `weight` (B,) scales each sample's squared errors. Returning
    the sum and the count lets callers normalise over micro-batches or data-parallel ranks exactly.
    """
    if pred.shape != target.shape or pred.dim() != 5:
        raise ValueError(f"pred and target must be equal (B, C, T, H, W) shapes, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    b, c, t, h, w = pred.shape
    if weight is not None and weight.shape != (b,):
        raise ValueError(f"weight must have shape ({b},), got {tuple(weight.shape)}")
    if valid_mask is not None and valid_mask.shape != (b, t, h, w):
        raise ValueError(f"valid_mask must have shape (B, T, H, W) = {(b, t, h, w)}, "
                         f"got {tuple(valid_mask.shape)}")
    diff = pred.float() - target.float()
    if valid_mask is None:
        count = torch.tensor(float(diff.numel()), device=diff.device)
    else:
        valid = (valid_mask.to(diff.device) > 0).unsqueeze(1)
        # Select before squaring so padded positions contribute exactly 0 (also to the gradient, even if the
        # prediction there is not finite).
        diff = torch.where(valid, diff, torch.zeros((), device=diff.device))
        count = valid.sum().float() * c
    err = diff.square()
    if weight is not None:
        err = err * weight.to(err.device, torch.float32).view(b, 1, 1, 1, 1)
    return err.sum(), count


def masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the (weighted) squared error over the valid latent positions of the whole batch (0 if none)."""
    total, count = masked_mse_sum(pred, target, valid_mask, weight)
    return total / count.clamp(min=1.0)


class Objective(ABC):
    """A diffusion training objective."""

    @abstractmethod
    def sample(self, x0: torch.Tensor, generator: torch.Generator) -> DiffusionSample:
        """Draw noise and timesteps from `generator`; build the noised input, the timestep and the target."""

    @abstractmethod
    def at_level(self, x0: torch.Tensor, noise: torch.Tensor, level: float) -> DiffusionSample:
        """The example at a given noise level in (0, 1) (0 = clean, 1 = pure noise) with the given noise, no
        shift or sampling: what evaluation at fixed timesteps needs."""

    def loss(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        valid_mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss: squared error averaged over valid latent positions (see `masked_mse`)."""
        return masked_mse(pred, target, valid_mask, weight)


def sample_each(objective: Objective, x0: torch.Tensor, generators: list[torch.Generator]) -> DiffusionSample:
    """`objective.sample` per sample, each from its own generator, stacked into one batch."""
    if len(generators) != x0.shape[0]:
        raise ValueError(f"need one generator per sample: {x0.shape[0]} samples, {len(generators)} generators")
    parts = [objective.sample(x0[i:i + 1], gen) for i, gen in enumerate(generators)]
    weight = None if parts[0].weight is None else torch.cat([p.weight for p in parts])
    return DiffusionSample(x_t=torch.cat([p.x_t for p in parts]), timestep=torch.cat([p.timestep for p in parts]),
                           target=torch.cat([p.target for p in parts]), weight=weight)

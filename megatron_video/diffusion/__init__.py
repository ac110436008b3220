"""Diffusion objectives: v1.5 rectified flow (default) and v1.3 v-prediction (option).

Usage in a forward step::

    gen = noise_generator(seed, iteration, micro_batch_index, dp_rank, device=latents.device)
    s = objective.sample(latents, gen)
    pred = model(s.x_t, s.timestep, ...)
    loss = objective.loss(pred, s.target, valid_mask, s.weight)
"""

from megatron_video.diffusion.base import DiffusionSample, Objective, masked_mse, masked_mse_sum
from megatron_video.diffusion.rectified_flow import (
    RectifiedFlow,
    RectifiedFlowConfig,
    dynamic_shift,
    shift_sigma,
    spatial_tokens,
)
from megatron_video.diffusion.seeding import make_generator, noise_generator, noise_seed
from megatron_video.diffusion.v_prediction import (
    VPrediction,
    VPredictionConfig,
    make_betas,
    rescale_zero_terminal_snr,
)

OBJECTIVES = ("rectified_flow", "v_prediction")


def build_objective(name: str = "rectified_flow", **kwargs: object) -> Objective:
    """`rectified_flow` (v1.5, default) or `v_prediction` (v1.3); kwargs go to the matching config."""
    if name == "rectified_flow":
        return RectifiedFlow(RectifiedFlowConfig(**kwargs))  # type: ignore[arg-type]
    if name == "v_prediction":
        return VPrediction(VPredictionConfig(**kwargs))  # type: ignore[arg-type]
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")


__all__ = [
    "OBJECTIVES", "DiffusionSample", "Objective", "RectifiedFlow", "RectifiedFlowConfig", "VPrediction",
    "VPredictionConfig", "build_objective", "dynamic_shift", "make_betas", "make_generator", "masked_mse",
    "masked_mse_sum", "noise_generator", "noise_seed", "rescale_zero_terminal_snr", "shift_sigma",
    "spatial_tokens",
]

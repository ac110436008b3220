"""Sampling the SUV model: rectified-flow Euler steps with the v1.5 time shift, classifier-free guidance with a
negative prompt, and inpainting conditioning (image-to-video, transition, continuation).

The model was trained on x_σ = σ·ε + (1 − σ)·x0 at timestep 1000·σ' with σ' the shifted σ (DESIGN §7) and the
velocity target ε − x0 = dx/dσ. Sampling integrates dx/dσ from σ = 1 (noise) to 0 over the same shifted grid:
σ_i = shift(1 − i/n), x ← x + (σ_{i+1} − σ_i)·v(x, 1000·σ_i). With guidance g and the negative prompt's velocity
v⁻: v = v⁻ + g·(v⁺ − v⁻) (g = 1: the prompt alone, no second pass).

Parallel layouts: every rank of a model replica runs the same loop on the same numbers. TP / CP ranks call the
model and get the whole velocity (the model gathers its output); with PP the step goes through megatron's
forward-only schedule and the last stage broadcasts the velocity to the others, so every stage holds the same x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_video.diffusion.rectified_flow import RectifiedFlowConfig, dynamic_shift, shift_sigma, spatial_tokens
from megatron_video.inpaint.conditioning import conditioned_input


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 50
    guidance_scale: float = 7.5
    shift: float | None = None  # None: the v1.5 dynamic shift of the latent size, as trained
    flow: RectifiedFlowConfig = RectifiedFlowConfig()

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def sigmas(self, latent_hw: tuple[int, int]) -> list[float]:
        """num_steps + 1 noise levels from 1 down to 0 on the shifted grid."""
        shift = self.shift
        if shift is None:
            shift = dynamic_shift(spatial_tokens(*latent_hw, self.flow.patch_hw), self.flow) \
                if self.flow.dynamic_shift else 1.0
        grid = torch.linspace(1.0, 0.0, self.num_steps + 1, dtype=torch.float64)
        return [float(s) for s in shift_sigma(grid, shift)]


@dataclass
class TextBatch:
    """Encoded prompts: T5 states (B, L, D), T5 mask (B, L), CLIP pooled (B, P)."""

    t5_hidden: Tensor
    t5_mask: Tensor
    clip_pooled: Tensor

    def __len__(self) -> int:
        return self.t5_hidden.shape[0]

    def padded(self, length: int) -> TextBatch:
        pad = length - self.t5_hidden.shape[1]
        if pad <= 0:
            return self
        hidden = torch.cat([self.t5_hidden, self.t5_hidden.new_zeros(len(self), pad, self.t5_hidden.shape[2])], 1)
        mask = torch.cat([self.t5_mask, self.t5_mask.new_zeros(len(self), pad)], 1)
        return TextBatch(hidden, mask, self.clip_pooled)

    @staticmethod
    def cat(parts: list[TextBatch]) -> TextBatch:
        length = max(p.t5_hidden.shape[1] for p in parts)
        parts = [p.padded(length) for p in parts]
        return TextBatch(torch.cat([p.t5_hidden for p in parts]), torch.cat([p.t5_mask for p in parts]),
                         torch.cat([p.clip_pooled for p in parts]))

    def expand_to(self, batch: int) -> TextBatch:
        """One prompt for every sample, or one per sample."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"{len(self)} guidance (negative) prompts for {batch} samples: give one, or one per "
                             "sample")
        return TextBatch(self.t5_hidden.expand(batch, -1, -1), self.t5_mask.expand(batch, -1),
                         self.clip_pooled.expand(batch, -1))


@dataclass
class InpaintCondition:
    """Conditioning of an inpainting model: masked-video latents (B, C, T, H, W), the folded mask
    (B, 8, T, H, W), and which latent frames are wholly given (B, T) (they are put back after the last step)."""

    cond_latents: Tensor
    cond_mask: Tensor
    keep_latent: Tensor


def initial_noise(latent_shape: tuple[int, int, int, int], seeds: list[int], device: torch.device | str = "cpu",
                  ) -> Tensor:
    """(B, C, T, H, W) fp32 noise, sample i from its own generator seeded with seeds[i] (reproducible alone)."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(int(s)),
                                    dtype=torch.float32) for s in seeds]).to(device)


def predict(model: torch.nn.Module, module: torch.nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """The denoiser's output for `inputs` on every rank of the replica (through the pipeline when PP > 1)."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized() or mpu.get_pipeline_model_parallel_world_size() == 1:
        return module(**inputs).float()
    from megatron_video.parallel.pipeline import run_forward_backward

    x = inputs["hidden_states"]
    b, _, t, h, w = x.shape
    text_len = inputs["encoder_hidden_states"].shape[-2]
    recv, send = module.pipeline_shapes(b, (t, h, w), text_len)

    def forward_step(data_iterator, chunk):
        output = chunk(**next(data_iterator))

        def keep(prediction: Tensor):
            return prediction.sum() * 0, {"prediction": prediction.detach()}

        return output, keep

    out = run_forward_backward(forward_step, iter([inputs]), model, 1, b, recv, send, forward_only=True)
    result = torch.empty(b, module.cfg.out_channels, t, h, w, dtype=torch.float32, device=x.device)
    if out:
        result.copy_(out[0]["prediction"])
    dist.broadcast(result, src=mpu.get_pipeline_model_parallel_last_rank(),
                   group=mpu.get_pipeline_model_parallel_group())
    return result


@torch.no_grad()
def sample(model: torch.nn.Module, module: torch.nn.Module, noise: Tensor, text: TextBatch, config: SamplerConfig,
           negative: TextBatch | None = None, condition: InpaintCondition | None = None,
           structure: Tensor | None = None) -> Tensor:
    """Latents (B, C, T, H, W) from `noise` by Euler steps; `model` is what megatron's schedule runs (DDP or
    the module), `module` the denoiser. `structure`: the (B, C, T', H', W') structure video of a structure-
    controlled denoiser (models/control), given to both guidance branches."""
    b, _, t, h, w = noise.shape
    if len(text) != b:
        raise ValueError(f"{len(text)} prompts for {b} noise samples")
    guided = config.guidance_scale != 1.0
    if guided and negative is None:
        raise ValueError("classifier-free guidance needs the negative prompt's encoding (e.g. of \"\")")
    texts = TextBatch.cat([negative.expand_to(b), text]) if guided else text
    device = noise.device
    rows = 2 * b if guided else b
    extra = {
        "encoder_hidden_states": texts.t5_hidden.to(device)[:, None],
        "pooled_projections": texts.clip_pooled.to(device)[:, None],
        "attention_mask": torch.ones(rows, t, h, w, dtype=torch.bool, device=device),
        "encoder_attention_mask": texts.t5_mask.to(device)[:, None],
    }
    if structure is not None:
        extra["structure"] = torch.cat([structure, structure]) if guided else structure
    sigmas = config.sigmas((h, w))
    x = noise.float().clone()
    was_training = module.training
    module.eval()
    try:
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            hidden = x if condition is None else conditioned_input(x, condition.cond_latents, condition.cond_mask)
            hidden = torch.cat([hidden, hidden]) if guided else hidden
            timestep = torch.full((rows,), sigma * config.flow.num_train_timesteps, device=device)
            v = predict(model, module, {"hidden_states": hidden, "timestep": timestep, **extra})
            if guided:
                v_neg, v_pos = v.chunk(2)
                v = v_neg + config.guidance_scale * (v_pos - v_neg)
            x = x + (sigma_next - sigma) * v
    finally:
        module.train(was_training)
    if condition is not None:  # wholly given latent frames keep their given latents
        given = condition.keep_latent.to(device)[:, None, :, None, None]
        x = torch.where(given, condition.cond_latents.to(x), x)
    return x


__all__ = ["InpaintCondition", "SamplerConfig", "TextBatch", "initial_noise", "predict", "sample"]

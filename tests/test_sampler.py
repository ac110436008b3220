"""The SUV sampler: Euler steps on the shifted grid reach the data point under the exact velocity field,
classifier-free guidance extrapolates from the negative prompt, inpainting conditioning reaches the model and the
given latent frames are kept, and the small SUV model samples the same latents under TP / CP / PP as on one rank.

Exactness argument: for data concentrated at x0, x_σ = σ·ε + (1 − σ)·x0 has velocity v = (x − x0)/σ, and one
Euler step from σ to σ' gives x0 + (x − x0)·σ'/σ exactly, so any grid ends at x0 (up to fp32 round-off).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megatron_video.sampling import SamplerConfig, TextBatch, initial_noise, sample
from megatron_video.sampling.conditioning import inpaint_condition, task_frame_mask
from tests.harness import run_distributed


class PointFlow(nn.Module):
    """The exact velocity towards a data point chosen by the text (its pooled embedding scales a base point)."""

    def __init__(self, target: torch.Tensor, condition_channels: int = 0) -> None:
        super().__init__()
        self.target, self.condition_channels = target, condition_channels
        self.seen: list[torch.Tensor] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, attention_mask,
                encoder_attention_mask):
        c = hidden_states.shape[1] - self.condition_channels
        x, cond = hidden_states[:, :c], hidden_states[:, c:]
        self.seen.append(cond)
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        point = self.target * pooled_projections.reshape(x.shape[0], -1)[:, :1].view(-1, 1, 1, 1, 1)
        return (x - point) / sigma


def _text(scales: list[float]) -> TextBatch:
    b = len(scales)
    return TextBatch(torch.zeros(b, 3, 4), torch.ones(b, 3, dtype=torch.bool), torch.tensor(scales)[:, None])


def test_shifted_grid():
    config = SamplerConfig(num_steps=4)
    sigmas = config.sigmas((36, 64))  # 576 tokens per frame: the v1.5 shift > 1 pushes the grid to high noise
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 5
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert sigmas[2] > 0.5
    assert SamplerConfig(num_steps=4, shift=1.0).sigmas((36, 64)) == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def test_euler_reaches_the_point_and_guidance_extrapolates():
    target = torch.randn(4, 2, 4, 4)
    noise = initial_noise((4, 2, 4, 4), [1, 2])
    assert torch.equal(noise[1], initial_noise((4, 2, 4, 4), [2])[0]), "a sample's noise depends on its seed only"
    model = PointFlow(target)
    out = sample(model, model, noise, _text([1.0, 2.0]), SamplerConfig(num_steps=7, guidance_scale=1.0))
    torch.testing.assert_close(out, torch.stack([target, 2 * target]), rtol=1e-4, atol=1e-5)
    guided = sample(model, model, noise, _text([1.0, 2.0]), SamplerConfig(num_steps=5, guidance_scale=3.0),
                    negative=_text([0.5]))
    # v = v- + g (v+ - v-) is the exact field towards p- + g (p+ - p-)
    expect = torch.stack([(0.5 + 3 * 0.5) * target, (0.5 + 3 * 1.5) * target])
    torch.testing.assert_close(guided, expect, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="negative prompt"):
        sample(model, model, noise, _text([1.0, 2.0]), SamplerConfig(guidance_scale=2.0))
    with pytest.raises(ValueError, match="3 guidance"):
        sample(model, model, noise, _text([1.0, 2.0]), SamplerConfig(guidance_scale=2.0), negative=_text([1, 1, 1]))


def test_image_to_video_conditioning():
    latents = torch.randn(1, 4, 3, 2, 2)  # 17 frames
    keep = task_frame_mask("i2v", 17)[None]
    condition = inpaint_condition(keep, (3, 2, 2), latents=latents)
    assert condition.keep_latent.tolist() == [[True, False, False]]
    assert condition.cond_mask.shape == (1, 8, 3, 2, 2) and bool((condition.cond_mask[:, :, 0] == 1).all())
    model = PointFlow(torch.zeros(4, 3, 2, 2), condition_channels=12)
    out = sample(model, model, initial_noise((4, 3, 2, 2), [0]), _text([1.0]),
                 SamplerConfig(num_steps=2, guidance_scale=1.0), condition=condition)
    assert torch.equal(model.seen[0][:, :4], condition.cond_latents)  # the masked latents reach the model
    assert torch.equal(out[:, :, 0], latents[:, :, 0]), "the given first latent frame is kept"
    assert out[:, :, 1:].abs().max() < 1e-4
    assert task_frame_mask("transition", 9).tolist() == [True] + [False] * 7 + [True]
    assert task_frame_mask("continuation", 17, 9).sum() == 9
    with pytest.raises(ValueError, match="continuation keeps"):
        task_frame_mask("continuation", 9, 9)


# (tp, cp, pp, sequence_parallel) at world size 4 (DP fills the rest: each replica samples the same prompts)
LAYOUTS = [(2, 1, 1, True), (1, 2, 2, False), (1, 1, 2, False)]


def sample_worker(cfg, layouts) -> list[torch.Tensor]:
    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.parallel import initialize_parallel, set_seed
    from tests.test_eval_loss import model_at_layout
    from tests.test_suv_tp import random_released_weights

    initialize_parallel()
    set_seed(0)
    weights = random_released_weights(SUVMMDiT(cfg, megatron_config(cfg, use_cpu_initialization=True)), seed=1)
    g = torch.Generator().manual_seed(5)
    text = TextBatch(torch.randn(2, 5, cfg.caption_channels, generator=g), torch.ones(2, 5, dtype=torch.bool),
                     torch.randn(2, cfg.pooled_projection_dim, generator=g))
    negative = TextBatch(torch.randn(1, 3, cfg.caption_channels, generator=g), torch.ones(1, 3, dtype=torch.bool),
                         torch.randn(1, cfg.pooled_projection_dim, generator=g))
    out = []
    for layout in layouts:
        model = model_at_layout(cfg, weights, *layout)
        noise = initial_noise((cfg.in_channels, 2, 4, 4), [11, 12])
        out.append(sample(model, model, noise, text, SamplerConfig(num_steps=3, guidance_scale=4.0), negative))
    return out


@pytest.mark.slow
def test_sampling_same_under_every_layout():
    """rtol 1e-4: three steps compound the fp32 reduction-order differences of TP / CP / PP (1e-5 per call)."""
    from megatron_video.models.suv_mmdit import suv_config

    cfg = suv_config("small", caption_channels=16, pooled_projection_dim=8)
    (reference,) = run_distributed(sample_worker, 1, cfg, [(1, 1, 1, False)], timeout=300)[0]
    assert reference.abs().max() > 0.1 and torch.isfinite(reference).all()
    per_rank = run_distributed(sample_worker, 4, cfg, LAYOUTS, timeout=600)
    for i, layout in enumerate(LAYOUTS):
        for rank, results in enumerate(per_rank):  # every rank (every PP stage too) holds the latents
            torch.testing.assert_close(results[i], reference, rtol=1e-4, atol=1e-5,
                                       msg=f"layout (tp, cp, pp, sp) = {layout}, rank {rank}")

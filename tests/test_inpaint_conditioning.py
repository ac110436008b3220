"""The per-micro-batch conditioner: masked-video latents (encoded, or masked in latent space), folded mask,
loss mask, kept-frame noise, schedule, determinism; and the denoiser input built from them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_video.inpaint import (
    InpaintConditioner,
    InpaintConfig,
    InpaintStage,
    conditioned_input,
    fold_mask,
    i2v_inputs,
    latent_keep,
    masked_video,
)
from tests.inpaint_fixtures import tiny_vae


def latent_batch(b: int = 4, t: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x0": torch.randn(b, 4, t, 2, 2, generator=g), "positions": list(range(b))}


def conditioner(ratios: dict, mode: str = "latent_mask", **kw) -> InpaintConditioner:
    return InpaintConditioner(InpaintConfig(stages=[InpaintStage(0, ratios)], masked_latents=mode, **kw), seed=7)


def test_latent_mask_mode_keeps_the_cached_latents_of_kept_frames() -> None:
    cond = conditioner({"i2v": 1, "continuation": 1, "transition": 1, "t2v": 1, "clear": 1})
    batch = latent_batch(b=8, t=4)
    cond(batch, iteration=0, consumed_samples=0)
    lat_keep = latent_keep(batch["frame_keep"])
    expected = batch["x0"] * lat_keep[:, None, :, None, None]
    assert torch.equal(batch["cond_latents"], expected)
    assert torch.equal(batch["cond_mask"], fold_mask(batch["frame_keep"], (2, 2)))
    # in this mode masks are whole latent frames: folding them back loses nothing
    assert torch.equal(batch["cond_mask"].amin(dim=1) > 0, lat_keep[:, :, None, None].expand(-1, -1, 2, 2))
    assert torch.equal(batch["loss_mask"], ~lat_keep[:, :, None, None].expand(-1, -1, 2, 2))
    assert len(set(batch["inpaint_task"])) > 1


def test_encode_mode_encodes_the_masked_video() -> None:
    vae = tiny_vae()
    video = torch.rand(2, 3, 17, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0 = vae.encode(video, sample=False)
    cond = InpaintConditioner(InpaintConfig(stages=[InpaintStage(0, {"continuation": 1, "random": 1})]), seed=3,
                              vae=vae)
    batch = {"x0": x0, "video": video, "positions": [4, 5]}
    cond(batch, 0, 0)
    assert "video" not in batch  # consumed, not carried into the forward step
    keep = batch["frame_keep"]
    assert keep.shape == (2, 17) and keep.any(dim=1).all() and not keep.all(dim=1).any()
    assert torch.allclose(batch["cond_latents"], vae.encode(masked_video(video, keep), sample=False), atol=1e-6)
    with pytest.raises(RuntimeError, match="decoded video"):
        cond({"x0": x0, "positions": [0, 1]}, 0, 0)


def test_masks_depend_on_position_and_step_not_on_the_micro_batch_split() -> None:
    cond = conditioner({"continuation": 1, "random": 1, "i2v": 1})
    whole = latent_batch(b=4, t=5)
    cond(whole, 3, 0)
    for i in range(4):
        part = {"x0": whole["x0"][i:i + 1], "positions": [i]}
        cond(part, 3, 0)
        assert torch.equal(part["frame_keep"][0], whole["frame_keep"][i])
        assert torch.equal(part["cond_latents"][0], whole["cond_latents"][i])
    other_steps = []
    for step in range(4, 10):
        again = latent_batch(b=4, t=5)
        cond(again, step, 0)
        other_steps.append(torch.equal(again["frame_keep"], whole["frame_keep"]))
    assert not all(other_steps)


def test_progressive_stages_switch_the_task() -> None:
    stages = [InpaintStage(0, {"t2v": 1}), InpaintStage(10, {"clear": 1})]
    cond = InpaintConditioner(InpaintConfig(stages=stages, masked_latents="latent_mask", loss_on="all"), seed=0)
    early, late = latent_batch(), latent_batch()
    cond(early, 9, 0)
    cond(late, 10, 0)
    assert early["inpaint_task"] == ["t2v"] * 4 and not early["frame_keep"].any()
    assert late["inpaint_task"] == ["clear"] * 4 and late["frame_keep"].all()
    assert late["loss_mask"].all()  # loss_on: all
    by_samples = InpaintConditioner(InpaintConfig(stages=stages, schedule_by="samples",
                                                  masked_latents="latent_mask"), seed=0)
    batch = latent_batch()
    by_samples(batch, 100, 9)
    assert batch["inpaint_task"] == ["t2v"] * 4


def test_kept_noise_only_where_frames_are_kept() -> None:
    ratios = {"i2v": 1}
    clean, noisy = latent_batch(), latent_batch()
    conditioner(ratios)(clean, 0, 0)
    conditioner(ratios, kept_noise_std=0.1)(noisy, 0, 0)
    delta = noisy["cond_latents"] - clean["cond_latents"]
    assert not delta[:, :, 1:].any()  # generated latent frames stay 0
    assert 0.03 < delta[:, :, 0].std() < 0.3


def test_denoiser_inputs() -> None:
    batch = latent_batch(b=2)
    conditioner({"i2v": 1})(batch, 0, 0)
    batch.update(t5_hidden=torch.randn(2, 5, 16), t5_mask=torch.ones(2, 5), clip_pooled=torch.randn(2, 8))
    sample = SimpleNamespace(x_t=torch.randn(2, 4, 3, 2, 2), timestep=torch.tensor([1.0, 2.0]))
    inputs = i2v_inputs(batch, sample)
    hidden = inputs["hidden_states"]
    assert hidden.shape == (2, 4 + 4 + 8, 3, 2, 2)
    assert torch.equal(hidden[:, :4], sample.x_t) and torch.equal(hidden[:, 4:8], batch["cond_latents"])
    assert torch.equal(hidden[:, 8:], batch["cond_mask"])
    assert inputs["loss_mask"][:, 0].sum() == 0 and inputs["loss_mask"][:, 1:].all()
    with pytest.raises(ValueError, match="does not match"):
        conditioned_input(sample.x_t, batch["cond_latents"][:, :, :2], batch["cond_mask"])

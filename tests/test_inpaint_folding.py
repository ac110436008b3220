"""Folding frame keep-masks to latent time (frames into channels) and why the cache approximation is exact on
prefix masks (the WF-VAE is causal)."""

from __future__ import annotations

import pytest
import torch

from megatron_video.inpaint import fold_mask, frames_from_latent, latent_frames, latent_keep, masked_video
from megatron_video.inpaint.masks import task_keep_mask
from tests.inpaint_fixtures import tiny_vae


def reference_fold(values: list[float], stride: int = 8) -> list[list[float]]:
    """folded[c][j] written out: latent frame 0 <- frame 0 on every channel, j >= 1 <- frame 8(j-1)+1+c."""
    n = (len(values) - 1) // stride
    return [[values[0]] + [values[stride * (j - 1) + 1 + c] for j in range(1, n + 1)] for c in range(stride)]


@pytest.mark.parametrize("frames", (1, 9, 17, 33))
def test_fold_puts_each_frame_in_its_latent_frame_and_channel(frames: int) -> None:
    values = torch.arange(frames, dtype=torch.float32) + 1.0  # distinct per frame: checks the order
    keep = torch.stack([values, -values])
    folded = fold_mask(keep, (3, 2))
    assert folded.shape == (2, 8, latent_frames(frames), 3, 2)
    assert folded[0, :, :, 1, 1].tolist() == reference_fold(values.tolist())
    assert folded[1, :, :, 2, 0].tolist() == reference_fold((-values).tolist())
    assert torch.equal(folded, folded[:, :, :, :1, :1].expand_as(folded))  # spatially uniform


def test_fold_of_task_masks() -> None:
    keep = torch.stack([task_keep_mask(t, 17, torch.Generator()) for t in ("i2v", "transition", "t2v")])
    folded = fold_mask(keep, (1, 1))[..., 0, 0]  # (3, 8, 3)
    assert folded[0, :, 0].tolist() == [1.0] * 8 and not folded[0, :, 1:].any()
    assert folded[1, :, 2].tolist() == [0.0] * 7 + [1.0]  # the last frame is the last channel
    assert not folded[2].any()


def test_per_pixel_mask_is_averaged_over_latent_cells() -> None:
    keep = torch.zeros(1, 9, 16, 16)
    keep[:, :, :8, :4] = 1.0  # the top-left cell half kept, the rest generated
    folded = fold_mask(keep, (2, 2))
    assert torch.allclose(folded[0, :, :, 0, 0], torch.full((8, 2), 0.5))
    assert not folded[0, :, :, 1].any() and not folded[0, :, :, 0, 1].any()


def test_latent_keep_and_frame_expansion() -> None:
    keep = torch.zeros(3, 17, dtype=torch.bool)
    keep[0, 0] = True  # i2v: latent frame 0 is frame 0 alone
    keep[1, :9] = True  # first 9 frames = latent frames 0 and 1
    keep[2, :8] = True  # frame 8 missing: latent frame 1 is not fully kept
    assert latent_keep(keep).tolist() == [[True, False, False], [True, True, False], [True, False, False]]
    lat = torch.tensor([[True, False, True], [False, True, False]])
    frames = frames_from_latent(lat)
    assert frames.shape == (2, 17) and frames[0].tolist() == [True] + [False] * 8 + [True] * 8
    assert torch.equal(latent_keep(frames), lat)


def test_frame_counts_must_be_8n_plus_1() -> None:
    with pytest.raises(ValueError, match="8n\\+1"):
        fold_mask(torch.ones(1, 10), (1, 1))
    with pytest.raises(ValueError, match="8n\\+1"):
        latent_keep(torch.ones(1, 16))


def test_causal_vae_gives_exact_prefix_latents() -> None:
    """Documented basis of the feature-cache mode: with the first 8k+1 frames kept, the masked video's latents
    equal the full video's on latent frames 0..k; later (generated) latent frames differ."""
    vae = tiny_vae()
    video = torch.rand(1, 3, 17, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keep = torch.zeros(1, 17, dtype=torch.bool)
    keep[0, :9] = True
    full = vae.encode(video, sample=False)
    masked = vae.encode(masked_video(video, keep), sample=False)
    assert torch.allclose(masked[:, :, :2], full[:, :, :2], atol=1e-6)
    assert not torch.allclose(masked[:, :, 2], full[:, :, 2], atol=1e-3)

"""Inpainting conditioning at sampling time: image-to-video, transition, continuation (and t2v through an
inpainting model), built the way the model was trained (inpaint/conditioning.py, `masked_latents`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megatron_video.inpaint.conditioning import masked_video
from megatron_video.inpaint.folding import TIME_STRIDE, fold_mask, latent_keep
from megatron_video.inpaint.masks import task_keep_mask
from megatron_video.sampling.sampler import InpaintCondition

SAMPLING_TASKS = ("t2v", "i2v", "transition", "continuation")


def task_frame_mask(task: str, num_frames: int, num_keep: int = 1) -> Tensor:
    """(num_frames,) bool: which frames the caller gives. i2v: the first; transition: the first and the last;
    continuation: the first `num_keep`; t2v: none."""
    if task not in SAMPLING_TASKS:
        raise ValueError(f"unknown sampling task {task!r}; known: {', '.join(SAMPLING_TASKS)}")
    if task != "continuation":  # t2v, i2v, transition draw nothing from the generator
        return task_keep_mask(task, num_frames, torch.Generator())
    if not 1 <= num_keep < num_frames:
        raise ValueError(f"continuation keeps 1 to {num_frames - 1} frames, got {num_keep}")
    keep = torch.zeros(num_frames, dtype=torch.bool)
    keep[:num_keep] = True
    return keep


def inpaint_condition(keep: Tensor, latent_thw: tuple[int, int, int], *, video: Tensor | None = None,
                      vae: Any = None, latents: Tensor | None = None, chunk_size: int | None = None,
                      stride: int = TIME_STRIDE) -> InpaintCondition:
    """Conditioning for frame keep-masks `keep` (B, T frames).

    "encode" convention (the model trained with masked_latents: encode): `video` (B, 3, T, H, W) in [-1, 1]
    with the frames not kept set to 0 goes through `vae`. "latent_mask" convention: `latents` (B, C, T', H', W')
    of the given video, zeroed on latent frames not wholly kept."""
    t_lat, h, w = latent_thw
    if keep.dim() != 2 or keep.shape[1] != stride * (t_lat - 1) + 1:
        raise ValueError(f"keep-mask must be (B, {stride * (t_lat - 1) + 1}) frames for {t_lat} latent frames, "
                         f"got {tuple(keep.shape)}")
    kept_latent = latent_keep(keep, stride)
    if video is not None and vae is not None:
        if video.shape[2] != keep.shape[1]:
            raise ValueError(f"conditioning video has {video.shape[2]} frames, the keep-mask {keep.shape[1]}")
        cond = vae.encode(masked_video(video, keep.to(video.device)), chunk_size=chunk_size, sample=False).float()
    elif latents is not None:
        cond = latents.float() * kept_latent.to(latents.device)[:, None, :, None, None]
    else:
        raise ValueError("inpainting conditioning needs the video and the VAE, or the video's latents")
    if tuple(cond.shape[2:]) != (t_lat, h, w):
        raise ValueError(f"conditioning latents {tuple(cond.shape)} do not match the latent size {latent_thw}")
    return InpaintCondition(cond, fold_mask(keep, (h, w), stride).to(cond), kept_latent.to(cond.device))


__all__ = ["SAMPLING_TASKS", "inpaint_condition", "task_frame_mask"]

"""Per-micro-batch inpainting conditioning: task, keep-mask, the masked video's latents, the folded mask, the
loss mask; and the denoiser input concat(noisy latent, masked-video latents, folded mask).

Where the masked video's latents come from (`masked_latents` in the inpainting config):

* "encode" (exact, online encoding only): the decoded video with the generated frames set to 0 (mid-grey in
  [-1, 1]) goes through the frozen WF-VAE, as at inference. Keep-masks are drawn per frame.
* "latent_mask" (works with the feature cache, which holds only the full video's latents): masks are drawn per
  latent frame (continuation keeps the first k latent frames, i.e. frames 0 .. 8(k-1), random k latent frames,
  ...), the conditioning latents are the full video's latents on kept latent frames and 0 elsewhere. Because
  the WF-VAE is causal, a kept latent frame whose frames and all earlier frames are kept (t2v, i2v,
  continuation, clear) equals what "encode" gives there; the generated latent frames (0 here, VAE(grey) there)
  and kept frames after a gap (transition, random) differ. It is a different conditioning convention: sample a
  model with the same convention it was trained with.

Randomness (task, n, which frames, kept-frame noise) comes from a generator per sample keyed by (seed,
iteration, position in the global batch) on its own stream (the diffusion noise uses stream 0, this stream 1),
so TP/CP/PP peers agree without communication and a resumed run draws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_video.diffusion.seeding import make_generator, noise_seed
from megatron_video.inpaint.config import InpaintConfig
from megatron_video.inpaint.folding import TIME_STRIDE, fold_mask, frames_from_latent, latent_keep
from megatron_video.inpaint.masks import sample_task, task_keep_mask

INPAINT_STREAM = 1  # the `dp_rank` slot of noise_seed; the diffusion noise uses 0


def inpaint_generators(seed: int, iteration: int, positions: list[int]) -> list[torch.Generator]:
    return [make_generator(noise_seed(seed, iteration, int(p), INPAINT_STREAM)) for p in positions]


def masked_video(video: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) video with the frames not kept ((B, T) keep-mask) set to 0."""
    return video * keep.to(video.dtype)[:, None, :, None, None]


def condition_channels(latent_channels: int, stride: int = TIME_STRIDE) -> int:
    """Extra denoiser input channels: the masked video's latents plus the folded mask."""
    return latent_channels + stride


@dataclass
class InpaintConditioner:
    """Adds "cond_latents" (B, C, T', H', W'), "cond_mask" (B, 8, T', H', W'), "loss_mask" (B, T', H', W'),
    "frame_keep" (B, T) and "inpaint_task" to an encoded micro-batch (after the loop set its "positions")."""

    config: InpaintConfig
    seed: int
    vae: Any = None  # the frozen WF-VAE ("encode" mode)
    vae_chunk: int | None = None
    stride: int = TIME_STRIDE

    def keep_masks(self, positions: list[int], num_latent_frames: int, iteration: int, consumed_samples: int,
                   ) -> tuple[list[str], torch.Tensor, list[torch.Generator]]:
        """(tasks, frame keep-mask (B, T) bool, the per-sample generators for what follows)."""
        cfg = self.config
        stage = cfg.stage_at(iteration, consumed_samples)
        gens = inpaint_generators(self.seed, iteration, positions)
        by_latent = cfg.masked_latents == "latent_mask"
        units = num_latent_frames if by_latent else self.stride * (num_latent_frames - 1) + 1
        tasks = [sample_task(stage, gen) for gen in gens]
        keep = torch.stack([task_keep_mask(task, units, gen, cfg.min_keep_fraction, cfg.max_keep_fraction)
                            for task, gen in zip(tasks, gens)])
        return tasks, frames_from_latent(keep, self.stride) if by_latent else keep, gens

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], iteration: int, consumed_samples: int) -> None:
        x0 = batch["x0"]
        b, _, t_lat, h, w = x0.shape
        tasks, keep, gens = self.keep_masks(list(batch["positions"]), t_lat, iteration, consumed_samples)
        if self.config.masked_latents == "latent_mask":
            cond = x0 * latent_keep(keep, self.stride).to(x0)[:, None, :, None, None]
        else:
            video = batch.pop("video", None)
            if video is None or self.vae is None:
                raise RuntimeError("masked_latents 'encode' needs the decoded video and the WF-VAE (online "
                                   "encoding: a data config without cache_path, and --vae-path/--vae-config)")
            if video.shape[2] != keep.shape[1]:
                raise ValueError(f"video has {video.shape[2]} frames, latents imply {keep.shape[1]}")
            masked = masked_video(video.to(x0.device), keep.to(x0.device))
            cond = self.vae.encode(masked, chunk_size=self.vae_chunk, sample=False).to(x0)
        folded = fold_mask(keep, (h, w), self.stride).to(x0)
        if self.config.kept_noise_std > 0:
            carries = (folded.amax(dim=1) > 0)[:, None].to(x0)  # latent frames holding any kept frame
            noise = torch.stack([torch.randn(cond.shape[1:], generator=g, dtype=torch.float32) for g in gens])
            cond = cond + self.config.kept_noise_std * noise.to(x0) * carries
        if self.config.loss_on == "generated":
            generated = ~latent_keep(keep, self.stride)
            loss_mask = generated[:, :, None, None].expand(b, t_lat, h, w).to(x0.device)
        else:
            loss_mask = torch.ones(b, t_lat, h, w, dtype=torch.bool, device=x0.device)
        batch.update(cond_latents=cond, cond_mask=folded, loss_mask=loss_mask, frame_keep=keep,
                     inpaint_task=tasks)


def conditioned_input(x_t: torch.Tensor, cond_latents: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """concat(noisy latent, masked-video latents, folded mask) on the channel axis."""
    if cond_latents.shape[2:] != x_t.shape[2:] or cond_mask.shape[2:] != x_t.shape[2:]:
        raise ValueError(f"conditioning {tuple(cond_latents.shape)} / {tuple(cond_mask.shape)} does not match the "
                         f"latent {tuple(x_t.shape)} in T, H, W")
    return torch.cat([x_t, cond_latents.to(x_t.dtype), cond_mask.to(x_t.dtype)], dim=1)


def i2v_inputs(batch: dict[str, Any], sample: Any) -> dict[str, torch.Tensor]:
    """The loop's `prepare_inputs` for inpainting: t2v's inputs with the conditioned hidden states and the
    loss restricted by the batch's loss mask."""
    from megatron_video.training.loop import t2v_inputs

    inputs = t2v_inputs(batch, sample)
    inputs["hidden_states"] = conditioned_input(sample.x_t, batch["cond_latents"], batch["cond_mask"])
    inputs["loss_mask"] = inputs["loss_mask"] & batch["loss_mask"].to(inputs["loss_mask"].device)
    return inputs


__all__ = ["INPAINT_STREAM", "InpaintConditioner", "condition_channels", "conditioned_input", "i2v_inputs",
           "inpaint_generators", "masked_video"]

"""Image-to-video, transition and continuation as one frame-masked inpainting model (DESIGN §10)."""

from megatron_video.inpaint.conditioning import (
    InpaintConditioner,
    condition_channels,
    conditioned_input,
    i2v_inputs,
    masked_video,
)
from megatron_video.inpaint.config import TASKS, InpaintConfig, InpaintStage, load_inpaint_config
from megatron_video.inpaint.folding import fold_mask, frames_from_latent, latent_frames, latent_keep
from megatron_video.inpaint.masks import keep_count_range, sample_task, task_keep_mask

__all__ = [
    "TASKS", "InpaintConditioner", "InpaintConfig", "InpaintStage", "condition_channels", "conditioned_input",
    "fold_mask", "frames_from_latent", "i2v_inputs", "keep_count_range", "latent_frames", "latent_keep",
    "load_inpaint_config", "masked_video", "sample_task", "task_keep_mask",
]

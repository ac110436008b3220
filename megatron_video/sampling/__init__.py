"""Sampling: rectified-flow Euler steps with guidance and inpainting conditioning, decoding, video files."""

from megatron_video.sampling.sampler import (
    InpaintCondition,
    SamplerConfig,
    TextBatch,
    initial_noise,
    predict,
    sample,
)

__all__ = ["InpaintCondition", "SamplerConfig", "TextBatch", "initial_noise", "predict", "sample"]

"""Open-Sora Plan v1.5 SUV MMDiT denoiser (tensor-parallel, Megatron sequence parallel)."""

from megatron_video.models.suv_mmdit.config import (
    PRESETS,
    BlockSpec,
    SUVConfig,
    megatron_config,
    skip_partner,
    suv_config,
)
from megatron_video.models.suv_mmdit.model import SUVBlock, SUVMMDiT

__all__ = ["PRESETS", "BlockSpec", "SUVBlock", "SUVConfig", "SUVMMDiT", "megatron_config", "skip_partner", "suv_config"]

"""Condition controllers on a frozen SUV denoiser: the structure controller (canny / depth / sketch)."""

from megatron_video.models.control.controller import (
    ControlConfig,
    ControlledSUV,
    StructureControl,
    StructureController,
    StructureEncoder,
)

__all__ = ["ControlConfig", "ControlledSUV", "StructureControl", "StructureController", "StructureEncoder"]

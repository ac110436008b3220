"""Device backends.

`setup_device` picks one backend (cuda, npu or cpu) and prepares torch and megatron-core for it. The cpu backend
is the only code in the project that patches torch or megatron-core internals; it exists so that the real
megatron-core code paths (tensor parallel layers, DDP, the distributed optimizer, pipeline schedules,
dist_checkpointing) run on CPU processes with gloo for development and CI.
"""

from __future__ import annotations

from megatron_video.adaptor.base import DeviceBackend, DeviceUnavailableError, current_backend, setup_device

__all__ = ["DeviceBackend", "DeviceUnavailableError", "current_backend", "setup_device", "default_device_name"]


def default_device_name() -> str:
    """cuda if a GPU is visible, else npu if torch_npu imports, else cpu."""
    from megatron_video.adaptor.base import detect_default_device

    return detect_default_device()

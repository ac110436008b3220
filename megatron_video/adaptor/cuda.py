"""CUDA: megatron-core runs natively; only check that a GPU is there."""

from __future__ import annotations

import torch


def prepare() -> None:
    from megatron_video.adaptor.base import DeviceUnavailableError

    if not torch.cuda.is_available():
        raise DeviceUnavailableError("--device cuda was requested but torch sees no CUDA device")

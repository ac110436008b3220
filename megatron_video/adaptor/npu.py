"""Ascend NPU: torch_npu registers the device, mindspeed's megatron adaptor patches megatron-core for it."""

from __future__ import annotations

import importlib


def prepare() -> None:
    from megatron_video.adaptor.base import DeviceUnavailableError

    try:
        importlib.import_module("torch_npu")
    except ImportError as exc:
        raise DeviceUnavailableError(
            "--device npu needs the 'torch_npu' package (Ascend PyTorch adapter, matching your CANN version); "
            f"it could not be imported: {exc}"
        ) from exc
    try:
        # mindspeed must patch megatron-core before megatron's modules are used.
        importlib.import_module("mindspeed.megatron_adaptor")
    except ImportError as exc:
        raise DeviceUnavailableError(
            "--device npu needs the 'mindspeed' package (MindSpeed, the Ascend acceleration library for "
            f"megatron-core); it could not be imported: {exc}"
        ) from exc

"""Backend selection. Each backend module exposes `prepare() -> DeviceBackend`."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch

DEVICES = ("cuda", "npu", "cpu")
DIST_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used on this machine (missing package or hardware)."""


@dataclass(frozen=True)
class DeviceBackend:
    name: str  # cuda | npu | cpu
    dist_backend: str  # nccl | hccl | gloo

    def device(self, local_rank: int = 0) -> torch.device:
        if self.name == "cpu":
            return torch.device("cpu")
        return torch.device(self.name, local_rank)

    def set_device(self, local_rank: int) -> None:
        if self.name == "cuda":
            torch.cuda.set_device(local_rank)
        elif self.name == "npu":
            torch.npu.set_device(local_rank)  # type: ignore[attr-defined]

    def synchronize(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize()
        elif self.name == "npu":
            torch.npu.synchronize()  # type: ignore[attr-defined]

    def max_memory_allocated(self) -> int:
        """Peak bytes allocated on the device (cpu: peak resident set size of the process)."""
        if self.name == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.name == "npu":
            return torch.npu.max_memory_allocated()  # type: ignore[attr-defined]
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_ACTIVE: DeviceBackend | None = None


def npu_available() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def detect_default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if npu_available():
        return "npu"
    return "cpu"


def setup_device(name: str | None = None) -> DeviceBackend:
    """Prepare torch/megatron-core for `name` (default: detected). Idempotent; switching devices is an error."""
    global _ACTIVE
    name = name or detect_default_device()
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if _ACTIVE is not None:
        if _ACTIVE.name != name:
            raise RuntimeError(f"device backend already set up as {_ACTIVE.name!r}; cannot switch to {name!r}")
        return _ACTIVE
    module = importlib.import_module(f"megatron_video.adaptor.{name}")
    module.prepare()
    _ACTIVE = DeviceBackend(name=name, dist_backend=DIST_BACKENDS[name])
    return _ACTIVE


def active_backend() -> DeviceBackend | None:
    """The backend chosen by `setup_device`, or None before it ran."""
    return _ACTIVE


def current_backend() -> DeviceBackend:
    """The backend chosen by `setup_device` (sets up the default one if none was chosen yet)."""
    return _ACTIVE if _ACTIVE is not None else setup_device()

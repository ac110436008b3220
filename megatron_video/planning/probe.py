"""Measured activation memory on any device: the live bytes of tensors autograd keeps for backward.

`SavedTensorMeter` wraps every saved tensor (via `torch.autograd.graph.saved_tensors_hooks`) and counts its
storage while the autograd graph holds it, once per storage, so views and re-saves are not double counted.
Parameters are excluded (they are model state, not activations). This is the quantity the planner's activation
model predicts; it needs no CUDA memory statistics, so it also works on CPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """Context manager; keep it open across forward and backward to see recompute transients."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._refs: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _release(self, ptr: int, nbytes: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            del self._refs[ptr]
            self.live -= nbytes

    def _pack(self, tensor: torch.Tensor) -> object:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._excluded or tensor.device.type == "meta":
            return tensor
        if ptr not in self._refs:
            self._refs[ptr] = 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[ptr] += 1
        box = _Saved(tensor)
        weakref.finalize(box, self._release, ptr, storage.nbytes())
        return box

    @staticmethod
    def _unpack(box: object) -> torch.Tensor:
        return box.tensor if isinstance(box, _Saved) else box  # type: ignore[return-value]

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


__all__ = ["SavedTensorMeter"]

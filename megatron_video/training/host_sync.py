"""Count the places where the host waits for the device (device -> host synchronisation).

On a GPU or NPU the host runs ahead of the device by queueing kernels; any op whose result the host must read
(a Python scalar from a tensor, an output whose size depends on the data) stalls that queue. `HostSyncCounter`
records such ops while active. It works on CPU too, where nothing actually waits: it counts the ops that
*would* synchronise on a device, so tests can hold the model to zero on any machine.

Counted: aten._local_scalar_dense (`.item()`, `bool(t)`, `int(t)`, `float(t)`), data-dependent output sizes
(nonzero, masked_select, unique, boolean-mask indexing, repeat_interleave with tensor repeats) and, through a
torch-function hook, `Tensor.tolist()` / `Tensor.numpy()` (which on CPU tensors skip the dispatcher).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_DATA_DEPENDENT = {
    aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_consecutive,
    aten.unique_dim,
}
_HOST_READS = {"tolist", "numpy"}  # item(), bool(), int(), float() reach _local_scalar_dense


def _bool_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in _DATA_DEPENDENT:
            self.counts[str(packet)] += 1
        elif packet in (aten.index, aten.index_put, aten.index_put_) and _bool_index(args[1]):
            self.counts[f"{packet} (boolean mask)"] += 1
        elif packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and len(args) > 1 \
                and isinstance(args[1], torch.Tensor):
            self.counts[str(packet)] += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.counts[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """`with HostSyncCounter() as syncs: ...` then `syncs.total`, `syncs.counts` (op -> number)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._modes = (_Function(self.counts), _Dispatch(self.counts))

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


__all__ = ["HostSyncCounter"]

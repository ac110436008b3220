"""Per-collective byte counters for tests and benchmarks.

While a `CommCounter` is active it wraps the torch.distributed collectives (including those megatron-core calls)
and records, per collective and per process group size, the number of calls, the local payload bytes and the
bytes this rank puts on the wire under the usual ring / pairwise algorithms. Wrapping torch.distributed is a
patch of torch internals, hence this lives in `adaptor/`; it is active only inside the `with` block.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


def _nbytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (list, tuple)):
        return sum(_nbytes(t) for t in tensors)
    return 0


def _group_size(group: Any) -> int:
    return dist.get_world_size(group)


# collective -> (index of the payload argument, wire factor as a function of the group size P)
# payload = this rank's contribution; wire = bytes it sends with the standard algorithm.
_COLLECTIVES: dict[str, tuple[int, Callable[[int], float]]] = {
    "all_reduce": (0, lambda p: 2.0 * (p - 1) / p),
    "all_gather_into_tensor": (1, lambda p: float(p - 1)),
    "_all_gather_base": (1, lambda p: float(p - 1)),
    "all_gather": (1, lambda p: float(p - 1)),
    "reduce_scatter_tensor": (1, lambda p: (p - 1) / p),
    "_reduce_scatter_base": (1, lambda p: (p - 1) / p),
    "reduce_scatter": (1, lambda p: (p - 1) / p),
    "all_to_all_single": (1, lambda p: (p - 1) / p),
    "all_to_all": (1, lambda p: (p - 1) / p),
    "broadcast": (0, lambda p: (p - 1) / p),
    "send": (0, lambda p: 1.0),
}
# positional index of the `group` argument of each collective
_GROUP_POSITION = {
    "all_reduce": 2, "all_gather_into_tensor": 2, "_all_gather_base": 2, "all_gather": 2,
    "reduce_scatter_tensor": 3, "_reduce_scatter_base": 3, "reduce_scatter": 3,
    "all_to_all_single": 5, "all_to_all": 2, "broadcast": 2, "send": 2,
}
_MEGATRON_ALIASES = {"dist_all_gather_func": "all_gather_into_tensor",
                     "dist_reduce_scatter_func": "reduce_scatter_tensor"}
_PAYLOAD_KWARGS = ("tensor", "input", "input_tensor", "input_tensor_list", "input_list")


@dataclass
class OpStats:
    calls: int = 0
    payload_bytes: int = 0
    wire_bytes: float = 0.0


@dataclass
class CommCounter:
    """`with CommCounter() as c: ...` then `c.stats["all_to_all_single"].wire_bytes`, `c.total_wire_bytes()`.

    `only_group_size` restricts counting to groups of that size (e.g. the CP group's)."""

    stats: dict[str, OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    by_group_size: dict[tuple[str, int], OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    _saved: dict[str, Callable] = field(default_factory=dict)
    _saved_aliases: list[tuple[Any, str, Callable]] = field(default_factory=list)

    def _record(self, op: str, payload: int, group_size: int, wire_factor: float) -> None:
        for entry in (self.stats[op], self.by_group_size[(op, group_size)]):
            entry.calls += 1
            entry.payload_bytes += payload
            entry.wire_bytes += payload * wire_factor

    def _wrap(self, op: str, fn: Callable, payload_index: int, factor: Callable[[int], float]) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            if group is None and len(args) > _GROUP_POSITION[op]:
                group = args[_GROUP_POSITION[op]]
            size = _group_size(group)
            payload_arg = args[payload_index] if len(args) > payload_index else None
            for name in _PAYLOAD_KWARGS:
                if payload_arg is None:
                    payload_arg = kwargs.get(name)
            self._record(op, _nbytes(payload_arg), size, factor(size))
            return fn(*args, **kwargs)

        return wrapper

    def _wrap_batch_p2p(self, fn: Callable) -> Callable:
        def wrapper(p2p_op_list: list, *args: Any, **kwargs: Any) -> Any:
            for p2p in p2p_op_list:
                if getattr(p2p.op, "__name__", "") == "isend":
                    self._record("p2p_send", _nbytes(p2p.tensor), 2, 1.0)
            return fn(p2p_op_list, *args, **kwargs)

        return wrapper

    def __enter__(self) -> CommCounter:
        for op, (index, factor) in _COLLECTIVES.items():
            fn = getattr(dist, op, None)
            if fn is None:
                continue
            self._saved[op] = fn
            setattr(dist, op, self._wrap(op, fn, index, factor))
        self._saved["batch_isend_irecv"] = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._wrap_batch_p2p(dist.batch_isend_irecv)
        # megatron-core binds its all-gather / reduce-scatter functions to module aliases at import time
        for module_name, module in list(sys.modules.items()):
            if not module_name.startswith("megatron.core") or module is None:
                continue
            for alias, op in _MEGATRON_ALIASES.items():
                fn = module.__dict__.get(alias)
                if callable(fn):
                    self._saved_aliases.append((module, alias, fn))
                    index, factor = _COLLECTIVES[op]
                    setattr(module, alias, self._wrap(op, fn, index, factor))
        return self

    def __exit__(self, *exc: Any) -> None:
        for op, fn in self._saved.items():
            setattr(dist, op, fn)
        for module, alias, fn in self._saved_aliases:
            setattr(module, alias, fn)
        self._saved.clear()
        self._saved_aliases.clear()

    def total_wire_bytes(self, ops: tuple[str, ...] | None = None) -> float:
        return sum(s.wire_bytes for op, s in self.stats.items() if ops is None or op in ops)

    def summary(self) -> dict[str, dict[str, float]]:
        return {op: {"calls": s.calls, "payload_bytes": s.payload_bytes, "wire_bytes": s.wire_bytes}
                for op, s in sorted(self.stats.items())}

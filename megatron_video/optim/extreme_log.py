"""The record of extreme (skipped) steps and the samples that caused them, so a resumed run can skip them.

On an extreme step the training loop gathers the global batch's sample ids (`gather_sample_ids`, a collective
over the data-parallel group) and calls `ExtremeStepLog.record`; the log is checkpointed (identical on every
rank: "common" state) and, on resume, `sample_ids()` is handed to the data sampler/dataset to leave out.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


class ExtremeStepLog:
    """Iterations, grad norms and sample ids of skipped extreme steps (bounded: oldest entries drop first)."""

    def __init__(self, max_entries: int = 10000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.entries: list[dict[str, Any]] = []

    def record(self, iteration: int, sample_ids: list[int], grad_norm: float, epoch: int | None = None) -> None:
        """`epoch`: the data epoch the batch came from (its samples are skipped from the next epoch on)."""
        entry = {"iteration": int(iteration), "grad_norm": float(grad_norm),
                 "sample_ids": sorted(int(i) for i in sample_ids)}
        self.entries.append(entry if epoch is None else {**entry, "epoch": int(epoch)})
        del self.entries[:-self.max_entries]

    def sample_ids(self) -> set[int]:
        return {i for entry in self.entries for i in entry["sample_ids"]}

    def state_dict(self) -> dict[str, Any]:
        return {"max_entries": self.max_entries, "entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        entries = state["entries"]
        for entry in entries:
            if not {"iteration", "grad_norm", "sample_ids"} <= set(entry):
                raise KeyError(f"malformed extreme-step entry {entry!r}")
        self.max_entries = int(state.get("max_entries", self.max_entries))
        self.entries = [dict(e) for e in entries][-self.max_entries:]


def gather_sample_ids(local_ids: list[int], group: dist.ProcessGroup | None = None) -> list[int]:
    """All ranks' sample ids of the current global batch (collective over `group`; sorted, unique)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return sorted({int(i) for i in local_ids})
    parts: list[list[int] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, [int(i) for i in local_ids], group=group)
    return sorted({i for part in parts for i in (part or [])})

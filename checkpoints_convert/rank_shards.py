"""Megatron's legacy per-rank layout, `mp_rank_TT[_PPP]/model_optim_rng.pt`, read one key at a time.

Our legacy format, MindSpeed-MM's and the Open-Sora Plan fork's all keep one torch file per (TP rank, PP stage)
holding released-name state dicts: TP slices of the split tensors, replicas of the rest, each pipeline stage with
its own (globally numbered) blocks. `RankShards` holds the opened state dicts, knows on which stage each key lives
and what shape it has once the TP slices are put together; the readers (ours.LegacyReader,
mindspeed.UpstreamLegacyReader) differ only in how a file is opened, which entry holds the weights, the key
names, and how unequal replicas are treated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from checkpoints_convert.layout import split_dim
from checkpoints_convert.tensorio import drop_mapped_pages, file_mappings

LEGACY_FILE = "model_optim_rng.pt"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


class CheckpointFormatError(ValueError):
    """A checkpoint directory that is not what it should be."""


def legacy_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def has_rank_dirs(directory: Path) -> bool:
    return any(RANK_DIR.match(p.name) for p in directory.iterdir() if p.is_dir())


def rank_files(directory: Path) -> dict[tuple[int, int], Path]:
    """{(TP rank, PP stage): file} of a complete per-rank checkpoint; an incomplete one is refused by name."""
    files: dict[tuple[int, int], Path] = {}
    for sub in directory.iterdir():
        match = RANK_DIR.match(sub.name)
        if match and sub.is_dir():
            files[(int(match[1]), int(match[2] or 0))] = sub / LEGACY_FILE
    if not files:
        raise CheckpointFormatError(f"{directory}: no mp_rank_* folders")
    tp, pp = 1 + max(t for t, _ in files), 1 + max(p for _, p in files)
    missing = [legacy_rank_dir(t, p, pp) for t in range(tp) for p in range(pp)
               if not files.get((t, p), Path("/nonexistent")).is_file()]
    if missing:
        raise CheckpointFormatError(f"{directory}: incomplete checkpoint, missing {missing[:4]}")
    return files


class RankShards:
    """The per-rank state dicts of one checkpoint: where each key lives, its merged shape, its TP values."""

    def __init__(self, directory: Path, shards: dict[tuple[int, int], dict[str, Any]], files: Iterable[Path]) -> None:
        self.directory = directory
        self.shards = shards
        self.tp = 1 + max(t for t, _ in shards)
        self.pp = 1 + max(p for _, p in shards)
        self._mappings = file_mappings(files)
        self._where: dict[str, int] = {}
        for p in range(self.pp):
            keys = list(shards[(0, p)])
            if any(list(shards[(t, p)]) != keys for t in range(1, self.tp)):
                raise CheckpointFormatError(f"{directory}: TP ranks of pipeline stage {p} hold different keys")
            for key in keys:
                if key in self._where:
                    raise CheckpointFormatError(f"{directory}: {key} is on pipeline stages {self._where[key]} and "
                                                f"{p} (blocks must be numbered globally)")
                self._where[key] = p

    def keys(self) -> list[str]:
        return list(self._where)

    def values(self, key: str) -> list[Any]:
        """`key` on every TP rank of its pipeline stage."""
        p = self._where[key]
        return [self.shards[(t, p)][key] for t in range(self.tp)]

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The merged shape; None for entries that are not tensors (Megatron's `._extra_state`)."""
        values = self.values(key)
        if key.endswith("._extra_state") or not isinstance(values[0], torch.Tensor):
            return None
        shapes = [tuple(v.shape) for v in values]
        dim = split_dim(key)
        if dim is None or len(shapes[0]) <= dim:
            if len(set(shapes)) != 1:
                raise CheckpointFormatError(f"{self.directory}: {key} has different shapes on TP ranks: {shapes}")
            return shapes[0]
        if len({s[:dim] + s[dim + 1:] for s in shapes}) != 1:
            raise CheckpointFormatError(f"{self.directory}: TP slices of {key} do not fit together: {shapes}")
        return shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1:]

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        return {key: self.shape(key) for key in self._where}

    def dtype(self, key: str) -> torch.dtype:
        return self.values(key)[0].dtype

    def release(self, key: str) -> None:
        """Give the pages of `key`'s memory-mapped values back to the OS (the converter reads each key once)."""
        for value in self.values(key):
            if isinstance(value, torch.Tensor):
                drop_mapped_pages(value, self._mappings)


__all__ = ["LEGACY_FILE", "RANK_DIR", "CheckpointFormatError", "RankShards", "has_rank_dirs", "legacy_rank_dir",
           "rank_files"]

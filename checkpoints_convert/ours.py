"""Our checkpoint formats, read and written one tensor (or one block) at a time.

dist:   megatron dist_checkpointing, as the training loop saves it (`iter_XXXXXXX/` + the tracker file). Model
        tensors are ShardedTensors under `model.<our name>` (EMA: `ema.<our name>`) in global shapes, so a
        dist checkpoint has no TP/PP layout: it loads at any layout and never needs resharding.
legacy: Megatron's per-rank layout `iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt` (as MindSpeed-MM and the
        Open-Sora Plan fork use): each file holds `{"model": {released name: TP-rank slice or None}, ...}`
        for the blocks of its pipeline stage (global block numbering, released names, `._extra_state` None).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from checkpoints_convert.layout import block_of, tp_merge
from checkpoints_convert.rank_shards import (
    LEGACY_FILE,
    CheckpointFormatError,
    RankShards,
    has_rank_dirs,
    legacy_rank_dir,
    rank_files,
)
from checkpoints_convert.sources import SourceError, load_pt
from megatron_video.models.suv_mmdit.config import SUVConfig
from megatron_video.models.suv_mmdit.state_dict_adapter import from_released_key, to_released_key
from megatron_video.training.checkpointing import TRACKER, fresh_tmp_dir, iteration_dir, publish_checkpoint

# Weights only: no per-rank RNG state (no "has_rng_state"), so load_checkpoint never asks for one.
FINETUNE_COMMON = {"train": {"iteration": 0, "consumed_samples": 0}, "world_size": 1}


def ensure_process_group() -> None:
    """dist_checkpointing needs a process group: a one-rank gloo group unless one exists."""
    import torch.distributed as dist

    from megatron_video.adaptor import setup_device

    setup_device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def resolve_iteration(path: str | Path, iteration: int | None = None) -> Path:
    """An `iter_XXXXXXX` directory: `path` itself, or under `path` (the tracker's iteration by default)."""
    path = Path(path)
    if re.match(r"^iter_\d{7}$", path.name) and path.is_dir():
        return path
    if not path.is_dir():
        raise CheckpointFormatError(f"checkpoint directory not found: {path}")
    if iteration is None:
        tracker = path / TRACKER
        if not tracker.is_file():
            raise CheckpointFormatError(f"{path}: no {TRACKER}; pass --iteration or an iter_XXXXXXX directory")
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointFormatError(f"{tracker} holds {text!r}, not an iteration number")
        iteration = int(text)
    found = iteration_dir(path, iteration)
    if not found.is_dir():
        raise CheckpointFormatError(f"checkpoint {found} not found")
    return found


def detect_format(directory: Path) -> str:
    if (directory / "metadata.json").is_file():
        return "dist"
    if has_rank_dirs(directory):
        return "legacy"
    raise CheckpointFormatError(f"{directory}: neither a dist_checkpointing directory (metadata.json) nor a "
                                "legacy one (mp_rank_* folders)")


def publish(root: Path, iteration: int, tmp: Path) -> Path:
    return publish_checkpoint(root, iteration, tmp)


def fresh_tmp(root: Path, iteration: int) -> Path:
    return fresh_tmp_dir(root, iteration)


# --- dist -----------------------------------------------------------------------------------------------------

def write_dist(root: str | Path, iteration: int, tensors: dict[str, torch.Tensor], prefix: str = "model.",
               common: dict[str, Any] | None = None) -> Path:
    """Save `{our name: full tensor}` as a dist checkpoint holding only `<prefix><name>` and `common`."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    ensure_process_group()
    root = Path(root)
    tmp = fresh_tmp(root, iteration)
    sharded = {name: ShardedTensor.from_rank_offsets(prefix + name, t, replica_id=0) for name, t in tensors.items()}
    dist_checkpointing.save({prefix.rstrip("."): sharded, "common": common or FINETUNE_COMMON}, str(tmp))
    return publish(root, iteration, tmp)


class DistReader:
    """Full tensors of one prefix (`model` or `ema`) of a dist checkpoint, loaded one block at a time."""

    def __init__(self, directory: Path, cfg: SUVConfig, weights: str = "model") -> None:
        from megatron.core.dist_checkpointing import load_tensors_metadata

        from megatron_video.training.checkpoint_safety import CheckpointRefused, verify_dist_checkpoint

        try:
            verify_dist_checkpoint(directory)
        except CheckpointRefused as exc:
            raise CheckpointFormatError(str(exc)) from exc
        ensure_process_group()
        self.directory, self.cfg = directory, cfg
        prefix = weights + "."
        meta = load_tensors_metadata(str(directory))
        self._meta: dict[str, Any] = {}
        for key, value in meta.items():
            if key.startswith(prefix) and hasattr(value, "global_shape"):
                try:
                    released = to_released_key(key[len(prefix):], cfg)
                except KeyError as exc:
                    raise CheckpointFormatError(f"{directory}: {exc}") from exc
                self._meta[released] = value
        if not self._meta:
            found = sorted({k.split(".")[0] for k in meta})
            raise CheckpointFormatError(f"{directory}: no tensors under {prefix!r} (found prefixes: {found})")
        self._group: tuple[object, dict[str, torch.Tensor]] = (object(), {})

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        return {key: tuple(meta.global_shape) for key, meta in self._meta.items()}

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key].dtype

    def get(self, key: str) -> torch.Tensor:
        group = block_of(key, self.cfg)
        if self._group[0] != group:
            self._group = (group, self._load([k for k in self._meta if block_of(k, self.cfg) == group]))
        return self._group[1][key]

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        request = {}
        for key in keys:
            meta = self._meta[key]
            request[key] = ShardedTensor.from_rank_offsets(
                meta.key, torch.empty(tuple(meta.global_shape), dtype=meta.dtype), replica_id=0)
        loaded = dist_checkpointing.load(request, str(self.directory))
        return {key: loaded[key] for key in keys}

    def release(self, key: str) -> None:
        self._group[1].pop(key, None)


# --- legacy ---------------------------------------------------------------------------------------------------

def config_dict(cfg: SUVConfig) -> dict[str, Any]:
    """The config as plain values (stored in legacy files; loadable with weights_only=True)."""
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


class LegacyReader:
    """Full released-name tensors of our legacy checkpoint: TP slices are concatenated one key at a time,
    replicas must be equal (layout.tp_merge)."""

    def __init__(self, directory: Path, weights: str = "model") -> None:
        self.directory = directory
        files = rank_files(directory)
        shards: dict[tuple[int, int], dict[str, Any]] = {}
        self.stored_config: dict[str, Any] | None = None
        for (t, p), path in sorted(files.items()):
            try:
                obj = load_pt(path)
            except SourceError as exc:
                raise CheckpointFormatError(str(exc)) from exc
            if not isinstance(obj, dict) or not isinstance(obj.get(weights), dict):
                raise CheckpointFormatError(f"{path}: no {weights!r} state dict in the file")
            shards[(t, p)] = obj[weights]
            self.stored_config = self.stored_config or obj.get("suv_config")
        self.ranks = RankShards(directory, shards, files.values())
        self.tp, self.pp = self.ranks.tp, self.ranks.pp

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        return self.ranks.shapes()

    def dtype(self, key: str) -> torch.dtype:
        return self.ranks.dtype(key)

    def get(self, key: str) -> Any:
        values = self.ranks.values(key)
        if not isinstance(values[0], torch.Tensor):
            return values[0]
        return tp_merge(key, values)

    def release(self, key: str) -> None:
        self.ranks.release(key)


def released_to_ours(keys: Iterable[str], cfg: SUVConfig) -> dict[str, str]:
    return {key: from_released_key(key, cfg) for key in keys}


__all__ = ["CheckpointFormatError", "DistReader", "FINETUNE_COMMON", "LEGACY_FILE", "LegacyReader", "config_dict",
           "detect_format", "ensure_process_group", "fresh_tmp", "legacy_rank_dir", "publish", "released_to_ours",
           "resolve_iteration", "write_dist"]

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

from checkpoints_convert.layout import block_of, split_dim, tp_merge
from checkpoints_convert.sources import SourceError, load_pt
from checkpoints_convert.tensorio import drop_mapped_pages, file_mappings
from megatron_video.models.suv_mmdit.config import SUVConfig
from megatron_video.models.suv_mmdit.state_dict_adapter import from_released_key, to_released_key
from megatron_video.training.checkpointing import TRACKER, fresh_tmp_dir, iteration_dir, publish_checkpoint

LEGACY_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
# Weights only: no per-rank RNG state (no "has_rng_state"), so load_checkpoint never asks for one.
FINETUNE_COMMON = {"train": {"iteration": 0, "consumed_samples": 0}, "world_size": 1}


class CheckpointFormatError(ValueError):
    """A checkpoint directory that is not what it should be."""


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
    if any(_RANK_DIR.match(p.name) for p in directory.iterdir() if p.is_dir()):
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

def legacy_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def config_dict(cfg: SUVConfig) -> dict[str, Any]:
    """The config as plain values (stored in legacy files; loadable with weights_only=True)."""
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


class LegacyReader:
    """Full released-name tensors of a legacy checkpoint: TP slices are concatenated one key at a time."""

    def __init__(self, directory: Path, weights: str = "model") -> None:
        self.directory = directory
        ranks: dict[tuple[int, int], Path] = {}
        for path in directory.iterdir():
            match = _RANK_DIR.match(path.name)
            if match and path.is_dir():
                ranks[(int(match[1]), int(match[2] or 0))] = path / LEGACY_FILE
        self.tp = 1 + max(t for t, _ in ranks)
        self.pp = 1 + max(p for _, p in ranks)
        missing = [legacy_rank_dir(t, p, self.pp) for t in range(self.tp) for p in range(self.pp)
                   if not ranks.get((t, p), Path("/nonexistent")).is_file()]
        if missing:
            raise CheckpointFormatError(f"{directory}: incomplete legacy checkpoint, missing {missing[:4]}")
        self.files: dict[tuple[int, int], dict[str, Any]] = {}
        self.stored_config: dict[str, Any] | None = None
        for (t, p), path in sorted(ranks.items()):
            try:
                obj = load_pt(path)
            except SourceError as exc:
                raise CheckpointFormatError(str(exc)) from exc
            if not isinstance(obj, dict) or not isinstance(obj.get(weights), dict):
                raise CheckpointFormatError(f"{path}: no {weights!r} state dict in the file")
            self.files[(t, p)] = obj[weights]
            self.stored_config = self.stored_config or obj.get("suv_config")
        self._mappings = file_mappings(ranks.values())
        self._where: dict[str, int] = {}
        for p in range(self.pp):
            keys = list(self.files[(0, p)])
            for t in range(1, self.tp):
                if list(self.files[(t, p)]) != keys:
                    raise CheckpointFormatError(f"{directory}: TP ranks of pipeline stage {p} hold different keys")
            for key in keys:
                if key in self._where:
                    raise CheckpointFormatError(f"{directory}: {key} is on pipeline stages {self._where[key]} and {p}")
                self._where[key] = p

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        out: dict[str, tuple[int, ...] | None] = {}
        for key, p in self._where.items():
            values = [self.files[(t, p)][key] for t in range(self.tp)]
            if not isinstance(values[0], torch.Tensor):
                out[key] = None
                continue
            shapes = [tuple(v.shape) for v in values]
            dim = split_dim(key)
            rest = {s[:dim] + s[dim + 1:] if dim is not None else s for s in shapes}
            if len(rest) != 1 or (dim is not None and len(shapes[0]) <= dim):
                raise CheckpointFormatError(f"{self.directory}: TP slices of {key} do not fit together: {shapes}")
            if dim is None:
                out[key] = shapes[0]
            else:
                out[key] = shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1:]
        return out

    def dtype(self, key: str) -> torch.dtype:
        return self.files[(0, self._where[key])][key].dtype

    def get(self, key: str) -> Any:
        p = self._where[key]
        values = [self.files[(t, p)][key] for t in range(self.tp)]
        if not isinstance(values[0], torch.Tensor):
            return values[0]
        return tp_merge(key, values)

    def release(self, key: str) -> None:
        for t in range(self.tp):
            value = self.files[(t, self._where[key])][key]
            if isinstance(value, torch.Tensor):
                drop_mapped_pages(value, self._mappings)


def released_to_ours(keys: Iterable[str], cfg: SUVConfig) -> dict[str, str]:
    return {key: from_released_key(key, cfg) for key in keys}


__all__ = ["CheckpointFormatError", "DistReader", "FINETUNE_COMMON", "LEGACY_FILE", "LegacyReader", "config_dict",
           "detect_format", "ensure_process_group", "fresh_tmp", "legacy_rank_dir", "publish", "released_to_ours",
           "resolve_iteration", "write_dist"]

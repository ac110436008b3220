"""Refuse checkpoints that would run code when loaded.

A dist_checkpointing directory holds three kinds of pickles: torch distributed-checkpoint's `.metadata` (read
with plain `pickle.load`), the byte entries inside the `.distcp` files (megatron's ShardedObjects, e.g. the RNG
state, which torch's load planner unpickles with `weights_only=False`) and `common.pt` (`torch.load`). Before
anything is loaded, `verify_dist_checkpoint` reads `.metadata` with an unpickler that admits only the classes a
checkpoint's metadata is made of, and loads every byte entry and `common.pt` with `weights_only=True`. Anything
else is refused with a `CheckpointRefused` naming the file; only then are the files handed to megatron.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from megatron_video.training.checkpointing import CheckpointError

# Everything torch's distributed checkpoint writes into `.metadata` (torch 2.x) and nothing else.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
}
METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"


class CheckpointRefused(CheckpointError):
    """A checkpoint file that could run code when loaded."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"refusing to load {path}: {why}")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which checkpoint metadata never holds")


def read_metadata(directory: Path) -> Any:
    """torch distributed-checkpoint metadata of `directory`, unpickled with only its own classes admitted."""
    path = directory / METADATA_FILE
    try:
        with open(path, "rb") as handle:
            return _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise
    except Exception as exc:  # any failure of a hostile or broken pickle is a refusal
        raise CheckpointRefused(path, str(exc)) from exc


def _load_weights_only(data: io.BytesIO | Path, path: Path, what: str) -> None:
    try:
        torch.load(data, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses code: a refusal that names the file
        raise CheckpointRefused(path, f"{what} is not loadable with weights_only=True ({exc})") from exc


def verify_dist_checkpoint(directory: str | Path) -> None:
    """Raise `CheckpointRefused` unless every pickle in the dist checkpoint `directory` is plain data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    directory = Path(directory)
    metadata = read_metadata(directory)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise CheckpointRefused(directory / METADATA_FILE, "it is not torch distributed-checkpoint metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata):
            continue
        info = storage.get(MetadataIndex(key))
        if info is None:
            raise CheckpointRefused(directory / METADATA_FILE, f"no storage is recorded for {key!r}")
        path = directory / info.relative_path
        if path.parent != directory:
            raise CheckpointRefused(directory / METADATA_FILE, f"{key!r} points outside the checkpoint")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointRefused(path, f"{key!r} is stored with transforms {info.transform_descriptors}")
        with open(path, "rb") as handle:
            handle.seek(info.offset)
            data = handle.read(info.length)
        _load_weights_only(io.BytesIO(data), path, f"entry {key!r}")
    if (directory / COMMON_FILE).is_file():
        _load_weights_only(directory / COMMON_FILE, directory / COMMON_FILE, "it")


def checkpoint_refusal(root: str | Path | None, flag: str) -> str | None:
    """Why the checkpoint `flag` names (its latest complete iteration) must not be loaded, or None. Cheap (reads
    only the pickles), so entry points call it before any heavy work."""
    from megatron_video.training.checkpointing import iteration_dir, latest_iteration

    if root is None:
        return None
    try:
        iteration = latest_iteration(root)
        if iteration is not None:
            verify_dist_checkpoint(iteration_dir(root, iteration))
    except CheckpointError as exc:
        return f"{flag}: {exc}"
    return None

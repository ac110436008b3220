"""Readers of released-format weights: a `.safetensors` file, a `.pt` file, or a diffusers-style folder
(`config.json` + `diffusion_pytorch_model.safetensors` or sharded with an index json). Every reader is lazy:
safetensors are memory-mapped, `.pt` files are loaded with `mmap=True, weights_only=True`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from checkpoints_convert.tensorio import MappedSafetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


class SourceError(ValueError):
    """Released weights that cannot be read."""


class ReleasedSource:
    """Released-format entries by name: `keys()`, `shape(key)` (None for a non-tensor entry), `get(key)`."""

    def __init__(self, entries: dict[str, tuple[Any, str]], config: dict[str, Any] | None, what: str) -> None:
        self._entries = entries  # key -> (MappedSafetensors | dict, name inside it)
        self.config = config
        self.what = what

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...] | None:
        holder, name = self._entries[key]
        if isinstance(holder, MappedSafetensors):
            return holder.shape(name)
        value = holder[name]
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        return {key: self.shape(key) for key in self._entries}

    def dtype(self, key: str) -> torch.dtype:
        holder, name = self._entries[key]
        return holder.dtype(name) if isinstance(holder, MappedSafetensors) else holder[name].dtype

    def get(self, key: str) -> Any:
        holder, name = self._entries[key]
        return holder.get(name) if isinstance(holder, MappedSafetensors) else holder[name]

    def release(self, key: str) -> None:
        holder, name = self._entries[key]
        if isinstance(holder, MappedSafetensors):
            holder.release(name)


def _strip(keys: list[str], prefix: str, what: str) -> dict[str, str]:
    out = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    if not out:
        raise SourceError(f"{what}: no key starts with the prefix {prefix!r} (first keys: {keys[:3]})")
    return out


def load_pt(path: Path) -> Any:
    """`torch.load` without unpickling code, memory-mapped (needs the zip format of torch >= 1.6)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "zip" in str(exc).lower() or "mmap" in str(exc).lower():
            raise SourceError(f"{path}: cannot be memory-mapped ({exc}); re-save it with torch.save (zip format) "
                              "or convert it to safetensors") from exc
        raise
    except pickle.UnpicklingError as exc:  # weights_only refuses pickled code: say so plainly
        raise SourceError(f"{path}: not loadable with weights_only=True ({type(exc).__name__}: {exc})") from exc


def _pt_state(obj: Any, path: Path, nest: str | None) -> dict[str, Any]:
    if nest:
        for part in nest.split("."):
            if not isinstance(obj, dict) or part not in obj:
                raise SourceError(f"{path}: no entry {part!r} (of --nest {nest!r}) in the loaded object")
            obj = obj[part]
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k, v in obj.items() if isinstance(v, dict)]
        raise SourceError(f"{path}: no tensors at the top level; pass --nest with one of {nested}")
    return obj


def open_released(path: str | Path, prefix: str = "", nest: str | None = None) -> ReleasedSource:
    """Open released weights lazily. `prefix` selects and strips a key prefix (e.g. `state_dict.`); `nest`
    names the entry of a `.pt` object that holds the state dict (e.g. `model` or `state_dict`)."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"released weights not found: {path}")
    config = None
    if path.is_dir():
        files = _folder_files(path)
        config_file = path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        entries: dict[str, tuple[Any, str]] = {}
        for file in files:
            reader = MappedSafetensors(file)
            for key, name in _strip(reader.keys(), prefix, str(file)).items() if prefix else (
                    (k, k) for k in reader.keys()):
                if key in entries:
                    raise SourceError(f"{path}: key {key} appears in more than one shard")
                entries[key] = (reader, name)
        return ReleasedSource(entries, config, str(path))
    if path.suffix == ".safetensors":
        reader = MappedSafetensors(path)
        names = _strip(reader.keys(), prefix, str(path)) if prefix else {k: k for k in reader.keys()}
        return ReleasedSource({k: (reader, n) for k, n in names.items()}, None, str(path))
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        state = _pt_state(load_pt(path), path, nest)
        names = _strip(list(state), prefix, str(path)) if prefix else {k: k for k in state}
        return ReleasedSource({k: (state, n) for k, n in names.items()}, None, str(path))
    raise SourceError(f"{path}: unknown weights format (expected .safetensors, .pt or a diffusers folder)")


def _folder_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise SourceError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise SourceError(f"{path}: shard(s) named in {INDEX_NAME} are missing: {missing[:3]}")
        return [path / f for f in files]
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{path}: no {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors in the folder")
    return files


__all__ = ["INDEX_NAME", "ReleasedSource", "SourceError", "WEIGHTS_NAME", "load_pt", "open_released"]

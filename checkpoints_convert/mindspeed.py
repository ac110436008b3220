"""Checkpoints written by MindSpeed-MM (`opensoraplan1.5`) and the Open-Sora Plan `mindspeed_mmdit` fork, read as
released-name tensors for `import`.

Both use Megatron's legacy layout: `<root>/latest_checkpointed_iteration.txt` (a number or `release`),
`iter_XXXXXXX/` or `release/`, then `mp_rank_TT[_PPP]/model_optim_rng.pt` holding `{"model": state dict, ...}`
(the fork also `"ema_model"`, its EMA weights, with `--use-ema`). TP slices follow the released split rules
(their converters: MindSpeed-MM checkpoint/sora_model/opensoraplan_converter.py `tp_split_mapping`, the fork's
examples/opensoraplan1.5/convert_mm_to_ckpt.py `keys_part_on_tp_dim_0/1`), which are ours (layout.tp_merge).

Names: the fork uses the released names. MindSpeed-MM renames the attention modules (its converter's v1.5
`str_replace_mapping`: `attn1.to_q` -> `attn1.proj_q`, ...) and its last block has no text output path.

Files are loaded with `weights_only=True`. A training checkpoint also pickles Megatron's `args` (an
`argparse.Namespace`) and RNG states (numpy arrays); their classes are bound to inert stand-ins that only keep
their state, so nothing of theirs is imported or called.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from checkpoints_convert.layout import split_dim
from checkpoints_convert.rank_shards import CheckpointFormatError, RankShards, has_rank_dirs, rank_files
from checkpoints_convert.sources import SourceError

FLAVOURS = ("mindspeed-mm", "osp-fork")
TRACKER = "latest_checkpointed_iteration.txt"

# MindSpeed-MM's name of each released attention module (attn1.<module>).
MINDSPEED_ATTN_NAMES = {
    "norm_q": "norm_proj_q", "norm_k": "norm_proj_k", "to_q": "proj_q", "to_k": "proj_k", "to_v": "proj_v",
    "add_q_proj": "added_proj_q", "add_k_proj": "added_proj_k", "add_v_proj": "added_proj_v",
    "to_out.0": "proj_out", "to_add_out": "added_proj_out", "norm_added_q": "norm_added_proj_q",
    "norm_added_k": "norm_added_proj_k",
}
_RELEASED_ATTN_NAMES = {v: k for k, v in MINDSPEED_ATTN_NAMES.items()}
_ATTN = re.compile(r"^(?P<head>.*\.attn1\.)(?P<module>to_out\.0|[a-z_]+)(?P<leaf>\..+)$")


def _rename_attn(key: str, names: dict[str, str]) -> str:
    match = _ATTN.match(key)
    if not match or match["module"] not in names:
        return key
    return match["head"] + names[match["module"]] + match["leaf"]


def to_mindspeed_key(released_key: str) -> str:
    return _rename_attn(released_key, MINDSPEED_ATTN_NAMES)


def from_mindspeed_key(key: str) -> str:
    return _rename_attn(key, _RELEASED_ATTN_NAMES)


class _Opaque:
    """Stand-in for any class a foreign pickle names: built from nothing, it only keeps what it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def load_foreign_pt(path: Path) -> Any:
    """`torch.load(weights_only=True, mmap=True)` with every non-torch global the file names bound to an inert
    stand-in (`_Opaque` subclasses): tensors load as usual, nothing outside torch's allowlist runs."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        stand_ins = [(type(name.rsplit(".", 1)[-1], (_Opaque,), {}), name) for name in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError) as exc:
        raise SourceError(f"{path}: cannot be read as a Megatron checkpoint with weights_only=True "
                          f"({type(exc).__name__}: {exc})") from exc


def resolve_upstream_dir(path: str | Path) -> Path:
    """The directory holding the mp_rank_* folders: `path` itself, or the one its tracker names."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointFormatError(f"checkpoint directory not found: {path}")
    if has_rank_dirs(path):
        return path
    tracker = path / TRACKER
    if not tracker.is_file():
        raise CheckpointFormatError(f"{path}: no mp_rank_* folders and no {TRACKER}")
    text = tracker.read_text().strip()
    if text != "release" and not text.isdigit():
        raise CheckpointFormatError(f"{tracker} holds {text!r}, neither an iteration number nor 'release'")
    found = path / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not found.is_dir():
        raise CheckpointFormatError(f"{tracker} names {found.name}, which does not exist")
    return found


class UpstreamLegacyReader:
    """Full released-name tensors of a MindSpeed-MM or fork checkpoint (one key in memory at a time).

    Replicated tensors should be equal on every TP rank. Where they are not (MindSpeed-MM does not all-reduce
    the final AdaNorm's gradients, so its replicas drift), TP rank 0's value is taken, as upstream's own merge
    does, and the key is recorded in `drift` with the largest difference."""

    def __init__(self, path: str | Path, flavour: str, weights: str = "model") -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown checkpoint flavour {flavour!r}; one of {FLAVOURS}")
        entry = {"model": "model", "ema": "ema_model"}.get(weights)
        if entry is None or (weights == "ema" and flavour != "osp-fork"):
            raise CheckpointFormatError(f"--weights {weights}: {flavour} checkpoints hold "
                                        + ("'model' and (with --use-ema) 'ema'" if flavour == "osp-fork" else
                                           "only 'model' (MindSpeed-MM keeps no EMA weights)"))
        self.directory = resolve_upstream_dir(path)
        self.what = f"{self.directory} ({flavour}, {weights})"
        files = rank_files(self.directory)
        rename = from_mindspeed_key if flavour == "mindspeed-mm" else (lambda k: k)
        shards: dict[tuple[int, int], dict[str, Any]] = {}
        self.iteration: int | None = None
        for (t, p), file in sorted(files.items()):
            obj = load_foreign_pt(file)
            if not isinstance(obj, dict) or not isinstance(obj.get(entry), dict):
                found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise CheckpointFormatError(f"{file}: no {entry!r} state dict (found {found})")
            shards[(t, p)] = {rename(k): v for k, v in obj[entry].items()}
            if isinstance(obj.get("iteration"), int):
                self.iteration = obj["iteration"]
        self.ranks = RankShards(self.directory, shards, files.values())
        self.tp, self.pp = self.ranks.tp, self.ranks.pp
        self.drift: dict[str, float] = {}

    def keys(self) -> list[str]:
        return self.ranks.keys()

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.ranks.shape(key)

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        return self.ranks.shapes()

    def dtype(self, key: str) -> torch.dtype:
        return self.ranks.dtype(key)

    def get(self, key: str) -> Any:
        """The merged tensor; None for `._extra_state` entries (Megatron's parallel linears keep nothing there)."""
        values = self.ranks.values(key)
        if key.endswith("._extra_state") or not isinstance(values[0], torch.Tensor):
            return None
        dim = split_dim(key)
        if dim is not None and self.tp > 1:
            return torch.cat(values, dim=dim)
        for value in values[1:]:
            if not torch.equal(values[0], value):
                diff = (value.float() - values[0].float()).abs().max().item()
                self.drift[key] = max(diff, self.drift.get(key, 0.0))
        return values[0]

    def release(self, key: str) -> None:
        self.ranks.release(key)


__all__ = ["FLAVOURS", "MINDSPEED_ATTN_NAMES", "UpstreamLegacyReader", "from_mindspeed_key", "load_foreign_pt",
           "resolve_upstream_dir", "to_mindspeed_key"]

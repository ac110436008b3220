"""The structure controller as a released-style file: one safetensors file of full (TP-merged) tensors, no
optimizer state, named in the style of the base's released weights (docs/DESIGN.md §15):

    control_encoder.conv_in.{weight,bias}                   encoder.conv_in      (signal folded to the latent grid)
    control_encoder.conv_mid.{weight,bias}                  encoder.conv_mid
    control_encoder.patch_embed.proj.{weight,bias}          encoder.patch_embed  (one token per latent patch)
    control_encoder.transformer_blocks.{i}.<name>           encoder.blocks.{i}   (modulation.linear, norm1, qkv,
                                                            norm_q, norm_k, out, norm2, fc1, fc2: SignalBlock)
    control_projector.{j}.{weight,bias}                     projector.linears.{j} (P_j, added after base block j)

The header's metadata (strings) says what the file is: `format`, `signal`, `control_config` (JSON of
ControlConfig), `base` and `base_fingerprint` (the frozen base it was trained on), `weights` (model / ema) and
`iteration`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from megatron_video.models.control import ControlConfig

FORMAT = "megatron-video structure controller"
_CONV = {"encoder.conv_in": "control_encoder.conv_in", "encoder.conv_mid": "control_encoder.conv_mid",
         "encoder.patch_embed": "control_encoder.patch_embed.proj"}


def to_export_name(name: str) -> str:
    """A controller state-dict name (`encoder.blocks.0.qkv.weight`) -> its name in the exported file."""
    module, _, leaf = name.rpartition(".")
    if module in _CONV:
        return f"{_CONV[module]}.{leaf}"
    if m := re.match(r"^encoder\.blocks\.(\d+)\.(.+)$", name):
        return f"control_encoder.transformer_blocks.{m[1]}.{m[2]}"
    if m := re.match(r"^projector\.linears\.(\d+)\.(weight|bias)$", name):
        return f"control_projector.{m[1]}.{m[2]}"
    raise KeyError(f"no exported name for the controller parameter {name!r}")


def from_export_name(name: str) -> str:
    """The inverse of `to_export_name`."""
    module, _, leaf = name.rpartition(".")
    for ours, exported in _CONV.items():
        if module == exported:
            return f"{ours}.{leaf}"
    if m := re.match(r"^control_encoder\.transformer_blocks\.(\d+)\.(.+)$", name):
        return f"encoder.blocks.{m[1]}.{m[2]}"
    if m := re.match(r"^control_projector\.(\d+)\.(weight|bias)$", name):
        return f"projector.linears.{m[1]}.{m[2]}"
    raise KeyError(f"{name!r} is not a structure-controller tensor name")


def export_controller(checkpoint: str | Path, out: str | Path, weights: str = "model",
                      iteration: int | None = None) -> Path:
    """Write the controller of a pretrain_control.py checkpoint (`weights`: its model or EMA weights) to `out`."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor, load_tensors_metadata

    from checkpoints_convert.ours import ensure_process_group, resolve_iteration
    from megatron_video.control.training import CONTROL_RECORD
    from megatron_video.training.checkpoint_safety import COMMON_FILE, verify_dist_checkpoint

    directory = resolve_iteration(checkpoint, iteration)
    verify_dist_checkpoint(directory)  # data only, before anything in it is unpickled
    common = torch.load(directory / COMMON_FILE, map_location="cpu", weights_only=True).get("common", {})
    record = common.get(CONTROL_RECORD)
    if record is None:
        raise ValueError(f"{directory} is not a structure-controller checkpoint (no control record)")
    ensure_process_group()
    prefix = f"{weights}.controller."
    metas = {k: m for k, m in load_tensors_metadata(str(directory)).items()
             if k.startswith(prefix) and hasattr(m, "global_shape")}
    if not metas:
        raise ValueError(f"{directory} holds no {weights} weights of the controller"
                         + (" (trained without --ema-decay)" if weights == "ema" else ""))
    request = {k: ShardedTensor.from_rank_offsets(k, torch.empty(tuple(m.global_shape), dtype=m.dtype), replica_id=0)
               for k, m in metas.items()}
    loaded = dist_checkpointing.load(request, str(directory))
    tensors = {k[len(prefix):]: loaded[k] for k in sorted(metas)}
    control = ControlConfig(**record["config"])
    return write_controller_file(out, tensors, control, record["signal"], base=record["base"],
                                 base_fingerprint=record["base_fingerprint"], weights=weights,
                                 iteration=str(common.get("train", {}).get("iteration", "")))


def write_controller_file(out: str | Path, tensors: dict[str, torch.Tensor], control: ControlConfig, signal: str,
                          **metadata: str) -> Path:
    """Full controller tensors (by controller state-dict name) -> the exported file, written atomically."""
    from safetensors.torch import save_file

    header = {"format": FORMAT, "signal": signal, "control_config": json.dumps(dataclasses.asdict(control)),
              **metadata}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({to_export_name(k): v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    tmp.replace(out)
    return out


def controller_metadata(path: str | Path) -> tuple[dict[str, str], ControlConfig]:
    """(metadata, architecture) of an exported file, from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a safetensors file ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an exported structure controller (format {metadata.get('format')!r})")
    return metadata, ControlConfig(**json.loads(metadata["control_config"]))


def read_controller_file(path: str | Path) -> tuple[dict[str, str], ControlConfig, dict[str, torch.Tensor]]:
    """(metadata, architecture, full tensors by controller state-dict name) of an exported file."""
    from safetensors import safe_open

    metadata, control = controller_metadata(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {from_export_name(k): handle.get_tensor(k) for k in handle.keys()}
    return metadata, control, tensors


def load_controller_weights(controller: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Full tensors into this rank's controller: tensor-parallel parameters take this TP rank's contiguous slice
    along their partition dim (as checkpoints shard them); every parameter of this pipeline stage must be there."""
    from megatron.core import parallel_state as mpu

    tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    own: dict[str, Any] = {k: v for k, v in controller.state_dict(keep_vars=True).items()
                           if isinstance(v, torch.Tensor)}
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise ValueError(f"the controller file lacks {len(missing)} tensors, e.g. {missing[:3]}")
    state = {}
    for name, param in own.items():
        full = tensors[name]
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            full = full.chunk(tp, dim=param.partition_dim)[rank]
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"controller tensor {name}: file {tuple(full.shape)}, model {tuple(param.shape)}")
        state[name] = full.to(param.dtype)
    controller.load_state_dict(state, strict=False)


__all__ = ["FORMAT", "controller_metadata", "export_controller", "from_export_name", "load_controller_weights",
           "read_controller_file", "to_export_name", "write_controller_file"]

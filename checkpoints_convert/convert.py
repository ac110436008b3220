"""The three conversions: released weights -> our checkpoint (`import_released`), our checkpoint -> released
files (`export_checkpoint`), and legacy TP x PP -> another TP x PP (`reshard_legacy`).

All three check the whole key set and every shape against the config before writing anything, then stream:
one tensor (legacy, released sources) or one block (dist sources) is read, sliced or merged, and written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from checkpoints_convert.layout import (
    LayoutError,
    check_tp,
    pipeline_stage,
    stage_bounds,
    tp_shard_shape,
    tp_slice,
)
from checkpoints_convert.ours import (
    LEGACY_FILE,
    CheckpointFormatError,
    DistReader,
    LegacyReader,
    config_dict,
    detect_format,
    fresh_tmp,
    legacy_rank_dir,
    publish,
    resolve_iteration,
    write_dist,
)
from checkpoints_convert.schema import (
    SchemaError,
    check_schema,
    diffusers_config,
    released_schema,
)
from checkpoints_convert.sources import INDEX_NAME, WEIGHTS_NAME, ReleasedSource
from checkpoints_convert.tensorio import MappedSafetensors, SafetensorsWriter, save_pt_from_safetensors
from megatron_video.models.suv_mmdit.config import SUVConfig
from megatron_video.models.suv_mmdit.state_dict_adapter import from_released_key
from megatron_video.progress import progress

DIST_NEEDS_NO_RESHARD = (
    "{path} is a dist (megatron dist_checkpointing) checkpoint: its tensors are stored in global shapes, so it "
    "loads at any TP x PP layout as it is and needs no resharding. Use `export` to get released files, or "
    "`import --format legacy` on an export to get a per-rank legacy layout.")


class Reader(Protocol):
    def shapes(self) -> dict[str, tuple[int, ...] | None]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str) -> Any: ...
    def release(self, key: str) -> None: ...


def _text_policy(policy: str, present: bool, what: str) -> bool:
    if policy not in ("auto", "keep", "drop", "include", "omit"):
        raise ValueError(f"unknown last-block-text policy {policy!r}")
    if policy == "keep" and not present:
        raise SchemaError(f"{what} has no last-block text modules to keep")
    return present if policy == "auto" else policy in ("keep", "include")


def import_released(source: ReleasedSource, out: str | Path, cfg: SUVConfig, fmt: str = "dist", tp: int = 1,
                    pp: int = 1, iteration: int = 0, last_block_text: str = "auto") -> Path:
    """Released weights -> our checkpoint under `out` (dist: layout-free; legacy: TP x PP rank files)."""
    shapes = source.shapes()
    bad = [k for k, s in shapes.items() if s is None and (not k.endswith("._extra_state") or source.get(k) is not None)]
    if bad:
        raise SchemaError(f"{source.what}: non-tensor entries other than None extra states: {bad[:4]}")
    present = check_schema(shapes, cfg, source.what)
    schema = released_schema(cfg, _text_policy(last_block_text, present, source.what))
    if fmt == "dist":
        if (tp, pp) != (1, 1):
            raise LayoutError("a dist checkpoint is layout-free (global shapes; it loads at any TP x PP): "
                              "--tp/--pp apply only with --format legacy")
        keys = [k for k, s in schema.items() if s is not None]
        tensors = {from_released_key(k, cfg): source.get(k) for k in progress(keys, desc="import", unit="tensor")}
        return write_dist(out, iteration, tensors)
    if fmt != "legacy":
        raise ValueError(f"unknown checkpoint format {fmt!r} (dist or legacy)")
    return write_legacy(out, iteration, cfg, schema, source, tp, pp)


def write_legacy(out: str | Path, iteration: int, cfg: SUVConfig, schema: dict[str, tuple[int, ...] | None],
                 reader: Reader, tp: int, pp: int) -> Path:
    """Write `schema`'s entries from `reader` as legacy TP x PP rank files, one tensor in memory at a time."""
    check_tp(schema, tp)
    if cfg.num_heads % tp:
        raise LayoutError(f"TP size {tp} does not divide the number of attention heads {cfg.num_heads}")
    stage_bounds(cfg.num_blocks, pp)  # raises for an impossible PP size
    root = Path(out)
    tmp = fresh_tmp(root, iteration)
    for stage in range(pp):
        keys = [k for k in schema if pipeline_stage(k, cfg, pp) == stage]
        tensors = [k for k in keys if schema[k] is not None]
        dirs = [tmp / legacy_rank_dir(rank, stage, pp) for rank in range(tp)]
        writers = []
        for directory in dirs:
            directory.mkdir()
            entries = {k: (reader.dtype(k), tp_shard_shape(k, schema[k], tp)) for k in tensors}
            writers.append(SafetensorsWriter(directory / "staging.safetensors", entries))
        for key in progress(tensors, desc=f"pipeline stage {stage}", unit="tensor"):
            full = reader.get(key)
            for rank, writer in enumerate(writers):
                writer.write(key, tp_slice(key, full, tp, rank))
            del full
            reader.release(key)
        for rank, (writer, directory) in enumerate(zip(writers, dirs)):
            staged = writer.close()
            layout = {k: (k if schema[k] is not None else None) for k in keys}
            extra = {"iteration": iteration, "checkpoint_version": 3.0, "suv_config": config_dict(cfg),
                     "layout": {"tp": tp, "pp": pp, "tp_rank": rank, "pp_rank": stage,
                                "blocks": list(stage_bounds(cfg.num_blocks, pp)[stage])}}
            save_pt_from_safetensors(MappedSafetensors(staged), directory / LEGACY_FILE, layout, "model", extra)
            staged.unlink()
    return publish(root, iteration, tmp)


def open_checkpoint(path: str | Path, cfg: SUVConfig, iteration: int | None = None,
                    weights: str = "model") -> tuple[Reader, Path, str]:
    """A reader of full released-name tensors of our checkpoint (dist or legacy), its directory and format."""
    directory = resolve_iteration(path, iteration)
    fmt = detect_format(directory)
    reader: Reader = DistReader(directory, cfg, weights) if fmt == "dist" else LegacyReader(directory, weights)
    return reader, directory, fmt


def export_checkpoint(reader: Reader, cfg: SUVConfig, what: str, safetensors: str | Path | None = None,
                      pt: str | Path | None = None, diffusers: str | Path | None = None,
                      last_block_text: str = "auto", pt_extra_state: bool = True,
                      max_shard_bytes: int = 10 * 2**30) -> list[Path]:
    """Our checkpoint -> released state dict as safetensors, `.pt` and/or a diffusers folder.

    `last_block_text`: auto (as the checkpoint has them), include (as the released file; zeros where the
    checkpoint has none: they never reach the output), omit. The `.pt` also holds the None `._extra_state`
    entries of the released file unless `pt_extra_state` is False."""
    if not (safetensors or pt or diffusers):
        raise ValueError("nothing to export: give a safetensors path, a .pt path and/or a diffusers folder")
    shapes = reader.shapes()
    present = check_schema(shapes, cfg, what)
    schema = released_schema(cfg, _text_policy(last_block_text, present, what))
    tensor_keys = [k for k, s in schema.items() if s is not None]
    dtypes = {k: reader.dtype(k) for k in tensor_keys if k in shapes}
    fallback = dtypes[tensor_keys[0]]
    entries = {k: (dtypes.get(k, fallback), schema[k]) for k in tensor_keys}
    outputs = [Path(p) for p in (safetensors, pt, diffusers) if p]
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    primary = Path(safetensors) if safetensors else outputs[0].with_name(outputs[0].name + ".staging.safetensors")
    writer = SafetensorsWriter(primary, entries, metadata={"format": "pt"})
    try:
        for key in progress(tensor_keys, desc=f"export {primary.name}", unit="tensor"):
            if key in shapes:
                writer.write(key, reader.get(key))
                reader.release(key)
            else:  # an included last-block text module the checkpoint lacks
                writer.write(key, torch.zeros(schema[key], dtype=entries[key][0]))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    mapped = MappedSafetensors(primary)
    written = [primary] if safetensors else []
    if pt:
        layout = {k: (k if s is not None else None) for k, s in schema.items() if s is not None or pt_extra_state}
        written.append(save_pt_from_safetensors(mapped, pt, layout))
    if diffusers:
        written.append(write_diffusers(mapped, tensor_keys, cfg, Path(diffusers), max_shard_bytes))
    if not safetensors:
        del mapped
        primary.unlink()
    return written


def write_diffusers(mapped: MappedSafetensors, keys: list[str], cfg: SUVConfig, folder: Path,
                    max_shard_bytes: int) -> Path:
    """`config.json` + `diffusion_pytorch_model.safetensors`, or numbered shards plus an index json when the
    weights exceed `max_shard_bytes`."""
    if max_shard_bytes < 1:
        raise ValueError("max shard size must be positive")
    shards: list[list[str]] = [[]]
    size = total = 0
    for key in keys:
        nbytes = mapped.get(key).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
        total += nbytes
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        writer = SafetensorsWriter(folder / name, {k: (mapped.dtype(k), mapped.shape(k)) for k in shard},
                                   metadata={"format": "pt"})
        for key in shard:
            writer.write(key, mapped.get(key))
            mapped.release(key)
        writer.close()
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2) + "\n")
    return folder


def reshard_legacy(path: str | Path, out: str | Path, cfg: SUVConfig, tp: int, pp: int,
                   iteration: int | None = None) -> Path:
    """A legacy checkpoint at another TP x PP layout (same iteration number, same entries)."""
    directory = resolve_iteration(path, iteration)
    if detect_format(directory) == "dist":
        raise CheckpointFormatError(DIST_NEEDS_NO_RESHARD.format(path=directory))
    reader = LegacyReader(directory)
    shapes = reader.shapes()
    present = check_schema(shapes, cfg, str(directory))
    schema = released_schema(cfg, present)
    return write_legacy(out, int(directory.name.removeprefix("iter_")), cfg, schema, reader, tp, pp)


def config_mismatch(a: SUVConfig, b: SUVConfig) -> list[str]:
    """Architecture fields that differ (build and runtime choices are ignored)."""
    ignore = {"build_last_block_text_modules", "init_std", "attention_backend"}
    return [f"{f}: {getattr(a, f)} != {getattr(b, f)}" for f in a.__dataclass_fields__
            if f not in ignore and getattr(a, f) != getattr(b, f)]


__all__ = ["DIST_NEEDS_NO_RESHARD", "config_mismatch", "export_checkpoint", "import_released", "open_checkpoint",
           "reshard_legacy", "write_diffusers", "write_legacy"]

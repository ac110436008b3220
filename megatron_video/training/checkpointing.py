"""Checkpoints with megatron-core dist_checkpointing: model, optimizer, EMA, clipping, sampler, RNG, counters.

Layout under `--save`:
    iter_0000100/                  one dist_checkpointing directory per saved iteration
    latest_checkpointed_iteration.txt

A checkpoint is written into `iter_0000100.tmp/`, and only when every rank has finished is it renamed to
`iter_0000100/` and the pointer file replaced (both atomic renames on one file system). A save killed half-way
leaves at most a `.tmp` directory, which the next save removes; the pointer still names the previous complete
checkpoint. Tensors are stored as ShardedTensors in model space, so a checkpoint saved at one TP/DP (CP)
layout loads at another. Before loading, every pickle in the checkpoint is checked to hold only data
(`checkpoint_safety.py`): a checkpoint that would run code is refused.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match the model."""


class CheckpointSaveError(CheckpointError):
    """A save that failed; its partial directory has been removed, the previous checkpoint is untouched."""

    def __init__(self, message: str, out_of_space: bool) -> None:
        super().__init__(message)
        self.out_of_space = out_of_space


def _out_of_space(exc: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain (megatron's writer processes send it back as it was raised; torch's
    zip writer turns a short write into "unexpected pos")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "unexpected pos" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The iteration the pointer file names, or None if there is no complete checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
    iteration = int(text)
    if not iteration_dir(root, iteration).is_dir():
        raise CheckpointError(f"{tracker} names iteration {iteration} but {iteration_dir(root, iteration)} is missing")
    return iteration


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_sharded_state_dict(model: torch.nn.Module, prefix: str = "model.") -> dict[str, Any]:
    """ShardedTensors for every entry of `model.state_dict()`, keyed by parameter name (checkpoint key:
    `prefix + name`).

    Tensor-parallel parameters (megatron sets `tensor_model_parallel` and `partition_dim` on them) are sharded
    along their partition dim over TP; the rest are replicas on TP peers. Every DP (and CP) rank holds a replica.
    The ShardedTensors hold the parameters themselves, which the distributed optimizer needs to find them.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing import ShardedTensor

    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    dp_rank = mpu.get_data_parallel_rank(with_context_parallel=True)
    sharded: dict[str, Any] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor is None or not isinstance(tensor, torch.Tensor):
            continue
        key = prefix + name
        if getattr(tensor, "tensor_model_parallel", False) and tp_size > 1:
            axis = tensor.partition_dim
            sharded[name] = ShardedTensor.from_rank_offsets(
                key, tensor, (axis, tp_rank, tp_size), replica_id=(0, 0, dp_rank)
            )
        else:
            sharded[name] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=(0, tp_rank, dp_rank))
    return sharded


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict[str, Any]) -> Any:
    """Per-rank RNG state, one object per global rank (restored only when the layout is unchanged)."""
    from megatron.core.dist_checkpointing import ShardedObject

    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject(f"rng_state.world{world}", state, (world,), (rank,), replica_id=0)


def tmp_dir(root: str | Path, iteration: int) -> Path:
    """Where iteration `iteration` is written before it is published."""
    return Path(root) / f"iter_{iteration:07d}.tmp"


def fresh_tmp_dir(root: Path, iteration: int) -> Path:
    """An empty `iter_XXXXXXX.tmp/` to write into (a leftover from a killed save is removed)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir(root, iteration)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def published_iterations(root: Path) -> list[int]:
    """Iterations with a published `iter_XXXXXXX/` directory (never a `.tmp` one), ascending."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_DIR.match(p.name)))


def newest_iteration(root: Path) -> int | None:
    """The newest published iteration, whether or not the tracker names it (a tracker moved back by an
    earlier run must not hide a newer checkpoint); None when there is none."""
    tracker = root / TRACKER
    tracked = tracker.read_text().strip() if tracker.is_file() else ""
    return max(published_iterations(root) + ([int(tracked)] if tracked.isdigit() else []), default=None)


def refuse_newer(root: Path, iteration: int) -> None:
    """Never publish `iteration` where a newer checkpoint exists: the tracker would move backwards and newer
    work be overwritten later (the last line of defence; runs are refused earlier, in training/preflight.py)."""
    newest = newest_iteration(root)
    if newest is not None and newest > iteration:
        raise CheckpointError(f"refusing to publish iteration {iteration} in {root}: it holds iteration {newest}, "
                              "newer (--overwrite-newer-checkpoints allows it)")


def publish_checkpoint(root: Path, iteration: int, tmp: Path, overwrite_newer: bool = False) -> Path:
    """Rename a finished `tmp` to `iter_XXXXXXX/` and point the tracker at it (atomic renames, fsynced)."""
    if not overwrite_newer:
        refuse_newer(root, iteration)
    final = iteration_dir(root, iteration)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same iteration (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / TRACKER, f"{iteration}\n")
    return final


def save_checkpoint(
    root: str | Path,
    iteration: int,
    sharded_state: dict[str, Any],
    common_state: dict[str, Any],
    keep_last: int | None = None,
    overwrite_newer: bool = False,
) -> Path:
    """Save one iteration atomically. `sharded_state` maps top-level names (model, optimizer, ema, ...) to
    sharded state dicts; `common_state` holds plain values saved once (iteration, counters, sampler, ...)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megatron_video.adaptor.checkpoint_writers import WritersDieWithParent

    root = Path(root)
    tmp = tmp_dir(root, iteration)
    if not overwrite_newer:  # on every rank, before writing: one rank refusing alone would hang the others
        refuse_newer(root, iteration)
    if _is_rank0():
        fresh_tmp_dir(root, iteration)
    _barrier()
    state = dict(sharded_state)
    state["rng_state"] = _rng_sharded_object(rng_state())
    state["common"] = {**common_state, "has_rng_state": True}
    try:
        with WritersDieWithParent():  # a killed job leaves no writer process behind
            dist_checkpointing.save(state, str(tmp))
    except (Exception, CheckpointException) as exc:  # whatever failed, the partial directory must not stay behind
        shutil.rmtree(tmp, ignore_errors=True)
        full = _out_of_space(exc)
        message = (f"no space left on {root} while saving iteration {iteration}" if full
                   else f"saving iteration {iteration} to {root} failed: {exc}")
        raise CheckpointSaveError(message + "; the partial checkpoint was removed, the last complete one is kept",
                                  full) from exc
    _barrier()
    if _is_rank0():
        publish_checkpoint(root, iteration, tmp, overwrite_newer)
        if keep_last is not None:
            prune_checkpoints(root, keep_last)
    _barrier()
    return iteration_dir(root, iteration)


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` (never the one the pointer names)."""
    pointed = latest_iteration(root)
    found = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _ITER_DIR.match(p.name))
    )
    removed = []
    for iteration, path in found[:-keep_last] if keep_last > 0 else []:
        if iteration != pointed:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def load_checkpoint(
    root: str | Path,
    build_sharded_state: Callable[[], dict[str, Any]],
    iteration: int | None = None,
    strict: bool = True,
    check_saved: Callable[[Path, dict[str, Any]], None] | None = None,
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Load `iteration` (default: the latest) into the tensors of `build_sharded_state()`.

    `check_saved(directory, saved common state)`, if given, runs before anything else is loaded and raises a
    `CheckpointError` for a checkpoint this run cannot take.

    Returns (iteration, loaded sharded state, common state). The caller applies the loaded values (megatron
    loads into new tensors for the optimizer and EMA; model ShardedTensors are loaded in place)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise CheckpointError(f"no complete checkpoint under {root} ({TRACKER} is missing)")
    directory = iteration_dir(root, iteration)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} not found")
    from megatron_video.training.checkpoint_safety import verify_dist_checkpoint

    verify_dist_checkpoint(directory)  # nothing in it may run code: checked before megatron unpickles anything
    common = dist_checkpointing.load_common_state_dict(str(directory))
    if check_saved is not None:
        check_saved(directory, common)
    state = build_sharded_state()
    saved = common.get("common", {})
    if saved.get("has_rng_state") and saved.get("world_size") == dist.get_world_size():
        state["rng_state"] = _rng_sharded_object(rng_state())
    handling = StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED
    loaded = dist_checkpointing.load(state, str(directory), strict=handling)
    if "rng_state" in loaded:
        set_rng_state(loaded.pop("rng_state"))
    return iteration, loaded, loaded.pop("common", common.get("common", {}))

"""torch.distributed start-up and megatron-core parallel state."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_video.adaptor import DeviceBackend, setup_device
from megatron_video.parallel.config import ParallelConfig

# The collective timeout the default group was created with; every group built later gets the same one (torch
# and megatron would otherwise give each new group their own 30-minute default, and a stopped rank would hang
# its model-parallel peers for that long whatever --distributed-timeout-minutes says).
_TIMEOUT_MINUTES = 10.0


def group_timeout() -> datetime.timedelta:
    """The timeout for a new process group: the one `init_distributed` was given."""
    return datetime.timedelta(minutes=_TIMEOUT_MINUTES)


def init_distributed(
    device: str | None = None, timeout_minutes: float = 10.0, backend: str | None = None
) -> DeviceBackend:
    """Set up the device backend and the default process group from torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A single process without those runs as world 1."""
    global _TIMEOUT_MINUTES
    device_backend = setup_device(device)
    if dist.is_initialized():
        return device_backend
    _TIMEOUT_MINUTES = timeout_minutes
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_backend.set_device(local_rank)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    backend = backend or device_backend.dist_backend
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a plain `python script.py`: a group of one, without touching the environment others read
        from megatron_video.parallel.spawn import free_port

        port = os.environ.get("MASTER_PORT") or str(free_port())
        dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{port}")
    return device_backend


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> ParallelConfig:
    """Build megatron-core's TP/CP/DP/PP groups (rank order tp-cp-dp-pp, as Megatron) on the default group, with
    the default group's collective timeout."""
    from megatron.core import parallel_state as mpu

    config = ParallelConfig(
        tensor_model_parallel_size=tensor_model_parallel_size,
        context_parallel_size=context_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel needs torch.distributed; call init_distributed() first")
    config.validate(dist.get_world_size())
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        order="tp-cp-ep-dp-pp",
        distributed_timeout_minutes=_TIMEOUT_MINUTES,
    )
    return config


def destroy_parallel() -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()


# Subgroups of the CP group, built once per (size, members) and shared by every model that asks.
_CP_SUBGROUPS: dict[tuple[int, tuple[int, ...]], dist.ProcessGroup] = {}


def context_parallel_subgroup(size: int) -> dist.ProcessGroup:
    """The group of `size` consecutive CP ranks this rank belongs to (e.g. Ulysses inside a part of the CP
    group). Collective over the world: every rank creates every such group, in the same order
    (megatron-style process groups, built once)."""
    from megatron.core import parallel_state as mpu

    cp_group = mpu.get_context_parallel_group()
    if size == dist.get_world_size(cp_group):
        return cp_group
    mine = tuple(dist.get_process_group_ranks(cp_group))
    everyone: list[tuple[int, ...] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    found = None
    for ranks in sorted(set(everyone)):
        for start in range(0, len(ranks), size):
            members = ranks[start:start + size]
            key = (size, members)
            if key not in _CP_SUBGROUPS:
                _CP_SUBGROUPS[key] = dist.new_group(list(members), timeout=group_timeout())
            if dist.get_rank() in members:
                found = _CP_SUBGROUPS[key]
    if found is None:
        raise RuntimeError(f"rank {dist.get_rank()} is in no context-parallel subgroup of size {size}")
    return found


def parallel_layout() -> dict[str, int | list[int]]:
    """This rank's coordinates and the members of each of its groups."""
    from megatron.core import parallel_state as mpu

    def members(group: dist.ProcessGroup) -> list[int]:
        return dist.get_process_group_ranks(group)

    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "tp_rank": mpu.get_tensor_model_parallel_rank(),
        "cp_rank": mpu.get_context_parallel_rank(),
        "dp_rank": mpu.get_data_parallel_rank(),
        "pp_rank": mpu.get_pipeline_model_parallel_rank(),
        "tp_group": members(mpu.get_tensor_model_parallel_group()),
        "cp_group": members(mpu.get_context_parallel_group()),
        "dp_group": members(mpu.get_data_parallel_group()),
        "dp_cp_group": members(mpu.get_data_parallel_group(with_context_parallel=True)),
        "pp_group": members(mpu.get_pipeline_model_parallel_group()),
    }


def local_device() -> torch.device:
    from megatron_video.adaptor import current_backend

    return current_backend().device(int(os.environ.get("LOCAL_RANK", "0")))

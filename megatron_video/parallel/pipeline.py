"""Running megatron-core's forward-backward schedules with per-stage p2p shapes, and results of the last stage.

megatron-core 0.16's 1F1B schedule derives one p2p shape from (seq_length, micro_batch_size, hidden_size),
the same for every boundary. A model whose boundaries carry different tensors (the SUV model's long skips)
passes each rank's exact (receive, send) shapes through `adjust_tensor_shapes_fn`, computed from the global
batch's metadata, so shapes may change from one global batch to the next without any shape exchange.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

Shape = tuple[int, int, int]


def run_forward_backward(
    forward_step_func: Callable, data_iterator: Iterator[Any] | list[Iterator[Any]],
    model: torch.nn.Module | list[torch.nn.Module], num_microbatches: int, micro_batch_size: int,
    recv_shape: Shape | None = None, send_shape: Shape | None = None, forward_only: bool = False,
) -> list[Any]:
    """One global batch through megatron's schedule for this rank's model chunk(s) (no pipeline when PP = 1).

    One chunk (1F1B): `recv_shape` / `send_shape` are this stage's p2p tensor shapes (None on the first / last
    stage). Several chunks (virtual stages, interleaved 1F1B, one data iterator per chunk): megatron 0.16 takes
    one shape for every boundary there (the model pads its carry to it; pass the shapes of chunk 0)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model if isinstance(model, list) else [model]
    iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
    if len(iterators) != len(chunks):
        raise ValueError(f"{len(chunks)} model chunks need as many data iterators, got {len(iterators)}")
    pp = mpu.get_pipeline_model_parallel_world_size()
    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    if (vpp or 1) != len(chunks):
        raise ValueError(f"{len(chunks)} model chunks on this rank but the virtual pipeline size is {vpp}")
    kwargs: dict[str, Any] = {}
    if pp > 1 and vpp is None:
        first, last = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
        if (recv_shape is None) != first or (send_shape is None) != last:
            raise ValueError(f"pipeline rank {mpu.get_pipeline_model_parallel_rank()} of {pp} needs a receive shape "
                             f"unless first and a send shape unless last; got {recv_shape}, {send_shape}")

        def adjust(recv: list, send: list) -> tuple[list, list]:
            return [recv_shape], [send_shape]

        kwargs["adjust_tensor_shapes_fn"] = adjust
    seq_length = 1
    if vpp is not None:
        from megatron.core.utils import get_model_config

        config = get_model_config(chunks[0])
        if pp == 2 and config.batch_p2p_comm:
            # With two ranks, prev and next are the same peer and a batched exchange in both directions
            # matches the activation with the gradient (seen on gloo): use megatron's split-group p2p.
            raise ValueError("interleaved PP = 2 needs config.batch_p2p_comm=False (and overlap_p2p_comm=True)")
        shape = recv_shape or send_shape
        if shape is None or shape[1] != micro_batch_size or shape[2] != config.hidden_size:
            raise ValueError(f"interleaved schedule: bad p2p shape {shape} for micro-batch {micro_batch_size}, "
                             f"hidden {config.hidden_size}")
        # megatron divides seq_length by CP and, under sequence parallelism, by TP; the rows are already local
        seq_length = shape[0] * mpu.get_context_parallel_world_size()
        if config.sequence_parallel:
            seq_length *= mpu.get_tensor_model_parallel_world_size()
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=forward_step_func, data_iterator=iterators if vpp else iterators[0],
        model=chunks, num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only, **kwargs,
    )


def batch_pipeline_shapes(module: torch.nn.Module, micro_batches: Sequence[dict[str, Any]], latent_key: str = "x0",
                          text_key: str = "t5_hidden") -> tuple[Shape | None, Shape | None]:
    """This stage's p2p (receive, send) shapes for one global batch, from its metadata: the latents
    (B, C, T, H, W) and text states (B, L, D) of the micro-batches, which must share one shape (one bucket per
    global batch; every PP rank of a replica reads the same micro-batches). `module` has `pipeline_shapes`."""
    shapes = {(tuple(mb[latent_key].shape), tuple(mb[text_key].shape[:2])) for mb in micro_batches}
    if len(shapes) != 1:
        raise ValueError(f"the micro-batches of one global batch differ in shape: {sorted(shapes)}")
    ((latent_shape, (batch, text_len)),) = shapes
    return module.pipeline_shapes(batch, tuple(latent_shape[2:]), text_len)


def from_last_stage(value: float, device: torch.device) -> float:
    """A scalar known on the last pipeline stage (e.g. the loss), on every rank of the pipeline group."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=mpu.get_pipeline_model_parallel_last_rank(),
                   group=mpu.get_pipeline_model_parallel_group())
    return tensor.item()


def sum_over_pipeline(value: int, device: torch.device) -> int:
    """An integer summed over the pipeline stages (e.g. parameter counts)."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, group=mpu.get_pipeline_model_parallel_group())
    return int(tensor.item())


__all__ = ["batch_pipeline_shapes", "from_last_stage", "run_forward_backward", "sum_over_pipeline"]

"""Builds what the loop trains: the denoiser in megatron DDP, the optimizer with clipping, EMA, LR schedule."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from megatron_video.optim.builder import OptimizerOptions, build_optimizer, build_rank_discard
from megatron_video.optim.ema import ShardedEMA


@dataclass
class Components:
    model: Any  # megatron DistributedDataParallel around the denoiser
    module: torch.nn.Module  # the denoiser itself
    config: Any  # megatron TransformerConfig (schedules read hooks from it)
    optimizer: Any  # AdaptiveClipOptimizer
    scheduler: Any  # megatron OptimizerParamScheduler
    ema: ShardedEMA | None
    rank_discard: Any  # PerRankDiscard or None

    def sync_params(self) -> None:
        """Finish the parameter all-gather now. With --overlap-param-gather the model's weights are gathered
        lazily by the next forward's pre-hooks, so a checkpoint must call this first (Megatron-LM's
        force_param_sync before saving)."""
        if self.model.ddp_config.overlap_param_gather:
            self.model.start_param_sync(force_sync=True)


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def clip_mode(args: argparse.Namespace) -> str:
    if args.clip_grad_ema_decay is not None:
        return "ema"
    if args.clip_grad_rank_discard:
        return "rank_discard"
    return "constant" if args.clip_grad > 0 else "none"


def optimizer_options(args: argparse.Namespace) -> OptimizerOptions:
    mode = clip_mode(args)
    return OptimizerOptions(
        lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        use_distributed_optimizer=args.use_distributed_optimizer, clip_mode=mode, clip_grad=args.clip_grad,
        clip_ema_decay=args.clip_grad_ema_decay if args.clip_grad_ema_decay is not None else 0.99,
        max_consecutive_extreme=args.max_consecutive_extreme_steps,
    )


def build_denoiser(args: argparse.Namespace, model_config: Any) -> tuple[torch.nn.Module, Any]:
    from megatron.core import parallel_state as mpu

    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.model import SUVMMDiT
    from megatron_video.models.suv_mmdit.pipeline import stage_of

    dtype = params_dtype(args)
    split = [int(n) for n in args.pipeline_layer_split.split(",")] if args.pipeline_layer_split else None
    stage = stage_of(model_config, args.pipeline_model_parallel_size, mpu.get_pipeline_model_parallel_rank(), split)
    config = megatron_config(
        model_config,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=args.bf16, fp16=args.fp16,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        use_cpu_initialization=True,
    )
    return SUVMMDiT(model_config, config, stage), config


def materialize_optimizer_state(optimizer: Any) -> None:
    """Give every parameter of the inner torch optimizers an (all-zero, step 0) Adam state, as it has after
    construction on Apex/TE. megatron's distributed optimizer needs it to describe its state for loading a
    checkpoint before the first step; the loaded values then replace it."""
    from megatron_video.optim.adaptive_optimizer import leaf_optimizers

    for leaf in leaf_optimizers(optimizer.optimizer if hasattr(optimizer, "clipper") else optimizer):
        torch_optimizer = leaf.optimizer
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def load_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """Load a `fully_reshardable` distributed-optimizer state.

    megatron-core 0.16's `load_parameter_state_from_fully_reshardable` copies every key of the live per-param
    state, but with torch's Adam (no Apex / Transformer Engine: CPU, or a GPU install without them) that state
    also holds "step", which the checkpoint keeps in the param groups instead, so the load fails. Do the same two
    phases here with "step" held aside: the inner load first (param groups, step), then the parameter state.
    Each parameter gets its own copy of the step counter (see below)."""
    from megatron_video.optim.adaptive_optimizer import leaf_optimizers

    leaves = list(leaf_optimizers(optimizer.optimizer if hasattr(optimizer, "clipper") else optimizer))
    if len(leaves) != 1 or "param_state" not in state:
        optimizer.load_state_dict(state)
        return
    leaf, state = leaves[0], dict(state)
    param_state, sharding = state.pop("param_state"), state.pop("param_state_sharding_type")
    if sharding != "fully_reshardable":
        raise ValueError(f"expected a fully_reshardable optimizer state, got {sharding!r}")
    leaf.load_state_dict(state)
    inner = leaf.optimizer.state
    steps = {param: entry.pop("step") for param, entry in inner.items() if "step" in entry}
    leaf.load_parameter_state_from_fully_reshardable(param_state)
    for param, step in steps.items():
        # megatron hands every parameter the same `step` tensor; torch's Adam increments it in place per
        # parameter, so a shared one would advance N times per step and skew the bias correction.
        inner[param]["step"] = step.detach().clone()


def build_components(args: argparse.Namespace, model_config: Any, train_iters: int) -> Components:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_video.parallel.initialize import local_device

    module, config = build_denoiser(args, model_config)
    module.to(local_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, bucket_size=args.ddp_bucket_size,
        use_distributed_optimizer=args.use_distributed_optimizer, check_for_nan_in_grad=False,
    )  # megatron's DDP picks the default bucket size (one bucket without overlap), as Megatron-LM
    model = DistributedDataParallel(config, ddp_config, module)
    options = optimizer_options(args)
    optimizer = build_optimizer([model], options)
    rank_discard = build_rank_discard(options)
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    if rank_discard is not None:
        from megatron_video.optim.rank_discard import finalize_with_rank_discard

        config.finalize_model_grads_func = finalize_with_rank_discard(rank_discard, finalize_model_grads)
    else:
        config.finalize_model_grads_func = finalize_model_grads
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters or train_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=train_iters, wd_incr_style="constant",
    )
    ema = ShardedEMA(optimizer, [model], decay=args.ema_decay) if args.ema_decay > 0 else None
    return Components(model, module, config, optimizer, scheduler, ema, rank_discard)

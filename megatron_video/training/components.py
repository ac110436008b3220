"""Builds what the loop trains: the denoiser in megatron DDP, the optimizer with clipping, EMA, LR schedule."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
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
    frozen_prefix: str | None = None  # state-dict entries loaded at start-up (a frozen base): never checkpointed
    common: dict[str, Any] = field(default_factory=dict)  # an entry point's record in every checkpoint's common

    def checkpointed_state(self, prefix: str = "model.") -> dict[str, Any]:
        """The module's ShardedTensors that checkpoints hold (all but the frozen-prefix entries)."""
        from megatron_video.training.checkpointing import model_sharded_state_dict

        state = model_sharded_state_dict(self.module, prefix=prefix)
        if self.frozen_prefix is None:
            return state
        return {name: entry for name, entry in state.items() if not name.startswith(self.frozen_prefix)}

    def sync_params(self) -> None:
        """Finish the parameter all-gather now. With --overlap-param-gather the model's weights are gathered
        lazily by the next forward's pre-hooks, so whatever reads or swaps them outside a forward calls this first:
        a checkpoint (Megatron-LM's force_param_sync before saving), an evaluation or sample on EMA weights
        (evaluation/runner.py evaluation_weights)."""
        if self.model.ddp_config.overlap_param_gather:
            self.model.start_param_sync(force_sync=True)


@dataclass
class ModelWrap:
    """An entry point's change to the trained module, made before DDP and the optimizer see it (pretrain_control.py:
    a trainable controller around a frozen base loaded from elsewhere). Only parameters that require grad train."""

    module: torch.nn.Module
    frozen_prefix: str | None = None  # see Components
    common: dict[str, Any] = field(default_factory=dict)


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
        clip_warmup_steps=args.clip_grad_ema_warmup_steps,
    )


def build_denoiser(args: argparse.Namespace, model_config: Any) -> tuple[torch.nn.Module, Any]:
    """The denoiser, allocated and initialised on this rank's device. Initial values depend on --seed only, not
    on the TP/CP/PP layout: megatron's master-weight initialisation (`use_cpu_initialization`: draw the whole
    weight, keep this rank's slice) runs on the device here, as the default device, and every block is seeded
    by its index. (megatron's on-device path draws each TP slice from a TP-rank seed: different per layout.)"""
    from megatron.core import parallel_state as mpu

    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.model import SUVMMDiT
    from megatron_video.models.suv_mmdit.pipeline import stage_of
    from megatron_video.parallel.initialize import local_device

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
        recompute_num_layers=args.recompute_num_layers, recompute_modules=getattr(args, "recompute_modules", None),
        use_cpu_initialization=True,
    )
    with torch.device(local_device()):
        return SUVMMDiT(model_config, config, stage, init_seed=args.seed,
                        compile_backend="inductor" if getattr(args, "compile", False) else None), config


def plain_torch_optimizer(optimizer: Any) -> bool:
    """True for torch's own optimizers (torch.optim.Adam / AdamW), which keep a per-parameter "step" in their
    state; TE's and apex's FusedAdam keep it in the param group instead."""
    return type(optimizer).__module__.startswith("torch.optim")


def materialize_optimizer_state(optimizer: Any) -> None:
    """Give every parameter of the inner optimizers its (all-zero) state before a checkpoint is loaded into it.

    megatron's distributed optimizer needs the state to exist to describe it for loading. This is megatron's
    own `init_state_fn` (exp_avg, exp_avg_sq; what TE / apex FusedAdam hold); "step" (0) is added only for
    plain torch optimizers, whose state keeps it per parameter. FusedAdam's state_dict() / load_state_dict()
    look every state key up among exp_avg / exp_avg_sq / master_param, so a "step" there breaks them."""
    from megatron_video.optim.adaptive_optimizer import leaf_optimizers

    for leaf in leaf_optimizers(optimizer.optimizer if hasattr(optimizer, "clipper") else optimizer):
        inner = leaf.optimizer
        if leaf.init_state_fn is not None:
            leaf.init_state_fn(inner, leaf.config)
        if plain_torch_optimizer(inner):
            for group in inner.param_groups:
                for param in group["params"]:
                    inner.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def build_components(args: argparse.Namespace, model_config: Any, train_iters: int,
                     wrap: Callable[[argparse.Namespace, torch.nn.Module], ModelWrap] | None = None) -> Components:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_video.parallel.initialize import local_device

    module, config = build_denoiser(args, model_config)
    wrapped = wrap(args, module) if wrap is not None else ModelWrap(module)
    module = wrapped.module
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
    return Components(model, module, config, optimizer, scheduler, ema, rank_discard, wrapped.frozen_prefix,
                      wrapped.common)

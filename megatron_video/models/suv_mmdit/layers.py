"""Small building blocks of the SUV MMDiT: norms (fp32 statistics), modulation, tensor-parallel helpers."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from torch import nn

from megatron_video.models.suv_mmdit.elementwise import EAGER, BlockElementwise, gated_residual, modulate


def tp_world_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def sequence_parallel_on(config: ModelParallelConfig) -> bool:
    return bool(config.sequence_parallel) and tp_world_size() > 1


def without_sequence_parallel(config: ModelParallelConfig) -> ModelParallelConfig:
    """A copy of `config` for column-parallel layers whose input is not a sequence shard."""
    if not config.sequence_parallel:
        return config
    return dataclasses.replace(config, sequence_parallel=False)


def normal_init(std: float):
    def init(weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=std)

    return init


def mark_sequence_parallel(module: nn.Module, config: ModelParallelConfig) -> None:
    """Tag replicated parameters applied to sequence shards: megatron-core's finalize_model_grads all-reduces
    the gradients of `param.sequence_parallel` parameters over TP when sequence parallelism is on."""
    if config.sequence_parallel:
        for param in module.parameters():
            param.sequence_parallel = True


def gather_shared_input(x: torch.Tensor, config: ModelParallelConfig) -> torch.Tensor:
    """The full-sequence input of several column-parallel linears (built with `disable_grad_reduce`): one
    all-gather (backward reduce-scatter) under sequence parallelism, else an identity whose backward
    all-reduces over TP."""
    if tp_world_size() == 1:
        return x
    if config.sequence_parallel:
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
    return copy_to_tensor_model_parallel_region(x)


class LayerNorm(nn.Module):
    """Affine LayerNorm with fp32 statistics, result in the input dtype (the fork's fp32 Megatron LayerNorm: torch's
    kernel accumulates in fp32 and rounds once). Called with (shift, scale) it also applies the adaLN modulation
    (`ops.norm_modulate`, eager or compiled): the parameters are read inside this module's forward, where
    megatron's pre-forward hook has finished their all-gather (--overlap-param-gather)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, ops: BlockElementwise = EAGER) -> None:
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype))

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        if shift is not None:
            return self.ops.norm_modulate(x, self.weight, self.bias, self.eps, shift, scale)
        return F.layer_norm(x, self.weight.shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class HeadRMSNorm(nn.Module):
    """RMSNorm over head_dim with one weight shared by all heads; fp32 statistics, one rounding (torch's kernel,
    as the fused npu_rms_norm). With RoPE (cos, sin) the rotation follows in the same region (`ops.rms_norm_rope`).

    Heads are split over TP, so every rank sees only some heads: the weight passes through an identity whose
    backward all-reduces its gradient over TP, which makes the replicas' gradients complete and equal."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, ops: BlockElementwise = EAGER) -> None:
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        weight = self.weight
        if tp_world_size() > 1 and weight.requires_grad:
            weight = copy_to_tensor_model_parallel_region(weight)
        cos, sin = rope if rope is not None else (None, None)
        return self.ops.rms_norm_rope(x, weight, self.eps, cos, sin)


class UpcastColumnParallelLinear(ColumnParallelLinear):
    """A column-parallel linear computed with an fp32 copy of its weight. The weight is read inside this
    module's forward: megatron's DDP pre-forward hook (--overlap-param-gather) finishes the all-gather of the
    called module's own parameters only, so a read by the parent before the call would see stale weights."""

    def forward(self, input_: torch.Tensor):
        return super().forward(input_, weight=self.weight.float())


class Modulation(nn.Module):
    """silu(temb) -> column-parallel Linear(E -> n*H), gathered to the full n*H, in fp32.

    temb is fp32 and the weight is upcast (the released run relied on Ascend's matmul dtype promotion). The
    output is replicated; under sequence parallelism each rank uses it on its own sequence shard only, so its
    gradient is all-reduced over TP before the gather's backward takes this rank's slice."""

    def __init__(self, in_dim: int, out_dim: int, config: ModelParallelConfig, init_std: float) -> None:
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.linear = UpcastColumnParallelLinear(
            in_dim, out_dim, config=dataclasses.replace(without_sequence_parallel(config),
                                                        gradient_accumulation_fusion=False),
            init_method=normal_init(init_std), bias=True, gather_output=False, skip_bias_add=True,
        )

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        out, bias = self.linear(F.silu(temb.float())[None])
        out = out[0] + bias.float()
        if tp_world_size() == 1:
            return out
        out = gather_from_tensor_model_parallel_region(out)
        if self.sequence_parallel:
            out = copy_to_tensor_model_parallel_region(out)
        return out


__all__ = [
    "HeadRMSNorm", "LayerNorm", "Modulation", "UpcastColumnParallelLinear", "gated_residual",
    "gather_shared_input", "mark_sequence_parallel",
    "modulate", "normal_init", "sequence_parallel_on", "tp_world_size", "without_sequence_parallel",
]

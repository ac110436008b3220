"""Shared pieces of the optimizer tests (no tests here): a tiny TP-splittable model and its unsplit twin.

The model is fc1 (ColumnParallelLinear) → GELU → fc2 (RowParallelLinear) → × scale (a replicated 1-D
parameter), in megatron DDP. `reference_grads` computes the same loss with plain tensors on the full model, so
multi-rank results can be checked against a one-process computation.
"""

from __future__ import annotations

import torch

HIDDEN, FFN, SEQ = 8, 16, 3


def full_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": 0.3 * torch.randn(FFN, HIDDEN, generator=gen),
        "fc1.bias": 0.1 * torch.randn(FFN, generator=gen),
        "fc2.weight": 0.3 * torch.randn(HIDDEN, FFN, generator=gen),
        "fc2.bias": 0.1 * torch.randn(HIDDEN, generator=gen),
        "scale": 1.0 + 0.1 * torch.randn(HIDDEN, generator=gen),
    }


def shard_of(name: str, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    if name in ("fc1.weight", "fc1.bias"):
        return full.chunk(tp, 0)[tp_rank]
    if name == "fc2.weight":
        return full.chunk(tp, 1)[tp_rank]
    return full


def forward_full(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.nn.functional.gelu(x @ w["fc1.weight"].T + w["fc1.bias"])
    return (h @ w["fc2.weight"].T + w["fc2.bias"]) * w["scale"]


def loss_fn(out: torch.Tensor, target: torch.Tensor, factor: float) -> torch.Tensor:
    return factor * (out - target).square().mean() / 2


def reference_grads(w: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor, factor: float
                    ) -> dict[str, torch.Tensor]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in w.items()}
    loss_fn(forward_full(leaves, x), target, factor).backward()
    return {k: v.grad for k, v in leaves.items()}


def build_model(tp: int, weights: dict[str, torch.Tensor], use_distributed_optimizer: bool = True,
                dtype: torch.dtype = torch.float32):
    """The TP-split model in megatron DDP (call after initialize_parallel)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=2,
                               tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=dtype,
                               bf16=dtype == torch.bfloat16)
    tp_rank = mpu.get_tensor_model_parallel_rank()

    class Tiny(MegatronModule):
        def __init__(self) -> None:
            super().__init__(config)
            init = torch.nn.init.zeros_
            self.fc1 = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=True,
                                            gather_output=False)
            self.fc2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=True,
                                         input_is_parallel=True, skip_bias_add=False)
            self.scale = torch.nn.Parameter(torch.ones(HIDDEN, dtype=dtype))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.fc1(x)
            y, _ = self.fc2(torch.nn.functional.gelu(h))
            return y * self.scale

    module = Tiny()
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(shard_of(name, weights[name], tp, tp_rank))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer)
    return DistributedDataParallel(config, ddp_config, module)


def local_batch(x: torch.Tensor, dp: int, dp_rank: int) -> torch.Tensor:
    """(seq, global batch, hidden) → this DP rank's (seq, batch/dp, hidden) part."""
    per = x.shape[1] // dp
    return x[:, dp_rank * per:(dp_rank + 1) * per]


def backward(model, x: torch.Tensor, target: torch.Tensor, factor: float) -> None:
    """Local forward/backward and megatron's grad finalisation (DP reduce-scatter / all-reduce)."""
    from megatron.core.distributed import finalize_model_grads

    loss_fn(model(x), target, factor).backward()
    finalize_model_grads([model])


def full_params(model, tp: int) -> dict[str, torch.Tensor]:
    """All-gather the TP shards of the model's (current) parameters into full fp32 tensors."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    group = mpu.get_tensor_model_parallel_group()
    out = {}
    for name, param in model.module.named_parameters():
        p = param.detach().float()
        if name in ("fc1.weight", "fc1.bias", "fc2.weight") and tp > 1:
            parts = [torch.empty_like(p) for _ in range(tp)]
            dist.all_gather(parts, p.contiguous(), group=group)
            p = torch.cat(parts, dim=1 if name == "fc2.weight" else 0)
        out[name] = p.clone()
    return out

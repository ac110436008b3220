"""Self-check of the device adaptor and the parallel groups.

    python -m megatron_video.parallel.selfcheck --world-size 4 --tp 2 --pp 2     # spawns 4 CPU ranks
    torchrun --nproc-per-node 8 -m megatron_video.parallel.selfcheck --tp 2 --cp 2 --device cuda

Builds megatron-core's groups, checks an all-reduce in every group and a tensor-parallel column->row matmul
against the unsplit one, then prints the group layout (one line per rank) and PASS / FAIL.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist


def tp_probe_layers(tp: int, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A column- and a row-parallel linear layer (16 -> 32 -> 16) on `device`, the input's device. megatron-core
    allocates them on the host with CPU initialisation, so they are moved; the check overwrites the weights."""
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    config = ModelParallelConfig(tensor_model_parallel_size=tp, params_dtype=torch.float32,
                                 use_cpu_initialization=True)
    col = ColumnParallelLinear(16, 32, config=config, init_method=torch.nn.init.normal_, bias=False,
                               gather_output=False)
    row = RowParallelLinear(32, 16, config=config, init_method=torch.nn.init.normal_, bias=False,
                            input_is_parallel=True, skip_bias_add=True)
    return col.to(device), row.to(device)


def _check(tp: int, cp: int, pp: int) -> dict:
    from megatron.core import parallel_state as mpu

    from megatron_video.parallel.initialize import initialize_parallel, local_device, parallel_layout
    from megatron_video.parallel.random import set_seed

    initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp)
    set_seed(1234)
    device = local_device()
    layout = parallel_layout()
    problems = []
    groups = {
        "tp": mpu.get_tensor_model_parallel_group(), "cp": mpu.get_context_parallel_group(),
        "dp": mpu.get_data_parallel_group(), "pp": mpu.get_pipeline_model_parallel_group(),
    }
    for name, group in groups.items():
        value = torch.ones(1, device=device)
        dist.all_reduce(value, group=group)
        if int(value.item()) != dist.get_world_size(group):
            problems.append(f"all-reduce over {name} gave {value.item()}, expected {dist.get_world_size(group)}")

    col, row = tp_probe_layers(tp, device)
    misplaced = sorted({str(p.device) for p in [*col.parameters(), *row.parameters()]} - {str(device)})
    if misplaced:  # a matmul across devices would raise; name the cause instead
        problems.append(f"TP layer parameters on {', '.join(misplaced)} while the input is on {device}")
    else:
        generator = torch.Generator().manual_seed(0)
        w1 = torch.randn(32, 16, generator=generator)
        w2 = torch.randn(16, 32, generator=generator)
        x = torch.randn(4, 2, 16, generator=generator)
        rank = mpu.get_tensor_model_parallel_rank()
        with torch.no_grad():
            col.weight.copy_(w1.chunk(tp, 0)[rank])
            row.weight.copy_(w2.chunk(tp, 1)[rank])
            out, _ = row(col(x.to(device))[0])
        err = (out.cpu() - x @ w1.T @ w2.T).abs().max().item()
        if err > 1e-3:
            problems.append(f"TP column->row matmul differs from the unsplit one by {err:.3g}")
    layout["problems"] = problems
    return layout


def _format(layouts: list[dict]) -> str:
    lines = []
    for item in layouts:
        lines.append(
            f"rank {item['rank']:>3}: tp {item['tp_rank']} cp {item['cp_rank']} dp {item['dp_rank']} "
            f"pp {item['pp_rank']} | tp group {item['tp_group']} cp group {item['cp_group']} "
            f"dp group {item['dp_group']} pp group {item['pp_group']}"
        )
    return "\n".join(lines)


def _gather_and_report(tp: int, cp: int, pp: int) -> list[dict]:
    layout = _check(tp, cp, pp)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, layout)
    return everyone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4, help="ranks to spawn when not under torchrun")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--device", choices=("cuda", "npu", "cpu"), default=None)
    args = parser.parse_args(argv)

    from megatron_video.parallel.config import ParallelConfig

    under_launcher = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_launcher else args.world_size
    ParallelConfig(tensor_model_parallel_size=args.tp, context_parallel_size=args.cp,
                   pipeline_model_parallel_size=args.pp).validate(world)
    if under_launcher:
        from megatron_video.parallel.initialize import init_distributed

        init_distributed(args.device)
        layouts = _gather_and_report(args.tp, args.cp, args.pp)
        if dist.get_rank() != 0:
            return 0
    else:
        if args.device not in (None, "cpu"):
            parser.error("spawning local ranks is for --device cpu; use torchrun for GPUs/NPUs")
        from megatron_video.parallel.spawn import run_distributed

        layouts = run_distributed(_gather_and_report, world, args.tp, args.cp, args.pp)[0]
    dp = world // (args.tp * args.cp * args.pp)
    print(f"world size {world}: TP {args.tp} x CP {args.cp} x PP {args.pp} x DP {dp}")
    print(_format(layouts))
    problems = [f"rank {item['rank']}: {p}" for item in layouts for p in item["problems"]]
    print("\n".join(problems) if problems else "PASS: collectives and the tensor-parallel matmul check out")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

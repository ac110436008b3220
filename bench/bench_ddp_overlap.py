"""Training step time with Megatron-LM's data-parallel overlap vs without, on DP CPU ranks (gloo).

    PYTHONPATH=. python bench/bench_ddp_overlap.py [--dp 4] [--steps 6] [--shape 4 16 16] [--bucket 200000]

Each rank trains the small preset (distributed optimizer, bf16 off) for warm-up + `steps` steps with
`--overlap-grad-reduce --overlap-param-gather --ddp-bucket-size B` and then without (one bucket); the two runs
alternate step by step so they see the same machine load. Prints the median step time (max over ranks) of
each and their ratio. On CPU the collectives and the compute share the same cores, so the ratio shows the
bucketing overhead more than the hiding a GPU/NPU gets from separate communication engines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _worker(steps: int, warmup: int, shape: tuple[int, int, int], bucket: int) -> dict[str, list[float]]:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from megatron_video.arguments import build_parser, validate_args
    from megatron_video.diffusion import build_objective
    from megatron_video.models.suv_mmdit.config import suv_config
    from megatron_video.parallel import initialize_parallel, set_seed
    from megatron_video.parallel.pipeline import run_forward_backward
    from megatron_video.training.components import build_components
    from megatron_video.training.loop import make_forward_step, t2v_inputs

    initialize_parallel()
    cfg, objective = suv_config("small"), build_objective("rectified_flow")
    world = dist.get_world_size()
    runs = {}
    for name, extra in (("overlap", ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size",
                                     str(bucket)]), ("no overlap", [])):
        set_seed(0)
        args = build_parser().parse_args(["--use-distributed-optimizer", "--micro-batch-size", "2", *extra])
        validate_args(args, world_size=world)
        runs[name] = build_components(args, cfg, train_iters=steps + warmup)
    rank = mpu.get_data_parallel_rank()
    g = torch.Generator().manual_seed(rank)
    batch = {"x0": torch.randn(2, cfg.in_channels, *shape, generator=g),
             "t5_hidden": torch.randn(2, 16, cfg.caption_channels, generator=g),
             "t5_mask": torch.ones(2, 16, dtype=torch.bool),
             "clip_pooled": torch.randn(2, cfg.pooled_projection_dim, generator=g),
             "positions": [2 * rank, 2 * rank + 1]}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(warmup + steps):
        for name, parts in runs.items():
            dist.barrier()
            start = time.perf_counter()
            parts.model.zero_grad_buffer()
            parts.optimizer.zero_grad()
            run_forward_backward(make_forward_step(objective, t2v_inputs, 0, step), iter([batch]), parts.model, 1, 2)
            parts.optimizer.step()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step >= warmup:
                times[name].append(float(elapsed))
    times["buckets"] = [float(len(runs["overlap"].model.bucket_groups))]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=(4, 16, 16), help="latent T H W")
    parser.add_argument("--bucket", type=int, default=200_000, help="--ddp-bucket-size of the overlap run")
    opts = parser.parse_args()

    from megatron_video.parallel.spawn import run_distributed

    times = run_distributed(_worker, opts.dp, opts.steps, opts.warmup, tuple(opts.shape), opts.bucket,
                            timeout=1800, threads_per_rank=1)[0]
    on, off = statistics.median(times["overlap"]), statistics.median(times["no overlap"])
    print(f"small preset, DP{opts.dp} gloo, 1 thread per rank, latent {'x'.join(map(str, opts.shape))}, batch 2 per "
          f"rank, {opts.steps} steps after {opts.warmup} warm-up; overlap run: {int(times['buckets'][0])} buckets")
    print(f"step with overlap    : {on * 1e3:8.1f} ms median (max over ranks)")
    print(f"step without overlap : {off * 1e3:8.1f} ms median (max over ranks)")
    print(f"ratio overlap / no overlap: {on / off:.3f}")


if __name__ == "__main__":
    main()

"""Sampler seconds per Euler step (with classifier-free guidance: one forward of 2 x batch) per parallel layout,
on CPU ranks with gloo.

    python bench/bench_sampler.py                           # small preset, latent 3x8x8, 1 sample, 6 steps
    python bench/bench_sampler.py --preset small --latent 5,16,16 --steps 10

Each layout runs in its own set of processes (1 rank; TP = 2 with sequence parallel; CP = 2; PP = 2). Weights are
random; per step: the median wall time and the median CPU time of rank 0's process over the steps after a warm-up
step (one torch thread per rank; CPU time is the figure that other load on the machine disturbs least).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = {"1 rank": (1, 1, 1, 1, False), "TP=2 (+SP)": (2, 2, 1, 1, True), "CP=2": (2, 1, 2, 1, False),
           "PP=2": (2, 1, 1, 2, False)}


def step_worker(preset: str, latent: tuple[int, int, int], batch: int, steps: int, layout: tuple,
                ) -> list[tuple[float, float]]:
    import torch
    from megatron.core import parallel_state as mpu

    from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.pipeline import stage_of
    from megatron_video.parallel import initialize_parallel, set_seed
    from megatron_video.sampling.sampler import SamplerConfig, TextBatch, initial_noise, predict

    _, tp, cp, pp, sp = layout
    cfg = suv_config(preset)
    initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp)
    set_seed(0)
    config = megatron_config(cfg, tensor_model_parallel_size=tp, context_parallel_size=cp,
                             pipeline_model_parallel_size=pp, sequence_parallel=sp, params_dtype=torch.float32,
                             pipeline_dtype=torch.float32, use_cpu_initialization=True)
    model = SUVMMDiT(cfg, config, stage_of(cfg, pp, mpu.get_pipeline_model_parallel_rank())).eval()
    rows = 2 * batch  # guidance: negative and positive prompt in one forward
    t, h, w = latent
    text = TextBatch(torch.randn(rows, 16, cfg.caption_channels), torch.ones(rows, 16, dtype=torch.bool),
                     torch.randn(rows, cfg.pooled_projection_dim))
    x = initial_noise((cfg.in_channels, t, h, w), list(range(rows)))
    inputs = {"hidden_states": x, "encoder_hidden_states": text.t5_hidden[:, None],
              "pooled_projections": text.clip_pooled[:, None], "attention_mask": torch.ones(rows, t, h, w, dtype=bool),
              "encoder_attention_mask": text.t5_mask[:, None]}
    times = []
    with torch.no_grad():
        for sigma in SamplerConfig(num_steps=steps + 1).sigmas((h, w))[:-1]:
            started, cpu = time.perf_counter(), time.process_time()
            predict(model, model, {**inputs, "timestep": torch.full((rows,), sigma * 1000)})
            times.append((time.perf_counter() - started, time.process_time() - cpu))
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--latent", default="3,8,8", help="latent T,H,W")
    parser.add_argument("--batch", type=int, default=1, help="samples (each runs with its negative prompt)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of: {', '.join(LAYOUTS)}")
    args = parser.parse_args()
    from megatron_video.parallel.spawn import run_distributed

    latent = tuple(int(v) for v in args.latent.split(","))
    print(f"preset {args.preset}, latent {latent}, batch {args.batch} (x2 with guidance), fp32, gloo")
    print(f"{'layout':12} {'ranks':>5} {'s/step':>8} {'cpu s/step':>10}")
    for name in args.layouts.split(","):
        layout = LAYOUTS[name]
        times = run_distributed(step_worker, layout[0], args.preset, latent, args.batch, args.steps, layout,
                                timeout=1200, threads_per_rank=1)[0]
        wall, cpu = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        print(f"{name:12} {layout[0]:5d} {wall:8.3f} {cpu:10.3f}", flush=True)


if __name__ == "__main__":
    main()

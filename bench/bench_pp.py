#!/usr/bin/env python
"""Pipeline-parallel cost of the SUV model, computed from the real stage split (no GPU needed):

1. the 1F1B bubble fraction (p - 1) / (m + p - 1) for the report's micro-batch counts;
2. the p2p bytes each stage boundary carries per micro-batch (forward; the backward returns as many), split
   into the base activations (video + text streams), the extra long-skip tensors and temb;
3. the training FLOPs per stage (6 P S + 12 d S^2 / k per block), its imbalance, and the FLOP-balanced
   contiguous split for comparison.

    PYTHONPATH=. python bench/bench_pp.py [--preset osp-v1.5-8.5b] [--frames 121 --height 576 --width 1024]
        [--pp 2 4] [--micro-batches 2 4 8 16 32] [--tp 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def block_params(cfg) -> list[int]:
    """Parameters of every block at TP = 1, from a meta-device model (nothing allocated)."""
    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.parallel import init_distributed, initialize_parallel
    from megatron_video.parallel.spawn import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed("cpu")
    initialize_parallel()
    with torch.device("meta"):
        model = SUVMMDiT(cfg, megatron_config(cfg, params_dtype=torch.bfloat16, use_cpu_initialization=True,
                                              perform_initialization=False))
    return [sum(p.numel() for p in block.parameters()) for block in model.blocks]


def balanced_split(costs: list[float], parts: int) -> list[int]:
    """Contiguous split of `costs` into `parts` minimising the largest part (exact dynamic programme)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for j in range(p, n + 1):
            for i in range(p - 1, j):
                value = max(best[p - 1][i], prefix[j] - prefix[i])
                if value < best[p][j]:
                    best[p][j], cut[p][j] = value, i
    sizes, j = [], n
    for p in range(parts, 0, -1):
        i = cut[p][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def main() -> None:
    from megatron_video.models.suv_mmdit import suv_config
    from megatron_video.models.suv_mmdit.pipeline import CarryLayout, crossing_skips, pipeline_stages

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="osp-v1.5-8.5b")
    parser.add_argument("--frames", type=int, default=121)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--tp", type=int, default=1, help="TP size with Megatron-SP (p2p rows are TP shards)")
    parser.add_argument("--p2p-gbps", type=float, default=25.0, help="assumed p2p bandwidth, GB/s per direction")
    parser.add_argument("--device-tflops", type=float, default=125.0,
                        help="assumed achieved TFLOP/s per device (e.g. 40%% of a 910B's 313)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cfg = suv_config(args.preset)
    latent = ((args.frames - 1) // 8 + 1, args.height // 8, args.width // 8)
    video_tokens = latent[0] * (latent[1] // cfg.patch_size) * (latent[2] // cfg.patch_size)
    seq = video_tokens + args.text_len
    params = block_params(cfg)
    flops = [6.0 * p * seq + 12.0 * cfg.hidden_size * seq * seq / spec.k
             for p, spec in zip(params, cfg.block_specs())]
    print(f"{args.preset}: latent {latent}, {video_tokens} video + {args.text_len} text tokens, "
          f"micro-batch {args.micro_batch_size}, bf16 p2p, TP={args.tp}{' +SP' if args.tp > 1 else ''}")
    report: dict = {"latent": latent, "video_tokens": video_tokens, "text_tokens": args.text_len, "pp": {}}
    for pp in args.pp:
        stages = pipeline_stages(cfg, pp)
        print(f"\nPP={pp}: split {[len(s.blocks) for s in stages]}, long skips crossing ranks "
              f"(producer->consumer block): {crossing_skips(cfg, pp)}")
        bubbles = {m: (pp - 1) / (m + pp - 1) for m in args.micro_batches}
        print("  1F1B bubble (p-1)/(m+p-1): " + ", ".join(f"m={m}: {b:.1%}" for m, b in bubbles.items()))
        boundaries = []
        for s in stages[:-1]:
            layout = CarryLayout.for_batch(cfg, len(s.carried_out), args.micro_batch_size, latent, args.text_len,
                                           args.tp, args.tp > 1, torch.bfloat16, torch.bfloat16)
            row = layout.batch * layout.hidden * 2
            base = (layout.video_rows + layout.text_rows) * row
            skips = layout.num_skips * base
            temb = layout.temb_rows * row
            boundaries.append({"after_block": s.blocks.stop - 1, "skips": list(s.carried_out), "base_bytes": base,
                               "skip_bytes": skips, "temb_bytes": temb, "total_bytes": layout.nbytes()})
            print(f"  boundary after block {s.blocks.stop - 1:2d}: carries skips of blocks {list(s.carried_out)}; "
                  f"base {base / 2**20:.1f} MiB + skips {skips / 2**20:.1f} MiB + temb {temb / 2**10:.1f} KiB "
                  f"= {layout.nbytes() / 2**20:.1f} MiB per micro-batch per rank ({layout.num_skips + 1:.0f}x)")
        extra = sum(b["skip_bytes"] + b["temb_bytes"] for b in boundaries)
        base = sum(b["base_bytes"] for b in boundaries)
        print(f"  all boundaries: {base / 2**20:.1f} MiB base + {extra / 2**20:.1f} MiB extra (skips + temb) "
              f"per micro-batch forward, the same again backward ({(base + extra) / base:.2f}x a plain split)")
        per_skip = boundaries[0]["base_bytes"]
        direct = len(crossing_skips(cfg, pp)) * per_skip
        print(f"  (relayed through every boundary in between; sending each skip straight to its consumer would "
              f"move {direct / 2**20:.1f} MiB instead - not expressible in megatron's schedule)")
        stage_flops = [sum(flops[i] for i in s.blocks) for s in stages]
        worst = max(b["total_bytes"] for b in boundaries)
        p2p_s = 2 * worst / (args.p2p_gbps * 1e9)  # forward activation + backward gradient
        compute_s = max(stage_flops) * args.micro_batch_size / args.tp / (args.device_tflops * 1e12)
        print(f"  per micro-batch, slowest stage: compute {compute_s:.2f} s at {args.device_tflops:g} TFLOP/s vs "
              f"p2p {p2p_s * 1e3:.1f} ms at {args.p2p_gbps:g} GB/s ({p2p_s / compute_s:.2%}; overlappable)")
        imbalance = max(stage_flops) / (sum(stage_flops) / pp)
        balanced = balanced_split(flops, pp)
        bal_stages = pipeline_stages(cfg, pp, balanced)
        bal_flops = [sum(flops[i] for i in s.blocks) for s in bal_stages]
        print(f"  stage TFLOPs per sample: {[round(f / 1e12, 1) for f in stage_flops]} "
              f"(max / mean {imbalance:.3f}); FLOP-balanced split {balanced}: max / mean "
              f"{max(bal_flops) / (sum(bal_flops) / pp):.3f}, crossing skips {len(crossing_skips(cfg, pp, balanced))}")
        report["pp"][pp] = {"split": [len(s.blocks) for s in stages], "bubble": bubbles, "boundaries": boundaries,
                            "extra_bytes_per_microbatch_fwd": extra, "base_bytes_per_microbatch_fwd": base,
                            "stage_tflops": [f / 1e12 for f in stage_flops], "imbalance": imbalance,
                            "balanced_split": balanced, "direct_skip_bytes": direct,
                            "p2p_seconds": p2p_s, "stage_compute_seconds": compute_s}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

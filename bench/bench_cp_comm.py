"""Bytes the context-parallel (CP) group moves per training step (forward + backward): Ulysses everywhere vs
the skiparse-aware layout.

1. The small SUV preset, measured: one training step per strategy on P CPU ranks (gloo, TP = 1), the CP-group
   collectives counted by `CommCounter` (payload = local input of each call; wire = its ring/pairwise
   estimate); the planner's figures for the same run are printed beside them (they must agree).
2. The released 8.5B layout ([2,4,6,8,6,4,2] / [1,2,4,8,4,2,1], 24 x 128 heads) at 121x576x1024 (latent
   16 x 72 x 128 -> 36,864 tokens, 512 text tokens, bf16, micro-batch 1), from the planner: the same block plans,
   index maps and all-to-all split sizes the model runs (megatron_video/models/suv_mmdit/cp_comm.py).

"a2a k>=P" counts the all-to-alls issued by blocks whose sparsity k is at least P (their attention and the
layout change into them); "wire" counts only bytes that leave the rank.

    PYTHONPATH=. python bench/bench_cp_comm.py                 # both parts
    PYTHONPATH=. python bench/bench_cp_comm.py --skip-measure  # planner only (no processes)
"""

from __future__ import annotations

import argparse
import json

import torch

STRATEGIES = ("ulysses", "skiparse")


def _measure_worker(cfg, cp: int, grid_latent: tuple[int, int, int], strategies: tuple[str, ...]) -> dict:
    """One rank: a training step (forward + backward) per strategy; CP-group bytes by collective."""
    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import megatron_config
    from megatron_video.models.suv_mmdit.context_parallel import set_context_parallel_strategy
    from megatron_video.parallel import CommCounter, initialize_parallel, set_seed

    initialize_parallel(context_parallel_size=cp)
    set_seed(1)
    config = megatron_config(cfg, context_parallel_size=cp, params_dtype=torch.float32,
                             use_cpu_initialization=True)
    model = SUVMMDiT(cfg, config)
    t, h, w = grid_latent
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, cfg.in_channels, t, h, w, generator=g), "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 1, 7, cfg.caption_channels, generator=g),
        "pooled_projections": torch.randn(1, 1, cfg.pooled_projection_dim, generator=g),
        "attention_mask": torch.ones(1, t, h, w), "encoder_attention_mask": torch.ones(1, 1, 7),
    }
    out = {}
    for strategy in strategies:
        set_context_parallel_strategy(model, strategy)
        with CommCounter() as counter:
            model(**inputs).square().mean().backward()
        out[strategy] = {f"{op}/{size}": [s.calls, s.payload_bytes, s.wire_bytes]
                         for (op, size), s in counter.by_group_size.items()}
    return out


def _planned(cfg, cp: int, grid: tuple[int, int, int], batch: int, text_len: int, element_bytes: int) -> dict:
    from megatron_video.models.suv_mmdit.cp_comm import planned_cp_traffic, summarize

    return {s: summarize(planned_cp_traffic(cfg, cp, 1, False, grid, batch, text_len, element_bytes, s), cfg, cp)
            for s in STRATEGIES}


def _ratio_lines(name: str, cp: int, totals: dict) -> list[str]:
    u, s = totals["ulysses"], totals["skiparse"]

    def pct(a: float, b: float) -> str:
        return f"{100.0 * (1 - a / b):5.1f}%" if b else "  n/a"

    return [
        f"{name} CP={cp}: a2a payload  ulysses {u['a2a_payload'] / 2**20:10.2f} MiB  skiparse "
        f"{s['a2a_payload'] / 2**20:10.2f} MiB  saved {pct(s['a2a_payload'], u['a2a_payload'])}",
        f"{name} CP={cp}: a2a wire     ulysses {u['a2a_wire'] / 2**20:10.2f} MiB  skiparse "
        f"{s['a2a_wire'] / 2**20:10.2f} MiB  saved {pct(s['a2a_wire'], u['a2a_wire'])}",
        f"{name} CP={cp}: a2a wire k>=P ulysses {u['a2a_wire_k_ge_p'] / 2**20:9.2f} MiB  skiparse "
        f"{s['a2a_wire_k_ge_p'] / 2**20:10.2f} MiB  saved {pct(s['a2a_wire_k_ge_p'], u['a2a_wire_k_ge_p'])}",
        f"{name} CP={cp}: all CP wire  ulysses {u['all_wire'] / 2**20:10.2f} MiB  skiparse "
        f"{s['all_wire'] / 2**20:10.2f} MiB  saved {pct(s['all_wire'], u['all_wire'])}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-latent", type=int, nargs=3, default=(3, 16, 16), metavar=("T", "H", "W"))
    parser.add_argument("--small-cp", type=int, nargs="+", default=(2, 4))
    parser.add_argument("--big-cp", type=int, nargs="+", default=(2, 4, 8))
    parser.add_argument("--skip-measure", action="store_true", help="planner figures only")
    parser.add_argument("--json", help="also write all figures to this file")
    args = parser.parse_args()

    from megatron_video.models.suv_mmdit import suv_config

    report: dict = {"small": {}, "8.5b": {}}
    small = suv_config("small")
    t, h, w = args.small_latent
    grid = (t, h // small.patch_size, w // small.patch_size)
    for cp in args.small_cp:
        planned = _planned(small, cp, grid, 1, 7, 4)
        report["small"][cp] = {"planned": planned}
        for line in _ratio_lines(f"small {t}x{h}x{w} latent (fp32)", cp, planned):
            print(line)
        if not args.skip_measure:
            from megatron_video.parallel.spawn import run_distributed

            measured = run_distributed(_measure_worker, cp, small, cp, (t, h, w), STRATEGIES, timeout=900)[0]
            report["small"][cp]["measured_rank0"] = measured
            for strategy in STRATEGIES:
                a2a = sum(v[1] for k, v in measured[strategy].items() if k.startswith("all_to_all_single/"))
                print(f"  measured rank 0, {strategy:8s}: a2a payload {a2a / 2**20:8.3f} MiB "
                      f"(planned {planned[strategy]['a2a_payload'] / 2**20:8.3f}); by collective/group size: "
                      + ", ".join(f"{k} {v[0]} calls {v[1] / 2**10:.1f} KiB" for k, v in
                                  sorted(measured[strategy].items())))
    big = suv_config("osp-v1.5-8.5b")
    for cp in args.big_cp:
        planned = _planned(big, cp, (16, 36, 64), 1, 512, 2)
        report["8.5b"][cp] = {"planned": planned}
        for line in _ratio_lines("8.5B 121x576x1024 (bf16, B=1)", cp, planned):
            print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1, default=str)


if __name__ == "__main__":
    main()

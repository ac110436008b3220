"""Skiparse speed, side by side in one run:

1. joint skiparse attention (video + text) for k = 2, 4, 8 against dense attention (k = 1), forward + backward:
   as one call on the natural-order sequence that pads and rearranges q/k/v and the output itself
   (`joint_attention`, what a block does under CP or Megatron-SP), and "in stage order", as the model runs it
   otherwise (`joint_attention_in_order` on q/k/v already in the stage's token order, key validity moved once
   outside the timed call: models/suv_mmdit/stage_order.py);
2. the SUV block stack (sparsity per stage, e.g. 1,2,4,8,4,2,1) against the same model with k = 1 everywhere,
   forward + backward, with the stream in stage order (the default) and with the per-block rearrangement.

Without masks by default, as training runs (one latent shape per batch; the text cut to its captions'
length, training/data.py trim_text_padding, fills it at micro-batch 1); `--masks` passes all-True key masks, the
masked kernel path of micro-batches whose captions differ in length.

`--compile BACKEND` compiles the stack's elementwise regions as the trainer's `--compile` does (both models);
`--part` times only the attention or only the stack; `--part kernel` times the bare SDPA kernel on the joined
shapes (k sub-sequences of N/k + L tokens against one of N + L) beside their FLOPs ratio, the floor under the
attention rows.

Runs interleave the variants and report medians. Example (CPU):
    PYTHONPATH=. python bench/bench_suv.py --grid 4 32 32 --heads 2 --head-dim 64 --reps 3 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds); CPU time is the robust figure on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _interleaved(runs: dict[str, Callable[[], None]], reps: int) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) seconds per variant, the variants interleaved so that load changes hit all alike."""
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            times[name].append(_timed(fn))
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def _backward(outputs: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...]) -> None:
    """The backward as a block runs it: dense upstream gradients (fixed random ones per shape; `sum()` would
    pass stride-0 ones) and the input gradients returned, not accumulated into `.grad`."""
    torch.autograd.grad(outputs, inputs, [_upstream(tuple(o.shape)) for o in outputs])


@functools.cache
def _upstream(shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed upstream gradient for `shape`, drawn on first use only: drawing it is not part of the timed
    work (a draw per call cost 2.4 ms for 4,096 x 128, 4 % of the k = 8 attention)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def bench_attention(n: int, text_len: int, heads: int, head_dim: int, reps: int, masks: bool,
                    ) -> dict[str, tuple[float, float]]:
    from megatron_video.models.attention import attention
    from megatron_video.models.suv_mmdit.skiparse import joint_attention, joint_attention_in_order
    from megatron_video.models.suv_mmdit.stage_order import StageOrder, StageOrders, move

    g = torch.Generator().manual_seed(0)
    video = [torch.randn(n, 1, heads, head_dim, generator=g, requires_grad=True) for _ in range(3)]
    text = [torch.randn(text_len, 1, heads, head_dim, generator=g, requires_grad=True) for _ in range(3)]
    video_valid, text_valid = None, None
    if masks:
        video_valid, text_valid = torch.ones(1, n, dtype=torch.bool), torch.ones(1, text_len, dtype=torch.bool)

    def run(k: int, mode: str) -> Callable[[], None]:
        def fn() -> None:
            out, out_text = joint_attention(*video, *text, video_valid, text_valid, k=k, mode=mode,
                                            scale=head_dim ** -0.5, attn_fn=attention)
            _backward((out, out_text), (*video, *text))
        return fn

    def run_in_order(k: int, mode: str) -> Callable[[], None]:
        orders = StageOrders(1, (torch.zeros(n, 1), torch.zeros(n, 1)), video_valid, text_valid)
        order = StageOrder(k, n)
        moved = [move(t.detach(), orders.natural, order).requires_grad_() for t in video]
        key_valid = orders.key_validity(order, mode)

        def fn() -> None:
            out, out_text = joint_attention_in_order(*moved, *text, key_valid, text_valid, k=k, mode=mode,
                                                     scale=head_dim ** -0.5, attn_fn=attention)
            _backward((out, out_text), (*moved, *text))
        return fn

    runs = {"dense (k=1)": run(1, "full")}
    for k in (2, 4, 8):
        for mode in ("single", "group"):
            runs[f"k={k} {mode}"] = run(k, mode)
            runs[f"k={k} {mode}, in stage order"] = run_in_order(k, mode)
    return _interleaved(runs, reps)


def bench_kernel(n: int, text_len: int, heads: int, head_dim: int, reps: int) -> dict[str, tuple[float, float]]:
    """SDPA forward + backward alone on batch-major (k, N/k + L, heads, d) inputs, as the attention paths hand
    them over, for k = 1, 2, 4, 8: what the kernel costs before any rearrangement."""
    g = torch.Generator().manual_seed(0)

    def run(k: int) -> Callable[[], None]:
        shape = (k, n // k + text_len, heads, head_dim)
        q, key, value = (torch.randn(shape, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
        upstream = torch.randn(shape, generator=g).transpose(1, 2)

        def fn() -> None:
            out = torch.nn.functional.scaled_dot_product_attention(q, key, value, scale=head_dim ** -0.5)
            torch.autograd.grad(out, (q, key, value), upstream)
        return fn

    return _interleaved({f"kernel, k={k} ({k} x {n // k + text_len} tokens)": run(k) for k in (1, 2, 4, 8)}, reps)


def bench_stack(grid: tuple[int, int, int], text_len: int, heads: int, head_dim: int, sparse_n: tuple[int, ...],
                layers: int, reps: int, masks: bool, compile_backend: str | None = None,
                ) -> dict[str, tuple[float, float]]:
    from megatron_video.models.suv_mmdit import SUVMMDiT, suv_config
    from megatron_video.models.suv_mmdit.config import megatron_config

    t, h, w = grid
    cfg = suv_config("small", num_layers=tuple(layers for _ in sparse_n), sparse_n=sparse_n, num_heads=heads,
                     head_dim=head_dim)
    dense_cfg = cfg.replace(sparse_n=tuple(1 for _ in sparse_n))
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, cfg.in_channels, t, 2 * h, 2 * w, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 1, text_len, cfg.caption_channels, generator=g),
        "pooled_projections": torch.randn(1, 1, cfg.pooled_projection_dim, generator=g),
        "attention_mask": torch.ones(1, t, 2 * h, 2 * w) if masks else None,
        "encoder_attention_mask": torch.ones(1, 1, text_len) if masks else None,
    }

    def run(c, stage_order: bool = True) -> Callable[[], None]:
        model = SUVMMDiT(c, megatron_config(c, params_dtype=torch.float32, use_cpu_initialization=True),
                         compile_backend=compile_backend)
        model.use_stage_order(stage_order)

        def fn() -> None:
            model.zero_grad(set_to_none=True)
            model(**inputs).square().mean().backward()
        return fn

    label = ",".join(map(str, sparse_n))
    return _interleaved({f"SUV k=[{label}]": run(cfg), f"SUV k=[{label}], per-block": run(cfg, False),
                         "same, k=1 everywhere": run(dense_cfg)}, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=3, default=(4, 32, 32), metavar=("T", "H", "W"),
                        help="video token grid (latent frames, latent H/2, latent W/2)")
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sparse-n", type=int, nargs="+", default=(1, 2, 4, 8, 4, 2, 1))
    parser.add_argument("--layers-per-stage", type=int, default=1,
                        help="blocks per stage of the stack (>= 2: stages alternate single / group skip)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--masks", action="store_true", help="all-True key masks (the masked kernel path)")
    parser.add_argument("--part", choices=("both", "attention", "stack", "kernel"), default="both",
                        help="what to time (kernel: SDPA alone on the joined shapes)")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="the stack's elementwise regions compiled with this torch.compile backend, as the "
                             "trainer's --compile (e.g. inductor; default: eager)")
    args = parser.parse_args()
    if len(args.sparse_n) % 2 != 1:
        parser.error("--sparse-n needs an odd number of stages")
    torch.set_num_threads(args.threads)

    from megatron_video.parallel import init_distributed, initialize_parallel
    from megatron_video.parallel.spawn import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed("cpu")
    initialize_parallel(tensor_model_parallel_size=1)

    t, h, w = args.grid
    n = t * h * w
    print(f"# tokens: video {n} + text {args.text_len}, heads {args.heads} x {args.head_dim}, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.reps}, forward + backward, "
          f"{'all-True key masks' if args.masks else 'no masks'}")
    if args.part in ("both", "attention"):
        attn_times = bench_attention(n, args.text_len, args.heads, args.head_dim, args.reps, args.masks)
        _table("skiparse joint attention vs dense", attn_times, "dense (k=1)")
    if args.part == "kernel":
        kernel_times = bench_kernel(n, args.text_len, args.heads, args.head_dim, args.reps)
        _table("SDPA kernel alone vs k=1", kernel_times, next(iter(kernel_times)))
        for k in (2, 4, 8):
            print(f"FLOPs ratio k={k}: {k * (n // k + args.text_len) ** 2 / (n + args.text_len) ** 2:.4f}")
    if args.part in ("both", "stack"):
        stack_times = bench_stack(tuple(args.grid), args.text_len, args.heads, args.head_dim, tuple(args.sparse_n),
                                  args.layers_per_stage, args.reps, args.masks, args.compile)
        _table(f"block stack ({args.layers_per_stage} block(s) per stage, {args.compile or 'eager'}) vs k=1 "
               "everywhere", stack_times, "same, k=1 everywhere")


def _table(title: str, times: dict[str, tuple[float, float]], reference: str) -> None:
    ref_wall, ref_cpu = times[reference]
    print(f"\n## {title}")
    print(f"{'variant':<40} {'wall ms':>10} {'rel.':>7} {'cpu ms':>10} {'rel.':>7}")
    for name, (wall, cpu) in times.items():
        print(f"{name:<40} {wall * 1e3:>10.1f} {wall / ref_wall:>7.3f} {cpu * 1e3:>10.1f} {cpu / ref_cpu:>7.3f}")


if __name__ == "__main__":
    main()

"""SUV denoiser forward + backward time in bf16, eager or with the blocks' elementwise regions compiled.

    python bench/bench_elementwise.py [--compile none|aot_eager|inductor] [--steps 10] [--threads 2]

A mid-sized model (hidden 512, 8 heads, blocks k = [1, 2, 2, 1]) so the elementwise work is a visible part of a
step; loss = mean(out^2), no optimizer. Prints the median step time. The same script runs against an older
checkout (PYTHONPATH=<checkout>) with --compile none, which is how "before" figures are taken.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", default="none", choices=("none", "aot_eager", "inductor"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(4, 32, 32), help="latent T H W")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    from megatron_video.models.suv_mmdit import SUVMMDiT
    from megatron_video.models.suv_mmdit.config import SUVConfig, megatron_config
    from megatron_video.parallel import init_distributed, initialize_parallel

    init_distributed("cpu")
    initialize_parallel()
    torch.manual_seed(0)
    cfg = SUVConfig(num_layers=(1, 2, 1), sparse_n=(1, 2, 1), num_heads=8, head_dim=64, in_channels=4,
                    out_channels=4, timestep_embed_dim=64, caption_channels=64, pooled_projection_dim=32)
    config = megatron_config(cfg, params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=True)
    kwargs = {} if opts.compile == "none" else {"compile_backend": opts.compile}
    model = SUVMMDiT(cfg, config, **kwargs)
    b, (t, h, w) = opts.batch, opts.shape
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(b, cfg.in_channels, t, h, w, generator=gen).bfloat16(),
        "timestep": torch.rand(b, generator=gen) * 1000,
        "encoder_hidden_states": torch.randn(b, 1, 32, cfg.caption_channels, generator=gen).bfloat16(),
        "pooled_projections": torch.randn(b, 1, cfg.pooled_projection_dim, generator=gen).bfloat16(),
        "attention_mask": None, "encoder_attention_mask": None,
    }
    times = []
    for step in range(opts.warmup + opts.steps):
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(**inputs).float().pow(2).mean().backward()
        if step >= opts.warmup:
            times.append(time.perf_counter() - started)
    tokens = t * (h // cfg.patch_size) * (w // cfg.patch_size)
    print(f"compile={opts.compile} tokens={tokens} batch={b} threads={opts.threads}: "
          f"median {1000 * statistics.median(times):.1f} ms/step (min {1000 * min(times):.1f})")


if __name__ == "__main__":
    main()

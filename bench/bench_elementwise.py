"""SUV denoiser forward + backward time in bf16, eager or with the blocks' elementwise regions compiled.

    python bench/bench_elementwise.py [--compile none|aot_eager|inductor] [--steps 10] [--threads 2]
    python bench/bench_elementwise.py --regions [--tokens 4096] [--compile inductor]

A mid-sized model (hidden 512, 8 heads, blocks k = [1, 2, 2, 1]) so the elementwise work is a visible part of a
step; loss = mean(out^2), no optimizer. Prints the median step time. The same script runs against an older
checkout (PYTHONPATH=<checkout>) with --compile none, which is how "before" figures are taken.

--regions times one block's elementwise regions alone (forward + backward, bf16, (tokens, 1, 512)): the fp32
upcasting formulas the model used before (written out here), the compute-dtype ones, and compiled ones.
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
    parser.add_argument("--regions", action="store_true", help="time the elementwise regions alone")
    parser.add_argument("--tokens", type=int, default=4096)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.regions:
        return bench_regions(opts)

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


def upcast_regions(x, w, b, shift, scale, gate, q, wq, cos, sin, h):
    """The block's elementwise work as the model computed it before (every region upcast to fp32)."""
    import torch.nn.functional as F

    from megatron_video.models.suv_mmdit.rope import _rotate_half_blocks, rope_sections

    normed = F.layer_norm(x.float(), w.shape, w.float(), b.float(), 1e-6).to(x.dtype)
    mod = (normed.float() * (1 + scale[None]) + shift[None]).to(x.dtype)
    qf = q.float()
    qn = (qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + 1e-6) * wq.float()).to(q.dtype)
    rot = (qn.float() * cos[:, None, None] + _rotate_half_blocks(qn.float(), rope_sections(q.shape[-1]))
           * sin[:, None, None]).to(q.dtype)
    act = F.gelu(h.float(), approximate="tanh").to(h.dtype)
    res = (x.float() + gate[None] * mod.float()).to(x.dtype)
    return mod, rot, act, res


def regions(ops):
    def run(x, w, b, shift, scale, gate, q, wq, cos, sin, h):
        mod = ops.norm_modulate(x, w, b, 1e-6, shift, scale)
        return mod, ops.rms_norm_rope(q, wq, 1e-6, cos, sin), ops.gelu(h), ops.gated_residual(x, gate, mod)

    return run


def bench_regions(opts: argparse.Namespace) -> None:
    from megatron_video.models.suv_mmdit.elementwise import EAGER, block_elementwise

    n, hidden, heads = opts.tokens, 512, 8
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    args = (leaf(n, 1, hidden), leaf(hidden), leaf(hidden), leaf(1, hidden, dtype=torch.float32),
            leaf(1, hidden, dtype=torch.float32), leaf(1, hidden, dtype=torch.float32), leaf(n, 1, heads, 64),
            leaf(64), torch.randn(n, 64, generator=g).bfloat16(), torch.randn(n, 64, generator=g).bfloat16(),
            leaf(n, 1, 4 * hidden))
    variants = {"fp32 upcast (before)": upcast_regions, "compute dtype (eager)": regions(EAGER)}
    if opts.compile != "none":
        variants[f"compute dtype ({opts.compile})"] = regions(block_elementwise(opts.compile))
    for name, fn in variants.items():
        times = []
        for step in range(opts.warmup + opts.steps):
            started = time.perf_counter()
            sum(o.float().sum() for o in fn(*args)).backward()
            if step >= opts.warmup:
                times.append(time.perf_counter() - started)
        print(f"{name}: tokens={n} hidden={hidden} threads={opts.threads}: median "
              f"{1000 * statistics.median(times):.2f} ms (min {1000 * min(times):.2f}) forward + backward")


if __name__ == "__main__":
    main()

"""Structure-controller overhead per training step over the frozen base alone (issue 18; goal <= 15 %).

    python bench/bench_control.py [--preset small] [--shape 4 16 16] [--steps 6] [--threads 2] [--num-blocks 2]
                                  [--hidden-size W] [--compile none|inductor]

Three steps in one process, same batch and MSE loss on a random target, torch Adam, TP = 1, timed in
interleaved rounds (a busy machine slows all three alike):
- frozen base: the frozen SUV model's forward and backward (activation gradients from the loss down to block 0's
  output, where F_0 enters; no weight gradients): what the base costs inside a controlled step;
- controlled: the same frozen base plus the controller (encoder E on the structure video, projectors P_j):
  forward, backward and an optimizer step over the controller;
- base trained: the SUV model trained alone (weight gradients and an optimizer step), for scale.
Prints the median step times, the controller's parameter count, the overhead controlled / frozen base - 1 (the
median of the rounds' ratios, with their quartiles, and the ratio of the median times), and the same ratio in
model FLOPs (training/flops.py). Adam is torch's multi-tensor one, as the stack's on host.
The structure video has the VAE's pixel shape for the latent ((T - 1) * 4 + 1, 8 H, 8 W).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class _Step:
    """One training step of `model` (Adam over its trainable parameters, if any)."""

    def __init__(self, model, inputs: dict, target: torch.Tensor) -> None:
        self.model, self.inputs, self.target, self.times = model, inputs, target, []
        params = [p for p in model.parameters() if p.requires_grad]
        # the fused Adam the stack's optimizer uses on host parameters (optim/builder.py use_fast_host_kernels)
        self.optimizer = torch.optim.Adam(params, lr=1e-5, fused=True) if params else None

    def __call__(self, record: bool) -> None:
        start = time.perf_counter()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        (self.model(**self.inputs) - self.target).pow(2).mean().backward()
        if self.optimizer is not None:
            self.optimizer.step()
        if record:
            self.times.append(time.perf_counter() - start)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--shape", type=int, nargs=3, default=(4, 16, 16), help="latent T H W")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-blocks", type=int, default=2, help="K, the controller's transformer blocks")
    parser.add_argument("--conv-channels", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=None, help="the encoder's width (default: the base's)")
    parser.add_argument("--compile", default="none", choices=("none", "inductor"),
                        help="the blocks' elementwise regions (base and encoder) as --compile trains them")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    from megatron_video.models.control import ControlConfig, ControlledSUV
    from megatron_video.models.suv_mmdit import SUVMMDiT, megatron_config, suv_config
    from megatron_video.parallel import init_distributed, initialize_parallel
    from megatron_video.training.flops import training_flops_per_sample, video_tokens

    init_distributed("cpu")
    initialize_parallel()
    cfg = suv_config(opts.preset)
    config = megatron_config(cfg, params_dtype=torch.float32, use_cpu_initialization=True)
    control = ControlConfig(num_blocks=opts.num_blocks, conv_channels=opts.conv_channels, hidden_size=opts.hidden_size)
    b, (t, h, w) = opts.batch, opts.shape
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(b, cfg.in_channels, t, h, w, generator=g),
        "timestep": torch.rand(b, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(b, 1, opts.text_len, cfg.caption_channels, generator=g),
        "pooled_projections": torch.randn(b, 1, cfg.pooled_projection_dim, generator=g),
        "attention_mask": torch.ones(b, t, h, w, dtype=torch.long),
        "encoder_attention_mask": torch.ones(b, 1, opts.text_len, dtype=torch.long),
    }
    target = torch.randn(b, cfg.out_channels, t, h, w, generator=g)
    structure = torch.rand(b, control.signal_channels, *control.pixel_shape((t, h, w)), generator=g)

    backend = None if opts.compile == "none" else opts.compile
    frozen_base = SUVMMDiT(cfg, config, init_seed=0, compile_backend=backend).requires_grad_(False)
    controlled = ControlledSUV(SUVMMDiT(cfg, config, init_seed=0, compile_backend=backend), control)
    trained_base = SUVMMDiT(cfg, config, init_seed=0, compile_backend=backend)
    # a controlled step's backward stops at block 0's output (block 0 and the embeddings see no gradient): the
    # frozen base's backward starts there too
    frozen_base.blocks[0].register_forward_hook(lambda module, args, out: (out[0].detach().requires_grad_(), out[1]))
    frozen = _Step(frozen_base, inputs, target)
    steps = [frozen, _Step(controlled, {**inputs, "structure": structure}, target), _Step(trained_base, inputs, target)]
    for i in range(opts.warmup + opts.steps):
        for step in steps:
            step(record=i >= opts.warmup)
    frozen_step, controlled_step, base_step = (step.median for step in steps)
    n_base = sum(p.numel() for p in trained_base.parameters())
    n_ctrl = sum(p.numel() for p in controlled.controller.parameters())
    print(f"preset {opts.preset}, latent {tuple(opts.shape)} x batch {b}, structure {tuple(structure.shape[2:])}, "
          f"K = {opts.num_blocks}, encoder width {control.width(cfg)} (base {cfg.hidden_size}), "
          f"{opts.threads} threads, compile {opts.compile}")
    print(f"parameters: base {n_base / 1e6:.3f} M, controller {n_ctrl / 1e6:.3f} M ({n_ctrl / n_base:.1%})")
    print(f"frozen base forward + backward {frozen_step * 1e3:8.1f} ms")
    print(f"controlled step (base frozen)  {controlled_step * 1e3:8.1f} ms")
    print(f"base trained alone             {base_step * 1e3:8.1f} ms")
    # each round's controlled / frozen ratio: the pair ran back to back, so a machine that slows down between
    # rounds moves both; the quartiles show how far the rounds spread
    ratios = [c / f - 1 for c, f in zip(steps[1].times, steps[0].times, strict=True)]
    low, mid, high = statistics.quantiles(ratios, n=4)
    print(f"controller overhead            {mid:+8.1%}  over the frozen base, median of the rounds' ratios "
          f"(quartiles {low:+.1%} .. {high:+.1%}; goal <= +15 %)")
    print(f"  ratio of the median times    {controlled_step / frozen_step - 1:+8.1%}")
    tokens = (video_tokens((t, h, w), cfg.patch_size), opts.text_len)
    base_flops = training_flops_per_sample(n_base, cfg.hidden_size, frozen_base.attention_sparsity(), *tokens,
                                           frozen_params=n_base)
    ctrl_flops = training_flops_per_sample(n_base + n_ctrl, cfg.hidden_size, controlled.attention_sparsity(),
                                           *tokens, frozen_params=n_base)
    print(f"model FLOPs overhead           {ctrl_flops / base_flops - 1:+8.1%}  (training/flops.py: matmuls and "
          "attention; what the time overhead tends to where kernels, not per-operation costs, dominate)")


if __name__ == "__main__":
    main()

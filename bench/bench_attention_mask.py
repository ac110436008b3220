"""One unpadded attention call (every key valid), with an all-True key mask (the path every call took before
masks of None) against no mask (taken now when nothing is padded), forward + backward, SDPA on CPU.

    PYTHONPATH=. python bench/bench_attention_mask.py --tokens 4096 --text 64 --reps 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from bench_suv import _interleaved  # the same interleaved-median timing as the skiparse benchmark


def bench(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, reps: int) -> dict[str, tuple[float, float]]:
    from megatron_video.models.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(tokens, 1, heads, head_dim, generator=g).to(dtype).requires_grad_() for _ in range(3))
    all_valid = torch.ones(1, tokens, dtype=torch.bool)

    def run(key_valid: torch.Tensor | None) -> Callable[[], None]:
        def fn() -> None:
            attention(q, k, v, key_valid, scale=head_dim ** -0.5, backend="sdpa").sum().backward()
        return fn

    return _interleaved({"masked (all True)": run(all_valid), "no mask": run(None)}, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="video tokens")
    parser.add_argument("--text", type=int, default=64, help="text tokens (joint attention: video + text)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    n = opts.tokens + opts.text
    print(f"SDPA on CPU, {n} tokens (queries = keys), {opts.heads} heads x {opts.head_dim}, batch 1, "
          f"forward + backward, {opts.threads} threads, median of {opts.reps}")
    for dtype in (torch.float32, torch.bfloat16):
        times = bench(n, opts.heads, opts.head_dim, dtype, opts.reps)
        (mw, mc), (uw, uc) = times["masked (all True)"], times["no mask"]
        print(f"{str(dtype):15s} masked {mw * 1e3:8.1f} ms wall {mc * 1e3:8.1f} ms CPU | no mask {uw * 1e3:8.1f} ms "
              f"wall {uc * 1e3:8.1f} ms CPU | no mask / masked (CPU time) {uc / mc:.2f}")


if __name__ == "__main__":
    main()

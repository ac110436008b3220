"""Stress gloo's all-gather the ways megatron's distributed optimizer can issue it, on 2 CPU ranks.

    PYTHONPATH=. python bench/stress_gloo_allgather.py --mode coalesced-async --rounds 25000

Each round every rank writes its shard of four buffers (megatron's bucket sizes, scaled down), gathers them in
place (the input is this rank's slice of the output, as megatron's param buffers) while doing a matmul, then
all-reduces a scalar and waits; the gathered buffers are checked every round. Modes:

- coalesced-async: one `_coalescing_manager(async_ops=True)` per buffer, what megatron-core 0.16.1's
  `start_param_sync` dispatches under --overlap-param-gather;
- coalesced-sync: the same with `async_ops=False` (what megatron_video/adaptor/cpu.py makes megatron use on CPU);
- plain-async: one `all_gather_into_tensor(async_op=True)` per buffer.

Prints "ok" and the round count, or which rank died how. On torch 2.13.0+cpu (2026-12-05, the 2-core CI machine),
`--rounds 5000`: coalesced-async died in four of five runs (glibc "unaligned tcache chunk" abort or SIGSEGV, once
within 200 rounds); coalesced-sync and plain-async completed every one of four runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("coalesced-async", "coalesced-sync", "plain-async")


def _stress(mode: str, rounds: int) -> int:
    import torch.distributed as dist
    from torch.distributed import _coalescing_manager

    warnings.filterwarnings("ignore", category=FutureWarning)  # all_gather_into_tensor's rename
    rank, size = dist.get_rank(), dist.get_world_size()
    buffers = [torch.zeros(n * size) for n in (3000, 7000, 20000, 1234)]
    shards = [b.view(size, -1)[rank] for b in buffers]
    for r in range(rounds):
        for shard in shards:
            shard.fill_(10 * r + rank)
        handles = []
        for buffer, shard in zip(buffers, shards, strict=True):
            if mode == "plain-async":
                handles.append(dist.all_gather_into_tensor(buffer, shard, async_op=True))
            else:
                with _coalescing_manager(None, async_ops=mode == "coalesced-async") as cm:
                    dist.all_gather_into_tensor(buffer, shard, async_op=mode == "coalesced-async")
                handles.append(cm)
            torch.randn(128, 128) @ torch.randn(128, 128)  # compute while the gather runs
        dist.all_reduce(torch.ones(1))
        for handle in handles:
            if handle is not None:
                handle.wait()
        for buffer in buffers:
            expected = torch.arange(size, dtype=buffer.dtype).repeat_interleave(buffer.numel() // size) + 10 * r
            if not torch.equal(buffer, expected):
                raise AssertionError(f"round {r}: a gathered buffer holds wrong values")
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--rounds", type=int, default=25000)
    args = parser.parse_args()
    from megatron_video.parallel.spawn import RankFailure, run_distributed

    try:
        done = run_distributed(_stress, 2, args.mode, args.rounds, timeout=3600, threads_per_rank=1)
    except RankFailure as exc:
        print(f"{args.mode}: {str(exc).splitlines()[0]}")
        raise SystemExit(1) from None
    print(f"{args.mode}: ok, {done[0]} rounds")


if __name__ == "__main__":
    main()

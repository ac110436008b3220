"""Run a function on N local CPU processes with torch.distributed (gloo): for tests, benchmarks and self-checks.

Every rank runs `fn(*args, **kwargs)` with the cpu device backend set up and the default process group
initialised; the parent collects each rank's return value in rank order. The first failure (exception, crash,
or timeout) terminates every rank and raises `RankFailure` carrying that rank's traceback, so a broken
collective never hangs the caller.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

_PRELOAD = ["torch", "megatron.core", "megatron_video.adaptor"]


class RankFailure(RuntimeError):
    """A rank raised, died or timed out."""

    def __init__(self, rank: int | None, message: str) -> None:
        self.rank = rank
        super().__init__(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict,
    results: mp.Queue, env: dict[str, str], threads: int, collective_timeout_s: float,
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch

    torch.set_num_threads(threads)
    try:
        from megatron_video.parallel.initialize import destroy_parallel, init_distributed

        init_distributed("cpu", timeout_minutes=collective_timeout_s / 60.0)
        value = fn(*args, **kwargs)
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure, SystemExit included, is reported to the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    try:
        destroy_parallel()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except RuntimeError:
        pass  # tear-down problems after a successful run do not change the result


def _crashed_rank(procs: list, exclude: set[int], grace_s: float = 1.0) -> int | None:
    deadline = time.monotonic() + grace_s
    while True:
        for rank, proc in enumerate(procs):
            if rank not in exclude and proc.exitcode not in (None, 0):
                return rank
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    threads_per_rank: int | None = None,
    collective_timeout_s: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run module-level `fn` on `world_size` CPU ranks; return the per-rank results in rank order. Collectives
    time out after `collective_timeout_s` (default: `timeout`)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    results: mp.Queue = ctx.Queue()
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, kwargs, results, dict(env or {}), threads,
                  collective_timeout_s or timeout),
            daemon=False,  # ranks may start children (dist_checkpointing writers); killed in `finally`
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise RankFailure(missing[0], f"ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, status, payload = results.get(timeout=min(1.0, remaining))
            except queue.Empty:
                for rank, proc in enumerate(procs):
                    if rank not in outputs and proc.exitcode is not None:
                        # give a report already in flight a moment to arrive before blaming the process
                        try:
                            rank2, status2, payload2 = results.get(timeout=2.0)
                        except queue.Empty:
                            raise RankFailure(
                                rank, f"rank {rank} died with exit code {proc.exitcode} without reporting"
                            ) from None
                        rank, status, payload = rank2, status2, payload2
                        break
                else:
                    continue
            if status == "error":
                crashed = _crashed_rank(procs, exclude=set(outputs) | {rank})
                if crashed is not None:  # a rank that died silently is the cause; the error is a consequence
                    raise RankFailure(
                        crashed, f"rank {crashed} died with exit code {procs[crashed].exitcode} without "
                        f"reporting; rank {rank} then failed:\n{payload}"
                    )
                raise RankFailure(rank, f"rank {rank} failed:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        for proc in procs:
            proc.join(timeout=5.0 if len(outputs) == world_size else 0.1)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
    return [outputs[rank] for rank in range(world_size)]

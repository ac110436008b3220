"""Training logs: a progress line with ETA on rank 0, scalars to TensorBoard on the last rank."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("megatron_video.train")


def _format_value(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


class TrainLogger:
    def __init__(self, train_iters: int, tensorboard_dir: str | None = None, log_interval: int = 1) -> None:
        self.train_iters, self.log_interval = train_iters, log_interval
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.writer = None
        if tensorboard_dir is not None and self.rank == world - 1:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self._start = time.monotonic()
        self._start_iteration: int | None = None

    def log(self, iteration: int, scalars: dict[str, float], extra: str = "") -> None:
        if self._start_iteration is None:
            self._start_iteration, self._start = iteration - 1, time.monotonic()
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, iteration)
            self.writer.flush()
        if self.rank != 0 or iteration % self.log_interval != 0:
            return
        done = iteration - self._start_iteration
        elapsed = time.monotonic() - self._start
        eta = elapsed / max(done, 1) * (self.train_iters - iteration)
        fields = " | ".join(f"{name} {_format_value(value)}" for name, value in scalars.items())
        line = f"iteration {iteration:>6}/{self.train_iters} | {fields} | ETA {eta / 60:.1f} min"
        print(line + (f" | {extra}" if extra else ""), flush=True)

    def info(self, message: str, *args: Any) -> None:
        if self.rank == 0:
            print(message % args if args else message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

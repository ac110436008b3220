"""Training logs, shaped like Megatron-LM's: one console line every `--log-interval` iterations with the values
averaged over the interval, and every iteration's values in TensorBoard. Both come from the last rank (the one
that holds the loss under pipeline parallelism, as Megatron prints with `print_rank_last`), so they agree: the
console's average is the mean of the TensorBoard points of the interval.

A resumed run into the same TensorBoard directory starts its event file with `purge_step` = its first
iteration: TensorBoard then drops the earlier run's points from that iteration on, so every iteration shows once
(the points of the run that was cut off after its last checkpoint are replaced by the resumed run's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import torch.distributed as dist

# Optional features (the clip statistics exist only for some clip modes, MFU only with --peak-tflops): a value
# that is not finite means "off" and is left out of both outputs instead of showing a column of nan.
OPTIONAL = frozenset({"grad_norm_clipped", "clip_threshold", "clip_mu", "clip_var", "mfu"})
SUMMED = frozenset({"clipped", "skipped"})  # counts over the interval
LATEST = frozenset({"lr", "consumed_samples", "bad_samples", "skipped_batches", "clip_threshold", "clip_mu",
                    "clip_var"})
PEAK = frozenset({"mem_gib"})
# (scalar name, console label, format) of Megatron's columns, in its order; the other scalars follow by name.
COLUMNS = (
    ("consumed_samples", "consumed samples", "{:12.0f}"),
    ("iteration_ms", "elapsed time per iteration (ms)", "{:.1f}"),
    ("lr", "learning rate", "{:.6E}"),
    ("loss", "loss", "{:.6E}"),
    ("grad_norm", "grad norm", "{:.3f}"),
    ("skipped", "number of skipped iterations", "{:3.0f}"),
    ("video_tokens_per_s", "video tokens per second", "{:.1f}"),
    ("tflops_per_device", "TFLOP/s per device", "{:.3g}"),
    ("mfu", "MFU (%)", "{:.2f}"),
    ("mem_gib", "max memory (GiB)", "{:.2f}"),
)


def _is_off(name: str, value: float | None) -> bool:
    return value is None or (name in OPTIONAL and not math.isfinite(value))


def _number(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))  # counts
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


def interval_values(points: list[dict[str, float]]) -> dict[str, float]:
    """The interval's value of each scalar: counts summed, state (lr, counters, clip statistics) the latest,
    memory the peak, everything else the mean of the iterations that had it."""
    out: dict[str, float] = {}
    names = dict.fromkeys(name for point in points for name in point)
    for name in names:
        values = [point[name] for point in points if name in point]
        if name in SUMMED:
            out[name] = float(sum(values))
        elif name in LATEST:
            out[name] = values[-1]
        elif name in PEAK:
            out[name] = max(values)
        else:
            out[name] = sum(values) / len(values)
    return out


def format_line(iteration: int, train_iters: int, global_batch_size: int, values: Mapping[str, float],
                extra: str = "", eta_s: float | None = None) -> str:
    """One Megatron-shaped console line: Megatron's columns first, then our other scalars by name."""
    fields = [f" [{datetime.now():%Y-%m-%d %H:%M:%S}] iteration {iteration:8d}/{train_iters:8d}"]
    known = {name for name, _, _ in COLUMNS}
    for name, label, spec in COLUMNS:
        if name in values:
            fields.append(f"{label}: {spec.format(values[name])}")
        if name == "lr":
            fields.append(f"global batch size: {global_batch_size:5d}")
    fields += [f"{name}: {_number(value)}" for name, value in values.items() if name not in known]
    if eta_s is not None:
        fields.append(f"ETA: {eta_s / 60:.1f} min")
    if extra:
        fields.append(extra)
    return " | ".join(fields) + " |"


def _text_table(mapping: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {key} | {json.dumps(value, default=str)} |" for key, value in mapping.items())
    return "| name | value |\n|---|---|\n" + rows


def run_description(args: argparse.Namespace) -> dict[str, str]:
    """TensorBoard text: the flags, and the model and data configs (dataclasses) in full."""
    flags = {k: v for k, v in sorted(vars(args).items()) if not dataclasses.is_dataclass(v)}
    out = {"hyperparameters": _text_table(flags)}
    for name in ("model_config", "data_config"):
        config = getattr(args, name, None)
        if dataclasses.is_dataclass(config):
            out[name] = "```\n" + json.dumps(dataclasses.asdict(config), indent=2, default=str) + "\n```"
    return out


class TrainLogger:
    def __init__(self, train_iters: int, tensorboard_dir: str | None = None, log_interval: int = 1,
                 global_batch_size: int = 0, args: argparse.Namespace | None = None) -> None:
        self.train_iters, self.log_interval, self.global_batch_size = train_iters, log_interval, global_batch_size
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.logging_rank = self.rank == world - 1  # console lines and TensorBoard from the same rank
        self.tensorboard_dir, self.args = tensorboard_dir, args
        self.writer = None
        self._points: list[dict[str, float]] = []
        self._start = time.monotonic()
        self._start_iteration: int | None = None

    def _open_writer(self, first_iteration: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops an earlier run's points from this iteration on (see the module doc)
        self.writer = SummaryWriter(log_dir=self.tensorboard_dir, purge_step=first_iteration)
        if self.args is not None:
            for tag, text in run_description(self.args).items():
                self.writer.add_text(tag, text, first_iteration)

    def log(self, iteration: int, scalars: dict[str, float], extra: str = "") -> None:
        if self._start_iteration is None:
            self._start_iteration, self._start = iteration - 1, time.monotonic()
            if self.tensorboard_dir is not None and self.logging_rank:
                self._open_writer(iteration)
        point = {name: float(value) for name, value in scalars.items() if not _is_off(name, value)}
        if self.writer is not None:
            for name, value in point.items():
                self.writer.add_scalar(name, value, iteration)
            self.writer.flush()
        self._points.append(point)
        if iteration % self.log_interval != 0 and iteration != self.train_iters and not extra:
            return
        values, self._points = interval_values(self._points), []
        if not self.logging_rank:
            return
        done = iteration - self._start_iteration
        eta = (time.monotonic() - self._start) / max(done, 1) * (self.train_iters - iteration)
        print(format_line(iteration, self.train_iters, self.global_batch_size, values, extra, eta), flush=True)

    def info(self, message: str, *args: Any) -> None:
        if self.rank == 0:
            print(message % args if args else message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

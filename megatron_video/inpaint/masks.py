"""Keep-masks of the inpainting tasks (DESIGN §10). A keep-mask is a bool vector over "units" (video frames, or
latent frames in the feature-cache mode): True = the unit is given to the model as conditioning, False = the
model generates it.

    t2v           nothing kept
    i2v           the first unit
    transition    the first and the last unit
    continuation  the first n units
    random        n units drawn without replacement
    clear         every unit

For continuation and random, n is uniform in [max(1, ceil(min_fraction * L)), max(that, floor(max_fraction * L))],
capped at L - 1 so something is always generated. A single unit (an image) has nothing to condition on: every
task keeps nothing there (text-to-image). All randomness comes from the caller's generator.
"""

from __future__ import annotations

import math

import torch

from megatron_video.inpaint.config import TASKS, InpaintStage


def keep_count_range(num_units: int, min_fraction: float, max_fraction: float) -> tuple[int, int]:
    """Inclusive bounds of n for continuation / random on `num_units` units (needs at least 2 units)."""
    if num_units < 2:
        raise ValueError(f"continuation / random need at least 2 units, got {num_units}")
    low = min(max(1, math.ceil(min_fraction * num_units)), num_units - 1)
    high = min(max(low, math.floor(max_fraction * num_units)), num_units - 1)
    return low, high


def task_keep_mask(task: str, num_units: int, generator: torch.Generator, min_fraction: float = 0.0,
                   max_fraction: float = 0.5) -> torch.Tensor:
    """(num_units,) bool keep-mask of `task`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if num_units < 1:
        raise ValueError(f"need at least one unit, got {num_units}")
    keep = torch.zeros(num_units, dtype=torch.bool)
    if num_units == 1:
        return keep
    if task == "i2v":
        keep[0] = True
    elif task == "transition":
        keep[0] = keep[-1] = True
    elif task == "clear":
        keep[:] = True
    elif task in ("continuation", "random"):
        low, high = keep_count_range(num_units, min_fraction, max_fraction)
        n = int(torch.randint(low, high + 1, (1,), generator=generator))
        if task == "continuation":
            keep[:n] = True
        else:
            keep[torch.randperm(num_units, generator=generator)[:n]] = True
    return keep


def sample_task(stage: InpaintStage, generator: torch.Generator) -> str:
    """A task drawn from the stage's mix."""
    probs = torch.tensor(stage.probabilities(), dtype=torch.float64)
    return TASKS[int(torch.multinomial(probs, 1, generator=generator))]


__all__ = ["keep_count_range", "sample_task", "task_keep_mask"]

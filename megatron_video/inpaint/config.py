"""The inpainting config file: task mix, kept-frame bounds, progressive stages, noise and loss options.

    schedule_by: step              # or "samples" (consumed samples): what a stage's `start` counts
    min_keep_fraction: 0.0         # continuation / random keep n frames, n in [min, max] * units
    max_keep_fraction: 0.5
    kept_noise_std: 0.0            # std of Gaussian noise added to the conditioning latents of kept frames
    loss_on: generated             # or "all"
    masked_latents: encode         # or "latent_mask" (feature cache; an approximation, see conditioning.py)
    stages:                        # the active stage is the last one whose start <= progress
      - {start: 0, ratios: {t2v: 0.1, i2v: 0.9}}
      - {start: 1000, ratios: {t2v: 0.1, i2v: 0.4, transition: 0.1, continuation: 0.2, random: 0.1, clear: 0.1}}

Ratios need not sum to 1 (they are normalised); tasks left out have ratio 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_video.configfile import load_dataclass

TASKS = ("t2v", "i2v", "transition", "continuation", "random", "clear")
SCHEDULE_BY = ("step", "samples")
LOSS_ON = ("generated", "all")
MASKED_LATENTS = ("encode", "latent_mask")


@dataclass(frozen=True)
class InpaintStage:
    start: int = 0  # first step (or consumed sample count) of this stage
    ratios: dict[str, float] = field(default_factory=lambda: {"i2v": 1.0})

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"stage start must be >= 0, got {self.start}")
        unknown = sorted(set(self.ratios) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in ratios; known: {', '.join(TASKS)}")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.ratios.values()):
            raise ValueError(f"task ratios must be non-negative numbers, got {self.ratios}")
        if sum(self.ratios.values()) <= 0:
            raise ValueError(f"a stage needs at least one task with a positive ratio, got {self.ratios}")

    def probabilities(self) -> list[float]:
        """Probabilities in TASKS order."""
        total = float(sum(self.ratios.values()))
        return [float(self.ratios.get(task, 0.0)) / total for task in TASKS]


@dataclass(frozen=True)
class InpaintConfig:
    stages: list[InpaintStage] = field(default_factory=lambda: [InpaintStage()])
    schedule_by: str = "step"
    min_keep_fraction: float = 0.0
    max_keep_fraction: float = 0.5
    kept_noise_std: float = 0.0
    loss_on: str = "generated"
    masked_latents: str = "encode"

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        starts = [stage.start for stage in self.stages]
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"stage starts must begin at 0 and strictly increase, got {starts}")
        for name, value, allowed in (("schedule_by", self.schedule_by, SCHEDULE_BY),
                                     ("loss_on", self.loss_on, LOSS_ON),
                                     ("masked_latents", self.masked_latents, MASKED_LATENTS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= self.min_keep_fraction <= self.max_keep_fraction <= 1.0:
            raise ValueError(f"need 0 <= min_keep_fraction <= max_keep_fraction <= 1, got "
                             f"{self.min_keep_fraction}, {self.max_keep_fraction}")
        if self.kept_noise_std < 0:
            raise ValueError(f"kept_noise_std must be >= 0, got {self.kept_noise_std}")

    def stage_at(self, iteration: int, consumed_samples: int) -> InpaintStage:
        """The stage active at this point of training (by step or by consumed samples)."""
        progress = iteration if self.schedule_by == "step" else consumed_samples
        active = self.stages[0]
        for stage in self.stages:
            if stage.start <= progress:
                active = stage
        return active


def load_inpaint_config(path: str | Path) -> InpaintConfig:
    """Read and validate an inpainting config file (JSON / YAML); errors name the file and the key."""
    return load_dataclass(InpaintConfig, path)

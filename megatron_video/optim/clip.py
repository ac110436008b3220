"""Adaptive gradient clipping statistics (DESIGN §8): the v1.5 EMA-3σ threshold.

`EmaThresholdClipper.decide(g)` takes the global gradient norm g of one step and returns what to do with it:

- warm-up (`warmup_steps` W > 0, our addition): the first W finite norms are never extreme. Step 1 is not
  clipped; steps 2..W are clipped at mean + 3·std of the norms seen so far; μ and var are the plain mean and
  (population) variance of all warm-up norms, clipped or not. The EMA rule below starts from them. Without
  it, the reference's first step (μ = min(3g, 1)) puts the extreme bound at max(μ + 5σ, 5) = 5, and a model
  whose first norms are above 5 (the small preset starts at ≈ 6.7) skips every step until the run stops.
- W = 0 is the v1.5 reference: first step μ = min(3g, 1), var = 0, no clip;
- thr = μ + 3·√var; if g ≤ thr the statistics move: μ ← d·μ + (1−d)·g, then var ← d·var + (1−d)·(μ − g)²
  (with the *updated* μ, as the reference does); otherwise the gradients are scaled by thr/g and the
  statistics are left alone;
- "extreme" step: g is NaN/Inf or g > max(μ + 5·√var, 5): the update must be skipped and the statistics are
  left alone; `max_consecutive_extreme` extreme steps in a row raise `TooManyExtremeStepsError`.

The decision is pure arithmetic on g, which megatron all-reduces, so every rank takes the same decision
without further communication. The state is a dict of Python scalars (checkpoint it with the optimizer;
identical on all ranks, so it is "common" state for dist_checkpointing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

STATE_VERSION = 2  # 2: warm-up count (a version-1 state has finished any warm-up)


class TooManyExtremeStepsError(RuntimeError):
    """Training produced too many extreme (non-finite or exploding) gradient norms in a row."""


@dataclass(frozen=True)
class EmaClipConfig:
    decay: float = 0.99
    num_sigma: float = 3.0
    extreme_sigma: float = 5.0
    extreme_floor: float = 5.0
    first_step_factor: float = 3.0
    first_step_cap: float = 1.0
    max_consecutive_extreme: int = 10
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"clip EMA decay must be in (0, 1), got {self.decay}")
        if self.num_sigma < 0 or self.extreme_sigma < self.num_sigma:
            raise ValueError(
                f"need 0 <= num_sigma <= extreme_sigma, got {self.num_sigma}, {self.extreme_sigma}")
        if self.first_step_factor <= 0 or self.first_step_cap <= 0:
            raise ValueError("first_step_factor and first_step_cap must be > 0")
        if self.max_consecutive_extreme < 1:
            raise ValueError(f"max_consecutive_extreme must be >= 1, got {self.max_consecutive_extreme}")
        if self.warmup_steps < 0:
            raise ValueError(f"clip warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class ClipDecision:
    """What to do with one step's gradients. `scale` multiplies the gradients (1.0 = untouched)."""

    grad_norm: float
    threshold: float  # clip threshold used for this step (inf on the first step)
    extreme_threshold: float
    scale: float
    clipped: bool
    extreme: bool
    mu: float  # statistics after this step
    var: float


class EmaThresholdClipper:
    """v1.5 EMA-3σ adaptive clipping statistics."""

    def __init__(self, config: EmaClipConfig | None = None) -> None:
        self.config = config or EmaClipConfig()
        self.mu: float | None = None
        self.var = 0.0
        self.steps = 0  # decisions taken (every optimizer step that reached the clipper)
        self.clipped_count = 0
        self.extreme_count = 0
        self.consecutive_extreme = 0
        self.warmup_seen = 0  # finite norms taken into the warm-up statistics

    @property
    def initialized(self) -> bool:
        return self.mu is not None

    def threshold(self) -> float:
        return math.inf if self.mu is None else self.mu + self.config.num_sigma * math.sqrt(self.var)

    @property
    def warming_up(self) -> bool:
        return self.warmup_seen < self.config.warmup_steps

    def extreme_threshold(self) -> float:
        if self.mu is None or self.warming_up:
            return math.inf  # no statistics yet: only non-finite norms are extreme
        return max(self.mu + self.config.extreme_sigma * math.sqrt(self.var), self.config.extreme_floor)

    def decide(self, grad_norm: float) -> ClipDecision:
        g = float(grad_norm)
        cfg = self.config
        thr, ext = self.threshold(), self.extreme_threshold()
        self.steps += 1
        if not math.isfinite(g) or g > ext:
            self.extreme_count += 1
            self.consecutive_extreme += 1
            if self.consecutive_extreme >= cfg.max_consecutive_extreme:
                raise TooManyExtremeStepsError(
                    f"{self.consecutive_extreme} consecutive extreme gradient steps (last grad norm {g:.4g}, "
                    f"extreme threshold {ext:.4g}, mu {self.mu}, var {self.var:.4g}); training is diverging "
                    "or the data is broken. Check the recorded skipped batches, lower the learning rate, or "
                    "raise max_consecutive_extreme."
                )
            return self._decision(g, thr, ext, scale=1.0, clipped=False, extreme=True)
        self.consecutive_extreme = 0
        if self.warming_up:
            return self._warmup(g, thr, ext)
        if self.mu is None:
            self.mu = min(cfg.first_step_factor * g, cfg.first_step_cap)
            self.var = 0.0
            return self._decision(g, thr, ext, scale=1.0, clipped=False, extreme=False)
        if g <= thr:
            d = cfg.decay
            self.mu = d * self.mu + (1.0 - d) * g
            self.var = d * self.var + (1.0 - d) * (self.mu - g) ** 2
            return self._decision(g, thr, ext, scale=1.0, clipped=False, extreme=False)
        self.clipped_count += 1
        return self._decision(g, thr, ext, scale=thr / g, clipped=True, extreme=False)

    def _warmup(self, g: float, thr: float, ext: float) -> ClipDecision:
        """One warm-up step: clip at the current threshold, then fold g into the running mean / variance
        (Welford's update, with var = M2 / n, so the state needs no extra sum)."""
        n = self.warmup_seen
        mu = 0.0 if self.mu is None else self.mu
        delta = g - mu
        new_mu = mu + delta / (n + 1)
        self.var = (self.var * n + delta * (g - new_mu)) / (n + 1)
        self.mu, self.warmup_seen = new_mu, n + 1
        if g <= thr:
            return self._decision(g, thr, ext, scale=1.0, clipped=False, extreme=False)
        self.clipped_count += 1
        return self._decision(g, thr, ext, scale=thr / g, clipped=True, extreme=False)

    def _decision(self, g: float, thr: float, ext: float, *, scale: float, clipped: bool, extreme: bool
                  ) -> ClipDecision:
        mu = math.nan if self.mu is None else self.mu
        return ClipDecision(g, thr, ext, scale, clipped, extreme, mu, self.var)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mu": self.mu,
            "var": self.var,
            "steps": self.steps,
            "clipped_count": self.clipped_count,
            "extreme_count": self.extreme_count,
            "consecutive_extreme": self.consecutive_extreme,
            "warmup_seen": self.warmup_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version", STATE_VERSION)
        if version not in (1, STATE_VERSION):
            raise ValueError(f"unsupported clip state version {state.get('version')}")
        required = {"mu", "var", "steps", "extreme_count", "consecutive_extreme"} | (
            {"warmup_seen"} if version >= 2 else set())
        missing = required - set(state)
        if missing:
            raise KeyError(f"clip state is missing {sorted(missing)}")
        mu = state["mu"]
        var = float(state["var"])
        if (mu is not None and not math.isfinite(float(mu))) or not math.isfinite(var) or var < 0:
            raise ValueError(f"invalid clip statistics mu={mu!r} var={var!r}")
        self.mu = None if mu is None else float(mu)
        self.var = var
        self.steps = int(state["steps"])
        self.clipped_count = int(state.get("clipped_count", 0))
        self.extreme_count = int(state["extreme_count"])
        self.consecutive_extreme = int(state["consecutive_extreme"])
        # a version-1 state predates the warm-up: statistics it holds came from the reference rule
        seen = state["warmup_seen"] if version >= 2 else (0 if mu is None else self.config.warmup_steps)
        self.warmup_seen = int(seen)

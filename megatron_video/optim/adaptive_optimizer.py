"""`AdaptiveClipOptimizer`: megatron-core's optimizer with adaptive clipping and skipping of extreme steps.

Composition, not patching. megatron-core 0.16 splits `MixedPrecisionOptimizer.step()` (the base of
`DistributedOptimizer`) and `FP32Optimizer.step()` / `ChainedOptimizer.step()` into
`prepare_grads()` (model grads → fp32 main grads, unscale, fp16 overflow check) → clip (`clip_grad_norm`,
only when `config.clip_grad > 0`) → `step_with_ready_grads()` (inner Adam step, main → model params, and for
the distributed optimizer the parameter all-gather). This wrapper runs the same three phases with its own
clip in the middle:

1. `prepare_grads()`; an fp16 loss-scale overflow skips the step (the grad scaler has already backed off).
2. `get_grad_norm()`: the L2 norm of the main grads, all-reduced over the optimizer's grad-stats group. For
   the distributed optimizer each DP rank contributes its own shard of the reduce-scattered grads and
   `param_is_not_tensor_parallel_duplicate` drops TP-replicated params on TP ranks > 0, so the result is the
   global norm with TP-duplicated parameters counted once; it is identical on every rank.
3. The clipper decides; the main grads (the `.grad` of the params the inner torch optimizer steps) are
   multiplied in place by the clip factor, or the update is skipped for an extreme step.
4. `step_with_ready_grads()` unless skipped.

A non-finite loss (the loop passes `loss_finite`) or gradient norm is an extreme step in every clip mode; in
the modes without a clipper this wrapper counts them and stops the job after `max_consecutive_extreme` in a
row, as the EMA clipper does.

Megatron's own clip must be off (`OptimizerConfig.clip_grad = 0.0`) when a clipper is given; without a
clipper, `clip_grad > 0` is honoured here as a constant max-norm clip, so the record is always filled.
Everything else (zero_grad, state_dict, sharded_state_dict, param_groups, …) is forwarded to the wrapped
optimizer; the clip statistics are saved separately from `clipper.state_dict()`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from megatron_video.optim.clip import EmaThresholdClipper, TooManyExtremeStepsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """What happened in one optimizer step, for logging."""

    grad_norm_before: float
    grad_norm_after: float
    threshold: float
    mu: float
    var: float
    scale: float
    clipped: bool
    extreme: bool
    skipped: bool
    overflow: bool  # fp16 dynamic loss-scale overflow (not an extreme step)
    num_zeros: float | None = None

    @property
    def stepped(self) -> bool:
        return not self.skipped

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def leaf_optimizers(optimizer: Any) -> Iterator[Any]:
    """The MegatronOptimizers inside a (possibly chained) megatron optimizer, stub optimizers excluded."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "chained_optimizers"):
            yield from leaf_optimizers(opt)
        elif not getattr(opt, "is_stub_optimizer", False) and getattr(opt, "optimizer", None) is not None:
            yield opt


def main_grads(optimizer: Any) -> list[torch.Tensor]:
    """The fp32 grads the inner torch optimizer reads (with the distributed optimizer: this DP shard)."""
    grads = []
    for opt in leaf_optimizers(optimizer):
        decoupled = getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                grad = getattr(param, "decoupled_grad", None) if decoupled else param.grad
                if grad is not None:
                    grads.append(grad)
    return grads


class AdaptiveClipOptimizer:
    """Wraps a megatron-core optimizer (usually the `ChainedOptimizer` of `get_megatron_optimizer`)."""

    def __init__(self, optimizer: Any, clipper: EmaThresholdClipper | None = None,
                 max_consecutive_extreme: int = 10) -> None:
        for name in ("prepare_grads", "get_grad_norm", "step_with_ready_grads"):
            if not callable(getattr(optimizer, name, None)):
                raise TypeError(f"expected a megatron-core optimizer with {name}(), "
                                f"got {type(optimizer).__name__}")
        clip_grad = float(getattr(optimizer.config, "clip_grad", 0.0) or 0.0)
        if clipper is not None and clip_grad > 0.0:
            raise ValueError("OptimizerConfig.clip_grad must be 0.0 when an adaptive clipper is used "
                             f"(got {clip_grad}); the clipper replaces megatron's constant clip")
        self.optimizer = optimizer
        self.clipper = clipper
        self.max_grad_norm = clip_grad
        self.max_consecutive_extreme = max_consecutive_extreme  # without a clipper (the clipper has its own)
        self.consecutive_extreme = 0

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not defined here: forward to the wrapped optimizer.
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    @torch.no_grad()
    def prepare_and_clip(self, loss_finite: bool = True) -> StepRecord:
        """Phases 1-3: main grads ready, norm measured, clip factor applied (or skip decided). No update.
        `loss_finite=False` (the same on every rank) makes the step extreme whatever the norm."""
        opt = self.optimizer
        if opt.prepare_grads():
            nan = math.nan
            return StepRecord(nan, nan, nan, nan, nan, 1.0, False, False, skipped=True, overflow=True)
        grad_norm = float(opt.get_grad_norm())
        judged = grad_norm if loss_finite else math.nan  # what the extreme test sees
        if self.clipper is not None:
            d = self.clipper.decide(judged)
            threshold, mu, var, scale, extreme = d.threshold, d.mu, d.var, d.scale, d.extreme
        else:
            threshold, mu, var = self.max_grad_norm or math.inf, math.nan, math.nan
            extreme = not math.isfinite(judged)
            self._count_extreme(extreme, grad_norm)
            scale = 1.0
            if self.max_grad_norm > 0.0 and grad_norm > self.max_grad_norm and not extreme:
                scale = self.max_grad_norm / grad_norm
        clipped = scale < 1.0 and not extreme
        if clipped:
            grads = main_grads(opt)
            if grads:
                torch._foreach_mul_(grads, scale)
        num_zeros = None
        if getattr(opt.config, "log_num_zeros_in_grad", False) and not extreme:
            num_zeros = float(opt.count_zeros())
        return StepRecord(
            grad_norm_before=grad_norm,
            grad_norm_after=grad_norm * scale if clipped else grad_norm,
            threshold=threshold,
            mu=mu,
            var=var,
            scale=scale if clipped else 1.0,
            clipped=clipped,
            extreme=extreme,
            skipped=extreme,
            overflow=False,
            num_zeros=num_zeros,
        )

    def _count_extreme(self, extreme: bool, grad_norm: float) -> None:
        self.consecutive_extreme = self.consecutive_extreme + 1 if extreme else 0
        if self.consecutive_extreme >= self.max_consecutive_extreme:
            raise TooManyExtremeStepsError(
                f"{self.consecutive_extreme} consecutive non-finite steps (loss or gradient norm; last grad norm "
                f"{grad_norm:.4g}); training is diverging or the data is broken. Check the recorded skipped "
                "batches, lower the learning rate, or raise --max-consecutive-extreme-steps.")

    @torch.no_grad()
    def apply_update(self, record: StepRecord) -> StepRecord:
        """Phase 4: the inner step, unless the record says skip. Returns the (possibly updated) record."""
        if record.skipped:
            return record
        if not self.optimizer.step_with_ready_grads():
            return replace(record, skipped=True)
        return record

    def step(self, skip_update: bool = False, loss_finite: bool = True) -> StepRecord:
        """One optimizer step. `skip_update=True` (e.g. every DP rank's gradient was discarded) skips it."""
        if skip_update:
            nan = math.nan
            return StepRecord(nan, nan, nan, nan, nan, 1.0, False, False, skipped=True, overflow=False)
        return self.apply_update(self.prepare_and_clip(loss_finite))

    def clip_state_dict(self) -> dict[str, Any]:
        if self.clipper is None:
            return {"consecutive_extreme": self.consecutive_extreme}
        return self.clipper.state_dict()

    def load_clip_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the clip statistics. A checkpoint saved with constant (or no) clipping holds no EMA
        statistics: switching to --clip-grad-ema-decay at a resume starts them afresh (the warm-up seeds them),
        keeping the count of extreme steps in a row; the other way round only that count carries over."""
        if self.clipper is None:
            self.consecutive_extreme = int(state.get("consecutive_extreme", 0))
        elif "mu" not in state:
            log.warning("the checkpoint was saved without EMA clipping: its statistics start afresh")
            self.clipper.consecutive_extreme = int(state.get("consecutive_extreme", 0))
        else:
            self.clipper.load_state_dict(state)

"""Optimizer construction, adaptive gradient clipping (DESIGN §8) and sharded fp32 EMA weights.

Training-loop order for one iteration::

    for chunk in model: chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward(...)          # finalize_model_grads (wrapped by finalize_with_rank_discard for v1.3)
    record = optimizer.step()      # AdaptiveClipOptimizer -> StepRecord (log it)
    if record.stepped:
        ema.update()
    elif record.extreme:
        extreme_log.record(iteration, gather_sample_ids(local_sample_ids, dp_group), record.grad_norm_before)
    # checkpoint: optimizer.clip_state_dict() and extreme_log.state_dict() (common, identical on all ranks);
    # ema.sharded_state_dict(model.sharded_state_dict()) for dist_checkpointing (reshardable), or
    # ema.state_dict() (this DP rank's shard only, same layout to load)
"""

from megatron_video.optim.adaptive_optimizer import AdaptiveClipOptimizer, StepRecord, main_grads
from megatron_video.optim.builder import (
    CLIP_MODES,
    OptimizerOptions,
    build_clipper,
    build_optimizer,
    build_rank_discard,
    optimizer_config,
)
from megatron_video.optim.clip import (
    ClipDecision,
    EmaClipConfig,
    EmaThresholdClipper,
    TooManyExtremeStepsError,
)
from megatron_video.optim.ema import ShardedEMA
from megatron_video.optim.extreme_log import ExtremeStepLog, gather_sample_ids
from megatron_video.optim.rank_discard import (
    PerRankDiscard,
    RankDiscardConfig,
    RankDiscardDecision,
    RankDiscardStats,
    finalize_with_rank_discard,
    local_grad_norm,
)

__all__ = [
    "CLIP_MODES", "AdaptiveClipOptimizer", "ClipDecision", "EmaClipConfig", "EmaThresholdClipper", "ExtremeStepLog",
    "OptimizerOptions", "PerRankDiscard", "RankDiscardConfig", "RankDiscardDecision", "RankDiscardStats",
    "ShardedEMA", "StepRecord", "TooManyExtremeStepsError", "build_clipper", "build_optimizer",
    "build_rank_discard", "finalize_with_rank_discard", "gather_sample_ids", "local_grad_norm", "main_grads",
    "optimizer_config",
]

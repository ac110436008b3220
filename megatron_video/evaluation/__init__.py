"""Evaluation loss on a held-out set (per shape bucket, fixed timesteps and noise)."""

from megatron_video.evaluation.eval_loss import (
    EvalBatch,
    EvalResult,
    bucket_name,
    eval_levels,
    eval_noise,
    evaluate_batches,
)

__all__ = ["EvalBatch", "EvalResult", "bucket_name", "eval_levels", "eval_noise", "evaluate_batches"]

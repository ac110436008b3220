"""Model FLOPs for throughput and MFU logging (DESIGN §14).

Training FLOPs of one sample ≈ 6·P·S + 12·d·S·Σ_blocks (S / k_b): the dense matmuls (P parameters seen by
all S = video + text tokens, forward and backward) plus bidirectional attention whose score and value
matmuls cost 12·S·d per token per block, divided by the block's skiparse sparsity k (each token attends
to S / k keys). Parameters that take no weight gradients (a frozen base under a trained structure controller)
cost 4·S each instead of 6·S: their forward and the activation gradient that flows through them.
"""

from __future__ import annotations

from collections.abc import Sequence


def video_tokens(latent_thw: Sequence[int], patch: int = 2) -> int:
    t, h, w = latent_thw
    return t * (h // patch) * (w // patch)


def training_flops_per_sample(
    num_params: int, hidden_size: int, block_sparsity: Sequence[float], num_video_tokens: int, num_text_tokens: int,
    frozen_params: int = 0,
) -> float:
    """`frozen_params` of the `num_params` take no weight gradients; `block_sparsity` has one k per attention
    block the step runs (forward and backward)."""
    if not 0 <= frozen_params <= num_params:
        raise ValueError(f"frozen_params must be in [0, num_params], got {frozen_params} of {num_params}")
    seq = num_video_tokens + num_text_tokens
    attention = 12.0 * hidden_size * seq * sum(seq / k for k in block_sparsity)
    return 6.0 * (num_params - frozen_params) * seq + 4.0 * frozen_params * seq + attention


def mfu(flops_per_second_per_device: float, peak_flops: float) -> float:
    return flops_per_second_per_device / peak_flops if peak_flops > 0 else 0.0

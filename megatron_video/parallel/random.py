"""Seeding: python, numpy and torch RNGs plus megatron's model-parallel RNG tracker."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed every RNG the way Megatron does: same seed on TP peers for replicated parameters, a TP-rank-offset
    seed for the tracked 'model-parallel' RNG (sharded parameters, dropout in TP regions), and the pipeline
    rank folded in so different stages initialise differently. Needs `initialize_parallel` first."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * mpu.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def seed_model_part(seed: int, part: int) -> None:
    """Reseed the default generators of the host and of every device so the parameters built next depend only on
    (seed, part), not on which pipeline stage builds them or what it built before."""
    torch.manual_seed(seed * 1000 + part)

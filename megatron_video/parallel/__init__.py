"""Process groups (on megatron.core.parallel_state), seeding, and communication accounting."""

from megatron_video.adaptor.comm_counter import CommCounter
from megatron_video.parallel.config import ParallelConfig, ParallelConfigError
from megatron_video.parallel.initialize import (
    destroy_parallel,
    init_distributed,
    initialize_parallel,
    parallel_layout,
)
from megatron_video.parallel.random import set_seed

__all__ = [
    "CommCounter",
    "ParallelConfig",
    "ParallelConfigError",
    "destroy_parallel",
    "init_distributed",
    "initialize_parallel",
    "parallel_layout",
    "set_seed",
]

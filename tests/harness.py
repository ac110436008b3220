"""Multi-rank test harness: `run_distributed(fn, world_size, *args, **kwargs)` runs a module-level function on
CPU ranks with gloo and returns every rank's result (see megatron_video.parallel.spawn)."""

from megatron_video.parallel.spawn import RankFailure, run_distributed

__all__ = ["RankFailure", "run_distributed"]

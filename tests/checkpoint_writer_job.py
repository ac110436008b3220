"""A one-rank job that saves a checkpoint whose writer processes stall (for tests/test_checkpoint_faults.py).

    python tests/checkpoint_writer_job.py SAVE_DIR PID_DIR

Every forked writer process records its pid in PID_DIR and then sleeps instead of writing, so the test can kill
this process in the middle of the save and watch what happens to the writers.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch


def _stalled_writer(pid_dir: Path):
    def write(*args, **kwargs):
        (pid_dir / str(os.getpid())).touch()
        time.sleep(600)

    return write


def main(save: str, pid_dir: str) -> None:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from checkpoints_convert.ours import ensure_process_group
    from megatron_video.parallel import initialize_parallel
    from megatron_video.training.checkpointing import save_checkpoint

    ensure_process_group()
    initialize_parallel()
    FileSystemWriterAsync.write_preloaded_data = staticmethod(_stalled_writer(Path(pid_dir)))
    state = {"model": {"w": ShardedTensor.from_rank_offsets("model.w", torch.ones(64, 64), replica_id=0)}}
    save_checkpoint(save, 1, state, {"world_size": 1})


if __name__ == "__main__":
    main(*sys.argv[1:3])

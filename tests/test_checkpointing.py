"""Checkpoint publication: a save killed half-way leaves the previous checkpoint loadable, old checkpoints are
pruned, a preempted (SIGTERM) job saves and exits cleanly."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import psutil
import pytest
import torch

from megatron_video.training.checkpointing import (
    CheckpointError,
    iteration_dir,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
)
from tests.harness import RankFailure, run_distributed
from tests.training_fixtures import start_training, train_args, wait_for


class _DieWhenPickled:
    """Stands for a crash in the middle of writing a checkpoint: the process dies while saving it."""

    def __reduce__(self):
        os._exit(17)


def _state(value: float) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_video.parallel import initialize_parallel

    initialize_parallel()
    rank = torch.distributed.get_rank()
    tensor = torch.full((2, 3), value)
    return {"model": {"w": ShardedTensor.from_rank_offsets("model.w", tensor, (0, rank, 2))}}


def _save(root: str, iteration: int, value: float, poison: bool = False, keep_last: int | None = None) -> None:
    common = {"train": {"iteration": iteration}, "world_size": 2}
    if poison and torch.distributed.get_rank() == 0:
        common["poison"] = _DieWhenPickled()
    save_checkpoint(root, iteration, _state(value), common, keep_last=keep_last)


def _load(root: str) -> tuple[int, list[float]]:
    iteration, loaded, common = load_checkpoint(root, lambda: _state(0.0))
    return iteration, loaded["model"]["w"].flatten().tolist()


@pytest.mark.slow
def test_save_killed_half_way_keeps_previous_checkpoint(tmp_path: Path):
    root = str(tmp_path / "ckpt")
    run_distributed(_save, 2, root, 1, 1.5)
    with pytest.raises(RankFailure) as info:
        run_distributed(_save, 2, root, 2, 2.5, True, timeout=120)
    assert info.value.rank == 0 and "exit code 17" in str(info.value)
    assert latest_iteration(root) == 1
    # the partial iter_0000002.tmp is removed by a rank that saw the save fail, or else by the next save
    assert not iteration_dir(root, 2).exists()
    for iteration, values in run_distributed(_load, 2, root):
        assert iteration == 1 and values == [1.5] * 6
    # the next save clears the leftover and publishes normally
    run_distributed(_save, 2, root, 2, 2.5)
    assert latest_iteration(root) == 2 and not (tmp_path / "ckpt" / "iter_0000002.tmp").exists()


@pytest.mark.slow
def test_keep_last_prunes_older_checkpoints(tmp_path: Path):
    root = str(tmp_path / "ckpt")
    for iteration in (1, 2, 3):
        run_distributed(_save, 2, root, iteration, float(iteration), False, 2)
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    assert kept == ["iter_0000002", "iter_0000003"]


def test_missing_or_corrupt_pointer_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nope", dict)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("banana\n")
    with pytest.raises(CheckpointError, match="holds 'banana', not an iteration number"):
        latest_iteration(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(CheckpointError, match="names iteration 7 but .*iter_0000007 is missing"):
        latest_iteration(tmp_path)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path: Path, training_setup):
    setup = training_setup
    save = tmp_path / "ckpt"
    proc = start_training(2, train_args(setup, 500, "--save", str(save)), tmp_path / "job.log")
    wait_for(tmp_path / "job.log", r"\] iteration\s+3/", proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "pretrain_t2v.py" in " ".join(p.cmdline())]
    for worker in workers:  # what a scheduler's preemption does: SIGTERM to every training process
        worker.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 0
    log = (tmp_path / "job.log").read_text()
    last = max(int(m) for m in re.findall(r"\] iteration\s+(\d+)/", log))
    assert f"SIGTERM: saved at iteration {last}" in log
    assert latest_iteration(save) == last < 500

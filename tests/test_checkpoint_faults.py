"""Faults while saving: writer processes die with a killed job; a full disk leaves no partial checkpoint and says
so plainly."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_writers_die_with_a_killed_job(tmp_path: Path):
    pids = tmp_path / "pids"
    pids.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    job = subprocess.Popen([sys.executable, str(REPO / "tests" / "checkpoint_writer_job.py"), str(tmp_path / "ckpt"),
                            str(pids)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(pids.iterdir()):
        assert job.poll() is None and time.monotonic() < deadline, "the job never reached its writers"
        time.sleep(0.2)
    tree = psutil.Process(job.pid).children(recursive=True)
    children = [p.pid for p in tree]
    names = {p.pid: " ".join(p.cmdline())[-80:] for p in tree}
    writers = [int(p.name) for p in pids.iterdir()]
    assert set(writers) <= set(children)
    job.send_signal(signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in children if _alive(pid)]
    for pid in survivors:  # do not leave them behind whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"{[names[p] for p in survivors]} outlived the killed job (of {len(children)} children)"


def _state(value: float) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    return {"model": {"w": ShardedTensor.from_rank_offsets("model.w", torch.full((4, 4), value), replica_id=0)}}


def test_full_disk_removes_the_partial_checkpoint_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """ENOSPC injected where megatron's writer processes write each item (`filesystem_async._write_item`)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from checkpoints_convert.ours import ensure_process_group
    from megatron_video.parallel import initialize_parallel
    from megatron_video.training.checkpointing import (
        CheckpointSaveError,
        latest_iteration,
        load_checkpoint,
        save_checkpoint,
    )

    ensure_process_group()
    initialize_parallel()
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, _state(1.0), {"world_size": 1})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filesystem_async, "_write_item", disk_full)
    with pytest.raises(CheckpointSaveError, match=f"^no space left on {root} while saving iteration 2;") as info:
        save_checkpoint(root, 2, _state(2.0), {"world_size": 1})
    assert info.value.out_of_space
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert latest_iteration(root) == 1
    _, loaded, _ = load_checkpoint(root, lambda: _state(0.0))
    assert torch.equal(loaded["model"]["w"], torch.full((4, 4), 1.0))


def _save_or_load(root: Path, distributed: bool, load: bool) -> None:
    from megatron_video.optim import OptimizerOptions, build_optimizer
    from megatron_video.training.checkpoint_state import check_optimizer_kind, optimizer_sharded_state
    from megatron_video.training.checkpointing import load_checkpoint, model_sharded_state_dict, save_checkpoint
    from megatron_video.training.components import materialize_optimizer_state
    from tests.test_optim_helpers import build_model, full_weights

    model = build_model(1, full_weights(0), use_distributed_optimizer=distributed)
    opt = build_optimizer([model], OptimizerOptions(precision="fp32", clip_mode="none",
                                                    use_distributed_optimizer=distributed))
    materialize_optimizer_state(opt)

    def state(loading: bool) -> dict:
        model_sd = model_sharded_state_dict(model.module)
        return {"model": model_sd, "optimizer": optimizer_sharded_state(opt, model_sd, loading)}

    if load:
        load_checkpoint(root, lambda: state(True), check_saved=check_optimizer_kind(opt))
    else:
        save_checkpoint(root, 1, state(False), {"world_size": 1})


@pytest.mark.parametrize("saved_distributed", [True, False], ids=["dist-to-plain", "plain-to-dist"])
def test_switching_the_distributed_optimizer_is_explained(tmp_path: Path, saved_distributed: bool):
    from checkpoints_convert.ours import ensure_process_group
    from megatron_video.parallel import initialize_parallel
    from megatron_video.training.checkpointing import CheckpointError

    ensure_process_group()
    initialize_parallel()
    _save_or_load(tmp_path, saved_distributed, load=False)
    _save_or_load(tmp_path, saved_distributed, load=True)  # the same kind loads
    with pytest.raises(CheckpointError, match=r"saved (with|without) --use-distributed-optimizer .*cannot be carried "
                                              r"over\. Pass --no-load-optim"):
        _save_or_load(tmp_path, not saved_distributed, load=True)


def test_malformed_yaml_names_file_and_line(tmp_path: Path):
    from megatron_video.configfile import ConfigError, read_mapping

    path = tmp_path / "model.yaml"
    path.write_text("preset: small\nhidden_size: [1, 2\nnum_heads: 4\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line 3, column \d+: malformed YAML: "):
        read_mapping(path)
    path = tmp_path / "data.json"
    path.write_text('{\n  "a": 1,\n  "b": }\n')
    with pytest.raises(ConfigError, match=rf"^{path}, line 3, column 8: malformed JSON: "):
        read_mapping(path)

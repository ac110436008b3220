"""Training health end to end (issue 20 items 8-10): a sample whose cached latent is NaN makes a real
non-finite step; resume stays exact across it; a save directory whose extreme-batch log covers every sample
fails fast with a message instead of spinning; a non-finite streak stops the job without losing the last
finite checkpoint.

All runs are one CPU rank under torchrun (the decisions are the same on every rank by construction:
`_all_finite` and the clip rule see all-reduced values); losses of a resumed run equal the uninterrupted run's
bitwise, as in test_training_loop.py.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from megatron_video.data.cache import FeatureCacheDataset
from megatron_video.data.config import DataConfig
from megatron_video.data.sampler import ShapeBatchSampler
from megatron_video.training.checkpointing import iteration_dir, latest_iteration
from tests import training_fixtures as fx
from tests.training_fixtures import TrainingSetup

pytestmark = pytest.mark.slow
GBS = 4
RUN_TIMEOUT = 900  # seconds per training run: ~15 on a quiet machine, far more on a loaded CI host


@pytest.fixture(scope="module")
def setup(training_setup: TrainingSetup) -> TrainingSetup:
    return training_setup


def epoch_batches(setup: TrainingSetup, epoch: int) -> list[list[int]]:
    """The global batches of `epoch` in training order (the sampler is a pure function of keys and seed)."""
    config = DataConfig.from_dict(yaml.safe_load(setup.data_config.read_text()))
    keys = FeatureCacheDataset(config.cache_path, config).shape_keys
    return ShapeBatchSampler(keys, GBS, 1, seed=config.seed).epoch_batches(epoch).tolist()


def skipped_batches(setup: TrainingSetup, ids: list[int], iters: int) -> int:
    """Global batches the sampler skips in `iters` iterations when `ids` (an extreme batch's samples) are
    skip-listed from epoch 1 on, as the loop does after an extreme step in epoch 0: what the run must report."""
    config = DataConfig.from_dict(yaml.safe_load(setup.data_config.read_text()))
    sampler = ShapeBatchSampler(FeatureCacheDataset(config.cache_path, config).shape_keys, GBS, 1, seed=config.seed)
    sampler.add_skip_ids(ids, from_epoch=1)
    wanted = iters * GBS  # micro-batches of one sample
    while wanted:
        for _ in sampler:
            wanted -= 1
            if not wanted:
                break
    return sampler.skipped_batches


def poisoned(setup: TrainingSetup, root: Path, sample_ids: list[int]) -> TrainingSetup:
    """A copy of the set-up whose cached latents of `sample_ids` are NaN: their batches' loss is NaN."""
    config = yaml.safe_load(setup.data_config.read_text())
    cache = root / "cache"
    shutil.copytree(config["cache_path"], cache)
    shard = cache / "shard_000000.safetensors"
    tensors = load_file(str(shard))
    for sid in sample_ids:
        tensors[f"{sid}/latent"] = torch.full_like(tensors[f"{sid}/latent"], float("nan"))
    save_file(tensors, str(shard))
    config["cache_path"] = str(cache)
    (root / "data.yaml").write_text(yaml.safe_dump(config))
    return TrainingSetup(root, setup.model_config, root / "data.yaml")


def train(data: TrainingSetup, iters: int, *extra: str) -> tuple[int, str]:
    """The trainer on one rank (in a process forked from the test harness's preloaded server); (exit code, log)."""
    return fx.train_in_process(1, fx.train_args(data, iters, *extra), timeout=RUN_TIMEOUT)


def extreme_entries(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "extreme_batches.jsonl").read_text().splitlines()]


def test_resume_after_an_extreme_step_is_exact(setup: TrainingSetup, tmp_path: Path):
    """Item 8: an extreme step at iteration 2 (a NaN sample); the uninterrupted run and a run resumed from its
    iteration-4 checkpoint (as if it had stopped there) to 12 (three epochs of 4 batches) skip the same later
    batches and train the same losses. Iteration 4 is inside the clip's 10-step warm-up (item 7)."""
    # a sample of the second batch that comes back in each later epoch (one of 21 is left out per epoch)
    bad = next(i for i in epoch_batches(setup, 0)[1]
               if all(any(i in b for b in epoch_batches(setup, e)) for e in (1, 2)))
    data = poisoned(setup, tmp_path / "data", [bad])
    common = ("--clip-grad-ema-decay", "0.99")
    full = tmp_path / "full"
    code, log = train(data, 12, *common, "--save", str(full), "--save-interval", "4")
    assert code == 0, log[-3000:]
    uninterrupted = fx.losses(log)
    entries = extreme_entries(full)
    # only the first meeting is extreme: the sample's later batches are skipped, not trained on again
    assert [(e["iteration"], e["epoch"]) for e in entries] == [(2, 0)] and bad in entries[0]["sample_ids"]
    assert math.isnan(uninterrupted.pop(2))  # iteration 2 logs loss NAN; every other iteration trains
    assert sorted(uninterrupted) == [i for i in range(1, 13) if i != 2]
    skips = skipped_batches(setup, entries[0]["sample_ids"], 12)
    assert skips >= 1  # the bad sample comes back within the 12 iterations (chosen so above)
    assert re.findall(r"skipped_batches: (\d+)", log)[-1] == str(skips)

    (full / "latest_checkpointed_iteration.txt").write_text("4\n")  # resume from iteration 4
    code, log = train(data, 12, *common, "--save", str(tmp_path / "resumed"), "--load", str(full))
    assert code == 0, log[-3000:]
    resumed = fx.losses(log)
    assert sorted(resumed) == list(range(5, 13))
    for iteration, loss in resumed.items():
        assert loss == uninterrupted[iteration], (iteration, loss, uninterrupted[iteration])
    assert re.findall(r"skipped_batches: (\d+)", log)[-1] == str(skips)  # the bad sample's later batches, as in
    # the uninterrupted run


def test_non_finite_streak_stops_and_keeps_the_last_finite_checkpoint(setup: TrainingSetup, tmp_path: Path):
    """Item 10 with constant clipping (the default --clip-grad 1.0): NaN batches at iterations 2, 4 and 5.
    Iteration 2 is skipped and not checkpointed, 3 is saved, 4 and 5 make two non-finite steps in a row, past
    --max-consecutive-extreme-steps 2: the job stops non-zero and iter 3 survives --keep-last-checkpoints 1."""
    first, second = epoch_batches(setup, 0), epoch_batches(setup, 1)  # 4 global batches per epoch
    recorded = set(first[1]) | set(first[3])
    fifth = next(b for b in second if not set(b) & recorded)  # epoch 1 skips the batches holding recorded ids
    late = [i for i in fifth if all(i not in b for b in first)]
    assert late, "need a sample of iteration 5 that epoch 0 left out"
    data = poisoned(setup, tmp_path / "data", [first[1][0], first[3][0], late[0]])
    save = tmp_path / "ckpt"
    code, log = train(data, 6, "--save", str(save), "--save-interval", "1", "--keep-last-checkpoints", "1",
                      "--max-consecutive-extreme-steps", "2")
    assert code != 0, log[-3000:]
    assert "iteration 2: non-finite loss or grad norm, checkpoint postponed" in log
    assert "stopping at iteration 5: 2 consecutive non-finite steps" in log
    assert latest_iteration(save) == 3
    assert sorted(p.name for p in save.glob("iter_*")) == [iteration_dir(save, 3).name]
    assert [e["iteration"] for e in extreme_entries(save)] == [2, 4]


def test_extreme_log_covering_every_sample_fails_fast(setup: TrainingSetup, tmp_path: Path):
    """Item 9: an extreme-batch log naming every sample made each later run spin at 100 % CPU with no output
    (an empty epoch, forever). Now the first empty epoch stops the job with a message, right after start-up."""
    save = tmp_path / "ckpt"
    save.mkdir()
    every = sorted({i for batch in epoch_batches(setup, 0) for i in batch})
    (save / "extreme_batches.jsonl").write_text(
        json.dumps({"iteration": 1, "grad_norm": float("nan"), "sample_ids": every}) + "\n")
    log_path = tmp_path / "job.log"
    proc = fx.start_training(1, fx.train_args(setup, 3, "--save", str(save)), log_path)
    started = time.monotonic()
    try:
        code = proc.wait(timeout=400)  # seconds on a quiet machine; the bound is for a loaded CI host
    except Exception:
        fx.kill_group(proc, signal.SIGKILL)
        raise
    text = log_path.read_text()
    assert code != 0 and time.monotonic() - started < 400, text[-3000:]
    assert "epoch 0 has no global batch to train on" in text, text[-3000:]
    assert str(save / "extreme_batches.jsonl") in text

"""pretrain_t2v.py end to end under torchrun on CPU ranks: loss falls, exact resume after SIGKILL, a dead rank
ends the job, checkpoints reshard across TP/DP, TP x CP x DP on eight ranks. (Extreme steps recorded and met again
on resume: tests/test_training_health.py.)

Exact resume is bitwise: the same ranks, the same reduction order, noise seeded by (seed, iteration,
micro-batch, DP rank) and the sampler restored from the consumed-sample count. Across TP/DP layouts the
reduction order changes, so losses agree to fp32 round-off (rtol 1e-4), not bitwise.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from megatron_video.training.checkpointing import iteration_dir, latest_iteration
from tests.training_fixtures import (
    TrainingSetup,
    checkpoint_tensors,
    kill_group,
    losses,
    same_values,
    start_training,
    train_args,
    train_in_process,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(training_setup: TrainingSetup) -> TrainingSetup:
    return training_setup


def test_loss_falls_tp2_dp2(reference_tp2_dp2: dict[int, float]):
    curve = reference_tp2_dp2
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert curve[6] < 0.75 * curve[1], curve


def test_exact_resume_after_sigkill(setup: TrainingSetup, tmp_path: Path):
    """Killed after a save, the resumed run's losses equal the uninterrupted run's and its final checkpoint is
    bitwise the same (weights, EMA, Adam moments, fp32 main params, RNG states). With Megatron's DP overlaps and
    small buckets, as the launch scripts train (a step's weights not yet gathered when a save is due; on CPU the
    adaptor runs the gathers synchronously, docs/PERFORMANCE.md "The gloo crash")."""
    save, reference = tmp_path / "ckpt", tmp_path / "reference"
    overlap = ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "20000"]
    args = train_args(setup, 9, "--save", str(save), "--save-interval", "3", *overlap)
    code, log = train_in_process(2, train_args(setup, 9, "--save", str(reference), "--save-interval", "9",
                                               *overlap))
    assert code == 0, log[-3000:]
    uninterrupted = losses(log)

    proc = start_training(2, args, tmp_path / "killed.log")
    wait_for(tmp_path / "killed.log", r"saved checkpoint .*iter_0000003", proc)
    kill_group(proc, signal.SIGKILL)
    resumed_from = latest_iteration(save)
    assert resumed_from is not None and resumed_from % 3 == 0 and resumed_from < 9

    code, log = train_in_process(2, [*args, "--load", str(save)])
    assert code == 0, log[-3000:]
    resumed = losses(log)
    assert sorted(resumed) == list(range(resumed_from + 1, 10))
    for iteration, loss in resumed.items():
        assert loss == uninterrupted[iteration], (iteration, loss, uninterrupted[iteration])
    want = checkpoint_tensors(iteration_dir(reference, 9), tmp_path / "want.pt")
    got = checkpoint_tensors(iteration_dir(save, 9), tmp_path / "got.pt")
    assert {key.split(".")[0] for key in want} == {"model", "ema", "optimizer", "rng_state"}
    assert sorted(got) == sorted(want)
    different = [key for key in want if not same_values(want[key], got[key])]
    assert not different, different[:10]


def test_dead_rank_fails_the_job_and_keeps_the_checkpoint(setup: TrainingSetup, tmp_path: Path):
    save = tmp_path / "ckpt"
    args = train_args(setup, 200, "--save", str(save), "--save-interval", "1")
    proc = start_training(2, args, tmp_path / "job.log")
    wait_for(tmp_path / "job.log", r"saved checkpoint .*iter_0000002", proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "pretrain_t2v.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    victim = workers[-1]
    started = time.monotonic()
    victim.kill()
    code = proc.wait(timeout=120)
    elapsed = time.monotonic() - started
    log = (tmp_path / "job.log").read_text()
    assert code != 0
    assert elapsed < 100, f"the job took {elapsed:.0f} s to fail"
    assert re.search(r"exitcode\s*:\s*-9", log), log[-2000:]
    last = latest_iteration(save)
    assert last is not None and (iteration_dir(save, last) / "metadata.json").is_file()


def test_checkpoint_reshards_across_tp_and_dp(setup: TrainingSetup, tmp_path: Path,
                                              reference_tp2_dp2: dict[int, float]):
    """Saved at TP 1 x DP 4, resumed at TP 2 x DP 2: weights split over TP, optimizer ranges regrouped over DP.
    (The other direction, TP merged and DP split, is tests/test_optim_ema.py's TP2 x DP2 -> TP1 x DP2 reshard
    with the optimizer and EMA, and tests/test_adaptor_cpu.py's.)"""
    save = tmp_path / "ckpt"
    code, log = train_in_process(4, train_args(setup, 3, "--tensor-model-parallel-size", "1", "--save", str(save)))
    assert code == 0, log[-3000:]
    code, log = train_in_process(4, train_args(setup, 6, "--tensor-model-parallel-size", "2", "--load", str(save)))
    assert code == 0, log[-3000:]
    resumed = losses(log)
    assert sorted(resumed) == [4, 5, 6]
    for iteration, loss in resumed.items():
        assert loss == pytest.approx(reference_tp2_dp2[iteration], rel=1e-4), iteration


def test_eight_ranks_tp_cp_dp_match_tp_dp(setup: TrainingSetup, reference_tp2_dp2: dict[int, float]):
    """TP 2 x CP 2 x DP 2 (+ Megatron-SP) trains the same model as TP 2 x DP 2: context parallel only splits
    each sample's tokens, so the losses agree to round-off."""
    code, log = train_in_process(8, train_args(setup, 3, "--tensor-model-parallel-size", "2",
                                           "--context-parallel-size", "2", "--sequence-parallel"))
    assert code == 0, log[-3000:]
    curve = losses(log)
    assert sorted(curve) == [1, 2, 3]
    for iteration, loss in curve.items():
        assert loss == pytest.approx(reference_tp2_dp2[iteration], rel=1e-4), iteration

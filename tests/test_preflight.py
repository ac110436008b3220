"""Checks before any process group is built (training/preflight.py): one error from rank 0 with exit code 2,
--load / --save semantics (a job's first run, newer checkpoints), --save writable and locked, --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_video.arguments import build_parser
from megatron_video.data.config import DataConfig
from megatron_video.inpaint.training import add_i2v_args
from megatron_video.training.checkpointing import CheckpointError, publish_checkpoint
from megatron_video.training.preflight import (
    PreflightError,
    check_metadata,
    check_run,
    check_save,
    preflight,
)
from megatron_video.training.save_dir import LOCK_NAME, SaveDirError, SaveDirLock, lock_identity

REPO = Path(__file__).resolve().parents[1]


def _fake_checkpoint(root: Path, iteration: int, model_config: dict | None = None, track: bool = True) -> None:
    """A published checkpoint as the publisher leaves it (the tensors are not read by the preflight)."""
    directory = root / f"iter_{iteration:07d}"
    directory.mkdir(parents=True)
    if model_config is not None:
        (directory / "model_config.json").write_text(json.dumps(model_config))
    if track:
        (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")


def _model_yaml(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"preset": "small", **overrides}))
    return path


def test_every_flag_has_help_text():
    parser = build_parser()
    add_i2v_args(parser)
    missing = [a.option_strings for a in parser._actions if not (a.help or "").strip()]
    assert missing == []


def test_unknown_flag_says_did_you_mean(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as info:
        preflight(["--tensor-model-paralel-size", "2"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "did you mean --tensor-model-parallel-size?" in err and "usage:" not in err


def test_error_printed_once_by_rank0_without_traceback(tmp_path, capsys, monkeypatch):
    argv = ["--load", str(tmp_path / "nowhere")]  # and no model / data config
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(SystemExit) as info:
        preflight(argv)
    assert info.value.code == 2 and capsys.readouterr() == ("", "")  # other ranks exit quietly
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as info:
        preflight(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err == "error: training needs --model-config, --data-config and --train-iters\n"
    assert "Traceback" not in err


def test_metadata_paths_checked(tmp_path):
    with pytest.raises(PreflightError, match="metadata file not found: .*missing.txt"):
        check_metadata(DataConfig(metadata_paths=[str(tmp_path / "missing.txt")]))
    listing = tmp_path / "data.txt"
    listing.write_text("videos,anno.json\n")
    with pytest.raises(PreflightError, match="names an annotation file that does not exist: .*anno.json"):
        check_metadata(DataConfig(metadata_paths=[str(listing)]))
    (tmp_path / "anno.json").write_text("[]")
    check_metadata(DataConfig(metadata_paths=[str(listing)]))
    with pytest.raises(PreflightError, match="cache_path is not a directory"):
        check_metadata(DataConfig(metadata_paths=[str(listing)], cache_path=str(tmp_path / "no-cache")))


def test_unwritable_or_invalid_save_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(PreflightError, match="exists and is not a directory"):
        check_save(str(a_file), create=True)
    with pytest.raises(PreflightError, match="is not a directory"):
        check_save(str(a_file / "ckpt"), create=True)
    # /proc/self is a directory nobody (root included) can create files in: a read-only location
    with pytest.raises(PreflightError, match="cannot write into /proc/self"):
        check_save("/proc/self", create=False)
    if os.geteuid() != 0:  # permission bits bind everyone but root
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        with pytest.raises(PreflightError, match="cannot"):
            check_save(str(read_only / "ckpt"), create=True)
    check_save(str(tmp_path / "new" / "ckpt"), create=True)
    assert (tmp_path / "new" / "ckpt").is_dir() and list((tmp_path / "new" / "ckpt").iterdir()) == []


def test_run_without_load_refused_over_newer_checkpoint(tmp_path, monkeypatch):
    """Today's failure: a restart without --load started at iteration 1 and published over iteration 3."""
    monkeypatch.setenv("RANK", "1")  # no lock taken: this test is about the checkpoint rule
    save = tmp_path / "ckpt"
    _fake_checkpoint(save, 3)
    with pytest.raises(PreflightError, match=r"holds a checkpoint of iteration 3, newer than this run starts from "
                                             r"\(scratch .*pass --load .*--overwrite-newer-checkpoints"):
        check_run(["--save", str(save)], rank=1, training=False)
    check_run(["--save", str(save), "--load", str(save)], rank=1, training=False)  # resuming is fine
    check_run(["--save", str(save), "--overwrite-newer-checkpoints"], rank=1, training=False)
    # a tracker moved back by an earlier run does not hide the newer directory
    _fake_checkpoint(save, 6, track=False)
    with pytest.raises(PreflightError, match="iteration 6, newer than this run starts from .iteration 3 of --load"):
        check_run(["--save", str(save), "--load", str(save)], rank=1, training=False)


def test_load_equal_to_save_may_be_empty_other_load_may_not(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    save = tmp_path / "ckpt"
    check_run(["--save", str(save), "--load", str(save)], rank=1, training=False)  # absent: a job's first run
    save.mkdir()
    check_run(["--save", str(save), "--load", str(save)], rank=1, training=False)  # empty (the launch script made it)
    with pytest.raises(PreflightError, match=r"--load .*other: no checkpoint there .*leave out --load or make it "
                                             r"the same directory as --save"):
        check_run(["--save", str(save), "--load", str(tmp_path / "other")], rank=1, training=False)
    with pytest.raises(PreflightError, match="no checkpoint there"):
        check_run(["--save", str(save), "--load", str(save), "--finetune"], rank=1, training=False)
    _fake_checkpoint(tmp_path / "orphans", 2, track=False)
    with pytest.raises(PreflightError, match=r"holds checkpoints \[2\] but no latest_checkpointed_iteration.txt"):
        check_run(["--load", str(tmp_path / "orphans")], rank=1, training=False)


def test_saved_model_config_must_match(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    from megatron_video.models.suv_mmdit.config import PRESETS
    from megatron_video.training.save_dir import write_model_config

    load = tmp_path / "ckpt"
    _fake_checkpoint(load, 4)
    write_model_config(load / "iter_0000004", PRESETS["small"])
    check_run(["--load", str(load), "--model-config", str(_model_yaml(tmp_path))], rank=1, training=False)
    with pytest.raises(PreflightError, match=r"another model config than --model-config: head_dim: checkpoint 16, "
                                             r"--model-config 32"):
        check_run(["--load", str(load), "--model-config", str(_model_yaml(tmp_path, head_dim=32))], rank=1,
                  training=False)


def test_publisher_never_moves_the_tracker_back(tmp_path):
    root = tmp_path / "ckpt"
    _fake_checkpoint(root, 6)
    tmp = root / "iter_0000003.tmp"
    tmp.mkdir()
    with pytest.raises(CheckpointError, match="refusing to publish iteration 3 .* holds iteration 6"):
        publish_checkpoint(root, 3, tmp)
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert not (root / "iter_0000003").exists()
    publish_checkpoint(root, 3, tmp, overwrite_newer=True)  # asked for explicitly
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


_HOLD_LOCK = """
import sys, time
from megatron_video.training.save_dir import SaveDirLock
SaveDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_job_refused_while_first_holds_the_lock(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SLURM_JOB_ID", None)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SaveDirError, match=f"in use by another job .*PID {holder.pid}.*delete .*{LOCK_NAME}"):
            SaveDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing (SIGKILL): its lock is stale and is taken over
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = SaveDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == lock_identity()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_reused_pid_is_stale(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    reused = dict(lock_identity(os.getppid()), start_time="1")  # a live PID, started at another time
    (tmp_path / LOCK_NAME).write_text(json.dumps(reused))
    lock = SaveDirLock(tmp_path).acquire()
    lock.release()
    live = lock_identity(os.getppid())  # the same PID and start time: the holder is alive
    (tmp_path / LOCK_NAME).write_text(json.dumps(live))
    with pytest.raises(SaveDirError, match="in use by another job"):
        SaveDirLock(tmp_path).acquire()
    other_host = dict(live, host="elsewhere", pid=1)  # cannot be checked from here: refused
    (tmp_path / LOCK_NAME).write_text(json.dumps(other_host))
    with pytest.raises(SaveDirError, match="host elsewhere"):
        SaveDirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # ... unless it is this very job, requeued
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(other_host, job_id="77")))
    SaveDirLock(tmp_path).acquire().release()


@pytest.mark.parametrize("entry", ["pretrain_t2v.py", "pretrain_i2v.py", "pretrain_control.py"])
def test_help_is_fast_and_quiet(entry):
    """--help never imports megatron (seconds of imports and their warnings); measured as imports."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / entry), "--help"], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 0 and "--exit-duration-in-mins" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import")]
    assert not [m for m in imported if m.split(".")[0] in ("megatron", "transformer_engine", "apex")]
    assert [line for line in proc.stderr.splitlines() if not line.startswith("import time:")] == []
    print(f"{entry} --help: {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_first_run_with_load_equal_save_then_restart_without_load(tmp_path, training_setup):
    """Today's failures, end to end: (1) the documented `--load` = `--save` failed on a job's first run with "no
    complete checkpoint" once the launch script had created the directory; (2) a restart without --load trained
    from iteration 1 and moved the tracker back. Also: --exit-duration-in-mins saves and exits (Megatron)."""
    from tests.training_fixtures import run_training, train_args

    setup = training_setup
    save = tmp_path / "ckpt"
    save.mkdir()  # what launch_common.sh does before starting torchrun
    rc, log = run_training(1, train_args(setup, 500, "--save", str(save), "--load", str(save),
                                         "--exit-duration-in-mins", "0.02", gbs=2))
    assert rc == 0, log[-3000:]
    assert log.count(f"no checkpoint in --load {save} yet: starting from scratch") == 1
    saved = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert f"--exit-duration-in-mins: saved at iteration {saved}, exiting" in log and 1 <= saved < 500
    assert json.loads((save / f"iter_{saved:07d}" / "model_config.json").read_text())["num_heads"] == 4
    assert not (save / LOCK_NAME).exists()  # released at exit

    rc, log = run_training(2, train_args(setup, 500, "--save", str(save), gbs=2))
    assert rc != 0
    assert log.count(f"error: --save {save} holds a checkpoint of iteration {saved}, newer than this run") == 1
    assert "Traceback" not in log.split("error: --save")[0]  # nothing before the one message
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == saved
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == [f"iter_{saved:07d}"]


def test_sigusr1_and_exit_duration_ask_to_save_and_exit(tp1):
    import signal

    import torch

    from megatron_video.training.loop import Preemption

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        preemption = Preemption()
        assert not preemption.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's `--signal=USR1@...` warning, forwarded to the tasks
        assert preemption.agreed(torch.device("cpu")) and preemption.reason == "SIGUSR1"
        timed = Preemption(exit_duration_mins=0.1 / 60)
        assert not timed.agreed(torch.device("cpu"))
        time.sleep(0.15)
        assert timed.agreed(torch.device("cpu")) and timed.reason == "--exit-duration-in-mins"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_image_to_video_checks_run_in_the_preflight(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    from megatron_video.inpaint.training import check_i2v_args

    argv = ["--inpaint-config", str(REPO / "examples" / "i2v" / "inpaint.yaml"), "--init-from-t2v",
            str(tmp_path / "t2v")]
    with pytest.raises(PreflightError, match="--init-from-t2v: checkpoint directory not found"):
        check_run(argv, add_i2v_args, rank=1, check=check_i2v_args, training=False)
    (tmp_path / "bad.yaml").write_text("no_such_key: 1\n")
    with pytest.raises(PreflightError, match="unknown key"):
        check_run(["--inpaint-config", str(tmp_path / "bad.yaml")], add_i2v_args, rank=1, check=check_i2v_args,
                  training=False)

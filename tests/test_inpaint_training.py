"""End to end on 4 CPU ranks (TP 2 x DP 2): pretrain_i2v.py with online encoding (tiny random WF-VAE, tiny T5 /
CLIP) on the generated sample data set, started from a pretrain_t2v.py checkpoint; the loss falls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.inpaint_fixtures import make_i2v_setup
from tests.training_fixtures import losses, run_training

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def common(setup, iters: int) -> list[str]:
    return ["--data-config", str(setup.data_config), *setup.encoder_args(), "--train-iters", str(iters),
            "--global-batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-3",
            "--lr-decay-style", "constant", "--log-interval", "1", "--use-distributed-optimizer",
            "--tensor-model-parallel-size", "2", "--distributed-timeout-minutes", "2"]


def run_i2v(nproc: int, args: list[str]) -> tuple[int, str]:
    from tests.training_fixtures import torchrun_command

    command = [c.replace("pretrain_t2v.py", "pretrain_i2v.py") for c in torchrun_command(nproc, *args)]
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return proc.returncode, proc.stdout + proc.stderr


def test_i2v_from_t2v_checkpoint_trains_on_4_ranks(tmp_path: Path) -> None:
    setup = make_i2v_setup(tmp_path)
    t2v_model = tmp_path / "t2v_model.yaml"
    t2v_model.write_text(setup.model_config.read_text().replace("condition_channels: 12", ""))
    code, log = run_training(4, ["--model-config", str(t2v_model), *common(setup, 1), "--save",
                                 str(tmp_path / "t2v")])
    assert code == 0, log[-3000:]
    code, log = run_i2v(4, ["--model-config", str(setup.model_config), "--inpaint-config",
                            str(setup.inpaint_config), "--init-from-t2v", str(tmp_path / "t2v"), *common(setup, 10)])
    assert code == 0, log[-3000:]
    assert "initialised from T2V checkpoint" in log
    loss = losses(log)
    assert sorted(loss) == list(range(1, 11))
    first, last = sum(loss[i] for i in (1, 2, 3)) / 3, sum(loss[i] for i in (8, 9, 10)) / 3
    print("i2v losses:", loss)
    assert last < 0.85 * first, loss


def test_mismatched_condition_channels_fail_before_training(tmp_path: Path) -> None:
    setup = make_i2v_setup(tmp_path)
    bad = tmp_path / "bad_model.yaml"
    bad.write_text(setup.model_config.read_text().replace("condition_channels: 12", "condition_channels: 4"))
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_i2v.py"), "--model-config", str(bad),
                           "--inpaint-config", str(setup.inpaint_config), "--data-config", str(setup.data_config)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and "condition_channels = in_channels + 8 = 12" in proc.stderr

"""The README's quickstart runs end to end (short): data, cache, train, resume, export, reload, sample.

The same script as a user runs, through its documented knobs: 4 iterations instead of 16, 2 ranks (TP 2) instead
of 4 (TP 2 x DP 2; every launch pays each rank's start-up, and DP is covered by the training tests), the model
narrowed to 4 heads x 16 (tests/quickstart_fixtures.py) and 2 Euler steps for the final video instead of 10."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.quickstart_fixtures import narrow_quickstart_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_script(tmp_path: Path):
    env = dict(os.environ, OUT=str(tmp_path / "qs"), ITERS="4", PYTHON=sys.executable, PYTHONPATH=str(REPO),
               MASTER_PORT="29531", NPROC="2", TP="2", SAMPLE_STEPS="2",
               MODEL_CONFIG=str(narrow_quickstart_model(tmp_path / "model.yaml")))
    proc = subprocess.run(["bash", str(REPO / "examples" / "quickstart" / "run.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    iterations = [int(i) for i in re.findall(r"\] iteration\s+(\d+)/", out)]
    assert iterations == [1, 2, 3, 4, 1], out[-3000:]  # train 2, resume to 4, one step from the export
    # the adaptive (EMA-3sigma) clip trains: its warm-up steps clip, none is skipped as extreme
    assert "clip_threshold" in out and "EXTREME" not in out and not re.search(r"skipped 1\.0", out), out[-3000:]
    assert "loaded" in out and "(full state)" in out and "(weights only)" in out
    released = tmp_path / "qs" / "released"
    assert (released / "model_ema.safetensors").is_file() and (released / "model.safetensors").is_file()
    assert (released / "diffusers_ema" / "config.json").is_file()
    # it ends with a video a person can open, decoded from the stand-in latent space it trained in
    from megatron_video.sampling.video import read_mp4

    assert read_mp4(tmp_path / "qs" / "videos" / "sample_0000.mp4").shape == (9, 32, 32, 3)

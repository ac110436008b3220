"""examples/quickstart/train_control.sh runs end to end (short), through its documented knobs, on what
train_to_video.sh leaves in OUT (made here the same way, small): a frozen EMA base checkpoint, its `--clip` data
and held-out clips.

The script trains a canny controller 2 iterations instead of 300, samples 1 held-out clip instead of 4 with 2
Euler steps, on the quickstart model narrowed to 4 heads x 16 (tests/quickstart_fixtures.py). An OUT without a
base, or with fewer held-out clips than asked, is refused before anything runs; run again, the script resumes the
finished controller and samples again. The figures of the full run (the controller raising the samples' edge F1)
are in the example's header; images through the controller: tests/test_control.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_video.parallel.spawn import free_port
from tests.quickstart_fixtures import narrow_quickstart_model, run_python

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "quickstart" / "train_control.sh"
SHAPE = {"resolution_mode": "forced", "height": 32, "width": 32, "num_frames": 9, "min_num_frames": 9, "fps": 8}


def _script(out: Path, model: Path, **knobs: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), ITERS="2", CLIPS="1", SAMPLE_STEPS="2", PYTHON=sys.executable,
               PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()), MODEL_CONFIG=str(model))
    env.update(knobs)
    return subprocess.run(["bash", str(SCRIPT)], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_train_control_script(tmp_path: Path):
    out, model = tmp_path / "out", narrow_quickstart_model(tmp_path / "model.yaml")
    refused = _script(out, model)  # nothing there yet
    assert refused.returncode == 2 and "run examples/quickstart/train_to_video.sh first" in refused.stderr

    for name, videos, images, seed in (("data", 4, 2, 0), ("heldout", 1, 0, 1)):
        run_python("tools/make_sample_dataset.py", "--out", str(out / name), "--num-videos", str(videos),
                   "--num-images", str(images), "--seed", str(seed), "--clip", "32", "32", "9", "8")
    config = {"metadata_paths": [str(out / "data" / "data.txt")], "shape": SHAPE, "num_workers": 0}
    (out / "data.yaml").write_text(yaml.safe_dump(config))
    run_python("tools/cache_features.py", "--data-config", str(out / "data.yaml"), "--out", str(out / "cache"),
               "--encoders", "megatron_video.models.space_to_depth:quickstart_encoders")
    (out / "data.yaml").write_text(yaml.safe_dump({**config, "cache_path": str(out / "cache")}))
    run_python("-m", "torch.distributed.run", "--nproc-per-node", "1", f"--master-port={free_port()}",
               "pretrain_t2v.py", "--device", "cpu", "--model-config", str(model), "--data-config",
               str(out / "data.yaml"), "--train-iters", "2", "--global-batch-size", "2", "--lr", "1e-3",
               "--ema-decay", "0.9", "--save", str(out / "checkpoints"), "--save-interval", "2")

    too_many = _script(out, model, CLIPS="2")
    assert too_many.returncode == 2 and "CLIPS=2" in too_many.stderr, too_many.stderr[-2000:]
    done = _script(out, model)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert [int(i) for i in re.findall(r"\] iteration\s+(\d+)/", log)] == [2], log[-3000:]  # --log-interval 50
    control = out / "control"
    assert (control / "controller.safetensors").is_file()
    from megatron_video.sampling.video import read_mp4

    for run in ("base", "controlled"):
        assert read_mp4(control / "videos" / run / "clip_0" / "sample_0000.mp4").shape == (9, 32, 32, 3)
    scored = re.compile(r"clip_0/sample_0000\.mp4: (edge F1 [0-9.]+|the structure video has no Canny edges)")
    assert len(scored.findall(log)) == 2, log[-3000:]  # the base's and the controlled sample's, scored or not

    again = _script(out, model)  # run again: resumes the finished controller (--load = --save) and samples again
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    assert "loaded" in (control / "train.log").read_text() and len(scored.findall(log)) == 2, log[-3000:]

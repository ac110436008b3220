"""End to end on 4 CPU ranks (TP 2 x DP 2): pretrain_i2v.py with online encoding (tiny random WF-VAE, tiny T5 /
CLIP) on the generated sample data set, started from a pretrain_t2v.py checkpoint; the loss falls, and the
training-time samples (--sample-interval) start from --sample-cond-image."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.inpaint_fixtures import make_i2v_setup
from tests.training_fixtures import losses, train_in_process

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


FRAMES, SIZE = 17, 32


def _gif_frames(data: bytes) -> np.ndarray:
    from PIL import Image, ImageSequence

    return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(io.BytesIO(data)))])


def _conditioning_image(path: Path) -> Path:
    from PIL import Image

    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., 2] = 90  # navy background
    pixels[8:20, 6:18] = (230, 30, 30)  # a red square
    Image.fromarray(pixels).save(path)
    return path


def common(setup, iters: int) -> list[str]:
    return ["--data-config", str(setup.data_config), *setup.encoder_args(), "--train-iters", str(iters),
            "--global-batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-3",
            "--lr-decay-style", "constant", "--log-interval", "1", "--use-distributed-optimizer",
            "--tensor-model-parallel-size", "2", "--distributed-timeout-minutes", "2"]


def run_i2v(nproc: int, args: list[str]) -> tuple[int, str]:
    from tests.training_fixtures import torchrun_command

    command = [c.replace("pretrain_t2v.py", "pretrain_i2v.py") for c in torchrun_command(nproc, *args)]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return proc.returncode, proc.stdout + proc.stderr


def test_i2v_from_t2v_checkpoint_trains_on_4_ranks(tmp_path: Path) -> None:
    setup = make_i2v_setup(tmp_path)
    t2v_model = tmp_path / "t2v_model.yaml"
    t2v_model.write_text(setup.model_config.read_text().replace("condition_channels: 12", ""))
    code, log = train_in_process(4, ["--model-config", str(t2v_model), *common(setup, 1), "--save",
                                 str(tmp_path / "t2v")])
    assert code == 0, log[-3000:]
    image = _conditioning_image(tmp_path / "first_frame.png")
    (tmp_path / "prompts.txt").write_text("A red square moves to the right.\nA red square moves down.\n")
    sampling = ["--sample-interval", "10", "--sample-prompts", str(tmp_path / "prompts.txt"),
                "--sample-encoders", "osp", "--sample-num-steps", "2", "--sample-guidance-scale", "1",
                "--sample-cond-image", str(image), "--tensorboard-dir", str(tmp_path / "tb")]
    code, log = run_i2v(4, ["--model-config", str(setup.model_config), "--inpaint-config",
                            str(setup.inpaint_config), "--init-from-t2v", str(tmp_path / "t2v"), *common(setup, 10),
                            *sampling])
    assert code == 0, log[-3000:]
    assert "initialised from T2V checkpoint" in log
    loss = losses(log)
    assert sorted(loss) == list(range(1, 11))
    first, last = sum(loss[i] for i in (1, 2, 3)) / 3, sum(loss[i] for i in (8, 9, 10)) / 3
    print("i2v losses:", loss)
    assert last < 0.85 * first, loss
    _check_samples_start_from(image, tmp_path / "tb", log)


def _check_samples_start_from(image: Path, tensorboard: Path, log: str) -> None:
    """--sample-interval for an inpainting model: every training-time sample is image-to-video from the first
    frame of --sample-cond-image. The sampler puts the wholly given latent frame (the first: the WF-VAE encodes
    frame 0 alone) back after the last Euler step, so the first frame of every logged video is the VAE's
    decoding of the conditioning image's latents, whatever the prompt, seed or model; the later frames are
    generated and differ between prompts."""
    import numpy as np
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_video.sampling.cli import read_condition_video, task_condition
    from megatron_video.sampling.video import to_frames
    from tests.inpaint_fixtures import tiny_vae

    assert "sampled 2 prompt(s) at iteration 10 (model weights, image-to-video)" in log, log[-3000:]
    events = EventAccumulator(str(tensorboard), size_guidance={"images": 0}).Reload()
    videos = [_gif_frames(events.Images(f"samples/{i:02d}")[0].encoded_image_string) for i in (0, 1)]
    assert all(v.shape == (FRAMES, SIZE, SIZE, 3) for v in videos), [v.shape for v in videos]
    # the expected first frame: the conditioning built as the sampler builds it (masked_latents "encode": the
    # image as frame 0 of an otherwise zero video through the same VAE, tiny_vae() is the saved one), decoded
    vae = tiny_vae()
    with torch.no_grad():
        condition = task_condition("i2v", read_condition_video(str(image), FRAMES, SIZE, SIZE), vae,
                                   (3, SIZE // 8, SIZE // 8), "encode")
        expected = to_frames(vae.decode(condition.cond_latents)[0].float())[0].astype(np.float32)
    # both prompts' first frames are the same image (the same frame quantises to the same GIF frame) ...
    np.testing.assert_array_equal(videos[0][0], videos[1][0])
    # ... the conditioning's decoding, up to the GIF palette (256 colours for a noisy random-VAE image: measured
    # 7.6 levels mean error; an unrelated decoded frame is tens of levels away)
    first_error = float(np.abs(videos[0][0].astype(np.float32) - expected).mean())
    assert first_error < 12.0, first_error
    # the generated frames are not pinned: the two prompts (seeds) differ there
    generated_gap = float(np.abs(videos[0][1:].astype(np.float32) - videos[1][1:].astype(np.float32)).mean())
    assert generated_gap > 3.0, generated_gap


def test_mismatched_condition_channels_fail_before_training(tmp_path: Path) -> None:
    setup = make_i2v_setup(tmp_path)
    bad = tmp_path / "bad_model.yaml"
    bad.write_text(setup.model_config.read_text().replace("condition_channels: 12", "condition_channels: 4"))
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_i2v.py"), "--model-config", str(bad),
                           "--inpaint-config", str(setup.inpaint_config), "--data-config", str(setup.data_config)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and "condition_channels = in_channels + 8 = 12" in proc.stderr


def test_i2v_sampling_without_conditioning_image_refused(tmp_path: Path) -> None:
    """--sample-interval for an inpainting model without --sample-cond-image: one clear error before anything
    heavy, exit code 2."""
    setup = make_i2v_setup(tmp_path)
    (tmp_path / "prompts.txt").write_text("A red square moves to the right.\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_i2v.py"), "--device", "cpu",
                           "--model-config", str(setup.model_config), "--inpaint-config", str(setup.inpaint_config),
                           "--data-config", str(setup.data_config), *setup.encoder_args(), "--train-iters", "1",
                           "--global-batch-size", "1", "--sample-interval", "1", "--sample-prompts",
                           str(tmp_path / "prompts.txt"), "--sample-encoders", "osp"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "needs --sample-cond-image" in out and "Traceback" not in out, out[-3000:]

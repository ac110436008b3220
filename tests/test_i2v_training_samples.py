"""--sample-interval during image-to-video training (pretrain_i2v.py, one rank, tiny random WF-VAE and tiny T5 /
CLIP): every training-time sample starts from the first frame of --sample-cond-image.

The sampler puts the wholly given latent frame (the first: the WF-VAE encodes frame 0 alone) back after the last
Euler step, so the first frame of every logged video is the VAE's decoding of the conditioning image's latents,
whatever the prompt, seed or (barely trained) model; the later frames are generated and differ between prompts."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.inpaint_fixtures import make_i2v_setup, tiny_vae
from tests.test_inpaint_training import run_i2v

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


def _args(setup, tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "prompts.txt").write_text("A red square moves to the right.\nA red square moves down.\n")
    return ["--model-config", str(setup.model_config), "--inpaint-config", str(setup.inpaint_config),
            "--data-config", str(setup.data_config), *setup.encoder_args(), "--train-iters", "1",
            "--global-batch-size", "1", "--lr", "1e-3", "--log-interval", "1", "--sample-interval", "1",
            "--sample-prompts", str(tmp_path / "prompts.txt"), "--sample-encoders", "osp",
            "--sample-num-steps", "2", "--sample-guidance-scale", "1", *extra]


def test_i2v_training_samples_start_from_the_conditioning_image(tmp_path: Path) -> None:
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_video.sampling.cli import read_condition_video, task_condition
    from megatron_video.sampling.video import to_frames

    setup = make_i2v_setup(tmp_path, num_frames=FRAMES)
    image = _conditioning_image(tmp_path / "first_frame.png")
    code, log = run_i2v(1, _args(setup, tmp_path, "--sample-cond-image", str(image), "--tensorboard-dir",
                                 str(tmp_path / "tb")))
    assert code == 0, log[-3000:]
    assert "sampled 2 prompt(s) at iteration 1 (model weights, image-to-video)" in log, log[-3000:]

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
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

    # without the conditioning image: one clear error before anything heavy, exit code 2
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_i2v.py"), "--device", "cpu", *_args(setup, tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "needs --sample-cond-image" in out and "Traceback" not in out, out[-3000:]


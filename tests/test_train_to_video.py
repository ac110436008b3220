"""The short CI version of examples/quickstart/train_to_video.sh: train the small SUV model in the space-to-depth
stand-in latent space with the evaluation loss on a held-out set and sample videos in TensorBoard, and check that
training moves both towards the data.

Criterion (measured, not hard-coded): between the first evaluation (after EARLY iterations) and the last, the
held-out evaluation loss falls by more than 10 %, each prompt's sample moves closer in mean RGB to a frame drawn
for its caption (its colours and shape, as the data set draws them), and the samples' motion statistic (mean
absolute frame difference) moves closer to the held-out videos'. The 15-minute example runs the same pipeline
long enough that the samples show the moving shapes, on a set made for its one clip size
(`make_sample_dataset.py --clip`); this test reads the varied default set, resized to that size."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_video.parallel.spawn import free_port
from tests.quickstart_fixtures import run_python

REPO = Path(__file__).resolve().parents[1]
EARLY, ITERS = 10, 30
ENCODERS = "megatron_video.models.space_to_depth:quickstart_encoders"
SHAPE = {"resolution_mode": "forced", "height": 32, "width": 32, "num_frames": 9, "min_num_frames": 9, "fps": 8}


def _run(*argv: str) -> str:
    return run_python(*argv, threads=2)


def _gif_frames(data: bytes) -> np.ndarray:
    from PIL import Image, ImageSequence

    return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(io.BytesIO(data)))])


PROMPTS = ("A red circle moves left to right across a black background.",
           "A blue square moves top to bottom across a navy background.")


def _caption_colour(caption: str) -> np.ndarray:
    """Mean RGB of a 32x32 frame drawn as tools/make_sample_dataset.py draws the caption's shape (its colour,
    size and background; "A <colour> <shape> moves ... across a <background> background.")."""
    from tests.data_fixtures import load_tool

    tool = load_tool("make_sample_dataset")
    words = caption.rstrip(".").split()
    colour, shape = words[1], words[2]
    background = caption.rstrip(".").split(" across a ")[1].removesuffix(" background")
    frame = tool.draw(32, 32, tool.BACKGROUNDS[background], tool.COLOURS[colour], shape, 16, 16, 32 * 0.15)
    return frame.reshape(-1, 3).mean(0)


def _stats(videos: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """(mean RGB over all frames, mean |frame difference|) of uint8 (T, H, W, 3) videos."""
    colour = np.mean([v.reshape(-1, 3).mean(0) for v in videos], axis=0)
    motion = float(np.mean([np.abs(np.diff(v.astype(np.float32), axis=0)).mean() for v in videos]))
    return colour, motion


@pytest.mark.slow
def test_training_moves_eval_loss_and_samples_towards_the_data(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_video.sampling.video import read_mp4

    # 3 held-out clips, fewer than a global batch: the evaluation completes its batch by repeating clips
    for name, videos, seed in (("data", 8, 0), ("heldout", 3, 1)):
        _run("tools/make_sample_dataset.py", "--out", str(tmp_path / name), "--num-videos", str(videos),
             "--num-images", "0", "--seed", str(seed))
        config = {"metadata_paths": [str(tmp_path / name / "data.txt")], "shape": SHAPE, "num_workers": 0}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        _run("tools/cache_features.py", "--data-config", str(tmp_path / f"{name}.yaml"), "--out",
             str(tmp_path / f"{name}_cache"), "--encoders", ENCODERS)
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    data["cache_path"] = str(tmp_path / "data_cache")
    data["eval"] = {"metadata_paths": [str(tmp_path / "heldout" / "data.txt")],
                    "cache_path": str(tmp_path / "heldout_cache"), "num_timesteps": 3}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "prompts.txt").write_text("".join(f"{prompt}\n" for prompt in PROMPTS))
    log = _run("-m", "torch.distributed.run", "--nproc-per-node", "1", f"--master-port={free_port()}",
               "pretrain_t2v.py", "--device", "cpu", "--model-config", "examples/quickstart/model.yaml",
               "--data-config", str(tmp_path / "data.yaml"), "--train-iters", str(ITERS), "--global-batch-size", "4",
               "--lr", "2e-3", "--lr-warmup-iters", "3", "--eval-interval", str(EARLY), "--eval-iters", "1",
               "--sample-interval", str(EARLY), "--sample-prompts", str(tmp_path / "prompts.txt"),
               "--sample-encoders", "stub", "--sample-stand-in-vae", "4", "--sample-num-steps", "6",
               "--sample-guidance-scale", "1", "--tensorboard-dir", str(tmp_path / "tb"))
    pattern = r"^evaluation at iteration (\d+) .*eval loss ([0-9.]+)"
    evals = {int(i): float(v) for i, v in re.findall(pattern, log, re.M)}
    assert sorted(evals) == list(range(EARLY, ITERS + 1, EARLY)), log[-3000:]
    assert evals[ITERS] < 0.9 * evals[EARLY], evals

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {"eval/loss", "eval/loss_9x32x32", "eval/loss_t01"} <= set(events.Tags()["scalars"])
    samples: dict[int, list[np.ndarray]] = {}
    for tag in ("samples/00", "samples/01"):
        for event in events.Images(tag):
            samples.setdefault(event.step, []).append(_gif_frames(event.encoded_image_string))
    assert sorted(samples) == list(range(EARLY, ITERS + 1, EARLY)) and all(len(v) == 2 for v in samples.values())
    assert samples[ITERS][0].shape == (9, 32, 32, 3)

    held_out = [read_mp4(p)[:9] for p in sorted((tmp_path / "heldout" / "videos").glob("*.mp4"))]
    import torch
    import torch.nn.functional as F

    held_out = [F.interpolate(torch.from_numpy(v).permute(0, 3, 1, 2).float(), size=(32, 32), mode="area")
                .permute(0, 2, 3, 1).numpy() for v in held_out]
    _, data_motion = _stats(held_out)
    early_colour, early_motion = _stats(samples[EARLY])
    late_colour, late_motion = _stats(samples[ITERS])
    # each prompt's sample against the colours its caption names (not the held-out clips' mix of colours)
    wanted = [_caption_colour(prompt) for prompt in PROMPTS]
    early, late = ([np.abs(_stats([videos[i]])[0] - wanted[i]).sum() for i in range(len(PROMPTS))]
                   for videos in (samples[EARLY], samples[ITERS]))
    assert sum(late) < sum(early), (wanted, early, late, early_colour, late_colour)
    assert abs(late_motion - data_motion) < abs(early_motion - data_motion), (data_motion, early_motion, late_motion)

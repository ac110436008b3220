"""MP4 files of samples (sampling/video.py): the same frames make the same file, whatever the process did before.

x264's macroblock-tree rate control read uninitialised memory on small frames: the same 32x32 frames, encoded
after the heap had held other data, gave other files (decoded pixels off by up to 32 levels), so a sample's MP4
changed from run to run while its latents were exact. `write_mp4` turns it off."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_video.sampling.video import read_mp4, write_mp4


def _frames() -> np.ndarray:
    """9 frames of 32x32: a yellow square moving right over a gradient, with some noise (what a sample looks like)."""
    rng = np.random.default_rng(0)
    frames = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    frames[..., 2] = np.linspace(20, 120, 32, dtype=np.uint8)[None, :, None]
    for t in range(9):
        frames[t, 8:20, 2 + 2 * t:14 + 2 * t] = (240, 220, 40)
    return np.clip(frames + rng.integers(0, 12, frames.shape), 0, 255).astype(np.uint8)


def test_the_same_frames_make_the_same_file_after_the_heap_held_other_data(tmp_path: Path):
    frames, files = _frames(), []
    for k in range(5):
        rng = np.random.default_rng(k)  # fill and free heap blocks, as a long sampling run leaves them
        junk = [rng.integers(0, 255, size=1 << 16, dtype=np.uint8) for _ in range(200)]
        del junk
        files.append(write_mp4(tmp_path / f"sample_{k}.mp4", frames, 8).read_bytes())
    assert all(data == files[0] for data in files[1:])
    decoded = read_mp4(tmp_path / "sample_0.mp4")
    assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).mean() < 8  # lossy, close

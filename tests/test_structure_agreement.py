"""Edge agreement of a sample with its structure video (evaluation/structure.py, tools/structure_agreement.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_video.evaluation.structure import edge_agreement, frames_to_video

REPO = Path(__file__).resolve().parents[1]


def _square_video(x0: int, y0: int, frames: int = 5, side: int = 12, step: int = 2) -> torch.Tensor:
    """(3, T, 32, 32) in [0, 1]: a light square on a dark background moving right by `step` pixels a frame."""
    video = np.zeros((frames, 32, 32, 3), dtype=np.uint8)
    video[...] = (20, 20, 40)
    for t in range(frames):
        x = x0 + step * t
        video[t, y0:y0 + side, x:x + side] = (230, 200, 30)
    return frames_to_video(video)


def test_a_video_agrees_with_itself_and_a_blank_one_with_nothing():
    source = _square_video(2, 10)
    same = edge_agreement(source, source)
    assert (same.precision, same.recall, same.f1) == (1.0, 1.0, 1.0)
    assert same.sample_edges == same.structure_edges > 0
    blank = edge_agreement(torch.full_like(source, 0.1), source)
    assert (blank.precision, blank.recall, blank.f1, blank.sample_edges) == (0.0, 0.0, 0.0, 0)


def test_a_one_pixel_shift_matches_within_the_tolerance_only():
    source, shifted = _square_video(2, 10), _square_video(3, 10)
    assert edge_agreement(shifted, source, tolerance=1).f1 == 1.0
    assert edge_agreement(shifted, source, tolerance=0).f1 < 0.7


def test_the_same_shape_elsewhere_scores_low_and_closer_scores_higher():
    source = _square_video(2, 2)
    far, near = edge_agreement(_square_video(14, 18), source), edge_agreement(_square_video(4, 3), source)
    assert far.f1 < 0.2 < near.f1, (far, near)


def test_videos_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="one size"):
        edge_agreement(_square_video(2, 2, frames=5), _square_video(2, 2, frames=4))


def test_the_tool_prints_one_line_per_sample_and_refuses_a_missing_file(tmp_path: Path):
    from megatron_video.sampling.video import write_mp4

    def frames(video: torch.Tensor) -> np.ndarray:
        return (video.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()

    source, same, far = tmp_path / "source.mp4", tmp_path / "same.mp4", tmp_path / "far.mp4"
    write_mp4(source, frames(_square_video(2, 2)), fps=8)
    write_mp4(same, frames(_square_video(2, 2)), fps=8)
    write_mp4(far, frames(_square_video(14, 18)), fps=8)
    tool = [sys.executable, str(REPO / "tools" / "structure_agreement.py"), "--structure-video", str(source)]
    done = subprocess.run([*tool, str(same), str(far)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    scores = [float(line.split("edge F1 ")[1].split()[0]) for line in lines]
    assert len(lines) == 2 and scores[0] > 0.9 > 0.2 > scores[1], done.stdout
    flat = tmp_path / "flat.mp4"  # a structure without edges: said so, no score
    write_mp4(flat, np.full((5, 32, 32, 3), 90, dtype=np.uint8), fps=8)
    done = subprocess.run([*tool[:-1], str(flat), str(same)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "has no Canny edges" in done.stdout and "F1" not in done.stdout, done.stdout
    short = tmp_path / "short.mp4"  # 4 frames against the structure's 5: refused, one line
    write_mp4(short, frames(_square_video(2, 2, frames=4)), fps=8)
    refused = subprocess.run([*tool, str(short)], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"{short}: edge agreement needs two RGB videos (3, T, H, W) of one size" in refused.stderr, refused.stderr
    missing = subprocess.run([*tool, str(tmp_path / "none.mp4")], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert missing.stderr.strip().endswith(f"no such video file: {tmp_path / 'none.mp4'}"), missing.stderr

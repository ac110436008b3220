"""Does a sample move the way its caption says? The centroid of the pixels of the moving shape's colour, in an
early and a late frame: the sample follows its caption when the centroid travels at least `min_shift` pixels along
the caption's direction. For data whose captions name a shape's colour and direction (tools/make_sample_dataset.py;
the quickstart's samples), where eval loss says little about whether the prompt's motion came out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def colour_centroid(frame: np.ndarray, rgb: tuple[int, int, int], tolerance: float = 90.0,
                    min_pixels: int = 5) -> tuple[float, float] | None:
    """(x, y) mean position of the pixels within `tolerance` (RGB distance) of `rgb` in an (H, W, 3) frame;
    None when fewer than `min_pixels` match (the shape is not there)."""
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"a frame is (H, W, 3) RGB, got {frame.shape}")
    near = np.linalg.norm(frame.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1) < tolerance
    ys, xs = np.nonzero(near)
    if len(xs) < min_pixels:
        return None
    return float(xs.mean()), float(ys.mean())


@dataclass(frozen=True)
class MotionScore:
    start: tuple[float, float] | None  # the shape's centroid in the early frame (None: not found)
    end: tuple[float, float] | None
    shift: float | None  # pixels travelled along the captioned direction (None: the shape is missing)
    follows: bool  # shift >= min_shift


def motion_agreement(frames: np.ndarray, rgb: tuple[int, int, int], direction: tuple[float, float],
                     min_shift: float = 3.0, first: int = 1, last: int = -2) -> MotionScore:
    """Score (T, H, W, 3) frames against a shape colour and an (x, y) direction (image axes: y down). `first` /
    `last` pick the frames compared; the default skips the two end frames, where a shape entering or leaving the
    picture has its centroid pulled inwards."""
    if frames.ndim != 4 or len(frames) < 2:
        raise ValueError(f"frames are (T >= 2, H, W, 3), got {frames.shape}")
    norm = math.hypot(*direction)
    if norm == 0:
        raise ValueError("the direction must not be (0, 0)")
    start, end = colour_centroid(frames[first], rgb), colour_centroid(frames[last], rgb)
    if start is None or end is None:
        return MotionScore(start, end, None, False)
    shift = ((end[0] - start[0]) * direction[0] + (end[1] - start[1]) * direction[1]) / norm
    return MotionScore(start, end, shift, shift >= min_shift)


__all__ = ["MotionScore", "colour_centroid", "motion_agreement"]

"""Per-sample target shapes (T x H x W) from metadata only: forced resolution or Min-Max token buckets.

Min-Max token (DESIGN §9): snap the aspect ratio to the nearest of a few ratios r_h:r_w (in log space);
the size is h = r_h*k*s, w = r_w*k*s with s the spatial stride and k = floor(sqrt(m / (r_h*r_w*s^2))) for a
pixel budget m ("max tokens"). Samples whose (cropped) source area is below `min_tokens` are dropped; by
default that is the smallest bucket area (m = 65536 -> 36864 = 144 x 256).

Frames: the source is resampled to the training fps (a frame step of fps_src / fps_train, never below 1, so a
low-fps clip is not padded with duplicated frames), temporally cropped to at most `num_frames`, and the count
snapped down to frame_stride*n + 1 (and to the largest temporal bucket it reaches, when buckets are set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_video.data.config import ShapeConfig
from megatron_video.data.metadata import SampleRecord, ShapeColumns

DROP_REASONS = ("image_disabled", "video_disabled", "too_few_frames", "too_small")


def minmax_size(ratio: tuple[int, int], max_tokens: int, stride: int = 16) -> tuple[int, int]:
    rh, rw = ratio
    """(h, w) for one aspect ratio; (0, 0) when even k = 1 exceeds the budget."""
    rh, rw = ratio
    # isqrt of the floored quotient equals floor(sqrt(exact quotient))
    k = math.isqrt(max_tokens // (rh * rw * stride * stride))
    return rh * k * stride, rw * k * stride


def usable_ratios(ratios: list[tuple[int, int]], max_tokens: int, stride: int = 16
                  ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The ratios whose size fits the budget, and their sizes; ValueError when none does."""
    pairs = [(tuple(r), minmax_size(tuple(r), max_tokens, stride)) for r in ratios]
    pairs = [(r, s) for r, s in pairs if s[0] > 0]
    if not pairs:
        raise ValueError(f"shape.max_tokens={max_tokens} is too small for every aspect ratio at stride "
                         f"{stride}")
    return [r for r, _ in pairs], [s for _, s in pairs]  # type: ignore[misc]


def minmax_sizes(ratios: list[tuple[int, int]], max_tokens: int, stride: int = 16) -> list[tuple[int, int]]:
    return usable_ratios(ratios, max_tokens, stride)[1]


def default_min_tokens(cfg: ShapeConfig) -> int:
    if cfg.min_tokens is not None:
        return cfg.min_tokens
    return min(h * w for h, w in minmax_sizes(cfg.aspect_ratios, cfg.max_tokens, cfg.spatial_stride))


def snap_frames(n: np.ndarray | int, snap: int) -> np.ndarray | int:
    """Largest snap*k + 1 <= n (n >= 1)."""
    return ((n - 1) // snap) * snap + 1


def encode_key(t: np.ndarray | int, h: np.ndarray | int, w: np.ndarray | int) -> np.ndarray | int:
    """Pack T x H x W into one int64 (H, W < 65536)."""
    return (np.asarray(t, np.int64) << 32) | (np.asarray(h, np.int64) << 16) | np.asarray(w, np.int64)


def decode_key(key: int) -> tuple[int, int, int]:
    key = int(key)
    return key >> 32, (key >> 16) & 0xFFFF, key & 0xFFFF


def frame_step(src_fps: float, target_fps: float) -> float:
    return max(src_fps / target_fps, 1.0)


@dataclass
class ShapePlan:
    """keys[i] = packed (T, H, W) of sample i, or -1 when the sample is dropped (reason in drop_reason)."""

    keys: np.ndarray  # int64
    drop_reason: np.ndarray  # int8: -1 kept, else index into DROP_REASONS

    def __len__(self) -> int:
        return len(self.keys)

    def shape(self, index: int) -> tuple[int, int, int]:
        if self.keys[index] < 0:
            raise ValueError(f"sample {index} was dropped by shape planning "
                             f"({DROP_REASONS[self.drop_reason[index]]})")
        return decode_key(self.keys[index])

    def drop_summary(self) -> dict[str, int]:
        counts = np.bincount(self.drop_reason[self.drop_reason >= 0], minlength=len(DROP_REASONS))
        return {r: int(c) for r, c in zip(DROP_REASONS, counts) if c}


def plan_shapes(cols: ShapeColumns, cfg: ShapeConfig, chunk: int = 1 << 18) -> ShapePlan:
    """Vectorised over all rows: target T x H x W for every sample, from metadata only.

    Rows are processed in chunks so temporaries stay small and cache-resident (10M rows in a few seconds).
    """
    n = len(cols)
    keys = np.empty(n, np.int64)
    reason = np.empty(n, np.int8)
    if cfg.resolution_mode == "forced":
        sizes, log_r, min_area = np.array([[cfg.height, cfg.width]], np.int64), None, 0
    else:
        ratios, size_list = usable_ratios(cfg.aspect_ratios, cfg.max_tokens, cfg.spatial_stride)
        sizes = np.array(size_list, np.int64)
        log_r = np.log(np.array([r[0] / r[1] for r in ratios]))
        min_area = default_min_tokens(cfg)
    buckets = np.array(sorted(cfg.temporal_buckets), np.int64) if cfg.temporal_buckets else None
    for lo in range(0, n, chunk):
        part = ShapeColumns(*(c[lo:lo + chunk] for c in cols))
        keys[lo:lo + chunk], reason[lo:lo + chunk] = _plan_chunk(part, cfg, sizes, log_r, min_area, buckets)
    return ShapePlan(keys=keys, drop_reason=reason)


def _plan_chunk(cols: ShapeColumns, cfg: ShapeConfig, sizes: np.ndarray, log_r: np.ndarray | None,
                min_area: int, buckets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    img = cols.is_image
    reason = np.full(len(img), -1, np.int8)
    # temporal: frames available after the cut, at the training fps, capped, snapped to snap*k + 1
    start = np.where(cols.cut_start >= 0, cols.cut_start, 0)
    end = np.where(cols.cut_end >= 0, cols.cut_end, cols.num_frames)
    avail = np.maximum(end - start, 1)
    step = np.maximum(np.where(img, cfg.fps, cols.fps) / cfg.fps, 1.0)
    t = np.floor((avail - 1) / step + 1e-6).astype(np.int64) + 1
    t = snap_frames(np.minimum(t, cfg.num_frames), cfg.frame_stride)
    if buckets is not None:
        pos = np.searchsorted(buckets, t, side="right") - 1
        t = np.where(pos >= 0, buckets[np.maximum(pos, 0)], 0)
    t[img] = 1
    reason[~img & (t < cfg.min_num_frames)] = DROP_REASONS.index("too_few_frames")
    # spatial: the (cropped) source size picks the nearest aspect ratio's bucket size
    has_crop = cols.crop[:, 0] >= 0
    src_h = np.where(has_crop, cols.crop[:, 3] - cols.crop[:, 2], cols.height).astype(np.int64)
    src_w = np.where(has_crop, cols.crop[:, 1] - cols.crop[:, 0], cols.width).astype(np.int64)
    if log_r is None:
        idx = np.zeros(len(img), np.int64)
    else:
        idx = np.abs(np.log(src_h / src_w)[:, None] - log_r[None]).argmin(1)
        reason[(reason < 0) & (src_h * src_w < min_area)] = DROP_REASONS.index("too_small")
    if not cfg.use_images:
        reason[img] = DROP_REASONS.index("image_disabled")
    if not cfg.use_videos:
        reason[~img] = DROP_REASONS.index("video_disabled")
    keys = encode_key(t, sizes[idx, 0], sizes[idx, 1])
    keys[reason >= 0] = -1
    return keys, reason


def frame_indices(rec: SampleRecord, num_frames: int, cfg: ShapeConfig, rng: np.random.Generator | None
                  ) -> np.ndarray:
    """Source frame indices of a temporal crop of `num_frames` frames at the training fps.

    The crop start is drawn from `rng` (seeded per sample and epoch by the caller), or centred when None.
    """
    if rec.is_image:
        return np.zeros(1, np.int64)
    start, end = rec.cut if rec.cut is not None else (0, rec.num_frames)
    step = frame_step(rec.fps, cfg.fps)
    span = (num_frames - 1) * step + 1
    slack = max((end - start) - span, 0.0)
    offset = rng.uniform(0.0, slack) if rng is not None else slack / 2
    idx = np.floor(start + offset + np.arange(num_frames) * step + 1e-6).astype(np.int64)
    return np.minimum(idx, end - 1)

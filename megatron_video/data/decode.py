"""Decoding: videos with PyAV (decord when installed and selected), images with PIL; resize + crop to the
target shape and normalise to [-1, 1]. Every failure surfaces as `DecodeError` so callers can skip it."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:  # PyAV is the portable default; import lazily-failing so image-only use works without it
    import av
except ImportError:  # pragma: no cover - av is in requirements
    av = None


class DecodeError(RuntimeError):
    """A file is missing, truncated or undecodable."""


def cover_geometry(h: int, w: int, crop: tuple[int, int, int, int] | None, size: tuple[int, int]
                   ) -> tuple[int, int, int, int]:
    """Resize-to-cover + centre crop as one step on the full frame: returns (scaled_h, scaled_w, top, left)
    such that scaling the whole h x w frame to scaled_h x scaled_w and cutting size at (top, left) equals
    cropping the box (x0, x1, y0, y1), scaling it to cover `size` and centre-cropping."""
    x0, x1, y0, y1 = crop if crop is not None else (0, w, 0, h)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise DecodeError(f"crop {crop} does not fit the decoded {w}x{h} frame")
    th, tw = size
    scale = max(th / (y1 - y0), tw / (x1 - x0))
    sh, sw = max(th, round(h * scale)), max(tw, round(w * scale))
    top = round(y0 * scale + ((y1 - y0) * scale - th) / 2)
    left = round(x0 * scale + ((x1 - x0) * scale - tw) / 2)
    return sh, sw, min(max(top, 0), sh - th), min(max(left, 0), sw - tw)


def _decode_pyav(path: str, indices: np.ndarray, size: tuple[int, int] | None = None,
                 crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    if av is None:  # pragma: no cover
        raise DecodeError("PyAV is not installed")
    wanted = {int(i) for i in indices}
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            tb = stream.time_base
            start = stream.start_time or 0
            first = min(wanted)
            if fps and tb and first > 2 * fps:  # far into the clip: seek to the keyframe before it
                container.seek(int(first / fps / tb) + start, stream=stream, backward=True)
            counter = -1
            for frame in container.decode(stream):
                counter += 1
                has_time = fps and frame.pts is not None
                idx = round(float((frame.pts - start) * tb) * fps) if has_time else counter
                if idx > last:
                    break
                if idx in wanted and idx not in frames:
                    frames[idx] = _frame_to_rgb(frame, size, crop)
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        raise DecodeError(f"{path}: cannot decode video: {e}") from e
    missing = wanted - frames.keys()
    if missing:
        raise DecodeError(f"{path}: truncated video: {len(missing)} of {len(wanted)} requested frames "
                          f"missing (first missing index {min(missing)})")
    return np.stack([frames[int(i)] for i in indices])


def _frame_to_rgb(frame: Any, size: tuple[int, int] | None, crop: tuple[int, int, int, int] | None
                  ) -> np.ndarray:
    """One decoded frame as uint8 RGB; resized (by swscale, in the decoder) and cropped when size is given."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    sh, sw, top, left = cover_geometry(frame.height, frame.width, crop, size)
    shrink = sh < frame.height
    rgb = frame.reformat(width=sw, height=sh, format="rgb24",
                         interpolation="AREA" if shrink else "BILINEAR").to_ndarray()
    return rgb[top:top + size[0], left:left + size[1]]


def _decode_decord(path: str, indices: np.ndarray, size: tuple[int, int] | None = None,
                   crop: tuple[int, int, int, int] | None = None
                   ) -> np.ndarray:  # pragma: no cover - decord is not installed here
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
        if int(indices.max()) >= len(reader):
            raise DecodeError(f"{path}: truncated video: {len(reader)} frames, index {int(indices.max())} "
                              "needed")
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except (decord.DECORDError, OSError, RuntimeError) as e:
        raise DecodeError(f"{path}: cannot decode video: {e}") from e
    if size is None:
        return frames
    return resize_cover(frames, size, crop)


def available_video_backends() -> list[str]:
    names = ["pyav"] if av is not None else []
    if importlib.util.find_spec("decord") is not None:
        names.append("decord")
    return names


def video_reader(backend: str = "auto") -> Callable[..., np.ndarray]:
    """'auto' prefers decord (faster random access) when installed, else PyAV."""
    names = available_video_backends()
    if backend == "auto":
        backend = "decord" if "decord" in names else "pyav"
    if backend not in names:
        raise ValueError(f"video backend {backend!r} is not available (installed: {names})")
    return {"pyav": _decode_pyav, "decord": _decode_decord}[backend]


def decode_video(path: str, indices: np.ndarray, size: tuple[int, int] | None = None,
                 crop: tuple[int, int, int, int] | None = None, backend: str = "auto") -> np.ndarray:
    """Frames `indices` (source frame numbers) of a video as uint8 (T, H, W, 3); with `size`, the optional
    source crop box (x0, x1, y0, y1) is applied and the frames resized to cover `size` and centre-cropped."""
    if len(indices) == 0:
        raise ValueError("no frame indices requested")
    return video_reader(backend)(path, np.asarray(indices, np.int64), size, crop)


def decode_image(path: str, size: tuple[int, int] | None = None,
                 crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """An image as uint8 (1, H, W, 3), optionally cropped/resized/centre-cropped like `decode_video`."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                sh, sw, top, left = cover_geometry(img.height, img.width, crop, size)
                img = img.resize((sw, sh), Image.BILINEAR)  # PIL filters are antialiased when shrinking
                img = img.crop((left, top, left + size[1], top + size[0]))
            return np.array(img)[None]
    except OSError as e:
        raise DecodeError(f"{path}: cannot decode image: {e}") from e


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).contiguous()  # uint8 copy
    return x.float().div_(127.5).sub_(1.0)


def resize_cover(frames: np.ndarray, size: tuple[int, int], crop: tuple[int, int, int, int] | None = None
                 ) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, h, w, 3) with torch: optional source crop box (x0, x1, y0, y1), resize
    to cover `size` (aspect kept), centre crop. For backends that return full frames."""
    if crop is not None:
        x0, x1, y0, y1 = crop
        frames = frames[:, y0:y1, x0:x1]
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise DecodeError(f"empty frame after crop {crop}")
    th, tw = size
    if not (frames.flags.writeable and frames.flags.c_contiguous):
        frames = np.array(frames)  # torch wants writable, contiguous memory
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # T, 3, H, W
    h, w = x.shape[-2:]
    scale = max(th / h, tw / w)
    rh, rw = max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (rh - th) // 2, (rw - tw) // 2
    x = x[:, :, top:top + th, left:left + tw]
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

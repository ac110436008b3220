"""Decoded videos out: uint8 frames, MP4 files (PyAV, H.264) and TensorBoard (an animated GIF image summary,
the form TensorBoard's video view reads; torch's `add_video` would need moviepy)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def to_frames(video: Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected one video (3, T, H, W), got {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """(T, H, W, 3) uint8 frames -> an H.264 MP4 any player opens (sizes padded to even for yuv420p)."""
    from fractions import Fraction

    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    even = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = even.shape[2], even.shape[1], "yuv420p"
        # mbtree off: x264's macroblock-tree rate control reads uninitialised memory on small frames (the same
        # 32x32 or 64x64 frames encoded differently run to run); without it an encode is a function of the frames
        stream.options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
        for frame in even:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a video file."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(int(round(1000 / fps)), 20), loop=0)
    return buffer.getvalue()


def log_video(writer: Any, tag: str, frames: np.ndarray, step: int, fps: float) -> None:
    """An animated image summary on a torch SummaryWriter (shown in TensorBoard's Images tab, playing)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


__all__ = ["gif_bytes", "log_video", "read_mp4", "to_frames", "write_mp4"]

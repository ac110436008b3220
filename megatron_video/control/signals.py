"""Structure signals for the structure controller (models/control): one-channel maps in [0, 1] per frame.

- canny: OpenCV's Canny detector (`cv2.Canny(grey, 100, 200)` on 8-bit frames by default, the call
  ControlNet-style canny annotators make). OpenCV rather than kornia: its Canny is the one those annotators, and
  so the released canny controllers, were trained on (no smoothing, L1 gradient magnitude, thresholds in 8-bit
  Sobel units); kornia's blurs first and normalises its thresholds, so its maps differ.
- depth: a MiDaS-style DPT network (transformers' `DPTForDepthEstimation`) read from a local directory.
- sketch: a PiDiNet-style edge network: the caller builds the architecture, weights come from a local
  safetensors file.
No model is ever downloaded: a missing path is an error.

Videos are (B, 3, T, H, W) RGB in [0, 1]; every extractor returns (B, 1, T, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _frames(video: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(B, C, T, H, W) -> (B*T, C, H, W) and (B, T)."""
    if video.dim() != 5:
        raise ValueError(f"expected a (B, C, T, H, W) video, got shape {tuple(video.shape)}")
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w), (b, t)


def _video(frames: Tensor, bt: tuple[int, int]) -> Tensor:
    """(B*T, 1, H, W) -> (B, 1, T, H, W)."""
    b, t = bt
    return frames.reshape(b, t, *frames.shape[1:]).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- canny


def canny(video: Tensor, low: float = 100.0, high: float = 200.0, sigma: float = 0.0) -> Tensor:
    """Canny edges of an RGB (or grey) video in [0, 1]: (B, C, T, H, W) -> (B, 1, T, H, W) of 0 / 1, by OpenCV's
    `cv2.Canny` on each frame's 8-bit grey image (`cv2.cvtColor` RGB -> grey), the call ControlNet-style canny
    annotators make. `low` / `high`: OpenCV's hysteresis thresholds on the 3x3 Sobel of the 8-bit frame (a ramp
    rising one level a pixel has magnitude 8; a sharp step of d levels, 4 d) with its default L1 magnitude: a
    pixel above `high` starts an edge, one above `low` continues it. `sigma` > 0 blurs first (`cv2.GaussianBlur`;
    OpenCV's Canny itself does not). Frames go to the host and back (OpenCV runs on CPU)."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds need 0 <= low <= high, got {low}, {high}")
    if sigma < 0:
        raise ValueError(f"canny's blur sigma must be >= 0, got {sigma}")
    frames, bt = _frames(video.float())
    if frames.shape[1] not in (1, 3):
        raise ValueError(f"canny takes RGB or grey video, got {frames.shape[1]} channels")
    cv2 = _opencv()
    levels = torch.floor(frames.clamp(0.0, 1.0) * 255 + 0.5).to(torch.uint8).cpu()  # the 8-bit frames
    rgb = frames.shape[1] == 3
    edges = []
    for frame in levels.permute(0, 2, 3, 1).numpy():  # (H, W, C)
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if rgb else frame[..., 0].copy()
        if sigma > 0:
            grey = cv2.GaussianBlur(grey, (0, 0), sigma)
        edges.append(torch.from_numpy(cv2.Canny(grey, float(low), float(high))))
    found = torch.stack(edges)[:, None].to(video.device) > 0
    return _video(found.to(video.dtype if video.is_floating_point() else torch.float32), bt)


def _opencv() -> Any:
    try:
        import cv2
    except ImportError as exc:  # a runtime requirement (requirements.txt); say which package
        raise ImportError("canny structure signals need OpenCV: pip install opencv-python-headless") from exc
    return cv2


# ------------------------------------------------------------------------------------ network signals


class FrameSignal(nn.Module):
    """A per-frame network as a structure signal: frames resized to `input_size`, normalised with `mean` /
    `std`, the network's (N, H', W') or (N, 1, H', W') map resized back and scaled to [0, 1] per frame."""

    def __init__(self, net: Callable[[Tensor], Tensor], input_size: tuple[int, int] | None,
                 mean: float = 0.5, std: float = 0.5) -> None:
        super().__init__()
        self.net, self.input_size, self.mean, self.std = net, input_size, mean, std

    @torch.no_grad()
    def forward(self, video: Tensor) -> Tensor:
        frames, bt = _frames(video.float())
        h, w = frames.shape[-2:]
        if self.input_size is not None:
            frames = F.interpolate(frames, size=self.input_size, mode="bilinear", align_corners=False)
        out = self.net((frames - self.mean) / self.std)
        out = out.unsqueeze(1) if out.dim() == 3 else out
        if out.dim() != 4 or out.shape[1] != 1:
            raise ValueError(f"the signal network must return (N, H, W) or (N, 1, H, W), got {tuple(out.shape)}")
        out = F.interpolate(out.float(), size=(h, w), mode="bilinear", align_corners=False)
        lo = out.amin(dim=(1, 2, 3), keepdim=True)
        hi = out.amax(dim=(1, 2, 3), keepdim=True)
        span = hi - lo
        return _video((out - lo) / torch.where(span > 0, span, torch.ones_like(span)), bt)  # a flat map -> 0


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"structure-signal model not found at {path} (models are read from local paths "
                                "only, never downloaded)")
    return path


def load_depth_estimator(path: str | Path, input_size: tuple[int, int] = (384, 384)) -> FrameSignal:
    """MiDaS depth (DPT, relative inverse depth: near is bright) from a local transformers directory
    (config.json + weights, e.g. a saved `DPTForDepthEstimation`). `input_size`: multiples of the ViT patch."""
    from transformers import DPTForDepthEstimation

    model = DPTForDepthEstimation.from_pretrained(str(_existing(path)), local_files_only=True).eval()
    return FrameSignal(lambda x: model(pixel_values=x).predicted_depth, input_size)


def load_sketch_model(path: str | Path, build: Callable[[], nn.Module],
                      input_size: tuple[int, int] | None = None) -> FrameSignal:
    """A sketch (PiDiNet-style edge) network: `build()` makes the architecture (no installable package ships
    PiDiNet), its weights are read strictly from the local safetensors file at `path`. The network maps
    normalised RGB frames (N, 3, H, W) to an edge map (N, 1, H', W')."""
    from safetensors.torch import load_file

    net = build()
    net.load_state_dict(load_file(str(_existing(path))), strict=True)
    return FrameSignal(net.eval(), input_size)


# ------------------------------------------------------------------------ the data pipeline's signals

SIGNAL_KINDS = ("canny", "depth", "sketch")
LEVELS = 255  # signals are stored and trained as uint8 levels: the feature cache's form, bitwise the same online


def to_levels(signal: Tensor) -> Tensor:
    """A [0, 1] signal -> uint8 levels 0..255 (canny's 0 / 1 maps are exact; a depth map loses < 1/510)."""
    return torch.round(signal.float().clamp(0.0, 1.0) * LEVELS).to(torch.uint8)


def from_levels(levels: Tensor) -> Tensor:
    """uint8 levels -> the controller's float input in [0, 1]."""
    return levels.float() / LEVELS


def resolve_callable(spec: str) -> Callable[[], nn.Module]:
    """"package.module:function" -> the function (a sketch network's architecture builder)."""
    import importlib

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def add_signal_source_args(group: Any) -> None:
    """--structure-model / --structure-sketch-arch: where the depth and sketch networks come from (an argparse
    parser or group; the same flags in pretrain_control.py, tools/cache_features.py and tools/sample.py)."""
    group.add_argument("--structure-model", type=str, default=None,
                       help="depth: a local transformers DPT directory; sketch: a local safetensors file")
    group.add_argument("--structure-sketch-arch", type=str, default=None, metavar="MODULE:FUNCTION",
                       help="sketch: the function that builds the PiDiNet-style network")


def check_signal_source(kind: str, model_path: str | None, sketch_arch: str | None) -> None:
    """What `signal_extractor` needs, checked without loading anything (ValueError naming the flag)."""
    if kind not in SIGNAL_KINDS:
        raise ValueError(f"unknown structure signal {kind!r}: choose one of {', '.join(SIGNAL_KINDS)}")
    if kind == "canny":
        return
    if model_path is None or not Path(model_path).exists():
        raise ValueError(f"the {kind} signal needs its model from a local path (--structure-model), "
                         f"{'not given' if model_path is None else f'not found: {model_path}'}")
    if kind == "sketch" and (sketch_arch is None or ":" not in sketch_arch):
        raise ValueError("the sketch signal needs --structure-sketch-arch package.module:function (PiDiNet's "
                         "architecture builder; no installable package ships it)")


def signal_extractor(kind: str, model_path: str | None = None, sketch_arch: str | None = None
                     ) -> Callable[[Tensor], Tensor]:
    """The data pipeline's extractor: a video (B, 3, T, H, W) in [-1, 1] (the decoder's range) -> uint8 levels
    (B, 1, T, H, W). The feature cache stores exactly this; online training computes the same."""
    check_signal_source(kind, model_path, sketch_arch)
    if kind == "canny":
        net: Callable[[Tensor], Tensor] = canny
    elif kind == "depth":
        net = load_depth_estimator(model_path)
    else:
        net = load_sketch_model(model_path, resolve_callable(sketch_arch))

    def extract(video: Tensor) -> Tensor:
        return to_levels(net((video.float() + 1.0) / 2.0))

    return extract


__all__ = ["FrameSignal", "LEVELS", "SIGNAL_KINDS", "add_signal_source_args", "canny", "check_signal_source",
           "from_levels", "load_depth_estimator", "load_sketch_model", "resolve_callable", "signal_extractor",
           "to_levels"]

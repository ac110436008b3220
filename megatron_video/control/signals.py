"""Structure signals for the structure controller (models/control): one-channel maps in [0, 1] per frame.

- canny: the Canny detector written in torch (neither OpenCV nor kornia is a dependency of this stack, and a
  torch version runs batched on the training device): grey -> (optional Gaussian blur) -> Sobel -> non-maximum
  suppression along the gradient direction -> double threshold -> hysteresis. Its defaults are OpenCV's
  `cv2.Canny(image, 100, 200)` on 8-bit frames, the call ControlNet-style canny annotators make: no smoothing,
  L1 gradient magnitude, the same thresholds and tie-breaking (compared pixel by pixel with OpenCV 5.1:
  bench/canny_vs_opencv.py).
- depth: a MiDaS-style DPT network (transformers' `DPTForDepthEstimation`) read from a local directory.
- sketch: a PiDiNet-style edge network: the caller builds the architecture, weights come from a local
  safetensors file.
No model is ever downloaded: a missing path is an error.

Videos are (B, 3, T, H, W) RGB in [0, 1]; every extractor returns (B, 1, T, H, W) in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LUMA = (4899 / 16384, 9617 / 16384, 1868 / 16384)  # ITU-R BT.601 in OpenCV's fixed point (RGB -> grey)


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


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    """Horizontal and vertical derivatives of (N, 1, H, W), scaled by 1/8 so a ramp of slope s gives s."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device) / 8
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kx.view(1, 1, 3, 3)), F.conv2d(padded, kx.t().reshape(1, 1, 3, 3))


def non_max_suppression(magnitude: Tensor, gx: Tensor, gy: Tensor) -> Tensor:
    """Keep a pixel only where its magnitude is a maximum along the gradient direction (quantised to 0, 45,
    90, 135 degrees). Ties broken as OpenCV breaks them: strictly above the neighbour behind (left / up) and at
    least the one ahead, so a sharp step, whose two sides have equal gradients, keeps one pixel, the first;
    strictly above both on the diagonals."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    sector = (((angle + 22.5) // 45) % 4).long()  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135
    padded = F.pad(magnitude, (1, 1, 1, 1))
    h, w = magnitude.shape[-2:]

    def shifted(dy: int, dx: int) -> Tensor:
        return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    # neighbours along the gradient for each sector (rows grow downwards: gy > 0 points down)
    steps = [(0, 1), (1, 1), (1, 0), (1, -1)]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for s, (dy, dx) in enumerate(steps):
        ahead = magnitude > shifted(dy, dx) if dy and dx else magnitude >= shifted(dy, dx)  # diagonals: strict
        is_max = ahead & (magnitude > shifted(-dy, -dx))
        keep |= (sector == s) & is_max
    return magnitude * keep


def hysteresis(strong: Tensor, weak: Tensor, max_iterations: int | None = None) -> Tensor:
    """Edges: strong pixels plus weak pixels 8-connected to a strong one through weak pixels (bool masks)."""
    edges, weak = strong, weak | strong
    limit = max_iterations if max_iterations is not None else strong.shape[-1] * strong.shape[-2]
    for _ in range(limit):
        grown = (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0) & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def canny(video: Tensor, low: float = 100.0, high: float = 200.0, sigma: float = 0.0) -> Tensor:
    """Canny edges of an RGB (or grey) video in [0, 1]: (B, C, T, H, W) -> (B, 1, T, H, W) of 0 / 1.
    `low` / `high`: hysteresis thresholds in OpenCV's units, on the 3x3 Sobel of the 8-bit grey frame (a ramp
    rising one level a pixel has magnitude 8; a sharp step of d levels, 4 d): a pixel above `high` starts an
    edge, one above `low` continues it. `sigma` > 0 blurs first (OpenCV's Canny does not). The magnitude is
    |gx| + |gy|, as OpenCV's default. The defaults are `cv2.Canny(grey, 100, 200)`; on 8-bit grey frames the
    integer gradients are exact in float, so the thresholds cut where OpenCV's do."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds need 0 <= low <= high, got {low}, {high}")
    if sigma < 0:
        raise ValueError(f"canny's blur sigma must be >= 0, got {sigma}")
    frames, bt = _frames(video.float())
    if frames.shape[1] == 3:
        frames = sum(weight * frames[:, i:i + 1] for i, weight in enumerate(_LUMA))
    elif frames.shape[1] != 1:
        raise ValueError(f"canny takes RGB or grey video, got {frames.shape[1]} channels")
    grey = torch.floor(frames.clamp(0.0, 1.0) * 255 + 0.5)  # 8-bit levels, rounded as OpenCV's RGB -> grey
    gx, gy = (8 * g for g in sobel(_gaussian_blur(grey, sigma) if sigma > 0 else grey))  # x 8: exact
    thin = non_max_suppression(gx.abs() + gy.abs(), gx, gy)
    edges = hysteresis(thin > high, thin > low)
    return _video(edges.to(video.dtype if video.is_floating_point() else torch.float32), bt)


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
           "from_levels", "hysteresis", "load_depth_estimator", "load_sketch_model", "non_max_suppression",
           "resolve_callable", "signal_extractor", "sobel", "to_levels"]

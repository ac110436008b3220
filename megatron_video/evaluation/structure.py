"""How closely a generated video follows a structure signal: edge agreement, the measure ControlNet-style
papers report for edge conditions. Both videos go through the same Canny detector the controller trains on
(control/signals.py); an edge pixel of one counts as matched when the other has an edge within `tolerance`
pixels (a max-pool dilation), so a one-pixel shift of a sharp outline is not a miss.

precision: the sample's edges that lie on the structure's; recall: the structure's edges the sample draws;
F1 their harmonic mean. 1 is a sample whose outlines are the structure's; a sample with no edges scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_video.control.signals import canny


@dataclass(frozen=True)
class EdgeAgreement:
    precision: float
    recall: float
    f1: float
    sample_edges: int  # edge pixels of each video, over all frames
    structure_edges: int


def _dilate(edges: Tensor, tolerance: int) -> Tensor:
    """(N, 1, H, W) 0/1 -> 1 wherever an edge lies within `tolerance` pixels (Chebyshev distance)."""
    if tolerance == 0:
        return edges
    return F.max_pool2d(edges, 2 * tolerance + 1, stride=1, padding=tolerance)


def _check(sample_shape: torch.Size, structure_shape: torch.Size) -> None:
    if sample_shape != structure_shape or len(sample_shape) != 4 or sample_shape[0] != 3:
        raise ValueError(f"edge agreement needs two RGB videos (3, T, H, W) of one size, got {tuple(sample_shape)} "
                         f"and the structure's {tuple(structure_shape)}")


def _edges(video: Tensor) -> Tensor:
    """RGB video (3, T, H, W) in [0, 1] -> its Canny edges (T, 1, H, W) of 0 / 1."""
    return canny(video[None].float())[0].transpose(0, 1)


class StructureEdges:
    """A structure video's Canny edges, computed once, to score any number of samples against."""

    def __init__(self, structure: Tensor) -> None:
        _check(structure.shape, structure.shape)
        self.shape, self.edges = structure.shape, _edges(structure)

    def agreement(self, sample: Tensor, tolerance: int = 1) -> EdgeAgreement:
        """`sample`: an RGB video (3, T, H, W) in [0, 1] of the structure's size; edges matched within
        `tolerance` pixels, over all frames."""
        _check(sample.shape, self.shape)
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
        a, b = _edges(sample), self.edges
        a_count, b_count = float(a.sum()), float(b.sum())
        precision = float((a * _dilate(b, tolerance)).sum()) / a_count if a_count else 0.0
        recall = float((b * _dilate(a, tolerance)).sum()) / b_count if b_count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return EdgeAgreement(precision, recall, f1, int(a_count), int(b_count))


def edge_agreement(sample: Tensor, structure: Tensor, tolerance: int = 1) -> EdgeAgreement:
    """`sample`, `structure`: RGB videos (3, T, H, W) in [0, 1] of one size (the structure: the video the signal
    was extracted from). Canny edges of both, matched within `tolerance` pixels, over all frames."""
    _check(sample.shape, structure.shape)
    return StructureEdges(structure).agreement(sample, tolerance)


def frames_to_video(frames: np.ndarray | Tensor) -> Tensor:
    """(T, H, W, 3) uint8 frames (numpy or torch, as sampling/video.py reads them) -> (3, T, H, W) in [0, 1]."""
    video = torch.as_tensor(frames)
    if video.dim() != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got {tuple(video.shape)}")
    return video.permute(3, 0, 1, 2).float() / 255.0


__all__ = ["EdgeAgreement", "StructureEdges", "edge_agreement", "frames_to_video"]

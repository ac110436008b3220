"""Explicit causal-cache state for chunked (tiled) WF-VAE encoding and decoding.

The state belongs to the caller of one chunked encode/decode and is passed through every forward call; the
modules themselves never keep per-video state, so different videos (and lengths) can interleave freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class CausalState:
    """Per-module cached frames of one video stream.

    `first` is True while the first chunk (the lone first frame) runs: causal convs pad with replicas of
    frame 0 and the inverse Haar drops its first output frame, exactly as in direct mode. Later chunks use the
    frames cached here instead. Keys are the module objects themselves (identity): nothing is stored on them.
    """

    first: bool = True
    frames: dict[nn.Module, torch.Tensor] = field(default_factory=dict)

    def get(self, module: nn.Module) -> torch.Tensor | None:
        return self.frames.get(module)

    def put(self, module: nn.Module, value: torch.Tensor) -> None:
        # Clone so a cached slice does not keep the whole chunk's activation alive.
        self.frames[module] = value.detach().clone()

"""Progress bars with an ETA for long offline work (feature-cache building, checkpoint conversion, sample-data
making): tqdm on stderr, so a tool's stdout keeps only its results. MEGATRON_VIDEO_PROGRESS=0 turns them off."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any


def progress(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             ) -> Any:
    """A tqdm bar (elapsed<remaining, rate) over `iterable`, or a manual one (`.update(n)`) when it is None."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, disable=os.environ.get("MEGATRON_VIDEO_PROGRESS", "1") == "0")

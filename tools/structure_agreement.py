#!/usr/bin/env python
"""How closely videos follow a structure video's Canny edges (a canny structure controller's samples).

    python tools/structure_agreement.py --structure-video SOURCE.mp4 SAMPLE.mp4 [SAMPLE.mp4 ...] [--tolerance 1]

Prints, per sample, the edge F1 against the structure video (with precision and recall): the Canny edges of
both, matched within --tolerance pixels (megatron_video/evaluation/structure.py). Compare a controlled sample
with the base's sample from the same prompt and seed to see what the controller adds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.tool_errors import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", nargs="+", help="video files of the structure video's size and length")
    p.add_argument("--structure-video", required=True, help="the video the structure signal was extracted from")
    p.add_argument("--tolerance", type=int, default=1, help="pixels an edge may be off and still match")
    a = p.parse_args(argv)
    if a.tolerance < 0:  # (StructureEdges.agreement refuses it too, but only after the videos are read)
        raise SystemExit(f"--tolerance must be >= 0 pixels, got {a.tolerance}")
    for path in (a.structure_video, *a.samples):
        if not Path(path).is_file():
            raise SystemExit(f"no such video file: {path}")
    from megatron_video.evaluation.structure import StructureEdges, frames_to_video
    from megatron_video.sampling.video import read_mp4

    structure = StructureEdges(frames_to_video(read_mp4(a.structure_video)))  # its edges once, for every sample
    for path in a.samples:
        try:
            score = structure.agreement(frames_to_video(read_mp4(path)), a.tolerance)
        except ValueError as exc:  # another size or length than the structure video
            raise SystemExit(f"{path}: {exc}") from None
        if not score.structure_edges:
            print(f"{path}: the structure video has no Canny edges (too little contrast): nothing to follow")
            continue
        print(f"{path}: edge F1 {score.f1:.3f} (precision {score.precision:.3f}, recall {score.recall:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))

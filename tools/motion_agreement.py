#!/usr/bin/env python
"""How often sampled videos move the way their captions say (captions as tools/make_sample_dataset.py writes them).

    python tools/motion_agreement.py --write-prompts prompts.txt     # 20 captions: 5 directions x 4 shapes
    python tools/sample.py ... --prompts prompts.txt --out samples/
    python tools/motion_agreement.py samples/                        # reads sample_*.json and sample_*.mp4

Per sample: the centroid of the caption's colour in frame 1 and in the last frame but one, and how far it moved
along the caption's direction (megatron_video/evaluation/motion.py); a sample follows its caption when that is
at least --min-shift pixels. Prints each sample and the count that follow.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_video.tool_errors import run_tool  # noqa: E402

CAPTION = re.compile(r"^A (?P<colour>\w+) (?P<shape>circle|square) moves (?P<direction>.+) across an? "
                     r"(?P<background>.+) background\.$")
# (colour, shape, background) of the written prompts, each direction taking the next four in turn
PROMPT_SHAPES = [("red", "circle"), ("blue", "square"), ("yellow", "circle"), ("white", "square"),
                 ("green", "circle"), ("orange", "square"), ("purple", "circle")]
PROMPT_BACKGROUNDS = ["black", "navy", "dark grey", "olive"]


def _sample_dataset():
    """tools/make_sample_dataset.py: its colours and directions are what the captions name."""
    spec = importlib.util.spec_from_file_location("make_sample_dataset", Path(__file__).with_name(
        "make_sample_dataset.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompts(per_direction: int) -> list[str]:
    data = _sample_dataset()
    out, k = [], 0
    for direction in data.DIRECTIONS:
        for _ in range(per_direction):
            colour, shape = PROMPT_SHAPES[k % len(PROMPT_SHAPES)]
            background = PROMPT_BACKGROUNDS[k % len(PROMPT_BACKGROUNDS)]
            out.append(data.caption(colour, shape, direction, background))
            k += 1
    return out


def score(directory: Path, min_shift: float) -> tuple[int, int]:
    from megatron_video.evaluation.motion import motion_agreement
    from megatron_video.sampling.video import read_mp4

    data = _sample_dataset()
    records = sorted(directory.glob("sample_*.json"))
    if not records:
        raise SystemExit(f"no sample_*.json in {directory} (the output directory of tools/sample.py)")
    follows = 0
    for record in records:
        try:
            caption = json.loads(record.read_text())["prompt"]
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"{record}: not a tools/sample.py record (JSON with a \"prompt\")") from None
        match = CAPTION.match(str(caption))
        if match is None or match["colour"] not in data.COLOURS or match["direction"] not in data.DIRECTIONS:
            raise SystemExit(f"{record}: the caption {caption!r} does not name one of make_sample_dataset.py's "
                             "colours and directions as 'A <colour> <circle|square> moves <direction> across a "
                             "<background> background.'")
        video = record.with_suffix(".mp4")
        if not video.is_file():
            raise SystemExit(f"{record}: its video {video.name} is missing")
        result = motion_agreement(read_mp4(video), data.COLOURS[match["colour"]], data.DIRECTIONS[match["direction"]],
                                  min_shift)
        follows += result.follows
        moved = "shape not found" if result.shift is None else f"moved {result.shift:+.1f} px along it"
        print(f"{video.name}: {'follows' if result.follows else 'does not follow'} ({moved}): {caption}")
    return follows, len(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", nargs="?", type=Path, help="tools/sample.py's output directory")
    p.add_argument("--write-prompts", type=Path, help="write captions to sample, one per line, and exit")
    p.add_argument("--per-direction", type=int, default=4, help="captions per direction (--write-prompts)")
    p.add_argument("--min-shift", type=float, default=3.0, help="pixels the shape must travel along the direction")
    a = p.parse_args(argv)
    if (a.samples is None) == (a.write_prompts is None):
        raise SystemExit("give either a samples directory or --write-prompts FILE")
    if a.write_prompts is not None:
        if a.per_direction < 1:
            raise SystemExit(f"--per-direction must be >= 1, got {a.per_direction}")
        a.write_prompts.write_text("\n".join(prompts(a.per_direction)) + "\n")
        return 0
    if not a.samples.is_dir():
        raise SystemExit(f"no such directory: {a.samples}")
    follows, total = score(a.samples, a.min_shift)
    print(f"{follows}/{total} samples move the way their caption says (at least {a.min_shift:g} px, frame 1 to the "
          "last but one)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))

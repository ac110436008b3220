"""Whether a sample moves the way its caption says (evaluation/motion.py, tools/motion_agreement.py), on clips
drawn the way tools/make_sample_dataset.py draws its data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_video.evaluation.motion import colour_centroid, motion_agreement
from tests.data_fixtures import load_tool

REPO = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, str(REPO / "tools" / "motion_agreement.py")]
DATA = load_tool("make_sample_dataset")


def _clip(colour: str, direction: str, frames: int = 9, size: int = 32) -> np.ndarray:
    """(T, H, W, 3) uint8: a circle of `colour` crossing 70 % of the frame in `direction`, as the data set draws."""
    dx, dy = DATA.DIRECTIONS[direction]
    x0, y0 = size / 2 - dx * size * 0.35, size / 2 - dy * size * 0.35
    return np.stack([DATA.draw(size, size, DATA.BACKGROUNDS["navy"], DATA.COLOURS[colour], "circle",
                               x0 + dx * size * 0.7 * k / (frames - 1), y0 + dy * size * 0.7 * k / (frames - 1),
                               size / 4) for k in range(frames)])


def test_centroid_finds_the_shape_of_its_colour_only():
    frame = _clip("red", "left to right")[4]  # the middle frame: the circle at the centre
    x, y = colour_centroid(frame, DATA.COLOURS["red"])
    assert abs(x - 16) < 1 and abs(y - 16) < 1
    assert colour_centroid(frame, DATA.COLOURS["yellow"]) is None
    with pytest.raises(ValueError, match="H, W, 3"):
        colour_centroid(frame[..., 0], DATA.COLOURS["red"])


@pytest.mark.parametrize("direction", list(DATA.DIRECTIONS))
def test_a_clip_follows_its_own_direction_and_not_the_reverse(direction):
    clip = _clip("yellow", direction)
    dx, dy = DATA.DIRECTIONS[direction]
    own = motion_agreement(clip, DATA.COLOURS["yellow"], (dx, dy))
    assert own.follows and own.shift > 10  # frame 1 to 7 of 9: 6/8 of 22.4 px
    reverse = motion_agreement(clip, DATA.COLOURS["yellow"], (-dx, -dy))
    assert not reverse.follows and reverse.shift < -10
    still = motion_agreement(np.repeat(clip[4:5], 9, axis=0), DATA.COLOURS["yellow"], (dx, dy))
    assert not still.follows and abs(still.shift) < 1e-6
    missing = motion_agreement(clip, DATA.COLOURS["red"], (dx, dy))
    assert (missing.follows, missing.shift, missing.start) == (False, None, None)


def test_tool_writes_prompts_and_counts_the_samples_that_follow(tmp_path: Path):
    from megatron_video.sampling.video import write_mp4

    prompts = tmp_path / "prompts.txt"
    assert subprocess.run([*TOOL, "--write-prompts", str(prompts)], timeout=120).returncode == 0
    captions = prompts.read_text().splitlines()
    assert len(captions) == 20 and len(set(captions)) == 20
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, caption in enumerate(captions[:4:3] + captions[8:9]):  # left to right twice, top to bottom once
        colour, direction = caption.split()[1], caption.split(" moves ")[1].split(" across")[0]
        drawn = "left to right" if i < 2 else "bottom to top"  # the third moves against its caption
        write_mp4(samples / f"sample_{i:04d}.mp4", _clip(colour, drawn), fps=8)
        (samples / f"sample_{i:04d}.json").write_text(json.dumps({"prompt": caption}))
        assert direction == ("left to right" if i < 2 else "top to bottom")
    run = subprocess.run([*TOOL, str(samples)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].startswith("2/3 samples move the way their caption says")
    (samples / "sample_0000.json").write_text(json.dumps({"prompt": "A red blob wanders about."}))
    bad = subprocess.run([*TOOL, str(samples)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not name one of" in bad.stderr and "Traceback" not in bad.stderr
    (samples / "sample_0000.json").write_text("{not json")
    broken = subprocess.run([*TOOL, str(samples)], capture_output=True, text=True, timeout=120)
    assert broken.returncode == 2 and "not a tools/sample.py record" in broken.stderr
    empty = subprocess.run([*TOOL, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "no sample_*.json" in empty.stderr


def test_every_caption_the_data_set_writes_parses_back():
    """The data set's caption form (make_sample_dataset.caption) and the tool's parser cannot drift apart."""
    tool = load_tool("motion_agreement")
    for colour in DATA.COLOURS:
        for direction in DATA.DIRECTIONS:
            for background in DATA.BACKGROUNDS:
                for shape in ("circle", "square"):
                    match = tool.CAPTION.match(DATA.caption(colour, shape, direction, background))
                    assert match is not None, (colour, direction, background, shape)
                    assert match.group("colour", "shape", "direction", "background") == (
                        colour, shape, direction, background)

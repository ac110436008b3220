"""tools/make_sample_dataset.py: a real, varied data set in the Open-Sora Plan layout, made quickly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import av

from megatron_video.data.metadata import load_metadata
from tests.data_fixtures import load_tool


def test_make_sample_dataset_cli(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "ds"
    t0 = time.perf_counter()
    assert load_tool("make_sample_dataset").main(["--out", str(out), "--num-videos", "9", "--num-images", "3",
                                                  "--seed", "4"]) == 0
    assert time.perf_counter() - t0 < 20
    meta = load_metadata(str(out / "data.txt"))
    assert len(meta) == 12 and int(meta.columns.is_image.sum()) == 3
    vids = [meta.record(i) for i in range(9)]
    assert len({(r.height, r.width) for r in vids}) >= 5 and len({r.fps for r in vids}) >= 3
    assert len({r.num_frames for r in vids}) >= 3
    for r in vids:
        with av.open(r.path) as c:
            s = c.streams.video[0]
            assert (s.codec_context.height, s.codec_context.width) == (r.height, r.width)
            assert sum(1 for _ in c.decode(s)) == r.num_frames
        words = r.captions[0].lower()
        assert any(colour in words for colour in ("red", "green", "blue", "yellow", "white", "orange",
                                                   "purple"))
    entries = json.loads((out / "video_annotations.json").read_text())
    assert {"path", "cap", "resolution", "num_frames", "fps"} <= set(entries[0])
    # deterministic for a seed
    again = tmp_path / "again"
    load_tool("make_sample_dataset").main(["--out", str(again), "--num-videos", "9", "--num-images", "3",
                                           "--seed", "4"])
    assert (again / "video_annotations.json").read_text() == (out / "video_annotations.json").read_text()


def test_make_sample_dataset_for_one_clip_size(tmp_path: Path) -> None:
    """--clip H W FRAMES FPS: every video exactly that (decoded), uncut and uncropped, images at that size;
    a clip of one frame or of an odd size is refused before anything is written."""
    import numpy as np
    import pytest
    from PIL import Image

    tool = load_tool("make_sample_dataset")
    out = tmp_path / "clip"
    args = ["--out", str(out), "--num-videos", "8", "--num-images", "2", "--clip", "32", "48", "9", "8"]
    assert tool.main(args) == 0
    meta = load_metadata(str(out / "data.txt"))
    entries = json.loads((out / "video_annotations.json").read_text())
    assert not any("cut" in e or "crop" in e for e in entries)
    for i in range(8):
        r = meta.record(i)
        assert (r.height, r.width, r.num_frames, r.fps) == (32, 48, 9, 8)
        with av.open(r.path) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
        # the shape covers a quarter-side radius: many pixels differ from the background corner
        assert (np.abs(frames[4].astype(int) - frames[4][0, 0].astype(int)).sum(-1) > 60).sum() > 100
    for i in range(8, 10):
        with Image.open(meta.record(i).path) as image:
            assert image.size == (48, 32)
    for bad in (["32", "32", "1", "8"], ["33", "32", "9", "8"]):
        with pytest.raises(SystemExit):
            tool.main(["--out", str(tmp_path / "bad"), "--clip", *bad])
        assert not (tmp_path / "bad").exists()

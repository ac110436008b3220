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

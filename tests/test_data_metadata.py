"""Metadata readers (JSON and Parquet), row-named errors, and the json <-> parquet converter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_video.data.metadata import MetadataError, load_metadata
from tests.data_fixtures import load_tool, sample_dataset_dir  # noqa: F401

GOOD = {"path": "a.mp4", "cap": "x", "resolution": {"height": 64, "width": 96}, "num_frames": 30, "fps": 24}


def write_ann(tmp_path: Path, entries: list) -> Path:
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(entries))
    (tmp_path / "data.txt").write_text(f"{tmp_path},{ann}\n")
    return tmp_path / "data.txt"


def test_reads_open_sora_plan_layout(sample_dataset_dir: Path) -> None:  # noqa: F811
    meta = load_metadata(str(sample_dataset_dir / "data.txt"))
    assert len(meta) == 22
    cols = meta.columns
    assert cols.is_image.sum() == 6 and (cols.num_frames[~cols.is_image] > 1).all()
    rec = meta.record(0)
    assert Path(rec.path).is_file() and rec.captions and rec.fps > 0 and rec.aesthetic is not None
    assert len(meta.record(0).captions) == 2  # list captions are kept whole
    cut = [meta.record(i).cut for i in range(16) if meta.record(i).cut]
    assert cut and all(0 <= a < b for a, b in cut)
    with pytest.raises(IndexError):
        meta.record(22)


@pytest.mark.parametrize("patch,needle", [
    ({"cap": None}, "'cap'"),
    ({"cap": []}, "'cap'"),
    ({"resolution": {"height": 64}}, "'resolution'"),
    ({"num_frames": None}, "'num_frames'"),
    ({"fps": 0}, "fps"),
    ({"resolution": {"height": -4, "width": 96}}, "resolution"),
    ({"cut": [10, 5]}, "cut"),
    ({"cut": [0, 31]}, "cut"),
    ({"crop": [0, 200, 0, 10]}, "crop"),
    ({"path": ""}, "'path'"),
    ({"aes": "high"}, "'aes'"),
])
def test_bad_rows_are_named(tmp_path: Path, patch: dict, needle: str) -> None:
    bad = {**GOOD, **patch}
    data = write_ann(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(MetadataError) as err:
        load_metadata(str(data))
    assert "row 2" in str(err.value) and needle in str(err.value)


def test_images_need_no_frames(tmp_path: Path) -> None:
    entry = {"path": "x.jpg", "cap": ["a", "b"], "resolution": {"height": 8, "width": 8}}
    data = write_ann(tmp_path, [entry])
    rec = load_metadata(str(data)).record(0)
    assert rec.is_image and rec.num_frames == 1 and rec.captions == ("a", "b")


def test_parquet_round_trip_and_lazy_records(sample_dataset_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    tool = load_tool("convert_metadata")
    pq_path = tmp_path / "meta.parquet"
    assert tool.main(["--to", "parquet", str(sample_dataset_dir / "data.txt"), "--out", str(pq_path)]) == 0
    js = load_metadata(str(sample_dataset_dir / "data.txt"))
    pq = load_metadata(str(pq_path))
    assert len(pq) == len(js)
    for f in js.columns._fields:
        np.testing.assert_array_equal(getattr(js.columns, f), getattr(pq.columns, f), err_msg=f)
    for i in range(len(js)):
        a, b = js.record(i), pq.record(i)
        assert (a.path, a.captions, a.cut, a.crop, a.aesthetic, a.motion) == (
            b.path, b.captions, b.cut, b.crop, b.aesthetic, b.motion)
    back = tmp_path / "back"
    assert tool.main(["--to", "json", str(pq_path), "--out", str(back)]) == 0
    again = load_metadata(str(back / "data.txt"))
    assert len(again) == len(js)
    for i in range(len(js)):
        assert (again.record(i).path, again.record(i).captions) == (js.record(i).path, js.record(i).captions)


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"path": ["a.mp4", "b.mp4", "c.mp4"], "cap": [["x"], ["y"], ["z"]],
                      "height": [64, 64, 64], "width": [64, 64, 64], "num_frames": [10, None, 10],
                      "fps": [24.0, 24.0, 24.0]})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(MetadataError, match=r"row 1: invalid num_frames"):
        load_metadata(str(tmp_path / "m.parquet"))
    fixed = table.set_column(4, "num_frames", pa.array([10, 10, 10]))
    caps = pa.array([["x"], None, ["z"]], pa.list_(pa.string()))
    pq.write_table(fixed.set_column(1, "cap", caps), tmp_path / "c.parquet", row_group_size=2)
    with pytest.raises(MetadataError, match=r"row 1: missing field 'cap'"):
        load_metadata(str(tmp_path / "c.parquet"))
    paths = pa.array(["a.mp4", "b.mp4", None])
    pq.write_table(fixed.set_column(0, "path", paths), tmp_path / "p.parquet", row_group_size=2)
    with pytest.raises(MetadataError, match=r"row 2: missing field 'path'"):
        load_metadata(str(tmp_path / "p.parquet"))
    pq.write_table(table.drop(["height"]), tmp_path / "n.parquet")
    with pytest.raises(MetadataError, match="missing required column"):
        load_metadata(str(tmp_path / "n.parquet"))

"""Conversion between the Open-Sora Plan JSON metadata form and the Parquet form."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_video.data.metadata import Metadata, SampleRecord, load_metadata

PARQUET_ROW_GROUP = 4096  # small row groups keep on-demand reads of one record cheap


def parquet_schema() -> Any:
    import pyarrow as pa

    i32, f64 = pa.int32(), pa.float64()
    return pa.schema([("path", pa.string()), ("cap", pa.list_(pa.string())), ("height", i32), ("width", i32),
                      ("num_frames", i32), ("fps", f64), ("is_image", pa.bool_()), ("aes", f64),
                      ("motion", f64), ("camera", pa.string()), ("cut_start", i32), ("cut_end", i32),
                      ("crop_x0", i32), ("crop_x1", i32), ("crop_y0", i32), ("crop_y1", i32)])


def _row(rec: SampleRecord) -> dict[str, Any]:
    cut = rec.cut or (None, None)
    crop = rec.crop or (None, None, None, None)
    return {"path": rec.path, "cap": list(rec.captions), "height": rec.height, "width": rec.width,
            "num_frames": None if rec.is_image else rec.num_frames, "fps": None if rec.is_image else rec.fps,
            "is_image": rec.is_image, "aes": rec.aesthetic, "motion": rec.motion, "camera": rec.camera,
            "cut_start": cut[0], "cut_end": cut[1], "crop_x0": crop[0], "crop_x1": crop[1],
            "crop_y0": crop[2], "crop_y1": crop[3]}


def metadata_to_parquet(meta: Metadata, out: str | os.PathLike, row_group_size: int = PARQUET_ROW_GROUP
                        ) -> int:
    """Write every record (paths joined with their roots) to one Parquet file; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    with pq.ParquetWriter(str(out), schema) as writer:
        for lo in range(0, len(meta), row_group_size):
            rows = [_row(meta.record(i)) for i in range(lo, min(lo + row_group_size, len(meta)))]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=row_group_size)
    return len(meta)


def json_to_parquet(sources: list[str], out: str | os.PathLike, data_root: str = "") -> int:
    return metadata_to_parquet(load_metadata(sources, data_root), out)


def parquet_to_json(source: str, out_dir: str | os.PathLike, data_root: str = "") -> Path:
    """Write `annotation.json` (paths relative to the common root) and `data.txt`; returns data.txt's path."""
    meta = load_metadata([source], data_root)
    records = [meta.record(i) for i in range(len(meta))]
    paths = [os.path.abspath(r.path) for r in records]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else os.path.abspath(".")
    entries = []
    for rec, path in zip(records, paths):
        e: dict[str, Any] = {"path": os.path.relpath(path, root),
                             "cap": rec.captions[0] if len(rec.captions) == 1 else list(rec.captions),
                             "resolution": {"height": rec.height, "width": rec.width}}
        if not rec.is_image:
            e["num_frames"], e["fps"] = rec.num_frames, rec.fps
        for key, value in (("aes", rec.aesthetic), ("motion", rec.motion), ("camera", rec.camera),
                           ("cut", list(rec.cut) if rec.cut else None),
                           ("crop", list(rec.crop) if rec.crop else None)):
            if value is not None:
                e[key] = value
        entries.append(e)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotation.json").write_text(json.dumps(entries, indent=1))
    (out / "data.txt").write_text(f"{root},{(out / 'annotation.json').resolve()}\n")
    return out / "data.txt"

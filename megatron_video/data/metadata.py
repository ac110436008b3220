"""Metadata readers: Open-Sora Plan `data.txt` + annotation JSON, and (lazy, columnar) Parquet.

Both forms give a `Metadata`: numeric columns for every row (enough to plan shapes without decoding) and
`record(i)` for the full entry of one sample. Parquet string columns (path, captions) are read one row group
at a time on demand, so 10M+ rows cost only their numeric columns at start-up; with a planned bucket index
(`on_demand=True`) not even those: every field comes with its row group.

Fields (JSON form): path, cap (string or list of strings), resolution {height, width}, num_frames, fps
(videos), optional aes/aesthetic, motion, camera, cut [start_frame, end_frame), crop [x0, x1, y0, y1].
Parquet form (reader in `metadata_parquet.py`): the same fields, flattened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
NUMERIC_COLUMNS = ("height", "width", "num_frames", "fps", "cut_start", "cut_end",
                   "crop_x0", "crop_x1", "crop_y0", "crop_y1")
STRING_COLUMNS = ("path", "cap", "camera")
FLOAT_COLUMNS = ("aes", "motion")


class MetadataError(ValueError):
    """A metadata row is missing a field or holds an impossible value; the message names the row."""


@dataclass(frozen=True)
class SampleRecord:
    index: int
    path: str
    captions: tuple[str, ...]
    is_image: bool
    height: int
    width: int
    num_frames: int  # 1 for images
    fps: float  # 0.0 for images
    aesthetic: float | None = None
    motion: float | None = None
    camera: str | None = None
    cut: tuple[int, int] | None = None  # [start, end) source frame indices
    crop: tuple[int, int, int, int] | None = None  # x0, x1, y0, y1 in source pixels


class ShapeColumns(NamedTuple):
    """Per-row numeric metadata (numpy), all that shape planning needs. -1 marks an absent cut/crop."""

    is_image: np.ndarray  # bool
    height: np.ndarray  # int32
    width: np.ndarray
    num_frames: np.ndarray
    fps: np.ndarray  # float64
    cut_start: np.ndarray
    cut_end: np.ndarray
    crop: np.ndarray  # (N, 4) int32: x0, x1, y0, y1

    def __len__(self) -> int:
        return len(self.height)


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _concat_columns(parts: list[ShapeColumns]) -> ShapeColumns:
    if len(parts) == 1:
        return parts[0]
    return ShapeColumns(*[np.concatenate([getattr(p, f) for p in parts]) for f in ShapeColumns._fields])


def validate_columns(cols: ShapeColumns, source: str, offset: int = 0, chunk: int = 1 << 20) -> None:
    """Vectorised plausibility checks; raises MetadataError naming the first bad row and field."""
    if len(cols) > chunk:  # bounded temporaries for 10M+ rows
        for lo in range(0, len(cols), chunk):
            validate_columns(ShapeColumns(*(c[lo:lo + chunk] for c in cols)), source, offset + lo, chunk)
        return
    vid = ~cols.is_image
    has_cut = cols.cut_start >= 0
    has_crop = cols.crop[:, 0] >= 0
    checks = [
        ("resolution (height/width must be positive)", (cols.height <= 0) | (cols.width <= 0)),
        ("num_frames (a video needs >= 1 frame)", vid & (cols.num_frames < 1)),
        ("fps (a video needs fps > 0)", vid & ~(cols.fps > 0)),
        ("cut (needs 0 <= start < end <= num_frames)", vid & has_cut & (
            (cols.cut_end <= cols.cut_start) | (cols.cut_end > cols.num_frames))),
        ("cut (present on one side only)", (cols.cut_start >= 0) != (cols.cut_end >= 0)),
        ("crop (needs 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height)", has_crop & (
            (cols.crop[:, 1] <= cols.crop[:, 0]) | (cols.crop[:, 1] > cols.width)
            | (cols.crop[:, 3] <= cols.crop[:, 2]) | (cols.crop[:, 3] > cols.height)
            | (cols.crop.min(1) < 0))),
    ]
    for what, bad in checks:
        if bad.any():
            row = int(np.argmax(bad))
            c = cols
            raise MetadataError(f"{source}: row {row + offset}: invalid {what}: height={c.height[row]} "
                                f"width={c.width[row]} num_frames={c.num_frames[row]} fps={c.fps[row]} "
                                f"cut=({c.cut_start[row]}, {c.cut_end[row]}) crop={c.crop[row].tolist()}")


class _JsonSource:
    """One annotation JSON file (entries held in memory: the form is meant for small/medium sets)."""

    def __init__(self, root: str, annotation: str) -> None:
        self.name = annotation
        try:
            with open(annotation, encoding="utf-8") as f:
                entries = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise MetadataError(f"{annotation}: cannot read annotation JSON: {e}") from e
        if not isinstance(entries, list):
            raise MetadataError(f"{annotation}: expected a JSON list of entries, "
                                f"got {type(entries).__name__}")
        self.root = root
        self.records: list[dict[str, Any]] = entries
        self.columns = self._columns()

    def __len__(self) -> int:
        return len(self.records)

    def _fail(self, row: int, msg: str) -> MetadataError:
        path = self.records[row].get("path") if isinstance(self.records[row], dict) else None
        return MetadataError(f"{self.name}: row {row} (path={path!r}): {msg}")

    def _columns(self) -> ShapeColumns:
        n = len(self.records)
        is_image = np.zeros(n, bool)
        names = ("height", "width", "num_frames", "cut_start", "cut_end")
        ints = {k: np.full(n, -1, np.int32) for k in names}
        fps = np.zeros(n, np.float64)
        crop = np.full((n, 4), -1, np.int32)
        for i, e in enumerate(self.records):
            if not isinstance(e, dict):
                raise self._fail(i, "entry is not a JSON object")
            path = e.get("path")
            if not isinstance(path, str) or not path:
                raise self._fail(i, "missing field 'path'")
            parse_captions(e.get("cap"), lambda m, i=i: self._fail(i, m))
            res = e.get("resolution")
            if not isinstance(res, dict) or not _is_int(res.get("height")) or not _is_int(res.get("width")):
                raise self._fail(i, "missing or non-integer field 'resolution' {height, width}")
            ints["height"][i], ints["width"][i] = res["height"], res["width"]
            is_image[i] = is_image_path(path)
            if is_image[i]:
                ints["num_frames"][i] = 1
            else:
                if not _is_int(e.get("num_frames")):
                    raise self._fail(i, "missing or non-integer field 'num_frames'")
                if not isinstance(e.get("fps"), (int, float)):
                    raise self._fail(i, "missing or non-numeric field 'fps'")
                ints["num_frames"][i], fps[i] = e["num_frames"], e["fps"]
            for key in ("aes", "aesthetic", "motion"):
                if e.get(key) is not None and not isinstance(e[key], (int, float)):
                    raise self._fail(i, f"field '{key}' must be a number")
            if e.get("cut") is not None:
                if not (isinstance(e["cut"], list) and len(e["cut"]) == 2 and all(map(_is_int, e["cut"]))):
                    raise self._fail(i, "field 'cut' must be [start_frame, end_frame]")
                ints["cut_start"][i], ints["cut_end"][i] = e["cut"]
            if e.get("crop") is not None:
                if not (isinstance(e["crop"], list) and len(e["crop"]) == 4 and all(map(_is_int, e["crop"]))):
                    raise self._fail(i, "field 'crop' must be [x0, x1, y0, y1]")
                crop[i] = e["crop"]
        cols = ShapeColumns(is_image, ints["height"], ints["width"], ints["num_frames"], fps,
                            ints["cut_start"], ints["cut_end"], crop)
        validate_columns(cols, self.name)
        return cols

    def record(self, local: int, index: int) -> SampleRecord:
        e, c = self.records[local], self.columns
        aes = e.get("aes", e.get("aesthetic"))
        return SampleRecord(
            index=index, path=os.path.join(self.root, e["path"]),
            captions=parse_captions(e["cap"], ValueError),
            is_image=bool(c.is_image[local]), height=int(c.height[local]), width=int(c.width[local]),
            num_frames=int(c.num_frames[local]), fps=float(c.fps[local]),
            aesthetic=None if aes is None else float(aes),
            motion=None if e.get("motion") is None else float(e["motion"]),
            camera=e.get("camera"), cut=cut_of(c, local), crop=crop_of(c, local))


class Metadata:
    """Concatenation of metadata sources with one global row index. `columns` is None when the sources read
    their records on demand (`load_metadata(..., on_demand=True)`)."""

    def __init__(self, sources: list[Any]) -> None:
        if not sources:
            raise MetadataError("no metadata sources given")
        self._sources = sources
        self._offsets = np.cumsum([0] + [len(s) for s in sources])
        loaded = all(hasattr(s, "columns") for s in sources)
        self.columns: ShapeColumns | None = _concat_columns([s.columns for s in sources]) if loaded else None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def record(self, index: int) -> SampleRecord:
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        s = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._sources[s].record(index - int(self._offsets[s]), index)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self._sources]


def load_metadata(paths: list[str] | str, data_root: str = "", on_demand: bool = False) -> Metadata:
    """Load `data.txt` (lines `root,annotation.json`), annotation `.json` or `.parquet` files, in order.
    `on_demand`: Parquet files read nothing per row at start-up (every field is read with its row group when a
    record is asked for; the shapes then come from a planned bucket index); JSON files are held in memory."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    sources: list[Any] = []
    for p in paths:
        p = str(p)
        if p.endswith(".parquet"):
            from megatron_video.data.metadata_parquet import ParquetSource

            sources.append(ParquetSource(p, data_root, load_columns=not on_demand))
        elif p.endswith(".json"):
            sources.append(_JsonSource(data_root, p))
        else:
            sources.extend(_JsonSource(root, ann) for root, ann in read_data_txt(p))
    return Metadata(sources)


def read_data_txt(path: str) -> list[tuple[str, str]]:
    """Parse an Open-Sora Plan `data.txt`; relative annotation paths resolve against the file's folder."""
    out = []
    base = Path(path).resolve().parent
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MetadataError(f"{path}: cannot read data list: {e}") from e
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        root, sep, ann = line.rpartition(",")
        if not sep:
            raise MetadataError(f"{path}: line {n}: expected 'root,annotation.json', got {line!r}")
        out.append((str(base / root.strip()), str(base / ann.strip())))
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_captions(cap: Any, fail: Any) -> tuple[str, ...]:
    if isinstance(cap, str):
        return (cap,)
    if isinstance(cap, (list, tuple)) and cap and all(isinstance(c, str) for c in cap):
        return tuple(cap)
    raise fail("missing field 'cap' (a string or a non-empty list of strings)")


def cut_of(c: ShapeColumns, i: int) -> tuple[int, int] | None:
    return None if c.cut_start[i] < 0 else (int(c.cut_start[i]), int(c.cut_end[i]))


def crop_of(c: ShapeColumns, i: int) -> tuple[int, int, int, int] | None:
    return None if c.crop[i, 0] < 0 else tuple(int(v) for v in c.crop[i])  # type: ignore[return-value]

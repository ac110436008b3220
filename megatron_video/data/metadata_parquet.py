"""Parquet metadata (the scalable form): numeric columns read eagerly into numpy, strings on demand.

Columns: path, cap (list<string> or string), height, width, num_frames, fps, is_image, aes, motion, camera,
cut_start, cut_end, crop_x0, crop_x1, crop_y0, crop_y1 (the optional ones nullable).
`tools/convert_metadata.py` writes it with small row groups so reading one record stays cheap.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np

from megatron_video.data.metadata import (
    FLOAT_COLUMNS,
    NUMERIC_COLUMNS,
    STRING_COLUMNS,
    MetadataError,
    SampleRecord,
    ShapeColumns,
    crop_of,
    cut_of,
    is_image_path,
    parse_captions,
    validate_columns,
)


class ParquetSource:
    """A Parquet metadata file: numeric columns read eagerly, strings one row group at a time (LRU)."""

    def __init__(self, path: str, root: str, cache_row_groups: int = 4, load_columns: bool = True) -> None:
        import pyarrow.parquet as pq

        self.name, self.root, self._path = path, root, path
        try:
            self._file = pq.ParquetFile(path)
        except OSError as e:
            raise MetadataError(f"{path}: cannot read Parquet metadata: {e}") from e
        names = set(self._file.schema_arrow.names)
        missing = {"path", "cap", "height", "width"} - names
        if missing:
            raise MetadataError(f"{path}: missing required column(s) {sorted(missing)}")
        self._names = names
        self._rg_starts = np.cumsum([0] + [self._file.metadata.row_group(i).num_rows
                                          for i in range(self._file.num_row_groups)])
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._cache_size = cache_row_groups
        if load_columns:  # False: only `read_columns` of some row groups (offline planning)
            self.columns = self._columns()

    def __getstate__(self) -> dict[str, Any]:  # ParquetFile handles are reopened in worker processes
        state = dict(self.__dict__)
        state["_file"], state["_cache"] = None, OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import pyarrow.parquet as pq

        self.__dict__.update(state)
        self._file = pq.ParquetFile(self._path)

    def _columns(self) -> ShapeColumns:
        cols = self.read_columns()
        validate_columns(cols, self.name)
        self._check_required_strings()
        return cols

    def read_columns(self, row_groups: list[int] | None = None, first_row: int = 0) -> ShapeColumns:
        """Numeric columns of `row_groups` (default all) streamed in batches into preallocated arrays (peak ~
        final arrays + 1 batch); not validated. `first_row`: the file row of the first one (for messages)."""
        md = self._file.metadata
        row_groups = list(range(md.num_row_groups)) if row_groups is None else row_groups
        n = sum(md.row_group(rg).num_rows for rg in row_groups)
        names = ("height", "width", "num_frames", "cut_start", "cut_end")
        ints = {k: np.full(n, -1, np.int32) for k in names}
        fps = np.zeros(n, np.float64)
        crop = np.full((n, 4), -1, np.int32)
        is_image = np.zeros(n, bool)
        wanted = [c for c in NUMERIC_COLUMNS + ("is_image",) if c in self._names]
        if "is_image" not in self._names:
            wanted.append("path")  # derive the media type from the file extension
        lo = 0
        for groups in self._row_group_chunks(1 << 20, row_groups):
            batch = self._file.read_row_groups(groups, columns=wanted, use_threads=True)
            hi = lo + batch.num_rows
            for name in wanted:
                arr = batch.column(name)
                if name in ("height", "width") and arr.null_count:
                    row = first_row + lo + int(np.flatnonzero(np.asarray(arr.is_null()))[0])
                    raise MetadataError(f"{self.name}: row {row}: missing field '{name}'")
                if name == "path":
                    is_image[lo:hi] = [is_image_path(p or "") for p in arr.to_pylist()]
                elif name == "is_image":
                    is_image[lo:hi] = arr.fill_null(False).to_numpy()
                elif name == "fps":
                    fps[lo:hi] = arr.fill_null(0.0).to_numpy()
                elif name.startswith("crop_"):
                    crop[lo:hi, ("x0", "x1", "y0", "y1").index(name[5:])] = arr.fill_null(-1).to_numpy()
                else:
                    ints[name][lo:hi] = arr.fill_null(-1).to_numpy()
            lo = hi
        ints["num_frames"][is_image] = 1
        return ShapeColumns(is_image, ints["height"], ints["width"], ints["num_frames"], fps,
                            ints["cut_start"], ints["cut_end"], crop)

    def _check_required_strings(self) -> None:
        """Null path/cap entries are found from the row-group statistics (no string data read at start-up);
        empty strings/lists can only be seen when a record is read."""
        md = self._file.metadata
        for name in ("path", "cap"):
            for rg in range(md.num_row_groups):
                rgm = md.row_group(rg)
                cols = [rgm.column(k) for k in range(rgm.num_columns)
                        if rgm.column(k).path_in_schema.split(".")[0] == name]
                stats = [c.statistics for c in cols]
                if all(st is not None and st.has_null_count and st.null_count == 0 for st in stats):
                    continue
                column = self._file.read_row_group(rg, columns=[name]).column(name)
                if column.null_count:
                    row = int(self._rg_starts[rg]) + int(np.flatnonzero(np.asarray(column.is_null()))[0])
                    raise MetadataError(f"{self.name}: row {row}: missing field '{name}'")

    def _row_group_chunks(self, rows: int, row_groups: list[int]) -> list[list[int]]:
        """Consecutive row groups in chunks of about `rows` rows (bounded memory, few large reads)."""
        chunks: list[list[int]] = [[]]
        count = 0
        for rg in row_groups:
            if count >= rows:
                chunks.append([])
                count = 0
            chunks[-1].append(rg)
            count += self._file.metadata.row_group(rg).num_rows
        return [c for c in chunks if c]

    def _row_group(self, rg: int) -> Any:
        if rg in self._cache:
            self._cache.move_to_end(rg)
            return self._cache[rg]
        cols = [c for c in STRING_COLUMNS + FLOAT_COLUMNS if c in self._names]
        data = self._file.read_row_group(rg, columns=cols, use_threads=False)
        self._cache[rg] = data
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return data

    def record(self, local: int, index: int) -> SampleRecord:
        rg = int(np.searchsorted(self._rg_starts, local, side="right")) - 1
        data, j, c = self._row_group(rg), local - int(self._rg_starts[rg]), self.columns

        def get(name: str) -> Any:
            return data.column(name)[j].as_py() if name in data.column_names else None

        path = get("path")
        if not isinstance(path, str) or not path:
            raise MetadataError(f"{self.name}: row {local}: missing field 'path'")
        caps = parse_captions(get("cap"), lambda m: MetadataError(f"{self.name}: row {local}: {m}"))
        return SampleRecord(
            index=index, path=os.path.join(self.root, path), captions=caps, is_image=bool(c.is_image[local]),
            height=int(c.height[local]), width=int(c.width[local]), num_frames=int(c.num_frames[local]),
            fps=0.0 if c.is_image[local] else float(c.fps[local]),
            aesthetic=get("aes"), motion=get("motion"), camera=get("camera"),
            cut=cut_of(c, local), crop=crop_of(c, local))

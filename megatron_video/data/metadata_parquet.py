"""Parquet metadata (the scalable form): numeric columns read eagerly into numpy and strings on demand, or
(`load_columns=False`, with a planned bucket index) every field on demand, one cached row group at a time.

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
from megatron_video.data.parquet_footer import FooterError, FooterLayout, RowGroupFile


class RowGroupCache:
    """Some columns of a Parquet file read one row group at a time, the last `size` kept (LRU), so a random
    row costs one row group's read and memory never holds the whole file. `file`: a `pyarrow.parquet.ParquetFile`
    or a `RowGroupFile` (whose row-group starts may be memory-mapped: nothing per row group in private memory)."""

    def __init__(self, file: Any, size: int) -> None:
        self.file, self.size = file, size
        if isinstance(file, RowGroupFile):
            self.starts = file.layout.starts
        else:
            md = file.metadata
            self.starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self._tables: OrderedDict[tuple[int, tuple[str, ...]], Any] = OrderedDict()

    def locate(self, row: int) -> tuple[int, int]:
        """(row group, offset in it) of a file row."""
        rg = int(np.searchsorted(self.starts, row, side="right")) - 1
        return rg, row - int(self.starts[rg])

    def get(self, rg: int, columns: tuple[str, ...], convert: Any = None) -> Any:
        """`columns` of row group `rg` (as `convert(table, first row)` when given, cached converted)."""
        if (rg, columns) in self._tables:
            self._tables.move_to_end((rg, columns))
            return self._tables[rg, columns]
        table = self.file.read_row_group(rg, columns=list(columns), use_threads=False)
        value = table if convert is None else convert(table, int(self.starts[rg]))
        self._tables[rg, columns] = value
        if len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return value


class ParquetSource:
    """A Parquet metadata file: numeric columns read eagerly (`load_columns`) or not at all at start-up; the
    rest one row group at a time (LRU of `cache_row_groups`). With a `layout` (a planned bucket index's
    `FooterLayout`) the footer is never decoded whole: each row group is read through its own slice of it."""

    def __init__(self, path: str, root: str, cache_row_groups: int = 4, load_columns: bool = True,
                 layout: FooterLayout | None = None) -> None:
        if layout is not None and load_columns:
            raise ValueError("a footer layout serves on-demand reads (load_columns=False) only")
        self.name, self.root, self._path, self._layout = path, root, path, layout
        self._file = self._open_file()
        names = set(self._file.schema_names() if layout is not None else self._file.schema_arrow.names)
        missing = {"path", "cap", "height", "width"} - names
        if missing:
            raise MetadataError(f"{path}: missing required column(s) {sorted(missing)}")
        self._names, self._cache_size = names, cache_row_groups
        self._rows = RowGroupCache(self._file, cache_row_groups)
        self._rg_starts = self._rows.starts
        if load_columns:  # False: records read on demand, a row group at a time (or planning's `read_columns`)
            self.columns = self._columns()

    def __getstate__(self) -> dict[str, Any]:  # ParquetFile handles are reopened in worker processes
        state = dict(self.__dict__)
        state["_file"] = state["_rows"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._file = self._open_file()
        self._rows = RowGroupCache(self._file, self._cache_size)

    def _open_file(self) -> Any:
        import pyarrow.parquet as pq

        try:
            if self._layout is not None:
                return RowGroupFile(self._path, self._layout)
            return pq.ParquetFile(self._path)
        except (OSError, FooterError) as e:
            raise MetadataError(f"{self._path}: cannot read Parquet metadata: {e}") from e

    def _columns(self) -> ShapeColumns:
        cols = self.read_columns()
        validate_columns(cols, self.name)
        self._check_required_strings()
        return cols

    def __len__(self) -> int:
        return int(self._rg_starts[-1])

    def _numeric_names(self) -> list[str]:
        wanted = [c for c in NUMERIC_COLUMNS + ("is_image",) if c in self._names]
        if "is_image" not in self._names:
            wanted.append("path")  # derive the media type from the file extension
        return wanted

    def read_columns(self, row_groups: list[int] | None = None, first_row: int = 0) -> ShapeColumns:
        """Numeric columns of `row_groups` (default all) streamed in batches into preallocated arrays (peak ~
        final arrays + 1 batch); not validated. `first_row`: the file row of the first one (for messages)."""
        starts = self._rg_starts
        row_groups = list(range(len(starts) - 1)) if row_groups is None else row_groups
        n = sum(int(starts[rg + 1] - starts[rg]) for rg in row_groups)
        out = ShapeColumns(np.zeros(n, bool), *(np.full(n, -1, np.int32) for _ in range(3)), np.zeros(n, np.float64),
                           np.full(n, -1, np.int32), np.full(n, -1, np.int32), np.full((n, 4), -1, np.int32))
        lo = 0
        for groups in self._row_group_chunks(1 << 20, row_groups):
            batch = self._read_row_groups(groups, self._numeric_names())
            part = self._batch_columns(batch, first_row + lo)
            for dst, src in zip(out, part):
                dst[lo:lo + len(src)] = src
            lo += batch.num_rows
        return out

    def _read_row_groups(self, groups: list[int], columns: list[str]) -> Any:
        if isinstance(self._file, RowGroupFile):  # one footer slice per row group
            import pyarrow as pa

            return pa.concat_tables([self._file.read_row_group(rg, columns) for rg in groups])
        return self._file.read_row_groups(groups, columns=columns, use_threads=True)

    def _batch_columns(self, batch: Any, first_row: int) -> ShapeColumns:
        """The numeric columns of a table read from this file (absent optional values as -1 / 0.0)."""
        n = batch.num_rows
        ints = {k: np.full(n, -1, np.int32) for k in ("height", "width", "num_frames", "cut_start", "cut_end")}
        fps, crop, is_image = np.zeros(n, np.float64), np.full((n, 4), -1, np.int32), np.zeros(n, bool)
        for name in self._numeric_names():
            arr = batch.column(name)
            if name in ("height", "width") and arr.null_count:
                row = first_row + int(np.flatnonzero(np.asarray(arr.is_null()))[0])
                raise MetadataError(f"{self.name}: row {row}: missing field '{name}'")
            if name == "path":
                is_image[:] = [is_image_path(p or "") for p in arr.to_pylist()]
            elif name == "is_image":
                is_image[:] = arr.fill_null(False).to_numpy()
            elif name == "fps":
                fps[:] = arr.fill_null(0.0).to_numpy()
            elif name.startswith("crop_"):
                crop[:, ("x0", "x1", "y0", "y1").index(name[5:])] = arr.fill_null(-1).to_numpy()
            else:
                ints[name][:] = arr.fill_null(-1).to_numpy()
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
            count += int(self._rg_starts[rg + 1] - self._rg_starts[rg])
        return [c for c in chunks if c]

    def _row_group(self, rg: int) -> tuple[Any, ShapeColumns | None]:
        """(string/float columns, numeric columns) of one row group, cached. The numeric columns come from the
        row group itself (checked as `_columns` checks all rows) when they were not loaded at start-up."""
        cols = tuple(c for c in STRING_COLUMNS + FLOAT_COLUMNS if c in self._names)
        if hasattr(self, "columns"):
            return self._rows.get(rg, cols), None
        cols += tuple(c for c in self._numeric_names() if c not in cols)
        return self._rows.get(rg, cols, self._checked_row_group)

    def _checked_row_group(self, table: Any, first_row: int) -> tuple[Any, ShapeColumns]:
        numeric = self._batch_columns(table, first_row)
        validate_columns(numeric, self.name, first_row)
        return table, numeric

    def record(self, local: int, index: int) -> SampleRecord:
        if not 0 <= local < len(self):
            raise IndexError(f"{self.name}: row {local} out of range [0, {len(self)})")
        rg, j = self._rows.locate(local)
        data, numeric = self._row_group(rg)
        c, k = (self.columns, local) if numeric is None else (numeric, j)

        def get(name: str) -> Any:
            return data.column(name)[j].as_py() if name in data.column_names else None

        path = get("path")
        if not isinstance(path, str) or not path:
            raise MetadataError(f"{self.name}: row {local}: missing field 'path'")
        caps = parse_captions(get("cap"), lambda m: MetadataError(f"{self.name}: row {local}: {m}"))
        return SampleRecord(
            index=index, path=os.path.join(self.root, path), captions=caps, is_image=bool(c.is_image[k]),
            height=int(c.height[k]), width=int(c.width[k]), num_frames=int(c.num_frames[k]),
            fps=0.0 if c.is_image[k] else float(c.fps[k]),
            aesthetic=get("aes"), motion=get("motion"), camera=get("camera"),
            cut=cut_of(c, k), crop=crop_of(c, k))

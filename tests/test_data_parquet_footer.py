"""Row groups read through a one-row-group slice of the Parquet footer (`parquet_footer`) equal pyarrow's own
reads of the whole file, and what the reader keeps does not grow with the row groups.

Contract relied on: `pyarrow.parquet.ParquetFile(source, metadata=FileMetaData)` uses the given metadata instead
of reading the footer (pyarrow/parquet/core.py, `ParquetFile.__init__`: "metadata: Use existing metadata object,
rather than reading from file"); the column chunk offsets in a RowGroup struct are absolute file offsets
(apache/parquet-format src/thrift/parquet.thrift, `ColumnMetaData.data_page_offset`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_video.data.parquet_footer import FooterError, FooterLayout, RowGroupFile, footer_layout


def write(path: Path, rows: int, row_group: int) -> Path:
    """Strings, lists of strings, nulls, numbers and booleans, with statistics and key-value metadata."""
    rng = np.random.default_rng(0)
    table = pa.table({
        "path": [f"clip_{i:06d}.mp4" if i % 7 else None for i in range(rows)],
        "cap": [[f"caption {i}", "second"][: 1 + i % 2] for i in range(rows)],
        "height": pa.array(rng.integers(100, 2000, rows), pa.int32()),
        "fps": pa.array(np.full(rows, 24.0), mask=np.arange(rows) % 3 == 0),
        "is_image": pa.array(np.arange(rows) % 5 == 0),
    }).replace_schema_metadata({"origin": "test"})
    pq.write_table(table, path, row_group_size=row_group)
    return path


@pytest.mark.parametrize("rows, row_group", [(40, 2), (9, 4), (5, 8)])  # 20 (long list header), 3, 1 groups
def test_row_groups_read_through_the_layout_equal_pyarrow(tmp_path: Path, rows: int, row_group: int) -> None:
    path = write(tmp_path / "m.parquet", rows, row_group)
    whole = pq.ParquetFile(path)
    layout = footer_layout(path)
    sizes = [whole.metadata.row_group(i).num_rows for i in range(whole.metadata.num_row_groups)]
    np.testing.assert_array_equal(layout.starts, np.cumsum([0] + sizes))
    reader = RowGroupFile(path, layout)
    assert reader.schema_names() == whole.schema_arrow.names
    for rg in range(layout.num_row_groups):
        assert reader.read_row_group(rg).equals(whole.read_row_group(rg))
        assert reader.read_row_group(rg, ["cap", "height"]).equals(whole.read_row_group(rg, ["cap", "height"]))
        md = reader.metadata(rg)
        assert md.num_row_groups == 1 and md.num_rows == sizes[rg]
        assert md.row_group(0).column(0).statistics == whole.metadata.row_group(rg).column(0).statistics
    assert reader.metadata(0).metadata == whole.metadata.metadata  # key-value metadata (arrow schema) kept
    with pytest.raises(IndexError, match="out of range"):
        reader.read_row_group(layout.num_row_groups)


def test_the_reader_keeps_nothing_per_row_group(tmp_path: Path) -> None:
    """Structural bound: the reader's own state (footer head and tail) is the same for 2 and for 200 row groups;
    the per-row-group arrays are the caller's memory map, pickled as their path."""
    held = {}
    for groups in (2, 200):
        path = write(tmp_path / f"m{groups}.parquet", groups * 3, 3)
        layout = footer_layout(path)
        np.save(tmp_path / f"m{groups}.npy", np.stack([layout.bounds, layout.starts]))
        rows = np.load(tmp_path / f"m{groups}.npy", mmap_mode="r")
        mapped = FooterLayout(layout.footer_offset, layout.footer_length, layout.head_length, rows[0], rows[1],
                              str(tmp_path / f"m{groups}.npy"))
        reader = RowGroupFile(path, mapped)
        held[groups] = sum(len(v) for _, _, v in reader._head + reader._tail)
        again = pickle.loads(pickle.dumps(reader))
        assert isinstance(again.layout.starts, np.memmap) and len(pickle.dumps(reader)) < 2000
        assert again.read_row_group(groups - 1).equals(pq.ParquetFile(path).read_row_group(groups - 1))
    assert held[2] == held[200]


def test_not_a_plain_parquet_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(FooterError, match=f"{bad}: not a plain Parquet file"):
        footer_layout(bad)
    path = write(tmp_path / "m.parquet", 9, 4)
    layout = footer_layout(path)
    with open(path, "ab") as f:  # the file changed (grew) since its layout was taken
        f.write(b"x")
    with pytest.raises(FooterError, match="not a plain Parquet file|footer moved"):
        RowGroupFile(path, layout)

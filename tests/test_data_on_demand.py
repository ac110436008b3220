"""Records read on demand over a planned bucket index (issue 21 item 3): the dataset built from the index and
Parquet metadata yields the samples of the in-memory path, start-up reads no row of the metadata, and a record
costs only its own row group (pyarrow's `ParquetFile.read_row_group`, spied on here)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from megatron_video.data.bucket_index import BucketCodes, plan_bucket_index
from megatron_video.data.config import DataConfig
from megatron_video.data.dataset import VideoDataset
from megatron_video.data.parquet_footer import RowGroupFile
from megatron_video.data.sampler import ShapeBatchSampler
from tests.data_fixtures import fresh_dataset_dir, sample_dataset_dir, tiny_config  # noqa: F401
from tests.test_data_bucket_index import ROWS, fresh_copy, metadata  # noqa: F401

ROW_GROUP = 4096  # bench_data.write_synthetic_parquet's row groups (convert.PARQUET_ROW_GROUP)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """Every row data read of any Parquet file: ("group", rg) per read_row_group (of the file, or through the
    index's footer layout: `RowGroupFile`), ("groups", rgs), ("read", 0); and ("footer", path) whenever a file's
    whole footer is decoded (a `ParquetFile` opened on a path without a one-row-group `metadata=`)."""
    log: list[tuple[str, object]] = []
    one, many, whole = pq.ParquetFile.read_row_group, pq.ParquetFile.read_row_groups, pq.ParquetFile.read
    init, through_layout, inner = pq.ParquetFile.__init__, RowGroupFile.read_row_group, []

    def parquet_file(self, source, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if k.get("metadata") is None and isinstance(source, (str, Path)):  # (one-row-group footers: in memory)
            log.append(("footer", str(source)))
        return init(self, source, *a, **k)

    def layout_read(self, rg, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        log.append(("group", rg))
        inner.append(rg)  # the one-row-group file read inside is this same read
        try:
            return through_layout(self, rg, *a, **k)
        finally:
            inner.pop()

    def read_row_group(self, i, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not inner:
            log.append(("group", i))
        return one(self, i, *a, **k)

    def read_row_groups(self, groups, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        log.append(("groups", tuple(groups)))
        return many(self, groups, *a, **k)

    def read(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        log.append(("read", 0))
        return whole(self, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", read_row_groups)
    monkeypatch.setattr(pq.ParquetFile, "read", read)
    monkeypatch.setattr(pq.ParquetFile, "__init__", parquet_file)
    monkeypatch.setattr(RowGroupFile, "read_row_group", layout_read)
    return log


def parquet_with_small_row_groups(data_dir: Path, out: Path, rows_per_group: int = 4) -> Path:
    from megatron_video.data.convert import json_to_parquet

    json_to_parquet([str(data_dir / "data.txt")], out, "")
    pq.write_table(pq.read_table(out), out, row_group_size=rows_per_group)  # several row groups
    return out


def test_samples_match_the_in_memory_path(fresh_dataset_dir: Path, tmp_path: Path,  # noqa: F811
                                          reads: list) -> None:
    (fresh_dataset_dir / "videos/clip_001.mp4").write_bytes(b"junk")  # replaced from its bucket on both paths
    meta = parquet_with_small_row_groups(fresh_dataset_dir, tmp_path / "meta.parquet")
    config = tiny_config(fresh_dataset_dir, metadata_paths=[str(meta)])
    plan_bucket_index(str(meta), config.shape)
    reads.clear()
    lazy = VideoDataset.from_index(config)
    assert reads == [] and lazy.metadata.columns is None  # start-up read no row
    eager = VideoDataset.from_config(config)
    sampler = ShapeBatchSampler(lazy.sampler_keys, 2, 1, seed=5)
    assert sampler.fingerprint() == ShapeBatchSampler(eager.shape_keys, 2, 1, seed=5).fingerprint()
    ids = [i for mb in list(sampler)[:6] for i in mb] + [1]
    expected = [(eager[(i, 3)], eager.metadata.record(i)) for i in ids]
    reads.clear()
    for i, (b, rec) in zip(ids, expected):
        a = lazy[(i, 3)]
        assert lazy.metadata.record(i) == rec
        assert (a["sample_id"], a["caption"], a["shape"]) == (b["sample_id"], b["caption"], b["shape"])
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
    replacement = lazy[(1, 0)]["sample_id"]
    touched = {i // 4 for i in ids} | {replacement // 4}
    assert {g for _, g in reads} <= touched and {kind for kind, _ in reads} == {"group"}
    assert replacement == eager[(1, 0)]["sample_id"] != 1  # the same replacement from the index's bucket
    assert lazy.bad_sample_count() == eager.bad_sample_count() == 1


def test_start_up_reads_nothing_per_row_and_records_cost_their_row_group(metadata: Path, tmp_path: Path,  # noqa: F811
                                                                        reads: list) -> None:
    meta = fresh_copy(metadata, tmp_path)
    config = DataConfig.from_dict({"metadata_paths": [str(meta)]})
    plan_bucket_index(str(meta), config.shape)
    reads.clear()
    lazy = VideoDataset.from_index(config)
    assert reads == [] and len(lazy) == ROWS  # no row read, and no footer decoded whole
    assert isinstance(lazy.metadata._sources[0]._rg_starts, np.memmap)  # row-group starts: the index's map
    eager = VideoDataset.from_config(config)
    keys = np.array([lazy._keys[i] for i in range(ROWS)])
    np.testing.assert_array_equal(keys, eager.shape_keys)
    reads.clear()
    ids = [5, 4095, 17, 8999, 8200, 3, 9]  # row groups 0, 0, 0, 2, 2, 0, 0
    expected = [eager.metadata.record(i) for i in ids]
    reads.clear()
    assert [lazy.metadata.record(i) for i in ids] == expected
    assert reads == [("group", 0), ("group", 2)]  # each touched row group once (LRU), row group 1 never,
    # each through its own slice of the footer (the whole footer grows with the rows and is never decoded)
    # a DataLoader worker (spawn) gets the index's path, not a copy of its arrays, and maps the same file
    codes = pickle.loads(pickle.dumps(lazy._keys))
    assert isinstance(codes, BucketCodes) and len(pickle.dumps(lazy._keys)) < 2000
    assert [codes[i] for i in ids] == [int(eager.shape_keys[i]) for i in ids]
    members = pickle.loads(pickle.dumps(lazy.bucket_members))
    assert isinstance(members.members, np.memmap) and len(pickle.dumps(lazy.bucket_members)) < 4000
    np.testing.assert_array_equal(members.members, lazy.bucket_members.members)
    worker = pickle.loads(pickle.dumps(lazy.metadata))
    assert worker.record(8999) == eager.metadata.record(8999)
    with pytest.raises(ValueError, match="needs a planned bucket index"):
        VideoDataset(lazy.metadata, config)

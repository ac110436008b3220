"""Planned bucket index (tools/plan_buckets.py): same buckets and sampler order as planning in memory, refused
when it belongs to other settings or metadata or is truncated (one clear message naming the file, exit 2)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_video.data.bucket_index import (
    EXCLUDED,
    BucketIndexError,
    index_paths,
    load_bucket_index,
    open_bucket_index,
    plan_bucket_index,
)
from megatron_video.data.config import DataConfig, ShapeConfig
from megatron_video.data.metadata_parquet import ParquetSource
from megatron_video.data.sampler import BucketMembers, ShapeBatchSampler
from megatron_video.data.shapes import plan_shapes
from tests.data_fixtures import REPO, load_tool, sample_dataset_dir, tiny_config  # noqa: F401

ROWS = 9000  # three Parquet row groups of 4096 rows (the last one partial)


@pytest.fixture(scope="module")
def metadata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "bench" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    path = tmp_path_factory.mktemp("meta") / "meta.parquet"
    bench.write_synthetic_parquet(path, ROWS)
    return path


def fresh_copy(metadata: Path, tmp_path: Path) -> Path:
    out = tmp_path / "meta.parquet"
    out.write_bytes(metadata.read_bytes())
    return out


def test_index_matches_planning_in_memory(metadata: Path, tmp_path: Path) -> None:
    meta, cfg = fresh_copy(metadata, tmp_path), ShapeConfig()
    head = plan_bucket_index(str(meta), cfg, rows_per_task=5000)  # tasks span row groups unevenly
    keys = plan_shapes(ParquetSource(str(meta), "").columns, cfg).keys
    codes = np.load(index_paths(meta)[1]).astype(np.int64)
    table = np.array(head["bucket_keys"] + [-1], np.int64)
    np.testing.assert_array_equal(table[np.where(codes == EXCLUDED, -1, codes)], keys)
    got, ref = load_bucket_index(str(meta), cfg), BucketMembers.from_keys(keys)
    assert isinstance(got.members, np.memmap)
    np.testing.assert_array_equal(got.bucket_keys, ref.bucket_keys)
    np.testing.assert_array_equal(got.bucket_sizes, ref.bucket_sizes)
    np.testing.assert_array_equal(got.members, ref.members)
    assert got.digest == ref.digest and got.num_rows == ROWS
    # the sampler built from the memory map is the one built from the keys (same order, same fingerprint)
    a, b = ShapeBatchSampler(got, 16, 2, 1, 2, seed=3), ShapeBatchSampler(keys, 16, 2, 1, 2, seed=3)
    assert a.fingerprint() == b.fingerprint()
    assert [mb for mb in a][:50] == [mb for mb in b][:50]
    # several planning processes write the same index
    before = [p.read_bytes() for p in index_paths(meta)[1:]]
    plan_bucket_index(str(meta), cfg, workers=2, rows_per_task=4096)
    assert [p.read_bytes() for p in index_paths(meta)[1:]] == before


def test_mismatches_are_refused_naming_the_file(metadata: Path, tmp_path: Path) -> None:
    meta, cfg = fresh_copy(metadata, tmp_path), ShapeConfig()
    head_path, codes_path, members_path, layout_path = index_paths(meta)
    with pytest.raises(BucketIndexError, match=f"{head_path}: bucket index header not found"):
        load_bucket_index(str(meta), cfg)
    plan_bucket_index(str(meta), cfg)
    with pytest.raises(BucketIndexError, match=f"{head_path}: planned with other shape settings .*max_tokens"):
        load_bucket_index(str(meta), ShapeConfig(max_tokens=4096))
    good = codes_path.read_bytes()
    codes_path.write_bytes(good[:-10])
    with pytest.raises(BucketIndexError, match=f"{codes_path}: unreadable or truncated"):
        load_bucket_index(str(meta), cfg)
    codes_path.write_bytes(good)
    members_path.write_bytes(members_path.read_bytes()[:-4])
    with pytest.raises(BucketIndexError, match=f"{members_path}: unreadable or truncated"):
        load_bucket_index(str(meta), cfg)
    plan_bucket_index(str(meta), cfg)
    layout_path.write_bytes(layout_path.read_bytes()[:-8])
    with pytest.raises(BucketIndexError, match=f"{layout_path}: unreadable or truncated"):
        open_bucket_index(str(meta), cfg)
    plan_bucket_index(str(meta), cfg)
    header = json.loads(head_path.read_text())
    head_path.write_text(json.dumps({**header, "version": 1}))  # an index from before the footer layout
    with pytest.raises(BucketIndexError, match=f"{head_path}: index version 1, expected 2; re-plan"):
        load_bucket_index(str(meta), cfg)
    plan_bucket_index(str(meta), cfg)
    load_bucket_index(str(meta), cfg)
    st = os.stat(meta)
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the metadata file was rewritten since
    with pytest.raises(BucketIndexError, match=f"{head_path}: written for other or older metadata .*mtime_ns"):
        load_bucket_index(str(meta), cfg)
    # an index copied next to other metadata
    other = tmp_path / "other" / "meta.parquet"
    other.parent.mkdir()
    data = bytearray(meta.read_bytes())
    data[-9] ^= 1  # one byte of the footer differs
    other.write_bytes(bytes(data))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    for src, dst in zip(index_paths(meta), index_paths(other)):
        dst.write_bytes(src.read_bytes())
    with pytest.raises(BucketIndexError, match="footer_blake2b"):
        load_bucket_index(str(other), cfg)


def test_preflight_and_tool_refuse_a_stale_index(metadata: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    from megatron_video.training.preflight import PreflightError, check_metadata

    meta = fresh_copy(metadata, tmp_path)
    config_path = tmp_path / "data.json"
    config_path.write_text(json.dumps({"metadata_paths": [str(meta)], "shape": {"max_tokens": 16384}}))
    tool = load_tool("plan_buckets")
    assert tool.main(["--metadata", str(meta), "--data-config", str(config_path)]) == 0
    config = DataConfig.from_dict(json.loads(config_path.read_text()))
    check_metadata(config)  # the index matches
    config.shape.max_tokens = 65536
    with pytest.raises(PreflightError, match=f"{index_paths(meta)[0]}: planned with other shape settings"):
        check_metadata(config)
    config.shape.max_tokens = 16384
    layout = index_paths(meta)[3]
    good = layout.read_bytes()
    layout.write_bytes(good[:-8])  # a truncated index file
    with pytest.raises(PreflightError, match=f"{layout}: unreadable or truncated"):
        check_metadata(config)
    layout.write_bytes(good)
    check_metadata(config)
    st = os.stat(meta)
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the metadata changed since planning
    with pytest.raises(PreflightError, match=f"{index_paths(meta)[0]}: written for other or older metadata"):
        check_metadata(config)
    assert tool.main(["--metadata", str(tmp_path / "missing.parquet"), "--data-config", str(config_path)]) == 2
    assert "not an existing .parquet metadata file" in capsys.readouterr().err
    # the index is read (and checked) only beside one Parquet file: training plans two files in memory
    from megatron_video.data.bucket_index import planned_metadata

    assert planned_metadata([str(meta)]) == str(meta)
    assert planned_metadata([str(meta), str(metadata)]) is None and planned_metadata([str(metadata)]) is None
    check_metadata(DataConfig.from_dict({"metadata_paths": [str(meta), str(metadata)], "shape": {}}))


def test_training_sampler_reads_the_planned_index(sample_dataset_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """build_data takes the bucket membership from the index next to Parquet metadata, with the order and
    resume fingerprint of planning in memory, and its dataset reads records on demand."""
    import argparse

    from megatron_video.data.convert import json_to_parquet
    from megatron_video.training.data import build_data

    meta = tmp_path / "meta.parquet"
    json_to_parquet([str(sample_dataset_dir / "data.txt")], meta, "")
    config = tiny_config(sample_dataset_dir, metadata_paths=[str(meta)])
    args = argparse.Namespace(global_batch_size=2, micro_batch_size=1)
    in_memory = build_data(args, config, 0, 1).sampler
    plan_bucket_index(str(meta), config.shape)
    planned_data = build_data(args, config, 0, 1)
    planned = planned_data.sampler
    assert isinstance(planned._members, np.memmap) and not isinstance(in_memory._members, np.memmap)
    assert planned_data.dataset.metadata.columns is None  # the dataset reads its records on demand
    assert planned.fingerprint() == in_memory.fingerprint()
    assert list(planned) == list(in_memory)

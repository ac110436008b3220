"""Feature cache: builder (stub encoders), resumable shards, rank split, cache dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megatron_video.data import build_sampler
from megatron_video.data.cache import INDEX_ARRAYS, FeatureCacheDataset, read_index
from megatron_video.data.cache_builder import build_cache, merge_index, stub_encoders
from megatron_video.data.dataset import VideoDataset
from megatron_video.data.shapes import decode_key
from tests.data_fixtures import fresh_dataset_dir, load_tool, sample_dataset_dir, tiny_config  # noqa: F401


def test_build_resume_and_read(sample_dataset_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = tiny_config(sample_dataset_dir)
    ds = VideoDataset.from_config(cfg)
    venc, tenc = stub_encoders()
    out = tmp_path / "cache"
    # two "ranks" build disjoint shards; the index appears only when all are done
    r1 = build_cache(ds, out, venc, tenc, shard_size=5, rank=1, world_size=2, dtype=torch.float32)
    assert not merge_index(out)
    r0 = build_cache(ds, out, venc, tenc, shard_size=5, rank=0, world_size=2, dtype=torch.float32)
    n_kept = int((ds.shape_keys >= 0).sum())
    assert r0.samples + r1.samples == n_kept and r0.shards_done + r1.shards_done == -(-n_kept // 5)
    assert merge_index(out)
    # resume: a finished shard is skipped, a lost one is rebuilt
    (out / "shard_000001.parquet").unlink()
    again = build_cache(ds, out, venc, tenc, shard_size=5, rank=0, world_size=1, dtype=torch.float32)
    assert again.shards_done == 1 and again.shards_skipped == r0.shards_done + r1.shards_done - 1
    with pytest.raises(ValueError, match="shard_size"):
        build_cache(ds, out, venc, tenc, shard_size=7, dtype=torch.float32)

    cache = FeatureCacheDataset(out, cfg)
    assert not any(f._tables for f in cache._captions._files)  # no caption read at start-up: on demand
    np.testing.assert_array_equal(cache.shape_keys, ds.shape_keys)  # same buckets as the decoding set
    sid = int(np.flatnonzero(ds.shape_keys >= 0)[3])
    item = cache[(sid, 0)]
    with torch.no_grad():
        expect = venc(ds.load(sid, 0)["video"][None])[0]
    torch.testing.assert_close(item["latent"], expect)
    t, h, w = decode_key(ds.shape_keys[sid])
    assert item["shape"] == (t, h, w) and item["latent"].shape[-2:] == (h // 8, w // 8)
    assert item["t5_hidden"].shape == (16, 16) and item["t5_mask"].dtype == torch.bool
    if item["caption"]:
        hidden, mask, pooled = tenc([item["caption"]])
        torch.testing.assert_close(item["t5_hidden"], hidden[0])
        torch.testing.assert_close(item["t5_mask"], mask[0])
        torch.testing.assert_close(item["clip_pooled"], pooled[0])
    # CFG dropout uses the cached embedding of "", with the decoding dataset's per-(id, epoch) draw
    for e in range(3):
        assert cache[(sid, e)]["caption"] == ds[(sid, e)]["caption"]
    for e in range(40):
        c = cache[(sid, e)]
        if c["caption"] == "":
            hidden, mask, _ = tenc([""])
            torch.testing.assert_close(c["t5_hidden"], hidden[0])
            assert int(c["t5_mask"].sum()) == int(mask[0].sum())
            break
    else:
        pytest.fail("no caption dropped in 40 epochs at cfg_dropout 0.1")
    # DataConfig.cache_path selects the cache dataset
    from megatron_video.data import build_dataset

    cached_cfg = tiny_config(sample_dataset_dir, cache_path=str(out))
    assert isinstance(build_dataset(cached_cfg), FeatureCacheDataset)
    assert isinstance(build_dataset(cfg), VideoDataset)
    # the sampler runs on the cache's keys unchanged
    sampler = build_sampler(cache.shape_keys, cfg)
    batch = next(iter(sampler))
    assert len({cache[(i, 0)]["shape"] for i in batch}) == 1
    check_mapped_index_arrays(out, cfg, cache)


def check_mapped_index_arrays(out: Path, cfg: Any, cache: FeatureCacheDataset) -> None:
    """A merged cache's per-sample arrays are memory maps (nothing per sample in private memory), pickle as
    their files, equal what an older cache without them computes in memory, and are refused when damaged."""
    import pickle

    from megatron_video.data.parquet_footer import RowGroupFile

    arrays = (cache.shape_keys, cache._shard, cache._row)
    assert all(isinstance(a, np.memmap) for a in arrays)
    assert isinstance(cache._captions._files[0].file, RowGroupFile)  # index.parquet's footer never decoded whole
    state = cache.__getstate__()  # a spawned DataLoader worker maps the files, no copy
    assert [state[k][0] for k in ("shape_keys", "_shard", "_row")] == ["memmap"] * 3 and state["buckets"] is None
    again = pickle.loads(pickle.dumps(cache))
    assert all(isinstance(getattr(again, k), np.memmap) for k in ("shape_keys", "_shard", "_row"))
    assert again[(2, 0)]["caption"] == cache[(2, 0)]["caption"]
    saved = {out / f"{name}.npy": (out / f"{name}.npy").read_bytes() for name in INDEX_ARRAYS}
    assert len(saved) == 3
    for p in saved:  # an older cache, merged before the arrays: read in memory, same values
        p.unlink()
    older = FeatureCacheDataset(out, cfg)
    assert not isinstance(older.shape_keys, np.memmap)
    for mine, theirs in zip(arrays, (older.shape_keys, older._shard, older._row)):
        np.testing.assert_array_equal(mine, theirs)
    for p, data in saved.items():
        p.write_bytes(data)
    damaged = out / "index_rows.npy"
    damaged.write_bytes(saved[damaged][:-8])
    with pytest.raises(ValueError, match=f"{damaged}: unreadable or truncated feature cache array"):
        FeatureCacheDataset(out, cfg)
    from megatron_video.training.preflight import PreflightError, check_metadata

    with pytest.raises(PreflightError, match=f"{damaged}: unreadable or truncated"):  # before any process group
        check_metadata(tiny_config(out.parent, cache_path=str(out), metadata_paths=cfg.metadata_paths))
    damaged.write_bytes(saved[damaged])
    head = out / "index_rowgroups.json"
    good = head.read_text()
    head.write_text(json.dumps({**json.loads(good), "offset": 1}))  # a layout of another index.parquet
    with pytest.raises(ValueError, match=f"{out / 'index_rowgroups.npy'}: unreadable or stale footer layout"):
        FeatureCacheDataset(out, cfg)
    head.write_text(good)


def test_bad_samples_marked_and_damaged_shard_replaced(fresh_dataset_dir: Path,  # noqa: F811
                                                        tmp_path: Path) -> None:
    (fresh_dataset_dir / "videos/clip_001.mp4").write_bytes(b"junk")
    cfg = tiny_config(fresh_dataset_dir)
    ds = VideoDataset.from_config(cfg)
    venc, tenc = stub_encoders()
    out = tmp_path / "cache"
    report = build_cache(ds, out, venc, None, shard_size=4)
    assert report.bad_samples == 1
    idx = read_index(out)
    assert not idx["ok"][list(idx["sample_id"]).index(1)]
    cache = FeatureCacheDataset(out, cfg)
    assert cache.shape_keys[1] == -1 and "t5_hidden" not in cache[(0, 0)]
    # a damaged shard file: its samples are replaced by same-shape samples from other shards
    (out / "shard_000000.safetensors").write_bytes(b"\x00" * 16)
    fresh = FeatureCacheDataset(out, cfg)
    in_shard0 = [i for i in range(len(fresh)) if fresh.shape_keys[i] >= 0 and fresh._shard[i] == 0]
    movable = [i for i in in_shard0
               if ((fresh.shape_keys == fresh.shape_keys[i]) & (fresh._shard != 0)).any()]
    assert movable, "sample data set should give shard 0 a bucket shared with other shards"
    item = fresh[(movable[0], 0)]
    assert item["sample_id"] != movable[0] and item["shape"] == decode_key(fresh.shape_keys[movable[0]])
    assert fresh.bad_sample_count() >= 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["latents"] and not meta["text"]


def test_cli_with_stub_encoders(sample_dataset_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg_path = tmp_path / "data.json"
    cfg_path.write_text(json.dumps(tiny_config(sample_dataset_dir).to_dict()))
    tool = load_tool("cache_features")
    args = ["--data-config", str(cfg_path), "--out", str(tmp_path / "c"), "--shard-size", "8",
            "--what", "text"]
    assert tool.main(args) == 0
    assert (tmp_path / "c" / "index.parquet").exists()
    assert FeatureCacheDataset(tmp_path / "c", tiny_config(sample_dataset_dir))[(2, 0)]["t5_hidden"].ndim == 2

"""Decoding the sample data set at planned shapes; bad files skipped, counted, replaced, bounded."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_video.data import build_dataloader, build_sampler
from megatron_video.data.dataset import TooManyBadSamplesError, VideoDataset
from megatron_video.data.decode import DecodeError, decode_image, decode_video
from megatron_video.data.shapes import decode_key
from tests.data_fixtures import fresh_dataset_dir, sample_dataset_dir, tiny_config  # noqa: F401


def test_samples_have_planned_shape_and_range(sample_dataset_dir: Path) -> None:  # noqa: F811
    ds = VideoDataset.from_config(tiny_config(sample_dataset_dir))
    kept = np.flatnonzero(ds.shape_keys >= 0)
    assert len(kept) >= 20
    seen_t = set()
    for i in kept.tolist():
        s = ds[(i, 0)]
        t, h, w = decode_key(ds.shape_keys[i])
        assert s["shape"] == (t, h, w) and s["video"].shape == (3, t, h, w) and s["sample_id"] == i
        assert s["video"].dtype == torch.float32
        assert -1.0 <= float(s["video"].min()) and float(s["video"].max()) <= 1.0
        assert float(s["video"].std()) > 0.05  # real content, not a constant
        assert (t - 1) % 8 == 0
        seen_t.add(t)
        assert isinstance(s["caption"], str)
    assert {1, 9, 17} <= seen_t
    # same (id, epoch) -> identical sample (resume, TP/CP peers); another epoch may crop differently
    other = VideoDataset.from_config(tiny_config(sample_dataset_dir))
    a, b = ds[(0, 3)], other[(0, 3)]
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]


def _gray_video(path: Path, n: int, fps: int) -> None:
    import av
    import av.video.frame as avf

    with av.open(str(path), mode="w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
        st.options = {"preset": "ultrafast", "qp": "0", "g": "10"}
        for i in range(n):
            frame = np.full((32, 32, 3), 4 * i, np.uint8)
            for p in st.encode(avf.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)


def test_decode_picks_the_requested_frames(tmp_path: Path) -> None:
    path = tmp_path / "gray.mp4"
    _gray_video(path, 60, 24)
    for idx in ([0, 3, 6, 9], [50, 53, 56, 59]):  # the second one seeks (start > 2 s * fps)
        frames = decode_video(str(path), np.array(idx))
        assert frames.shape == (4, 32, 32, 3)
        np.testing.assert_allclose(frames[:, 16, 16, 0], 4 * np.array(idx), atol=3)
    with pytest.raises(DecodeError, match="truncated"):
        decode_video(str(path), np.array([58, 59, 60]))


def _damage(data_dir: Path) -> dict[str, int]:
    """Break three videos and one image in different ways; returns name -> sample id."""
    (data_dir / "videos/clip_000.mp4").unlink()  # missing
    raw = (data_dir / "videos/clip_006.mp4").read_bytes()
    (data_dir / "videos/clip_006.mp4").write_bytes(raw[: len(raw) // 3])  # truncated
    (data_dir / "videos/clip_007.mp4").write_bytes(b"\x00not a video" * 50)  # undecodable
    (data_dir / "images/image_003.jpg").write_bytes(b"\xff\xd8\xff broken")
    return {"missing": 0, "truncated": 6, "garbage": 7, "image": 19}


def test_bad_files_skipped_counted_and_replaced(fresh_dataset_dir: Path) -> None:  # noqa: F811
    bad = _damage(fresh_dataset_dir)
    ds = VideoDataset.from_config(tiny_config(fresh_dataset_dir))
    for name, sid in bad.items():
        s = ds[(sid, 0)]
        assert ds.bad_samples.known_bad(sid), name  # counted when first met (maybe as another's replacement)
        assert s["requested_id"] == sid and s["sample_id"] != sid
        assert s["shape"] == decode_key(ds.shape_keys[sid]) and s["video"].shape[1:] == s["shape"]
        assert s["sample_id"] not in bad.values()
        again = VideoDataset.from_config(tiny_config(fresh_dataset_dir))[(sid, 0)]
        assert again["sample_id"] == s["sample_id"]  # deterministic replacement (same on every peer)
    assert ds.bad_sample_count() == len(bad)
    with pytest.raises(DecodeError):
        ds.load(bad["truncated"], 0)


def test_bad_sample_bound_stops_with_clear_error(fresh_dataset_dir: Path) -> None:  # noqa: F811
    bad = _damage(fresh_dataset_dir)
    ds = VideoDataset.from_config(tiny_config(fresh_dataset_dir, max_bad_samples=2))
    with pytest.raises(TooManyBadSamplesError, match="max_bad_samples=2"):
        for sid in bad.values():
            ds[(sid, 0)]
    assert ds.bad_sample_count() == 3


def test_bad_sample_bound_counts_distinct_samples_and_never_rereads(fresh_dataset_dir: Path) -> None:  # noqa: F811
    """Issue 20 item 11: 6 bad files stopped a job at step 66 with "101 unreadable samples": every epoch read
    and counted them again. A bad file is now read once per rank and counts once against the bound."""
    bad = _damage(fresh_dataset_dir)
    ds = VideoDataset.from_config(tiny_config(fresh_dataset_dir, max_bad_samples=len(bad)))
    reads: Counter[int] = Counter()
    load = ds.load

    def counting_load(sid: int, epoch: int) -> dict:
        reads[sid] += 1
        return load(sid, epoch)

    ds.load = counting_load  # the instance attribute shadows the method
    for epoch in range(5):
        for sid in bad.values():
            assert ds[(sid, epoch)]["sample_id"] not in bad.values()
    assert ds.bad_sample_count() == len(bad)
    assert {sid: reads[sid] for sid in bad.values()} == {sid: 1 for sid in bad.values()}


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_share_the_bad_count(fresh_dataset_dir: Path, context: str) -> None:  # noqa: F811
    bad = _damage(fresh_dataset_dir)
    cfg = tiny_config(fresh_dataset_dir, shape={"use_images": False})
    ds = VideoDataset.from_config(cfg)
    sampler = build_sampler(ds.shape_keys, cfg)
    loader = build_dataloader(ds, sampler, num_workers=2, multiprocessing_context=context)
    seen = []
    for batch in loader:
        assert batch["video"].shape[2:] == batch["shape"]
        assert batch["video"].shape[0] == cfg.batch.micro_batch_size
        seen += batch["requested_id"].tolist()
    expected_bad = len(set(seen) & set(bad.values()))
    assert expected_bad >= 1
    assert ds.bad_sample_count() >= expected_bad  # counted in worker processes, visible here
    assert sampler.epoch == 1


def test_image_decode_errors(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(str(tmp_path / "x.png"))
    with pytest.raises(DecodeError):
        decode_image(str(tmp_path / "missing.png"))


def test_cover_geometry_and_backend_resize_agree(sample_dataset_dir: Path) -> None:  # noqa: F811
    from megatron_video.data.decode import cover_geometry, resize_cover

    assert cover_geometry(144, 256, None, (72, 128)) == (72, 128, 0, 0)
    assert cover_geometry(144, 256, None, (64, 64)) == (64, 114, 0, 25)  # cover, centre crop
    assert cover_geometry(100, 200, (100, 200, 0, 100), (50, 50)) == (50, 100, 0, 50)  # right half
    with pytest.raises(DecodeError, match="does not fit"):
        cover_geometry(100, 200, (0, 300, 0, 100), (50, 50))
    video = sample_dataset_dir / "videos/clip_003.mp4"  # 192 x 256
    idx = np.array([0, 2, 4])
    for size, crop in [((48, 64), None), ((64, 64), (4, 100, 2, 90)), ((96, 96), None)]:
        fast = decode_video(str(video), idx, size, crop).astype(np.float32)
        ref = resize_cover(decode_video(str(video), idx), size, crop).astype(np.float32)
        assert fast.shape == ref.shape == (3, *size, 3)
        assert np.abs(fast - ref).mean() < 6.0, (size, crop)  # same geometry, different filters
    img = sample_dataset_dir / "images/image_000.png"
    fast = decode_image(str(img), (40, 40), (10, 90, 5, 85)).astype(np.float32)
    ref = resize_cover(decode_image(str(img)), (40, 40), (10, 90, 5, 85)).astype(np.float32)
    assert np.abs(fast - ref).mean() < 6.0

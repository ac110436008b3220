"""Min-Max token sizes, frame planning, forced resolution, and DataConfig validation."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_video.data.config import DataConfig, ShapeConfig
from megatron_video.data.metadata import SampleRecord, ShapeColumns
from megatron_video.data.shapes import (
    decode_key,
    default_min_tokens,
    frame_indices,
    minmax_size,
    minmax_sizes,
    plan_shapes,
)


def cols(rows: list[dict]) -> ShapeColumns:
    n = len(rows)

    def arr(name: str, default: float, dtype: type) -> np.ndarray:
        return np.array([r.get(name, default) for r in rows], dtype)

    return ShapeColumns(arr("img", False, bool), arr("h", 0, np.int32), arr("w", 0, np.int32),
                        arr("n", 1, np.int32), arr("fps", 0.0, np.float64), arr("cs", -1, np.int32),
                        arr("ce", -1, np.int32), np.array([r.get("crop", [-1] * 4) for r in rows], np.int32)
                        .reshape(n, 4))


def test_minmax_worked_example() -> None:
    # DESIGN §9: m = 65536 -> sizes per ratio, smallest 36864 = 144 x 256
    sizes = dict(zip([(1, 1), (3, 4), (4, 3), (9, 16), (16, 9)],
                     minmax_sizes([(1, 1), (3, 4), (4, 3), (9, 16), (16, 9)], 65536, 16)))
    assert sizes[(1, 1)] == (256, 256)
    assert sizes[(9, 16)] == (144, 256) and sizes[(16, 9)] == (256, 144)
    assert sizes[(3, 4)] == (192, 256)
    assert min(h * w for h, w in sizes.values()) == 36864
    assert default_min_tokens(ShapeConfig(max_tokens=65536)) == 36864
    for h, w in sizes.values():
        assert h * w <= 65536 and h % 16 == 0 and w % 16 == 0


def test_minmax_formula_matches_floor_sqrt() -> None:
    for m in (4096, 36864, 65536, 147456, 589824):
        for rh, rw in [(1, 1), (3, 4), (9, 16)]:
            k = int(np.floor(np.sqrt(m / (rh * rw * 256))))
            assert minmax_size((rh, rw), m, 16) == (rh * k * 16, rw * k * 16)


def test_plan_minmax_aspect_snap_and_min_tokens() -> None:
    cfg = ShapeConfig(max_tokens=65536, num_frames=121, min_num_frames=1, fps=24)
    plan = plan_shapes(cols([
        {"h": 720, "w": 1280, "n": 200, "fps": 24},  # 16:9 -> 144 x 256
        {"h": 1080, "w": 1080, "img": True},  # 1:1 image -> 256 x 256, T = 1
        {"h": 600, "w": 800, "n": 50, "fps": 24},  # 3:4 -> 192 x 256
        {"h": 100, "w": 100, "n": 50, "fps": 24},  # area 10000 < 36864 -> dropped
        {"h": 720, "w": 1280, "n": 50, "fps": 24, "crop": [0, 720, 0, 720]},  # crop makes it square
    ]), cfg)
    assert decode_key(plan.keys[0]) == (121, 144, 256)
    assert decode_key(plan.keys[1]) == (1, 256, 256)
    assert decode_key(plan.keys[2]) == (49, 192, 256)
    assert plan.keys[3] == -1 and plan.drop_summary() == {"too_small": 1}
    assert decode_key(plan.keys[4])[1:] == (256, 256)


def test_plan_frames_resample_snap_buckets_and_forced() -> None:
    rows = [{"h": 288, "w": 512, "n": 100, "fps": 48},  # step 2 -> 50 frames -> 49
            {"h": 288, "w": 512, "n": 100, "fps": 12},  # low fps: step 1 -> 100 -> 97
            {"h": 288, "w": 512, "n": 300, "fps": 24, "cs": 10, "ce": 40},  # cut -> 30 -> 25
            {"h": 288, "w": 512, "n": 12, "fps": 24}]  # 12 -> 9 < min 17: dropped
    cfg = ShapeConfig(resolution_mode="forced", height=64, width=96, num_frames=121, min_num_frames=17,
                      fps=24)
    plan = plan_shapes(cols(rows), cfg)
    assert [decode_key(k)[0] if k >= 0 else -1 for k in plan.keys] == [49, 97, 25, -1]
    assert all(decode_key(k)[1:] == (64, 96) for k in plan.keys if k >= 0)
    cfg.temporal_buckets = [17, 33, 65]
    plan = plan_shapes(cols(rows), cfg)
    assert [decode_key(k)[0] if k >= 0 else -1 for k in plan.keys] == [33, 65, 17, -1]
    cfg.frame_stride, cfg.temporal_buckets = 4, None
    assert decode_key(plan_shapes(cols(rows), cfg).keys[0])[0] == 49  # 50 -> 4n+1 = 49


def test_frame_indices_resample_to_training_fps() -> None:
    cfg = ShapeConfig(fps=12)
    rec = SampleRecord(0, "x.mp4", ("c",), False, 64, 64, num_frames=100, fps=24.0, cut=(10, 90))
    idx = frame_indices(rec, 17, cfg, None)
    assert len(idx) == 17 and np.all(np.diff(idx) == 2)
    assert idx[0] >= 10 and idx[-1] < 90
    rng_idx = [frame_indices(rec, 17, cfg, np.random.default_rng(s)) for s in range(20)]
    assert len({int(i[0]) for i in rng_idx}) > 3  # random temporal crops differ
    assert all(i[0] >= 10 and i[-1] < 90 for i in rng_idx)


def test_config_validate_names_field() -> None:
    DataConfig().validate()
    bad = [({"shape": {"num_frames": 120}}, "shape.num_frames"),
           ({"caption": {"cfg_dropout": 1.5}}, "caption.cfg_dropout"),
           ({"batch": {"global_batch_size": 6, "micro_batch_size": 4}}, "batch.global_batch_size"),
           ({"shape": {"resolution_mode": "forced", "height": 100}}, "shape.height"),
           ({"shape": {"temporal_buckets": [16]}}, "shape.temporal_buckets"),
           ({"max_bad_samples": -1}, "max_bad_samples")]
    for raw, field in bad:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            DataConfig.from_dict(raw).validate()
    with pytest.raises(ValueError, match=r"shape\.bogus"):
        DataConfig.from_dict({"shape": {"bogus": 1}})
    cfg = DataConfig.from_dict({"shape": {"aspect_ratios": [[1, 1], [9, 16]]}, "seed": 7})
    assert cfg.shape.aspect_ratios == [(1, 1), (9, 16)] and cfg.seed == 7
    assert DataConfig.from_dict(cfg.to_dict()) == cfg

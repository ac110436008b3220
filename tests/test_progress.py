"""Long offline work shows a progress bar with an ETA (tqdm on stderr): sample-data making, feature-cache
building, checkpoint conversion; the cache summary says how many samples were filtered and why."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from megatron_video.data.cache_builder import build_cache, stub_encoders
from megatron_video.data.dataset import VideoDataset
from tests.data_fixtures import fresh_dataset_dir, sample_dataset_dir, tiny_config  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
# tqdm's bar: "desc: 100%|####| n/n [elapsed<remaining, rate]" (the ETA is the "remaining" part)
BAR = r"{desc}: +100%\|[^|]*\| {n}/{n} \[\d\d:\d\d<\d\d:\d\d"


def test_sample_data_tool_shows_progress(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_sample_dataset.py"), "--out", str(tmp_path),
                           "--num-videos", "2", "--num-images", "1"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert re.search(BAR.format(desc="sample videos", n=2), proc.stderr), proc.stderr
    assert re.search(BAR.format(desc="sample images", n=1), proc.stderr), proc.stderr
    assert "sample videos" not in proc.stdout  # results on stdout, progress on stderr


def test_cache_progress_and_filter_summary(fresh_dataset_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    # one video made too short for the shape rules (metadata), one made unreadable (file)
    annotations = fresh_dataset_dir / "video_annotations.json"
    entries = json.loads(annotations.read_text())
    entries[0]["num_frames"] = 3
    annotations.write_text(json.dumps(entries))
    (fresh_dataset_dir / entries[1]["path"]).write_bytes(b"not a video")
    dataset = VideoDataset.from_config(tiny_config(fresh_dataset_dir))
    expected = dataset.plan.drop_summary()
    assert expected.get("too_few_frames", 0) >= 1
    report = build_cache(dataset, tmp_path / "cache", *stub_encoders(), shard_size=8, dtype=torch.float32)
    kept = int((dataset.shape_keys >= 0).sum())
    assert re.search(BAR.format(desc="cache rank 0", n=kept), capsys.readouterr().err)
    assert report.filtered == expected and report.bad_reasons == {"DecodeError": 1}
    summary = report.summary()
    filtered = ", ".join(f"{k}: {v}" for k, v in sorted(expected.items()))
    assert summary == (f"{kept - 1} samples cached; {sum(expected.values())} filtered by the shape rules "
                       f"({filtered}); 1 unreadable (DecodeError: 1)")


def test_conversion_shows_progress(tmp_path: Path, capsys) -> None:
    from checkpoints_convert.cli import main
    from checkpoints_convert.schema import released_schema
    from checkpoints_convert.synthetic import write_random_released
    from megatron_video.models.suv_mmdit import suv_config

    cfg = suv_config("tiny")
    write_random_released(tmp_path / "src.safetensors", cfg)
    tensors = sum(s is not None for s in released_schema(cfg, True).values())
    assert main(["import", str(tmp_path / "src.safetensors"), str(tmp_path / "ckpt"), "--preset", "tiny"]) == 0
    assert re.search(BAR.format(desc="import", n=tensors), capsys.readouterr().err)
    assert main(["export", str(tmp_path / "ckpt"), "--safetensors", str(tmp_path / "out.safetensors"),
                 "--preset", "tiny"]) == 0
    assert re.search(BAR.format(desc="export out.safetensors", n=tensors), capsys.readouterr().err)

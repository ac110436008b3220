"""Shared data-pipeline fixtures: a small real data set made by tools/make_sample_dataset.py (once per
session) and a tiny DataConfig that decodes it at small shapes."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest

from megatron_video.data.config import DataConfig

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def make_sample_dataset(out: Path, num_videos: int = 16, num_images: int = 6, seed: int = 0) -> Path:
    load_tool("make_sample_dataset").make(out, num_videos, num_images, seed)
    return out


@pytest.fixture(scope="session")
def sample_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only shared copy; tests that damage files use `fresh_dataset_dir`."""
    out = tmp_path_factory.getbasetemp() / "osp_sample_data"
    if not (out / "data.txt").exists():
        make_sample_dataset(out)
    return out


@pytest.fixture
def fresh_dataset_dir(sample_dataset_dir: Path, tmp_path: Path) -> Path:
    """A private copy (data.txt rewritten to point at it)."""
    out = tmp_path / "data"
    shutil.copytree(sample_dataset_dir, out)
    text = (out / "data.txt").read_text().replace(str(sample_dataset_dir.resolve()), str(out.resolve()))
    (out / "data.txt").write_text(text)
    return out


def tiny_config(data_dir: Path, **overrides: Any) -> DataConfig:
    """Min-Max buckets at a 64 x 64 pixel budget, stride 4, up to 17 frames at 8 fps."""
    raw: dict[str, Any] = {
        "metadata_paths": [str(data_dir / "data.txt")],
        "shape": {"max_tokens": 4096, "spatial_stride": 4, "num_frames": 17, "min_num_frames": 9, "fps": 8},
        "batch": {"global_batch_size": 2, "micro_batch_size": 1},
        "num_workers": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return DataConfig.from_dict(raw).validate()

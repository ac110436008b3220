"""Data pipeline: metadata, decoding, Min-Max token shapes, shape-safe sampler, captions, feature cache."""

from collections.abc import Iterable

import numpy as np

from megatron_video.data.cache import FeatureCacheDataset
from megatron_video.data.cache_builder import build_cache
from megatron_video.data.config import BatchConfig, CaptionConfig, DataConfig, ShapeConfig
from megatron_video.data.dataset import TooManyBadSamplesError, VideoDataset, global_bad_sample_count
from megatron_video.data.decode import DecodeError
from megatron_video.data.loader import build_dataloader, collate_samples
from megatron_video.data.metadata import Metadata, MetadataError, load_metadata
from megatron_video.data.sampler import ShapeBatchSampler
from megatron_video.data.shapes import ShapePlan, plan_shapes

__all__ = [
    "BatchConfig", "CaptionConfig", "DataConfig", "DecodeError", "FeatureCacheDataset", "Metadata",
    "MetadataError", "ShapeBatchSampler", "ShapeConfig", "ShapePlan", "TooManyBadSamplesError",
    "VideoDataset", "build_cache", "build_dataloader", "build_dataset", "build_sampler", "collate_samples",
    "global_bad_sample_count", "load_metadata", "plan_shapes",
]


def build_dataset(config: DataConfig) -> VideoDataset | FeatureCacheDataset:
    """The feature-cache dataset when `config.cache_path` is set, else the decoding dataset."""
    config.validate()
    if config.cache_path:
        return FeatureCacheDataset(config.cache_path, config)
    return VideoDataset.from_config(config)


def build_sampler(keys: np.ndarray, config: DataConfig, dp_rank: int = 0, dp_size: int = 1,
                  skip_ids: Iterable[int] | None = None) -> ShapeBatchSampler:
    """The batch sampler for a dataset's `shape_keys` with the batch settings of `config`."""
    b = config.batch
    return ShapeBatchSampler(keys, b.global_batch_size, b.micro_batch_size, dp_rank, dp_size, config.seed,
                             b.min_bucket_batches, b.drop_last, skip_ids)

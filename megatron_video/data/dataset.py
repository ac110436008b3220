"""Map-style dataset of decoded clips at their planned shape, with bad-file skipping."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_video.data.captions import build_caption
from megatron_video.data.config import DataConfig
from megatron_video.data.decode import DecodeError, decode_image, decode_video, to_tensor
from megatron_video.data.metadata import Metadata, MetadataError, load_metadata
from megatron_video.data.sampler import BucketMembers
from megatron_video.data.shapes import ShapePlan, decode_key, frame_indices, plan_shapes

if TYPE_CHECKING:
    from megatron_video.data.bucket_index import BucketCodes

logger = logging.getLogger(__name__)

MAX_REPLACEMENT_ATTEMPTS = 32


class TooManyBadSamplesError(RuntimeError):
    """More unreadable samples than `DataConfig.max_bad_samples` on one rank."""


class SampleIndex:
    """Resolves a dataset item: an int, or (sample id, epoch[, sampler position]) from `build_dataloader`."""

    @staticmethod
    def split(item: int | tuple[int, ...], default_epoch: int) -> tuple[int, int]:
        if isinstance(item, tuple):
            return int(item[0]), int(item[1])
        return int(item), default_epoch

    @staticmethod
    def position(item: int | tuple[int, ...]) -> tuple[int, int] | None:
        return (int(item[1]), int(item[2])) if isinstance(item, tuple) and len(item) == 3 else None


class BadSampleTracker:
    """Distinct unreadable samples of one rank, shared by its DataLoader worker processes (fork or spawn).

    A shared-memory byte per sample remembers the known-bad ones (never read again: `read_with_replacement`
    goes straight to the replacement) and a shared counter with one slot per process (main = slot 0, worker
    w = slot w + 1) counts each sample once: every process only writes its own slot, so there is no lost update
    without a lock. The bound is on distinct samples, not on reads: a bad file met every epoch counts once.

    Per rank, not global: each data-parallel rank learns its bad samples from the samples it is handed, so a
    file met by two DP ranks is read (and counted, in `global_bad_sample_count`) once on each, and
    `max_bad_samples` bounds each rank. Model-parallel peers of a replica read the same samples in the same
    order and reach the same replacements whether a peer re-reads a bad file or already knows it.
    """

    SLOTS = 256

    def __init__(self, limit: int, num_samples: int) -> None:
        self.limit = limit
        self._counts = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()
        # UntypedStorage._new_shared (torch/storage.py) maps a new shared-memory file sized with ftruncate
        # (aten/src/ATen/MapAllocator.cpp): it reads as zeros and only the pages a bad sample touches become
        # resident (measured: a 1 GiB one adds 4 KiB of RssShmem), unlike zeros().share_memory_(), which writes
        # every page (1 byte a row at start-up).
        storage = torch.UntypedStorage._new_shared(max(num_samples, 1))
        self._known = torch.empty(0, dtype=torch.uint8).set_(storage)[:num_samples]

    def known_bad(self, sample_id: int) -> bool:
        return bool(self._known[sample_id])

    def record(self, sample_id: int, error: Exception) -> int:
        if self._known[sample_id]:  # another worker of this rank met it at the same time: counted there
            return self.count
        self._known[sample_id] = 1
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else (info.id + 1) % self.SLOTS
        self._counts[slot] += 1
        count = self.count
        logger.warning("bad sample %d skipped (%d distinct so far on this rank): %s", sample_id, count, error)
        if count > self.limit:
            raise TooManyBadSamplesError(
                f"{count} distinct unreadable samples on this rank exceed max_bad_samples={self.limit}; last: sample "
                f"{sample_id}: {error}. Check the data set (missing/truncated/corrupt files) or raise the "
                "bound.")
        return count

    @property
    def count(self) -> int:
        return int(self._counts.sum())


class ShapeBuckets:
    """Members of each shape key, built on first use (only needed when replacing a bad sample), or taken from a
    planned bucket index (`BucketMembers`: rows ascending in each bucket, as here, so replacements agree)."""

    def __init__(self, keys: np.ndarray | BucketMembers) -> None:
        self._keys = keys
        self._order: np.ndarray | None = None

    def members(self, key: int) -> np.ndarray:
        if isinstance(self._keys, BucketMembers):
            b = int(np.searchsorted(self._keys.bucket_keys, key))
            if b == len(self._keys.bucket_keys) or self._keys.bucket_keys[b] != key:
                return self._keys.members[:0]
            start = int(self._keys.bucket_sizes[:b].sum())
            return self._keys.members[start:start + int(self._keys.bucket_sizes[b])]
        if self._order is None:
            self._order = np.argsort(self._keys, kind="stable")
            self._sorted = self._keys[self._order]
        lo, hi = np.searchsorted(self._sorted, key, "left"), np.searchsorted(self._sorted, key, "right")
        return self._order[lo:hi]

    def replacement(self, key: int, requested: int, epoch: int, attempt: int, seed: int) -> int:
        """A deterministic other member of the bucket (same on every TP/CP peer)."""
        members = self.members(key)
        if len(members) < 2:
            raise DecodeError(f"sample {requested} is unreadable and its shape bucket has no other member")
        rng = np.random.default_rng([seed, requested, epoch, attempt, 0xBAD])
        pick = int(members[rng.integers(0, len(members) - 1)])
        return pick if pick != requested else int(members[-1])


def read_with_replacement(requested: int, epoch: int, key: int, load: Callable[[int, int], dict[str, Any]],
                          tracker: BadSampleTracker, buckets: ShapeBuckets, seed: int,
                          errors: tuple[type[Exception], ...]) -> dict[str, Any]:
    """`load(requested, epoch)`, or, if that sample is unreadable, a deterministic other member of its shape
    bucket (so the batch keeps its size and shape). Samples known to be bad are not read again."""
    current = requested
    for attempt in range(MAX_REPLACEMENT_ATTEMPTS):
        if not tracker.known_bad(current):
            try:
                return load(current, epoch)
            except errors as e:
                tracker.record(current, e)
        current = buckets.replacement(key, requested, epoch, attempt, seed)
    raise DecodeError(f"sample {requested}: {MAX_REPLACEMENT_ATTEMPTS} replacements from its bucket "
                      f"{decode_key(key)} were unreadable too")


class VideoDataset(Dataset):
    """Item -> {"video": (3, T, H, W) in [-1, 1], "caption": str, "sample_id": int, "shape": (T, H, W),
    "requested_id": int}. `sample_id` differs from `requested_id` when an unreadable sample was replaced by
    another of the same shape bucket (so the batch keeps its size and shape).

    Shapes are planned in memory from the metadata's numeric columns, or (`from_index`) taken from a planned
    bucket index (tools/plan_buckets.py) while each record is read on demand: nothing per row is loaded."""

    def __init__(self, metadata: Metadata, config: DataConfig, plan: ShapePlan | None = None,
                 index: tuple[BucketMembers, BucketCodes] | None = None) -> None:
        config.validate()
        self.metadata, self.config = metadata, config
        if index is not None:
            self.plan, (self.bucket_members, self._keys) = None, index
            self.buckets = ShapeBuckets(self.bucket_members)
        else:
            if metadata.columns is None:
                raise ValueError("metadata read on demand needs a planned bucket index (VideoDataset.from_index)")
            self.plan = plan if plan is not None else plan_shapes(metadata.columns, config.shape)
            self.bucket_members, self._keys = None, self.plan.keys
            self.buckets = ShapeBuckets(self.plan.keys)
        self.bad_samples = BadSampleTracker(config.max_bad_samples, len(metadata))
        self.epoch = 0

    @classmethod
    def from_config(cls, config: DataConfig) -> VideoDataset:
        return cls(load_metadata(config.metadata_paths, config.data_root), config)

    @classmethod
    def from_index(cls, config: DataConfig) -> VideoDataset:
        """Over one Parquet metadata file with its planned bucket index: records read on demand."""
        from megatron_video.data.bucket_index import open_bucket_index, planned_metadata
        from megatron_video.data.metadata_parquet import ParquetSource

        path = planned_metadata(config.metadata_paths)
        if path is None:
            raise ValueError(f"a planned bucket index is read beside one Parquet metadata file (tools/plan_buckets.py "
                             f"writes it); none for {config.metadata_paths}")
        members, codes, layout = open_bucket_index(path, config.shape)
        # the row groups are read through the index's footer layout: the footer is never decoded whole
        metadata = Metadata([ParquetSource(path, config.data_root, load_columns=False, layout=layout)])
        return cls(metadata, config, index=(members, codes))

    @property
    def shape_keys(self) -> np.ndarray:
        """Per-row planned keys (in-memory planning only; `sampler_keys` serves both forms)."""
        if self.plan is None:
            raise AttributeError("a dataset over a planned bucket index has no per-row key array; "
                                 "use sampler_keys")
        return self.plan.keys

    @property
    def sampler_keys(self) -> np.ndarray | BucketMembers:
        """What `ShapeBatchSampler` takes: the planned bucket index's members, or the in-memory keys."""
        return self.bucket_members if self.bucket_members is not None else self.plan.keys

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain int items (tagged items carry their own)."""
        self.epoch = epoch

    def bad_sample_count(self) -> int:
        """Unreadable samples met so far on this rank (all worker processes)."""
        return self.bad_samples.count

    def __len__(self) -> int:
        return len(self.metadata)

    def __getitem__(self, item: int | tuple[int, ...]) -> dict[str, Any]:
        requested, epoch = SampleIndex.split(item, self.epoch)
        key = int(self._keys[requested])
        if key < 0:
            raise IndexError(f"sample {requested} is excluded by shape planning; use the batch sampler")
        sample = read_with_replacement(requested, epoch, key, self.load, self.bad_samples, self.buckets,
                                       self.config.seed, (DecodeError, MetadataError))
        sample["requested_id"] = requested
        if SampleIndex.position(item) is not None:
            sample["position"] = SampleIndex.position(item)
        return sample

    def load(self, sample_id: int, epoch: int) -> dict[str, Any]:
        """Decode one sample at its planned shape (raises DecodeError / MetadataError on bad input)."""
        rec = self.metadata.record(sample_id)
        t, h, w = decode_key(self._keys[sample_id])
        if rec.is_image:
            frames = decode_image(rec.path, (h, w), rec.crop)
        else:
            rng = np.random.default_rng([self.config.seed, sample_id, epoch, 0x7C0])
            frames = decode_video(rec.path, frame_indices(rec, t, self.config.shape, rng), (h, w), rec.crop,
                                  self.config.video_backend)
        video = to_tensor(frames)
        return {"video": video, "caption": build_caption(rec, self.config.caption, self.config.seed, epoch),
                "sample_id": sample_id, "shape": (t, h, w)}


def global_bad_sample_count(local_count: int, group: Any = None) -> int:
    """Sum of per-rank bad-sample counts over `group` (all ranks when torch.distributed is up)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return int(local_count)
    t = torch.tensor([int(local_count)], dtype=torch.int64)
    torch.distributed.all_reduce(t, group=group)
    return int(t.item())

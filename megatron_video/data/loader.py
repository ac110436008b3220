"""Collation and DataLoader assembly for the shape-bucketed pipeline."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from megatron_video.data.captions import Tokenizer, tokenize_captions
from megatron_video.data.sampler import ShapeBatchSampler

_TENSOR_KEYS = ("video", "latent", "t5_hidden", "t5_mask", "clip_pooled", "structure")


def collate_samples(samples: list[dict[str, Any]], tokenizers: Mapping[str, Tokenizer] | None = None
                    ) -> dict[str, Any]:
    """Stack one micro-batch; every sample must have one shape (the sampler guarantees it)."""
    if not samples:
        raise ValueError("empty micro-batch")
    shapes = {tuple(s["shape"]) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"micro-batch mixes shapes {sorted(shapes)}; use ShapeBatchSampler")
    out: dict[str, Any] = {"shape": shapes.pop(),
                           "sample_id": torch.tensor([s["sample_id"] for s in samples], dtype=torch.int64)}
    if "position" in samples[0]:
        out["sampler_position"] = samples[0]["position"]  # (epoch, consumed) after this micro-batch
    if "requested_id" in samples[0]:
        out["requested_id"] = torch.tensor([s["requested_id"] for s in samples], dtype=torch.int64)
    for key in _TENSOR_KEYS:
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    if "caption" in samples[0]:
        out["caption"] = [s["caption"] for s in samples]
        if tokenizers:
            out.update(tokenize_captions(out["caption"], tokenizers))
    return out


class _TaggedBatches:
    """Adapts the sampler to DataLoader's batch_sampler: items become (sample id, epoch, position)."""

    def __init__(self, sampler: ShapeBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for epoch, ids, consumed in self.sampler.iter_tagged():
            yield [(i, epoch, consumed) for i in ids]

    def __len__(self) -> int:
        return len(self.sampler)


def build_dataloader(dataset: Dataset, sampler: ShapeBatchSampler, num_workers: int = 0,
                     tokenizers: Mapping[str, Tokenizer] | None = None, prefetch_factor: int = 2,
                     collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
                     multiprocessing_context: str | None = None) -> DataLoader:
    """One epoch of micro-batches per iteration of the returned loader.

    Batches carry "sampler_position"; the loader prefetches ahead of training, so checkpoint the sampler
    with `sampler.state_dict(position=batch["sampler_position"])` of the last batch trained on.
    """
    fn = collate_fn or functools.partial(collate_samples, tokenizers=tokenizers)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=True,
                      multiprocessing_context=multiprocessing_context)
    # A private generator: every random draw of the pipeline is seeded by (seed, sample, epoch), and starting an
    # iterator would otherwise take a draw from the global RNG, which the checkpoint saves (a resumed run starts
    # its loader after the restore, so its RNG state would part from the uninterrupted run's).
    return DataLoader(dataset, batch_sampler=_TaggedBatches(sampler), num_workers=num_workers, collate_fn=fn,
                      generator=torch.Generator().manual_seed(0), **kwargs)

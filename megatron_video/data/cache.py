"""Feature cache: VAE latents and text embeddings computed once, stored as safetensors shards + Parquet index.

Layout of a cache directory:
    meta.json                    settings the cache was built with (checked on resume and on read)
    empty_text.safetensors       the embeddings of "" (used for classifier-free-guidance dropout)
    shard_000000.safetensors     tensors "<sample id>/latent", and per caption variant j "<sample id>/<j>/t5"
                                 (trimmed to its valid length) and "<sample id>/<j>/clip"
    shard_000000.parquet         the shard's index rows; written last, so its presence marks the shard done
    index.parquet                all rows (written once every shard is done; readers fall back to the shards)

Shard s holds the planned samples [s*shard_size, (s+1)*shard_size) in id order, independent of the number of
ranks; rank r builds shards r::world_size, so a resumed or re-sized job redoes only unfinished shards.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_video.data.captions import choose_caption
from megatron_video.data.config import DataConfig
from megatron_video.data.dataset import BadSampleTracker, SampleIndex, ShapeBuckets, read_with_replacement
from megatron_video.data.decode import DecodeError
from megatron_video.data.encoders import sample_cached_latent
from megatron_video.data.shapes import decode_key, encode_key

logger = logging.getLogger(__name__)
CACHE_VERSION = 1


def shard_name(s: int) -> str:
    return f"shard_{s:06d}"


def read_index(cache_dir: str | os.PathLike) -> dict[str, np.ndarray | list]:
    """The cache index as columns (from index.parquet, else from every finished shard file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(cache_dir)
    if (out / "index.parquet").exists():
        table = pq.read_table(out / "index.parquet")
    else:
        parts = sorted(out.glob("shard_*.parquet"))
        if not parts:
            raise FileNotFoundError(f"{out}: no feature cache index (no shard_*.parquet / index.parquet)")
        table = pa.concat_tables([pq.read_table(p) for p in parts])
    lists = ("captions", "latent_shape")
    return {name: table.column(name).to_pylist() if name in lists
            else table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def hash_seed(*values: int) -> int:
    return int(np.random.default_rng(list(values)).integers(0, 2**62))


class FeatureCacheDataset(Dataset):
    """Reads a feature cache. Item -> {"latent" (C, t, h, w) normalised, if cached; "t5_hidden" (L, D),
    "t5_mask" (L,), "clip_pooled" (P,) if cached; "caption", "sample_id", "requested_id", "shape" (T, H, W)
    of the pixels}.

    `shape_keys` covers the original metadata ids (-1 where not cached or bad), so `ShapeBatchSampler`
    works on it unchanged; CFG dropout swaps in the cached embeddings of "" with the same per-(sample,
    epoch) draw as the decoding dataset.
    """

    def __init__(self, cache_dir: str | os.PathLike, config: DataConfig, max_open_shards: int = 8) -> None:
        config.validate()
        self.dir, self.config = Path(cache_dir), config
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.dir}: not a feature cache (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(f"{self.dir}: cache version {self.meta.get('version')} != {CACHE_VERSION}")
        idx = read_index(self.dir)
        ok = np.asarray(idx["ok"], bool)
        n = int(self.meta["num_samples"])
        self.shape_keys = np.full(n, -1, np.int64)
        sids = np.asarray(idx["sample_id"], np.int64)[ok]
        self.shape_keys[sids] = encode_key(np.asarray(idx["t"])[ok], np.asarray(idx["h"])[ok],
                                           np.asarray(idx["w"])[ok])
        self._shard = np.full(n, -1, np.int32)
        self._shard[sids] = np.asarray(idx["shard"])[ok]
        self._captions = {int(s): c for s, c, k in zip(idx["sample_id"], idx["captions"], ok) if k}
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._max_open = max_open_shards
        self._empty: dict[str, torch.Tensor] | None = None
        self.bad_samples = BadSampleTracker(config.max_bad_samples, n)
        self.buckets = ShapeBuckets(self.shape_keys)
        self.epoch = 0
        logger.info("feature cache %s: %d of %d samples cached", self.dir, int(ok.sum()), n)

    def __getstate__(self) -> dict[str, Any]:  # open safetensors handles stay in their process
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.shape_keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def bad_sample_count(self) -> int:
        return self.bad_samples.count

    def _open(self, shard: int) -> Any:
        from safetensors import SafetensorError, safe_open

        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        path = self.dir / f"{shard_name(shard)}.safetensors"
        try:
            handle = safe_open(str(path), framework="pt")
        except (OSError, SafetensorError) as e:
            raise DecodeError(f"{path}: cannot open cache shard: {e}") from e
        self._handles[shard] = handle
        if len(self._handles) > self._max_open:
            self._handles.popitem(last=False)
        return handle

    def _empty_text(self) -> dict[str, torch.Tensor]:
        if self._empty is None:
            from safetensors.torch import load_file

            self._empty = load_file(str(self.dir / "empty_text.safetensors"))
        return self._empty

    def __getitem__(self, item: int | tuple[int, ...]) -> dict[str, Any]:
        requested, epoch = SampleIndex.split(item, self.epoch)
        key = int(self.shape_keys[requested])
        if key < 0:
            raise IndexError(f"sample {requested} is not in the feature cache")
        out = read_with_replacement(requested, epoch, key, self.load, self.bad_samples, self.buckets,
                                    self.config.seed, (DecodeError, KeyError, OSError))
        out["requested_id"] = requested
        if SampleIndex.position(item) is not None:
            out["position"] = SampleIndex.position(item)
        return out

    def load(self, sid: int, epoch: int) -> dict[str, Any]:
        from safetensors import SafetensorError

        handle = self._open(int(self._shard[sid]))
        out: dict[str, Any] = {"sample_id": sid, "shape": decode_key(self.shape_keys[sid])}
        try:
            if self.meta["latents"]:
                out["latent"] = handle.get_tensor(f"{sid}/latent")
                if self.meta["latent_kind"] == "moments":  # a fresh draw per (sample, epoch), same on peers
                    gen = torch.Generator().manual_seed(hash_seed(self.config.seed, sid, epoch))
                    out["latent"] = sample_cached_latent(out["latent"], "moments", gen)
            captions = self._captions[sid]
            j = choose_caption(len(captions), self.config.caption.cfg_dropout, self.config.seed, sid, epoch)
            out["caption"] = "" if j < 0 else captions[j]
            if self.meta["text"]:
                out.update(self._text(handle, sid, j))
        except SafetensorError as e:
            raise DecodeError(f"cache shard {int(self._shard[sid])}, sample {sid}: {e}") from e
        return out

    def _text(self, handle: Any, sid: int, j: int) -> dict[str, torch.Tensor]:
        empty = self._empty_text()
        if j < 0:
            return {"t5_hidden": empty["t5"], "t5_mask": empty["t5_mask"].to(torch.bool), "clip_pooled":
                    empty["clip"]}
        hidden = handle.get_tensor(f"{sid}/{j}/t5")
        max_len = empty["t5"].shape[0]
        padded = torch.zeros((max_len, hidden.shape[1]), dtype=hidden.dtype)
        padded[:hidden.shape[0]] = hidden
        mask = torch.zeros(max_len, dtype=torch.bool)
        mask[:hidden.shape[0]] = True
        return {"t5_hidden": padded, "t5_mask": mask, "clip_pooled": handle.get_tensor(f"{sid}/{j}/clip")}

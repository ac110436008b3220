"""Feature cache: VAE latents and text embeddings computed once, stored as safetensors shards + Parquet index.

Layout of a cache directory:
    meta.json                    settings the cache was built with (checked on resume and on read)
    empty_text.safetensors       the embeddings of "" (used for classifier-free-guidance dropout)
    shard_000000.safetensors     tensors "<sample id>/latent", and per caption variant j "<sample id>/<j>/t5"
                                 (trimmed to its valid length) and "<sample id>/<j>/clip"
                                 and, when built with a structure signal, "<sample id>/structure" (the
                                 controller's input: uint8 levels (1, T, H, W) at pixel resolution)
    shard_000000.parquet         the shard's index rows; written last, so its presence marks the shard done
    index_keys.npy, index_shards.npy, index_rows.npy
                                 per metadata sample id: shape key (-1: not cached), shard, row of index.parquet
                                 (memory-mapped by readers: no per-sample array in private memory)
    index_rowgroups.npy/.json    where index.parquet's row groups lie in its footer (captions are read by row
                                 group without decoding the whole footer)
    index.parquet                all rows (written once every shard is done, after the arrays; readers fall
                                 back to the shards)

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

    table = pa.concat_tables([pq.read_table(p) for p in index_files(cache_dir)])
    lists = ("captions", "latent_shape")
    return {name: table.column(name).to_pylist() if name in lists
            else table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


NUMERIC_INDEX_COLUMNS = ("sample_id", "ok", "t", "h", "w", "shard")
INDEX_ARRAYS = {"index_keys": (np.int64, -1), "index_shards": (np.int32, -1), "index_rows": (np.int64, -1)}
INDEX_ROW_GROUP = 8192  # rows per row group of index.parquet
INDEX_LAYOUT = "index_rowgroups"  # .npy + .json: where index.parquet's row groups lie in its footer


class IndexCaptions:
    """The cached caption variants of one index row, read on demand from the index file(s) by row group (LRU),
    so opening a cache builds no Python object per row. Pickles as its paths (workers reopen the files)."""

    def __init__(self, paths: list[Path], cache_row_groups: int = 4) -> None:
        self.paths, self._size = paths, cache_row_groups
        self._open()

    def _open(self) -> None:
        import pyarrow.parquet as pq

        from megatron_video.data.metadata_parquet import RowGroupCache

        self._files = [RowGroupCache(_index_file(p) or pq.ParquetFile(p), self._size) for p in self.paths]
        self.starts = np.cumsum([0] + [int(f.starts[-1]) for f in self._files])

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "_size": self._size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def numeric_columns(self) -> dict[str, np.ndarray]:
        """The index's numeric columns of all rows, as numpy (no string data read)."""
        import pyarrow.parquet as pq

        parts = [pq.read_table(p, columns=list(NUMERIC_INDEX_COLUMNS)) for p in self.paths]
        return {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in parts])
                for c in NUMERIC_INDEX_COLUMNS}

    def __getitem__(self, row: int) -> list[str]:
        f = int(np.searchsorted(self.starts, row, side="right")) - 1
        rg, j = self._files[f].locate(row - int(self.starts[f]))
        return self._files[f].get(rg, ("captions",)).column("captions")[j].as_py()


def _index_file(path: Path) -> Any:
    """index.parquet read through its footer layout (written by merge_index: the footer, which grows with the
    row groups, is never decoded whole); None for shard files and caches merged before the layout existed."""
    from megatron_video.data.parquet_footer import FooterError, FooterLayout, RowGroupFile

    head, rows = path.with_name(f"{INDEX_LAYOUT}.json"), path.with_name(f"{INDEX_LAYOUT}.npy")
    if path.name != "index.parquet" or not head.exists():
        return None
    try:
        foot, arr = json.loads(head.read_text()), np.load(rows, mmap_mode="r")
        layout = FooterLayout(foot["offset"], foot["length"], foot["head_length"], arr[0], arr[1], str(rows))
        return RowGroupFile(path, layout)
    except (OSError, ValueError, KeyError, IndexError, FooterError) as exc:
        raise ValueError(f"{rows}: unreadable or stale footer layout of {path} ({exc}); re-run "
                         "tools/cache_features.py on the cache to re-merge its index") from exc


def index_files(cache_dir: str | os.PathLike) -> list[Path]:
    """index.parquet, else every finished shard's index file."""
    out = Path(cache_dir)
    if (out / "index.parquet").exists():
        return [out / "index.parquet"]
    parts = sorted(out.glob("shard_*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{out}: no feature cache index (no shard_*.parquet / index.parquet)")
    return parts


def open_index_arrays(cache_dir: str | os.PathLike, n: int) -> tuple[np.ndarray, ...] | None:
    """A merged index's per-sample arrays (`INDEX_ARRAYS`) as memory maps; None without a merged index.parquet,
    or (with a warning) for a cache merged before they were written. A damaged array: ValueError naming it."""
    out_dir = Path(cache_dir)
    if not (out_dir / "index.parquet").exists():
        return None
    paths = [out_dir / f"{name}.npy" for name in INDEX_ARRAYS]
    if not any(p.exists() for p in paths):
        logger.warning("feature cache %s: merged without per-sample arrays (an older cache): 20 bytes a sample "
                       "are held in memory; re-run tools/cache_features.py on it (every shard is done, so it "
                       "only re-merges the index) to memory-map them", out_dir)
        return None
    out = []
    for path, (dtype, _) in zip(paths, INDEX_ARRAYS.values()):
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable or truncated feature cache array ({exc}); re-run "
                             "tools/cache_features.py on the cache to re-merge its index") from exc
        if arr.shape != (n,) or arr.dtype != dtype:
            raise ValueError(f"{path}: holds {arr.dtype}{list(arr.shape)}, expected {np.dtype(dtype)}[{n}]; "
                             "re-run tools/cache_features.py on the cache to re-merge its index")
        out.append(arr)
    return tuple(out)


def hash_seed(*values: int) -> int:
    return int(np.random.default_rng(list(values)).integers(0, 2**62))


class FeatureCacheDataset(Dataset):
    """Reads a feature cache. Item -> {"latent" (C, t, h, w) normalised, if cached; "t5_hidden" (L, D),
    "t5_mask" (L,), "clip_pooled" (P,) if cached; "structure" (1, T, H, W) uint8 if cached; "caption",
    "sample_id", "requested_id", "shape" (T, H, W) of the pixels}.

    `shape_keys` covers the original metadata ids (-1 where not cached or bad), so `ShapeBatchSampler`
    works on it unchanged; CFG dropout swaps in the cached embeddings of "" with the same per-(sample,
    epoch) draw as the decoding dataset. Only the index's numeric columns are loaded (numpy); captions are
    read by row group when a sample is.
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
        self._captions = IndexCaptions(index_files(self.dir))
        n = int(self.meta["num_samples"])
        mapped = open_index_arrays(self.dir, n)
        if mapped is not None:  # a merged index: per-sample arrays memory-mapped (page cache, shared by ranks)
            self.shape_keys, self._shard, self._row = mapped
        else:  # shards only (a cache still being built), or merged before the arrays existed: in memory
            idx = self._captions.numeric_columns()
            ok = np.asarray(idx["ok"], bool)
            self.shape_keys = np.full(n, -1, np.int64)
            sids = np.asarray(idx["sample_id"], np.int64)[ok]
            self.shape_keys[sids] = encode_key(np.asarray(idx["t"])[ok], np.asarray(idx["h"])[ok],
                                               np.asarray(idx["w"])[ok])
            self._shard = np.full(n, -1, np.int32)
            self._shard[sids] = np.asarray(idx["shard"])[ok]
            self._row = np.full(n, -1, np.int64)  # the sample's row in the index (its captions: read on demand)
            self._row[sids] = np.flatnonzero(ok)
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._max_open = max_open_shards
        self._empty: dict[str, torch.Tensor] | None = None
        self.bad_samples = BadSampleTracker(config.max_bad_samples, n)
        self.buckets = ShapeBuckets(self.shape_keys)
        self.epoch = 0
        logger.info("feature cache %s: %d index rows for %d samples (%s)", self.dir, int(self._captions.starts[-1]), n,
                    "memory-mapped" if mapped is not None else "in memory")

    def __getstate__(self) -> dict[str, Any]:  # open safetensors handles stay in their process
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        for name in ("shape_keys", "_shard", "_row"):  # a spawned worker maps the same file, no copy
            if isinstance(state[name], np.memmap):
                state[name] = ("memmap", state[name].filename)
                state["buckets"] = None  # holds the keys too: rebuilt over the map
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in ("shape_keys", "_shard", "_row"):
            if isinstance(state[name], tuple):
                state[name] = np.load(state[name][1], mmap_mode="r")
        self.__dict__.update(state)
        if self.buckets is None:
            self.buckets = ShapeBuckets(self.shape_keys)

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
            if self.meta.get("structure"):  # uint8 levels; control/signals.py from_levels makes the input
                out["structure"] = handle.get_tensor(f"{sid}/structure")
            if self._row[sid] < 0:
                raise KeyError(f"sample {sid} is not in the feature cache index")
            captions = self._captions[int(self._row[sid])]
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

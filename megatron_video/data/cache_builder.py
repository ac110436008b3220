"""Feature-cache builder: runs a video encoder and a text encoder over a data set, shard by shard.

See `cache.py` for the on-disk layout. Encoders are plain callables (`VideoEncoderFn`, `TextEncoderFn`), so
the builder runs with the real WF-VAE / T5 + CLIP (`encoders.py`) or with `stub_encoders()` in tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from megatron_video.data.cache import (
    CACHE_VERSION,
    INDEX_ARRAYS,
    INDEX_LAYOUT,
    INDEX_ROW_GROUP,
    NUMERIC_INDEX_COLUMNS,
    shard_name,
)
from megatron_video.data.captions import caption_variants
from megatron_video.data.dataset import VideoDataset
from megatron_video.data.decode import DecodeError
from megatron_video.data.encoders import LATENT_KINDS
from megatron_video.data.metadata import MetadataError
from megatron_video.data.shapes import decode_key, encode_key
from megatron_video.progress import progress

logger = logging.getLogger(__name__)


class VideoEncoderFn(Protocol):
    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> latents (B, C, t, h, w)."""


class TextEncoderFn(Protocol):
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions -> (T5 last hidden state (B, L, D), T5 mask (B, L), CLIP pooled (B, P))."""


@dataclass
class CacheReport:
    shards_done: int = 0
    shards_skipped: int = 0
    samples: int = 0
    bad_samples: int = 0
    filtered: dict[str, int] = field(default_factory=dict)  # dropped by shape planning, by reason (all shards)
    bad_reasons: dict[str, int] = field(default_factory=dict)  # failed to read, by error type (this rank)

    def summary(self) -> str:
        """How many samples were cached, filtered and unreadable, and why."""
        def reasons(counts: dict[str, int]) -> str:
            return " (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")" if counts else ""

        return (f"{self.samples} samples cached; {sum(self.filtered.values())} filtered by the shape rules"
                f"{reasons(self.filtered)}; {self.bad_samples} unreadable{reasons(self.bad_reasons)}")


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)


def _text_tensors(prefix: str, hidden: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    length = int(mask.sum())
    if not bool(mask[:length].all()):
        raise ValueError("text encoder masks must be left-aligned (valid tokens first)")
    return {f"{prefix}t5": hidden[:length].to(dtype).contiguous(),
            f"{prefix}clip": pooled.to(dtype).contiguous()}


def _check_meta(out: Path, meta: dict[str, Any]) -> None:
    path = out / "meta.json"
    if path.exists():
        saved = json.loads(path.read_text())
        diff = [k for k in meta if saved.get(k) != meta[k]]
        if diff:
            raise ValueError(f"{out}: existing cache was built with different settings ({', '.join(diff)}); "
                             "use a new directory")
    else:
        _write_atomic(path, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))


def build_cache(dataset: VideoDataset, out_dir: str | os.PathLike, video_encoder: VideoEncoderFn | None,
                text_encoder: TextEncoderFn | None, shard_size: int = 256, rank: int = 0, world_size: int = 1,
                batch_size: int = 4, dtype: torch.dtype = torch.bfloat16, latent_kind: str = "mean",
                structure: Callable[[torch.Tensor], torch.Tensor] | None = None, structure_kind: str | None = None,
                ) -> CacheReport:
    """Encode this rank's unfinished shards. Decoding uses epoch 0's temporal crop; captions are stored for
    every caption variant, CFG dropout is applied when reading. `latent_kind` says what the video encoder
    returns (see `encoders.LATENT_KINDS`; "moments" latents are sampled afresh when read). `structure`, if
    given, maps the decoded video to the structure controller's input signal (uint8 levels, control/signals.py
    `signal_extractor`), stored beside the latents; `structure_kind` names it in meta.json."""
    from safetensors.torch import save_file

    if video_encoder is None and text_encoder is None and structure is None:
        raise ValueError("nothing to cache: give a video encoder, a text encoder, a structure signal or several")
    if (structure is None) != (structure_kind is None):
        raise ValueError("a structure signal needs its kind (structure_kind) and the other way round")
    if latent_kind not in LATENT_KINDS:
        raise ValueError(f"latent_kind must be one of {LATENT_KINDS}, got {latent_kind!r}")
    if shard_size < 1 or batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid shard_size={shard_size} batch_size={batch_size} rank={rank}/{world_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = np.flatnonzero(dataset.plan.keys >= 0)
    num_shards = -(-len(ids) // shard_size)
    meta = {"version": CACHE_VERSION, "shard_size": shard_size, "num_samples": len(dataset),
            "keys_digest": hashlib.blake2b(dataset.plan.keys.tobytes(), digest_size=16).hexdigest(),
            "num_shards": num_shards, "latents": video_encoder is not None, "text": text_encoder is not None,
            "latent_kind": latent_kind, "structure": structure_kind,
            "dtype": str(dtype).removeprefix("torch."), "caption": dataset.config.caption.__dict__ | {
                "cfg_dropout": None}}
    _check_meta(out, meta)  # every rank: identical content, written atomically
    if text_encoder is not None and rank == 0 and not (out / "empty_text.safetensors").exists():
        hidden, mask, pooled = text_encoder([""])
        tensors = {"t5": hidden[0].to(dtype).contiguous(), "t5_mask": mask[0].to(torch.int8).contiguous(),
                   "clip": pooled[0].to(dtype).contiguous()}
        _write_atomic(out / "empty_text.safetensors", lambda p: save_file(tensors, p))
    report = CacheReport(filtered=dataset.plan.drop_summary())
    todo = [s for s in range(rank, num_shards, world_size) if not (out / f"{shard_name(s)}.parquet").exists()]
    report.shards_skipped = len(range(rank, num_shards, world_size)) - len(todo)
    bar = progress(total=sum(len(ids[s * shard_size:(s + 1) * shard_size]) for s in todo),
                   desc=f"cache rank {rank}", unit="sample")
    for s in todo:
        rows, tensors = _encode_shard(dataset, ids[s * shard_size:(s + 1) * shard_size], video_encoder,
                                      text_encoder, batch_size, dtype, report, bar, structure)
        for r in rows:
            r["shard"] = s
        _write_atomic(out / f"{shard_name(s)}.safetensors", lambda p, t=tensors: save_file(t, p))
        _write_atomic(out / f"{shard_name(s)}.parquet", lambda p, r=rows: _write_rows(r, p))
        report.shards_done += 1
        logger.info("cache: rank %d wrote shard %d/%d (%d samples)", rank, s + 1, num_shards, len(rows))
    bar.close()
    return report


def _encode_shard(dataset: VideoDataset, ids: np.ndarray, video_encoder: VideoEncoderFn | None,
                  text_encoder: TextEncoderFn | None, batch_size: int, dtype: torch.dtype, report: CacheReport,
                  bar: Any = None, structure: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    rows: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    clips: dict[int, list[tuple[int, torch.Tensor]]] = {}  # shape key -> [(sample id, video)]
    texts: list[tuple[int, int, str]] = []
    for sid in ids.tolist():
        if bar is not None:
            bar.update(1)  # decoding dominates; the encoders then run over the shard in batches
        t, h, w = decode_key(dataset.plan.keys[sid])
        row = {"sample_id": sid, "ok": True, "t": t, "h": h, "w": w, "captions": [], "latent_shape": []}
        try:
            rec = dataset.metadata.record(sid)
            variants = caption_variants(rec, dataset.config.caption)
            if video_encoder is not None or structure is not None:
                clips.setdefault(int(dataset.plan.keys[sid]), []).append((sid, dataset.load(sid, 0)["video"]))
        except (DecodeError, MetadataError) as e:
            dataset.bad_samples.record(sid, e)
            report.bad_samples += 1
            report.bad_reasons[type(e).__name__] = report.bad_reasons.get(type(e).__name__, 0) + 1
            row["ok"] = False
            rows.append(row)
            continue
        row["captions"] = variants
        texts.extend((sid, j, c) for j, c in enumerate(variants))
        rows.append(row)
    by_id = {r["sample_id"]: r for r in rows}
    for members in clips.values():
        for lo in range(0, len(members), batch_size):
            chunk = members[lo:lo + batch_size]
            videos = torch.stack([v for _, v in chunk])
            if video_encoder is not None:
                with torch.no_grad():
                    lat = video_encoder(videos)
                for (sid, _), z in zip(chunk, lat):
                    tensors[f"{sid}/latent"] = z.to(dtype).contiguous()
                    by_id[sid]["latent_shape"] = list(z.shape)
            if structure is not None:  # stored as computed (uint8 levels): no dtype cast
                for (sid, _), signal in zip(chunk, structure(videos)):
                    tensors[f"{sid}/structure"] = signal.contiguous()
    if text_encoder is not None:
        for lo in range(0, len(texts), batch_size):
            chunk = texts[lo:lo + batch_size]
            with torch.no_grad():
                hidden, mask, pooled = text_encoder([c for _, _, c in chunk])
            for k, (sid, j, _) in enumerate(chunk):
                tensors.update(_text_tensors(f"{sid}/{j}/", hidden[k], mask[k], pooled[k], dtype))
    report.samples += sum(r["ok"] for r in rows)
    return rows, tensors


def _write_rows(rows: list[dict[str, Any]], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("sample_id", pa.int64()), ("ok", pa.bool_()), ("t", pa.int32()), ("h", pa.int32()),
                        ("w", pa.int32()), ("captions", pa.list_(pa.string())),
                        ("latent_shape", pa.list_(pa.int32())), ("shard", pa.int32())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def merge_index(cache_dir: str | os.PathLike) -> bool:
    """Write index.parquet (and, before it, the per-sample arrays the reader memory-maps: `INDEX_ARRAYS`) when
    every shard is done, streamed shard by shard; returns whether it did."""
    import pyarrow.parquet as pq

    out = Path(cache_dir)
    meta = json.loads((out / "meta.json").read_text())
    parts = [out / f"{shard_name(s)}.parquet" for s in range(meta["num_shards"])]
    if not parts or not all(p.exists() for p in parts):
        return False
    _write_index_arrays(out, parts, int(meta["num_samples"]))

    def write(path: str) -> None:  # row groups of INDEX_ROW_GROUP rows (a caption read costs one of them)
        import pyarrow as pa

        group = INDEX_ROW_GROUP
        with pq.ParquetWriter(path, pq.read_schema(parts[0])) as writer:
            buf, rows = [], 0
            for p in parts:
                buf.append(pq.read_table(p))
                rows += buf[-1].num_rows
                if rows >= group:
                    table, full = pa.concat_tables(buf), rows // group * group
                    writer.write_table(table.slice(0, full), row_group_size=group)
                    buf, rows = [table.slice(full)], rows - full
            if rows:
                writer.write_table(pa.concat_tables(buf), row_group_size=group)

    tmp = out / "index.parquet.tmp"
    write(str(tmp))
    _write_footer_layout(out, tmp)
    os.replace(tmp, out / "index.parquet")  # last: its presence marks the index (arrays, layout) complete
    return True


def _write_footer_layout(out: Path, index: Path) -> None:
    """Where each row group of index.parquet lies in its footer (read_row_group without decoding the whole
    footer: `parquet_footer`), as INDEX_LAYOUT .npy [bounds; starts] + .json (footer position)."""
    from megatron_video.data.parquet_footer import footer_layout

    layout = footer_layout(index)
    np.save(out / f"{INDEX_LAYOUT}.tmp.npy", np.stack([layout.bounds, layout.starts]))
    os.replace(out / f"{INDEX_LAYOUT}.tmp.npy", out / f"{INDEX_LAYOUT}.npy")
    _write_atomic(out / f"{INDEX_LAYOUT}.json", lambda p: Path(p).write_text(json.dumps(
        {"offset": layout.footer_offset, "length": layout.footer_length, "head_length": layout.head_length})))


def _write_index_arrays(out: Path, parts: list[Path], num_samples: int) -> None:
    """Per metadata sample id: shape key (-1: not cached), shard and row of index.parquet, as .npy files."""
    import pyarrow.parquet as pq

    arrays = {}
    for name, (dtype, fill) in INDEX_ARRAYS.items():
        arrays[name] = np.lib.format.open_memmap(out / f"{name}.tmp.npy", "w+", dtype, (num_samples,))
        arrays[name][:] = fill
    row = 0
    for p in parts:
        t = pq.read_table(p, columns=list(NUMERIC_INDEX_COLUMNS))
        c = {k: t.column(k).to_numpy(zero_copy_only=False) for k in NUMERIC_INDEX_COLUMNS}
        ok = c["ok"].astype(bool)
        sids = c["sample_id"][ok]
        arrays["index_keys"][sids] = encode_key(c["t"][ok], c["h"][ok], c["w"][ok])
        arrays["index_shards"][sids] = c["shard"][ok]
        arrays["index_rows"][sids] = row + np.flatnonzero(ok)
        row += t.num_rows
    for name, arr in arrays.items():
        arr.flush()
        os.replace(out / f"{name}.tmp.npy", out / f"{name}.npy")
    arrays.clear()


def stub_encoders(latent_channels: int = 4, factors: Sequence[int] = (8, 8, 8), text_dim: int = 16,
                  text_len: int = 16, pooled_dim: int = 8) -> tuple[VideoEncoderFn, TextEncoderFn]:
    """Deterministic stand-ins with the real encoders' shapes (for tests, dry runs and the CPU quickstart).

    The text stand-in gives every word (lower case, punctuation stripped) its own fixed random vector, seeded by
    the word's CRC-32, so different words are told apart the way a real encoder's states are (a caption's colour,
    shape and direction words steer a model trained on them). Each state also carries a fixed random vector of
    its position, as a real encoder's states depend on word order: the MMDiT's text tokens have no positional
    encoding of their own, so without it "left to right" and "right to left" would reach the model as the same
    set of states. The pooled vector is the mean of the words' pooled parts (order-free). Up to `text_len - 1`
    words and an end token; the empty caption is the end token alone."""
    ft, fh, fw = factors

    def video(x: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        pooled = torch.nn.functional.adaptive_avg_pool3d(x, (1 + (t - 1) // ft, h // fh, w // fw))
        return pooled.mean(1, keepdim=True).repeat(1, latent_channels, 1, 1, 1) * torch.arange(
            1, latent_channels + 1, dtype=x.dtype).view(1, -1, 1, 1, 1)

    def word_vector(word: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
        return torch.randn(text_dim + pooled_dim, generator=gen)

    # one fixed vector per token position (seeded apart from the words' CRC-32 seeds)
    positions = torch.randn(text_len, text_dim, generator=torch.Generator().manual_seed(2**40))

    def text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = len(captions)
        hidden = torch.zeros(b, text_len, text_dim)
        mask = torch.zeros(b, text_len, dtype=torch.bool)
        pooled = torch.zeros(b, pooled_dim)
        for i, c in enumerate(captions):
            words = [w.strip(".,;:!?\"'()").lower() for w in c.split()]
            words = [w for w in words if w][: text_len - 1]
            vectors = torch.stack([word_vector(w) for w in words] + [word_vector("</s>")])
            n = vectors.shape[0]  # + the end token, so "" still has one valid token
            hidden[i, :n] = (vectors[:, :text_dim] + positions[:n]) * 0.5 ** 0.5  # unit variance, as each part
            mask[i, :n] = True
            pooled[i] = vectors[:, text_dim:].mean(0)
        return hidden, mask, pooled

    return video, text

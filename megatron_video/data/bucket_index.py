"""A planned bucket index next to a Parquet metadata file: shapes planned once, offline, memory-mapped in training.

`tools/plan_buckets.py` streams the metadata by row group (optionally on several processes), plans every row's
T x H x W (`shapes.plan_shapes`) and writes, next to `<meta>.parquet`:

- `<meta>.parquet.buckets.npy`: one uint16 bucket code per row (0xFFFF: row excluded by planning),
- `<meta>.parquet.members.npy`: the row ids grouped by bucket (buckets in ascending key order, rows ascending),
  so the sampler maps a position inside a bucket to a row without building anything per row,
- `<meta>.parquet.rowgroups.npy`: int64 [2, row groups + 1]: where each row group's struct lies in the Parquet
  footer, and each row group's first row (`parquet_footer.FooterLayout`), so training reads a row group
  through its own slice of the footer and never decodes the whole footer (which grows with the rows),
- `<meta>.parquet.buckets.json`: the planning settings, the metadata file's identity (size, mtime, a hash of
  the Parquet footer), the footer's position, the bucket keys by code, per-bucket counts and the digest of the
  planned keys.

Loading refuses an index written with other settings, for other or changed metadata, or truncated, naming the
file. The digest equals `BucketMembers.from_keys(plan.keys).digest`, so a sampler built from the index has the
same order and resume fingerprint as one built from the in-memory plan.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from megatron_video.data.config import ShapeConfig, _to_dict
from megatron_video.data.metadata import MetadataError, validate_columns
from megatron_video.data.parquet_footer import FooterError, FooterLayout, footer_layout
from megatron_video.data.sampler import BucketMembers

VERSION = 2  # 2: + the footer layout (rowgroups.npy); a version-1 index is refused (re-plan)
EXCLUDED = 0xFFFF  # code of a row planning dropped


class BucketIndexError(MetadataError):
    """The bucket index does not belong to this metadata file / these planning settings, or is damaged."""


def index_paths(metadata: str | Path) -> tuple[Path, Path, Path, Path]:
    """(header JSON, per-row codes, members, footer layout) paths next to `metadata`."""
    m = str(metadata)
    return Path(m + ".buckets.json"), Path(m + ".buckets.npy"), Path(m + ".members.npy"), Path(m + ".rowgroups.npy")


def planned_metadata(metadata_paths: list[str]) -> str | None:
    """The Parquet metadata file whose planned bucket index a data set reads, or None. An index is read only
    beside a single Parquet file (training, the dataset and the pre-flight decide it here)."""
    if len(metadata_paths) != 1 or not metadata_paths[0].endswith(".parquet"):
        return None
    return metadata_paths[0] if index_paths(metadata_paths[0])[0].exists() else None


def metadata_identity(path: str | Path) -> dict[str, Any]:
    """Size, mtime and a hash of the Parquet footer (schema, row groups, statistics): changes with the file."""
    st = os.stat(path)
    with open(path, "rb") as f:
        f.seek(max(st.st_size - 8, 0))
        tail = f.read(8)
        if len(tail) != 8 or tail[4:] != b"PAR1":
            raise BucketIndexError(f"{path}: not a Parquet file (no footer)")
        footer_len = int.from_bytes(tail[:4], "little")
        f.seek(max(st.st_size - 8 - footer_len, 0))
        digest = hashlib.blake2b(digest_size=16)
        left = footer_len
        while left > 0:  # the footer grows with the row groups: hash it in pieces
            piece = f.read(min(1 << 20, left))
            if not piece:
                break
            digest.update(piece)
            left -= len(piece)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "footer_blake2b": digest.hexdigest()}


def planning_settings(cfg: ShapeConfig) -> dict[str, Any]:
    return _to_dict(cfg)


_SOURCE: list[Any] = []  # per planning process: the metadata, read through the footer layout


def _init_planner(path: str, layout: FooterLayout) -> None:
    from megatron_video.data.metadata_parquet import ParquetSource

    _SOURCE[:] = [ParquetSource(path, "", load_columns=False, layout=layout)]


def _plan_groups(task: tuple[str, list[int], int, dict[str, Any]]) -> np.ndarray:
    """Worker: planned int64 keys of some row groups (read through the footer layout: no planning process
    decodes the whole footer)."""
    from megatron_video.data.config import DataConfig
    from megatron_video.data.shapes import plan_shapes

    path, groups, offset, shape = task
    cols = _SOURCE[0].read_columns(groups, offset)
    validate_columns(cols, path, offset)
    return plan_shapes(cols, DataConfig.from_dict({"shape": shape}).shape).keys


def _tasks(path: str, layout: FooterLayout, rows: int, shape: dict[str, Any]
           ) -> Iterator[tuple[str, list[int], int, dict]]:
    groups, count, offset = [], 0, 0
    for rg in range(layout.num_row_groups):
        groups.append(rg)
        count += int(layout.starts[rg + 1] - layout.starts[rg])
        if count >= rows:
            yield path, groups, offset, shape
            groups, offset, count = [], offset + count, 0
    if groups:
        yield path, groups, offset, shape


def plan_bucket_index(metadata: str, cfg: ShapeConfig, workers: int = 1, rows_per_task: int = 1 << 20
                      ) -> dict[str, Any]:
    """Plan every row's bucket and write the index next to `metadata`; returns the header."""
    identity = metadata_identity(metadata)
    try:
        layout = footer_layout(metadata)
    except FooterError as exc:
        raise BucketIndexError(str(exc)) from exc
    tasks = _tasks(metadata, layout, rows_per_task, planning_settings(cfg))
    if workers > 1:
        import multiprocessing as mp

        # fork: the workers inherit the imports (spawn re-imports numpy/pyarrow/torch per process)
        pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(
            workers, initializer=_init_planner, initargs=(metadata, layout))
        results: Iterator[np.ndarray] = pool.imap(_plan_groups, tasks)
    else:
        _init_planner(metadata, layout)
        pool, results = None, map(_plan_groups, tasks)
    try:
        return write_bucket_index(metadata, cfg, results, layout, identity, rows_per_task)
    finally:
        _SOURCE.clear()
        if pool is not None:
            pool.close()


def write_bucket_index(metadata: str, cfg: ShapeConfig, planned: Iterable[np.ndarray], layout: FooterLayout,
                       identity: dict[str, Any], rows_per_task: int = 1 << 20) -> dict[str, Any]:
    """Write the index of `metadata` from its rows' planned keys (`planned`: int64 chunks in row order, -1 for an
    excluded row) taken with `cfg`; `identity` and `layout` taken from the file before planning read it."""
    n = layout.num_rows
    head_path, codes_path, members_path, layout_path = index_paths(metadata)
    tmp_codes = codes_path.with_name(codes_path.name + ".tmp.npy")
    codes = np.lib.format.open_memmap(tmp_codes, "w+", np.uint16, (n,))
    table: dict[int, int] = {}
    digest = hashlib.blake2b(digest_size=16)
    pos = 0
    try:
        for keys in planned:  # in row order
            if pos + len(keys) > n:
                raise BucketIndexError(f"{metadata}: planned more rows than its {n}")
            digest.update(np.ascontiguousarray(keys, np.int64))
            uniq, inverse = np.unique(keys, return_inverse=True)
            local = np.array([EXCLUDED if k < 0 else table.setdefault(int(k), len(table)) for k in uniq])
            if len(table) >= EXCLUDED:
                raise BucketIndexError(f"{metadata}: more than {EXCLUDED - 1} shape buckets")
            codes[pos:pos + len(keys)] = local[inverse.ravel()]
            pos += len(keys)
        if pos != n:
            raise BucketIndexError(f"{metadata}: planned {pos} rows of its {n}")
    except BaseException:
        del codes
        tmp_codes.unlink(missing_ok=True)
        raise
    keys_by_code = np.array(sorted(table, key=table.get), np.int64)
    counts = np.zeros(len(table), np.int64)
    for lo in range(0, n, rows_per_task):
        counts += np.bincount(codes[lo:lo + rows_per_task][codes[lo:lo + rows_per_task] != EXCLUDED],
                              minlength=len(table))
    _write_members(codes, keys_by_code, counts, members_path, rows_per_task)
    codes.flush()
    del codes
    os.replace(tmp_codes, codes_path)
    tmp_layout = layout_path.with_name(layout_path.name + ".tmp.npy")
    np.save(tmp_layout, np.stack([layout.bounds, layout.starts]))
    os.replace(tmp_layout, layout_path)
    header = {"version": VERSION, "metadata": os.path.basename(metadata), "num_rows": n,
              "metadata_identity": identity, "shape": planning_settings(cfg),
              "footer": {"offset": layout.footer_offset, "length": layout.footer_length,
                         "head_length": layout.head_length, "row_groups": layout.num_row_groups},
              "bucket_keys": keys_by_code.tolist(), "bucket_counts": counts.tolist(),
              "keys_digest": digest.hexdigest()}
    tmp = head_path.with_name(head_path.name + ".tmp")
    tmp.write_text(json.dumps(header, indent=1))
    os.replace(tmp, head_path)  # the header last: an index without one is never taken as complete
    return header


def _write_members(codes: np.ndarray, keys_by_code: np.ndarray, counts: np.ndarray, path: Path,
                   rows: int) -> None:
    """Row ids grouped by bucket in ascending key order (a chunked counting sort over the codes)."""
    n, total = len(codes), int(counts.sum())
    order = np.argsort(keys_by_code)  # code order -> key order
    start = np.zeros(len(counts), np.int64)
    start[order] = np.concatenate([[0], np.cumsum(counts[order])[:-1]]).astype(np.int64)
    tmp = path.with_name(path.name + ".tmp.npy")
    members = np.lib.format.open_memmap(tmp, "w+", np.uint32 if n < 2**32 else np.int64, (total,))
    cursor = start.copy()
    for lo in range(0, n, rows):
        chunk = np.asarray(codes[lo:lo + rows])
        rows_sorted = np.argsort(chunk, kind="stable")
        present, first, cnt = np.unique(chunk[rows_sorted], return_index=True, return_counts=True)
        for c, f, k in zip(present, first, cnt):
            if c == EXCLUDED:
                continue
            members[cursor[c]:cursor[c] + k] = lo + rows_sorted[f:f + k]
            cursor[c] += k
    members.flush()
    del members
    os.replace(tmp, path)


class BucketCodes:
    """Planned shape key of a row, read from the memory-mapped per-row codes (-1: excluded by planning). Pickles
    as its path, so DataLoader workers map the same file instead of copying it."""

    def __init__(self, path: Path, keys_by_code: np.ndarray, num_rows: int) -> None:
        self.path, self.keys_by_code, self.num_rows = Path(path), keys_by_code, num_rows
        self._codes = _open(self.path, (num_rows,), np.uint16)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, row: int) -> int:
        code = int(self._codes[row])
        return -1 if code == EXCLUDED else int(self.keys_by_code[code])

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_codes"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._codes = _open(self.path, (self.num_rows,), np.uint16)


def open_bucket_index(metadata: str, cfg: ShapeConfig) -> tuple[BucketMembers, BucketCodes, FooterLayout]:
    """The planned buckets of `metadata` (members by bucket, each row's key, and where each row group's footer
    struct lies) as memory maps; BucketIndexError naming the file on any mismatch."""
    header = read_header(metadata, cfg)
    _, codes_path, members_path, layout_path = index_paths(metadata)
    keys_by_code = np.array(header["bucket_keys"], np.int64)
    counts = np.array(header["bucket_counts"], np.int64)
    n = header["num_rows"]
    codes = BucketCodes(codes_path, keys_by_code, n)
    members = _open(members_path, (int(counts.sum()),), np.uint32 if n < 2**32 else np.int64)
    foot = header["footer"]
    rows = _open(layout_path, (2, foot["row_groups"] + 1), np.int64)
    layout = FooterLayout(foot["offset"], foot["length"], foot["head_length"], rows[0], rows[1], str(layout_path))
    if layout.num_rows != n:
        raise BucketIndexError(f"{layout_path}: {layout.num_rows} rows, the index {n}")
    order = np.argsort(keys_by_code)
    return BucketMembers(keys_by_code[order], counts[order], members, n, header["keys_digest"]), codes, layout


def load_bucket_index(metadata: str, cfg: ShapeConfig) -> BucketMembers:
    """The planned buckets of `metadata` as memory maps; BucketIndexError naming the file on any mismatch."""
    return open_bucket_index(metadata, cfg)[0]


def read_header(metadata: str, cfg: ShapeConfig) -> dict[str, Any]:
    """The index header, checked against the metadata file and the planning settings."""
    head_path = index_paths(metadata)[0]
    hint = f"re-plan with: python tools/plan_buckets.py --metadata {metadata} --data-config <config>"
    if not head_path.is_file():
        raise BucketIndexError(f"{head_path}: bucket index header not found; {hint}")
    try:
        header = json.loads(head_path.read_text())
    except (OSError, ValueError) as exc:
        raise BucketIndexError(f"{head_path}: unreadable bucket index header ({exc}); {hint}") from exc
    if header.get("version") != VERSION:
        raise BucketIndexError(f"{head_path}: index version {header.get('version')!r}, expected {VERSION}; {hint}")
    if header.get("shape") != planning_settings(cfg):
        diff = sorted(k for k, v in planning_settings(cfg).items() if header.get("shape", {}).get(k) != v)
        raise BucketIndexError(f"{head_path}: planned with other shape settings (differ: {', '.join(diff)}); "
                               f"{hint}")
    now = metadata_identity(metadata)
    if header.get("metadata_identity") != now:
        diff = sorted(k for k, v in now.items() if header.get("metadata_identity", {}).get(k) != v)
        raise BucketIndexError(f"{head_path}: written for other or older metadata than {metadata} "
                               f"(differ: {', '.join(diff)}); {hint}")
    return header


def _open(path: Path, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise BucketIndexError(f"{path}: unreadable or truncated bucket index file ({exc})") from exc
    if arr.shape != shape or arr.dtype != dtype:
        raise BucketIndexError(f"{path}: holds {arr.dtype}{list(arr.shape)}, expected {np.dtype(dtype)}"
                               f"{list(shape)}")
    return arr

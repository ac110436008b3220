"""Streaming tensor I/O: zero-copy memory-mapped safetensors reading, an incremental safetensors writer, and a
`.pt` writer that serialises from a memory-mapped file, so no format here needs the whole model in memory.

Pages of a memory-mapped file are file-backed: the kernel can drop them at any time, and `release` drops them
explicitly once a tensor has been consumed, so the resident set stays near one tensor.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_PAGE = mmap.PAGESIZE


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors")
    return _NAMES[dtype]


class MappedSafetensors:
    """A safetensors file opened lazily: `get(key)` returns a tensor backed by the file's pages (no copy)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000:
                raise ValueError(f"{self.path}: not a safetensors file (header size {size})")
            header = json.loads(handle.read(size))
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + size
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{self.path}: {key} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            self._entries[key] = (_DTYPES[info["dtype"]], tuple(info["shape"]), self._base + begin, self._base + end)
        if self._entries and max(e[3] for e in self._entries.values()) > len(self._map):
            raise ValueError(f"{self.path}: truncated (tensor data extends past the end of the file)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=begin)
        return raw.view(dtype).reshape(shape)

    def release(self, key: str) -> None:
        """Drop the resident pages of `key` (they are re-read from the file if touched again)."""
        _, _, begin, end = self._entries[key]
        start = begin - begin % _PAGE
        length = end - start
        if length > 0 and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, length)


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time: the header (all keys, dtypes, shapes) first, then each
    tensor's bytes in the announced order. The file appears under its name only after `close()`."""

    def __init__(self, path: str | Path, entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        header: dict[str, Any] = {}
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for key, (dtype, shape) in entries.items():
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((key, dtype, tuple(shape), nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = dict(metadata)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.total_bytes = offset
        self._next = 0
        self._handle = open(self._tmp, "wb")
        self._handle.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"{self.path}: unexpected extra tensor {key}")
        want, dtype, shape, nbytes = self._order[self._next]
        if key != want:
            raise ValueError(f"{self.path}: expected tensor {want} next, got {key}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: {key} is {tensor.dtype} {tuple(tensor.shape)}, announced {dtype} {shape}")
        if nbytes:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            self._handle.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self._order):
            self.abort()
            raise ValueError(f"{self.path}: {len(self._order) - self._next} announced tensor(s) never written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self._tmp.unlink(missing_ok=True)


def file_mappings(paths: Iterable[str | Path]) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from `paths` (from /proc/self/maps; empty where unavailable)."""
    wanted = {str(Path(p).resolve()) for p in paths}
    ranges = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in wanted:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def drop_mapped_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Drop the resident pages of a tensor that lives in a private read-only file mapping (e.g. a
    `torch.load(mmap=True)` result), so a pass over a large file does not keep it all resident. Does nothing
    unless the storage lies inside one of `mappings`: on anonymous memory MADV_DONTNEED would zero the data."""
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if not any(lo <= start and end <= hi for lo, hi in mappings) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if hi > lo:
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


_LIBC = ctypes.CDLL(None, use_errno=True)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def save_pt_from_safetensors(source: MappedSafetensors, path: str | Path, layout: Mapping[str, Any],
                             nest: str | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """`torch.save` a dict whose tensors are pages of `source` (no copy in anonymous memory).

    `layout` gives the key order and values: a string names a tensor of `source`, anything else (e.g. None
    for an `._extra_state` entry) is stored as is. With `nest`, the dict goes under that key of the saved
    object, next to `extra`."""
    state = {key: source.get(value) if isinstance(value, str) else value for key, value in layout.items()}
    obj: dict[str, Any] = {nest: state, **(extra or {})} if nest else state
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    for value in layout.values():
        if isinstance(value, str):
            source.release(value)
    return path


__all__ = ["MappedSafetensors", "SafetensorsWriter", "drop_mapped_pages", "dtype_name", "file_mappings",
           "save_pt_from_safetensors"]

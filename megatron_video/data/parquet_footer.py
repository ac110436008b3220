"""Read one row group of a Parquet file without decoding the whole footer.

pyarrow's `ParquetFile` decodes the entire footer (about 1.4 KiB per column chunk, ~5 MiB per million rows at
4096-row row groups): memory that grows with the row count. Here the footer is scanned once, offline
(`footer_layout`), for where each row group's thrift struct lies in it; reading a row group then reads only that
struct's bytes and wraps it in a one-row-group footer that pyarrow reads with `ParquetFile(..., metadata=)`. The
column chunk offsets inside the struct are absolute, so the data pages are read from the real file unchanged.

Formats followed:
- the footer: `FileMetaData` (1: version, 2: schema, 3: num_rows, 4: row_groups, 5.. optional) and `RowGroup`
  (3: num_rows), apache/parquet-format src/thrift/parquet.thrift; file = data + footer + 4-byte footer length
  (little endian) + "PAR1" (parquet-format README, "File Format");
- thrift's compact protocol (apache/thrift doc/specs/thrift-compact-protocol.md): a field header byte holds the
  field-id delta (high nibble, 0: a zigzag i16 id follows) and the type (low nibble); integers are zigzag
  varints; a list header holds the size (high nibble, 15: a varint follows) and the element type.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# compact protocol type ids
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
MAGIC = b"PAR1"


class FooterError(ValueError):
    """Not a plain (unencrypted) Parquet footer this reader understands."""


class _Reader:
    """A position in thrift compact-protocol bytes, with generic skipping."""

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def varint(self) -> int:
        data, pos, shift, out = self.data, self.pos, 0, 0
        while True:
            b = data[pos]
            pos += 1
            out |= (b & 0x7F) << shift
            if b < 0x80:
                self.pos = pos
                return out
            shift += 7

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def field(self, last: int) -> tuple[int, int]:
        """(field id, type) of the next field; type 0 at the struct's end."""
        b = self.data[self.pos]
        self.pos += 1
        if b == 0:
            return 0, 0
        delta, kind = b >> 4, b & 0x0F
        return (last + delta if delta else self.zigzag()), kind

    def list_header(self) -> tuple[int, int]:
        b = self.data[self.pos]
        self.pos += 1
        size = b >> 4
        return (self.varint() if size == 15 else size), b & 0x0F

    def skip(self, kind: int) -> None:
        self.pos = _skip(self.data, self.pos, kind)


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = data[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7


def _skip(data: bytes | memoryview, pos: int, kind: int) -> int:
    """The position after a value of compact type `kind` at `pos`. A plain function with literal type ids
    (1/2 bool, 3 byte, 4-6 i16-i64, 7 double, 8 binary, 9 list, 10 set, 11 map, 12 struct): the footer scan
    skips ~100 values per column chunk."""
    if kind == 12:
        while True:
            b = data[pos]
            pos += 1
            if b == 0:
                return pos
            if not b >> 4:  # a long-form field id (zigzag varint) follows the type
                while data[pos] & 0x80:
                    pos += 1
                pos += 1
            pos = _skip(data, pos, b & 0x0F)
    if 4 <= kind <= 6:
        while data[pos] & 0x80:
            pos += 1
        return pos + 1
    if kind <= 2:
        return pos
    if kind == 8:
        n, pos = _read_varint(data, pos)
        return pos + n
    if kind == 9 or kind == 10:
        b = data[pos]
        n, elem = b >> 4, b & 0x0F
        n, pos = _read_varint(data, pos + 1) if n == 15 else (n, pos + 1)
        if elem <= 3:  # booleans and bytes in a list take a byte each
            return pos + n
        for _ in range(n):
            pos = _skip(data, pos, elem)
        return pos
    if kind == 3:
        return pos + 1
    if kind == 7:
        return pos + 8
    if kind == 11:
        n, pos = _read_varint(data, pos)
        if n:
            kv = data[pos]
            pos += 1
            for _ in range(n):
                pos = _skip(data, _skip(data, pos, kv >> 4), kv & 0x0F)
        return pos
    raise FooterError(f"unknown thrift compact type {kind} at byte {pos}")


def _fields(data: bytes, last: int) -> list[tuple[int, int, bytes]]:
    """The remaining fields of a struct as (id, type, raw value bytes), up to its stop byte."""
    r, out = _Reader(data), []
    while True:
        fid, kind = r.field(last)
        if kind == 0:
            return out
        start = r.pos
        r.skip(kind)
        out.append((fid, kind, bytes(data[start:r.pos])))
        last = fid


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _encode(fields: list[tuple[int, int, bytes]]) -> bytes:
    out, last = bytearray(), 0
    for fid, kind, value in fields:
        delta = fid - last
        out += bytes([(delta << 4) | kind]) if 0 < delta <= 15 else bytes([kind]) + _varint((fid << 1) ^ (fid >> 15))
        out += value
        last = fid
    return bytes(out + b"\x00")


@dataclass(frozen=True)
class FooterLayout:
    """Where a Parquet file's footer and each row group's struct in it lie. `bounds[i]:bounds[i+1]` are row group
    i's bytes in the footer; `starts[i]` its first row (`starts[-1]` = rows). Both int64, one entry a row group."""

    footer_offset: int  # file offset of the footer
    footer_length: int
    head_length: int  # footer bytes before the first row group struct (version, schema, num_rows, list header)
    bounds: np.ndarray
    starts: np.ndarray
    source: str = ""  # the .npy [bounds; starts] when memory-mapped from one: pickles as that path

    def __reduce__(self) -> Any:
        if self.source:
            return _mapped_layout, (self.source, self.footer_offset, self.footer_length, self.head_length)
        return FooterLayout, (self.footer_offset, self.footer_length, self.head_length, self.bounds, self.starts)

    @property
    def num_row_groups(self) -> int:
        return len(self.starts) - 1

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])


def _mapped_layout(source: str, offset: int, length: int, head: int) -> FooterLayout:
    rows = np.load(source, mmap_mode="r")
    return FooterLayout(offset, length, head, rows[0], rows[1], source)


def _footer_position(f: Any, size: int, path: str | os.PathLike) -> tuple[int, int]:
    f.seek(max(size - 8, 0))
    tail = f.read(8)
    if len(tail) != 8 or tail[4:] != MAGIC:
        raise FooterError(f"{path}: not a plain Parquet file (no PAR1 footer; encrypted footers are not read)")
    length = int.from_bytes(tail[:4], "little")
    if length + 12 > size:
        raise FooterError(f"{path}: footer length {length} exceeds the file")
    return size - 8 - length, length


def footer_layout(path: str | os.PathLike) -> FooterLayout:
    """Scan the footer once for the row group structs (pure Python: ~seconds per 10 M rows; done offline)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset, length = _footer_position(f, size, path)
        f.seek(offset)
        data = f.read(length)
    r, last = _Reader(data), 0
    while True:
        fid, kind = r.field(last)
        if kind == 0:
            raise FooterError(f"{path}: footer has no row_groups field")
        if fid == 4:
            break
        r.skip(kind)
        last = fid
    if kind != _LIST:
        raise FooterError(f"{path}: footer field 4 is not a list")
    n, elem = r.list_header()
    if elem != _STRUCT:
        raise FooterError(f"{path}: row_groups is not a list of structs")
    head = r.pos
    bounds, rows = np.empty(n + 1, np.int64), np.zeros(n + 1, np.int64)
    pos = r.pos
    for i in range(n):
        bounds[i] = pos
        fid = 0
        while True:  # the RowGroup struct, taking its num_rows (field 3) on the way
            b = data[pos]
            pos += 1
            if b == 0:
                break
            if b >> 4:
                fid += b >> 4
            else:
                v, pos = _read_varint(data, pos)
                fid = (v >> 1) ^ -(v & 1)
            if fid == 3 and b & 0x0F == _I64:
                v, pos = _read_varint(data, pos)
                rows[i + 1] = (v >> 1) ^ -(v & 1)
            else:
                pos = _skip(data, pos, b & 0x0F)
    bounds[n] = pos
    return FooterLayout(offset, length, head, bounds, np.cumsum(rows))


class RowGroupFile:
    """Reads row groups of one Parquet file through its `FooterLayout`: keeps the footer's head and tail (schema
    and key-value metadata, a few KiB) and the layout's arrays (memory-mapped when the caller maps them), never
    the decoded footer. Pickles as its path and layout."""

    def __init__(self, path: str | os.PathLike, layout: FooterLayout) -> None:
        self.path, self.layout = str(path), layout
        with open(self.path, "rb") as f:
            offset, length = _footer_position(f, os.path.getsize(self.path), self.path)
            if (offset, length) != (layout.footer_offset, layout.footer_length):
                raise FooterError(f"{self.path}: footer moved since its layout was taken (file changed)")
            f.seek(offset)
            head = f.read(layout.head_length)
            f.seek(offset + int(layout.bounds[-1]))
            tail = f.read(length - int(layout.bounds[-1]))
        r, last, self._head = _Reader(head), 0, []
        while True:  # version, schema, ... up to the row_groups field, without num_rows (set per row group)
            fid, kind = r.field(last)
            if fid == 4:
                break
            start = r.pos
            r.skip(kind)
            if fid != 3:
                self._head.append((fid, kind, head[start:r.pos]))
            last = fid
        self._tail = _fields(tail, 4)

    def metadata(self, rg: int) -> Any:
        """pyarrow FileMetaData holding only row group `rg`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        lo, hi = int(self.layout.bounds[rg]), int(self.layout.bounds[rg + 1])
        with open(self.path, "rb") as f:
            f.seek(self.layout.footer_offset + lo)
            group = f.read(hi - lo)
        rows = int(self.layout.starts[rg + 1] - self.layout.starts[rg])
        fields = sorted(self._head + [(3, _I64, _varint((rows << 1) ^ (rows >> 63))),
                                      (4, _LIST, bytes([0x10 | _STRUCT]) + group)] + self._tail)
        footer = _encode(fields)
        return pq.read_metadata(pa.BufferReader(MAGIC + footer + struct.pack("<I", len(footer)) + MAGIC))

    def read_row_group(self, rg: int, columns: list[str] | None = None, use_threads: bool = False) -> Any:
        """Row group `rg` as a pyarrow Table (the file's data pages, read through a one-row-group footer)."""
        import pyarrow.parquet as pq

        if not 0 <= rg < self.layout.num_row_groups:
            raise IndexError(f"{self.path}: row group {rg} out of range [0, {self.layout.num_row_groups})")
        return pq.ParquetFile(self.path, metadata=self.metadata(rg)).read_row_group(0, columns=columns,
                                                                                  use_threads=use_threads)

    def schema_names(self) -> list[str]:
        return list(self.metadata(0).schema.to_arrow_schema().names) if self.layout.num_row_groups else []


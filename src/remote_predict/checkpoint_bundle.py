"""Reading a TensorFlow checkpoint (tensor bundle) a row range at a time, without loading whole tensors.

`RestoreV2` with a slice spec reads the whole stored tensor and then copies the slice out, so splitting
an 8 GiB table that way would hold 8 GiB. A bundle stores each whole tensor as contiguous little-endian
bytes in a data file, and its `.index` file (a table of key -> `BundleEntryProto`) says where; reading
a row range is then one `pread` of those bytes (not a memory map, whose pages would count as the
process's memory until the kernel drops them).

The index is an SSTable (as in LevelDB) written without compression: a footer locates the index block,
whose entries locate the data blocks, whose entries are the bundle's keys in order.

A tensor saved in slices (a partitioned variable, or a table written a chunk at a time, as the splitter's
shards are) has an entry listing its slices, and one entry per slice under a binary key: TensorFlow's
`EncodeTensorNameSlice`, an OrderedCode encoding of (0, name, rank, start and length of each dimension).
`slice_key` writes that encoding, so a slice is found by the key TensorFlow gave it.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import tensor_bundle_pb2

from remote_predict import varint

_FOOTER_BYTES = 48
_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_BYTES = 5  # compression type, crc32c


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return varint.read(data, pos)
    except ValueError as e:
        raise ValueError(f"checkpoint index is corrupt: {e}") from None


def _block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one uncompressed table block."""
    if data[offset + size] != 0:
        raise ValueError("checkpoint index block is compressed; only uncompressed bundles are supported")
    block = data[offset:offset + size]
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + length]))
        pos += length
    return entries


def _ordered_num(value: int) -> bytes:
    """OrderedCode::WriteNumIncreasing: a length byte, then the value big-endian without leading zeros."""
    body = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
    return bytes([len(body)]) + body


def _ordered_string(text: str) -> bytes:
    """OrderedCode::WriteString: 0x00 and 0xff escaped, then the terminator 0x00 0x01."""
    escaped = (b"\x00\xff" if c == 0 else b"\xff\x00" if c == 0xFF else bytes([c]) for c in text.encode("utf-8"))
    return b"".join(escaped) + b"\x00\x01"


_SIGNED_HEADER = [b"", b"\x80", b"\xc0", b"\xe0", b"\xf0", b"\xf8", b"\xfc", b"\xfe", b"\xff", b"\xff\x80", b"\xff\xc0"]


def _ordered_signed(value: int) -> bytes:
    """OrderedCode::WriteSignedNumIncreasing: length bits in the leading byte(s), two's complement body."""
    magnitude = ~value if value < 0 else value
    length = 1
    while magnitude.bit_length() > 7 * length - 1:  # each length byte carries 7 bits, less the sign bit
        length += 1
    body = bytearray((value % (1 << (8 * length))).to_bytes(length, "big"))
    for i, bits in enumerate(_SIGNED_HEADER[length]):
        body[i] ^= bits
    return bytes(body)


def slice_key(name: str, extents: list[tuple[int, int]]) -> bytes:
    """The bundle key of a slice of tensor `name`: (start, length) per dimension, length -1 for all of it."""
    key = _ordered_num(0) + _ordered_string(name) + _ordered_num(len(extents))
    for start, length in extents:
        key += _ordered_signed(start) + _ordered_signed(length)
    return key


class Bundle:
    """The index of a checkpoint `prefix` (e.g. `.../variables/variables`)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        with open(f"{prefix}.index", "rb") as f:
            data = f.read()
        if len(data) < _FOOTER_BYTES or struct.unpack_from("<Q", data, len(data) - 8)[0] != _MAGIC:
            raise ValueError(f"{prefix}.index is not a TensorFlow checkpoint index")
        footer = data[-_FOOTER_BYTES:]
        _, pos = _varint(footer, 0)  # metaindex handle: unused
        _, pos = _varint(footer, pos)
        index_offset, pos = _varint(footer, pos)
        index_size, _ = _varint(footer, pos)
        self.entries: dict[str, tensor_bundle_pb2.BundleEntryProto] = {}  # tensors, by name
        self._slices: dict[bytes, tensor_bundle_pb2.BundleEntryProto] = {}  # their slices, by binary key
        self.header = tensor_bundle_pb2.BundleHeaderProto()
        for _, handle in _block(data, index_offset, index_size):
            offset, pos = _varint(handle, 0)
            size, _ = _varint(handle, pos)
            for key, value in _block(data, offset, size):
                if key == b"":
                    self.header.ParseFromString(value)
                    continue
                entry = tensor_bundle_pb2.BundleEntryProto()
                entry.ParseFromString(value)
                if key.startswith(b"\x00"):  # a slice key (tensor names never start with NUL)
                    self._slices[key] = entry
                else:
                    self.entries[key.decode("utf-8")] = entry
        if self.header.endianness != tensor_bundle_pb2.BundleHeaderProto.LITTLE:
            raise ValueError(f"{prefix}: big-endian checkpoints are not supported")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(d.size for d in self.entries[key].shape.dim)

    def dtype(self, key: str) -> tf.DType:
        return tf.as_dtype(self.entries[key].dtype)

    def _stored(self, what: str, entry: tensor_bundle_pb2.BundleEntryProto, shape: tuple[int, ...],
                dtype: tf.DType) -> StoredRows:
        data = f"{self.prefix}.data-{entry.shard_id:05d}-of-{self.header.num_shards:05d}"
        if entry.size != int(np.prod(shape, dtype=np.int64)) * dtype.size:
            raise ValueError(f"checkpoint tensor {what}: {entry.size} bytes stored for shape {shape}")
        if os.path.getsize(data) < entry.offset + entry.size:
            raise ValueError(f"{data} is shorter than the index says: the checkpoint is truncated")
        return StoredRows(data, entry.offset, shape, np.dtype(dtype.as_numpy_dtype))

    def row_ranges(self, key: str) -> list[tuple[int, StoredRows]]:
        """Where the rows of a numeric tensor are stored: (first row, rows) for the whole tensor, or for
        each of its slices in row order (slices must be row ranges spanning every other dimension)."""
        entry = self.entries[key]
        dtype = self.dtype(key)
        if dtype == tf.string or not dtype.is_numpy_compatible:
            raise ValueError(f"checkpoint tensor {key!r} is not numeric; cannot read it by rows")
        shape = self.shape(key)
        if not entry.slices:
            return [(0, self._stored(repr(key), entry, shape, dtype))]
        ranges = []
        for piece in entry.slices:
            extents = [(e.start, e.length if e.HasField("length") else -1) for e in piece.extent]
            # A dimension taken whole is written either as "-" (no length) or as "0,size" (a Saver's parts).
            whole = all(length == -1 or (start, length) == (0, size)
                        for (start, length), size in zip(extents[1:], shape[1:], strict=False))
            if len(extents) != len(shape) or not whole or extents[0][1] < 0:
                raise ValueError(f"checkpoint tensor {key!r} is sliced other than by rows; cannot read it by rows")
            stored = self._slices.get(slice_key(key, extents))
            if stored is None:
                raise ValueError(f"checkpoint tensor {key!r}: slice {extents[0]} is listed but not stored")
            start, count = extents[0]
            ranges.append((start, self._stored(f"{key!r} rows {start}..{start + count}", stored,
                                               (count, *shape[1:]), dtype)))
        ranges.sort(key=lambda item: item[0])
        covered = 0
        for start, rows in ranges:
            if start != covered:
                raise ValueError(f"checkpoint tensor {key!r}: its slices leave rows {covered}..{start} out")
            covered += rows.shape[0]
        if covered != shape[0]:
            raise ValueError(f"checkpoint tensor {key!r}: its slices hold {covered} of {shape[0]} rows")
        return ranges

    def rows(self, key: str) -> StoredRows | SlicedRows:
        """The stored tensor, read from disk a row range at a time by slicing (whole or sliced)."""
        ranges = self.row_ranges(key)
        return ranges[0][1] if len(ranges) == 1 else SlicedRows(ranges)

    def read(self, key: str) -> tf.Tensor:
        """A whole tensor, the ordinary way (for the small ones)."""
        return tf.raw_ops.RestoreV2(prefix=self.prefix, tensor_names=[key], shape_and_slices=[""],
                                    dtypes=[self.dtype(key)])[0]


class StoredRows:
    """A tensor stored whole in a data file; `rows[a:b]` reads those rows (a numpy array), nothing else."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.nbytes = shape[0] * self.row_bytes if shape else dtype.itemsize

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("stored rows are read by contiguous slices only")
        start, stop, _ = rows.indices(self.shape[0])
        count = max(0, stop - start)
        out = np.empty((count, *self.shape[1:]), self.dtype)
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while done < len(view):
                got = os.preadv(fd, [view[done:]], self.offset + start * self.row_bytes + done)
                if not got:
                    raise ValueError(f"{self.path} ended early: the checkpoint is truncated")
                done += got
        finally:
            os.close(fd)
        return out


class SlicedRows:
    """A tensor stored in row slices, read like StoredRows: `rows[a:b]` reads those rows from their slices."""

    def __init__(self, ranges: list[tuple[int, StoredRows]]):
        self.ranges = ranges
        first = ranges[0][1]
        self.shape = (sum(r.shape[0] for _, r in ranges), *first.shape[1:])
        self.dtype = first.dtype
        self.row_bytes = first.row_bytes
        self.nbytes = self.shape[0] * self.row_bytes

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("stored rows are read by contiguous slices only")
        start, stop, _ = rows.indices(self.shape[0])
        parts = [stored[max(start, first) - first:min(stop, first + stored.shape[0]) - first]
                 for first, stored in self.ranges if first < stop and first + stored.shape[0] > start]
        if not parts:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

"""Reading a TensorFlow checkpoint (tensor bundle) a row range at a time, without loading whole tensors.

`RestoreV2` with a slice spec reads the whole stored tensor and then copies the slice out, so splitting
an 8 GiB table that way would hold 8 GiB. A bundle stores each whole tensor as contiguous little-endian
bytes in a data file, and its `.index` file (a table of key -> `BundleEntryProto`) says where; reading
a row range is then one `pread` of those bytes (not a memory map, whose pages would count as the
process's memory until the kernel drops them).

The index is an SSTable (as in LevelDB) written without compression: a footer locates the index block,
whose entries locate the data blocks, whose entries are the bundle's keys in order.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import tensor_bundle_pb2

_FOOTER_BYTES = 48
_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_BYTES = 5  # compression type, crc32c


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


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
        self.entries: dict[str, tensor_bundle_pb2.BundleEntryProto] = {}
        self.header = tensor_bundle_pb2.BundleHeaderProto()
        for _, handle in _block(data, index_offset, index_size):
            offset, pos = _varint(handle, 0)
            size, _ = _varint(handle, pos)
            for key, value in _block(data, offset, size):
                if key == b"":
                    self.header.ParseFromString(value)
                else:
                    entry = tensor_bundle_pb2.BundleEntryProto()
                    entry.ParseFromString(value)
                    self.entries[key.decode()] = entry
        if self.header.endianness != tensor_bundle_pb2.BundleHeaderProto.LITTLE:
            raise ValueError(f"{prefix}: big-endian checkpoints are not supported")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(d.size for d in self.entries[key].shape.dim)

    def dtype(self, key: str) -> tf.DType:
        return tf.as_dtype(self.entries[key].dtype)

    def rows(self, key: str) -> StoredRows:
        """The stored tensor, read from disk a row range at a time by slicing."""
        entry = self.entries[key]
        dtype = self.dtype(key)
        if entry.slices or dtype == tf.string or not dtype.is_numpy_compatible:
            raise ValueError(f"checkpoint tensor {key!r} is not stored whole as numbers; cannot read it by rows")
        shape = self.shape(key)
        data = f"{self.prefix}.data-{entry.shard_id:05d}-of-{self.header.num_shards:05d}"
        if entry.size != int(np.prod(shape, dtype=np.int64)) * dtype.size:
            raise ValueError(f"checkpoint tensor {key!r}: {entry.size} bytes stored for shape {shape}")
        if os.path.getsize(data) < entry.offset + entry.size:
            raise ValueError(f"{data} is shorter than the index says: the checkpoint is truncated")
        return StoredRows(data, entry.offset, shape, np.dtype(dtype.as_numpy_dtype))

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

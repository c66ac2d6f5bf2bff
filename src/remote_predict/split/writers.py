"""Writing the pieces of a split model: shard SavedModels, the master, and any Keras sub-model.

Every version directory is written beside its final place and renamed into it, so a polling server never
sees half a model.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager

import keras
import numpy as np
import tensorflow as tf

from remote_predict.split.keras_archive import KerasArchive, LayerEntry
from remote_predict.split.partition import Partition
from remote_predict.split.sharded_embedding import EMBEDDINGS, IDS

CHUNK_BYTES = 64 << 20  # rows are read from the table this many bytes at a time


@contextmanager
def atomic_directory(path: str):
    """Yield a scratch directory that becomes `path` only when the block succeeds."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    scratch = os.path.join(parent, f".{os.path.basename(path)}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        yield scratch
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists already; pick another --version or remove it")
        os.rename(scratch, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Shard(tf.Module):
    def __init__(self, rows: np.ndarray):
        super().__init__()
        self.table = tf.Variable(rows, trainable=False, name="table")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name=IDS)])
    def lookup(self, ids):
        return {EMBEDDINGS: tf.gather(self.table, ids)}


def shard_rows(archive: KerasArchive, entry: LayerEntry, partition: Partition, shard: int,
               progress: Callable[[float], None]) -> np.ndarray:
    """A shard's rows, read from the table a chunk at a time (peak memory: this shard plus one chunk)."""
    table = archive.table(entry)
    dim = table.shape[1]
    rows = np.empty((partition.shard_rows(shard), dim), dtype=table.dtype)
    chunk = max(partition.shards, (CHUNK_BYTES // max(1, dim * table.dtype.itemsize)) // partition.shards
                * partition.shards)
    if partition.strategy == "div":
        start = partition.div_start(shard)
        for offset in range(0, rows.shape[0], chunk):
            end = min(rows.shape[0], offset + chunk)
            rows[offset:end] = table[start + offset:start + end]
            progress(end / max(1, rows.shape[0]))
        return rows
    filled = 0
    for first in range(0, partition.rows, chunk):  # chunks start at multiples of N: row k+jN is shard k's
        block = table[first:min(partition.rows, first + chunk)]
        mine = block[shard::partition.shards]
        rows[filled:filled + len(mine)] = mine
        filled += len(mine)
        progress(min(1.0, (first + chunk) / partition.rows))
    assert filled == rows.shape[0]
    return rows


def write_shard(path: str, rows: np.ndarray) -> None:
    module = _Shard(rows)
    with atomic_directory(path) as scratch:
        tf.saved_model.save(module, scratch, signatures={"lookup": module.lookup,
                                                         "serving_default": module.lookup})


def write_keras(path: str, model: keras.Model) -> None:
    """Export a Keras model as a SavedModel (signature serving_default, inputs named after its inputs)."""
    with atomic_directory(path) as scratch:
        model.export(scratch, format="tf_saved_model", verbose=False)


class Progress:
    """One line per step on stderr, rewritten in place on a terminal."""

    def __init__(self, label: str):
        self.label = label
        self._last = -1

    def __call__(self, fraction: float) -> None:
        percent = int(fraction * 100)
        if percent != self._last and (percent % 10 == 0 or sys.stderr.isatty()):
            self._last = percent
            end = "\r" if sys.stderr.isatty() and percent < 100 else "\n"
            print(f"  {self.label}: {percent:3d}%", end=end, file=sys.stderr, flush=True)

"""Writing the pieces of a split model: shard SavedModels, the master, and any Keras sub-model.

Every version directory is written beside its final place and renamed into it, so a polling server never
sees half a model.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from remote_predict.op.lookup import LOOKUP_SIGNATURE
from remote_predict.op.partition import Partition

CHUNK_BYTES = 32 << 20  # rows are read from the table this many bytes at a time


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


def shard_chunks(table, partition: Partition, shard: int,
                 progress: Callable[[float], None]) -> Iterator[tuple[int, np.ndarray]]:
    """(first local row, rows) of one shard, read from `table` (h5py or StoredRows) CHUNK_BYTES at a time."""
    dim = table.shape[1]
    count = partition.shard_rows(shard)
    chunk = max(partition.shards, (CHUNK_BYTES // max(1, dim * table.dtype.itemsize)) // partition.shards
                * partition.shards)
    if partition.strategy == "div":
        start = partition.div_start(shard)
        for offset in range(0, count, chunk):
            end = min(count, offset + chunk)
            yield offset, table[start + offset:start + end]
            progress(end / max(1, count))
        return
    filled = 0
    for first in range(0, partition.rows, chunk):  # chunks start at multiples of N: row k+jN is shard k's
        mine = table[first:min(partition.rows, first + chunk)][shard::partition.shards]
        yield filled, mine
        filled += len(mine)
        progress(min(1.0, (first + chunk) / partition.rows))


@dataclass
class ShardTable:
    """One table's part of a shard: `rows` x `dim` values, arriving as (first local row, rows) chunks."""

    name: str
    rows: int
    dim: int
    dtype: np.dtype
    chunks: Iterable[tuple[int, np.ndarray]]


def write_shard(path: str, tables: Sequence[ShardTable]) -> None:
    """A SavedModel with signature `lookup`: for each table, ids (int64 [n]) in, its rows ([n, dim]) out,
    both under the table's name, over tables that are never whole in memory.

    Each chunk is saved as a slice of its table's variable (SaveV2 with a slice spec, as TensorFlow saves
    partitioned variables), the slices are merged into one checkpoint, and the graph is written beside
    it: loading the SavedModel restores each whole table from its slices, and remote-predict's server
    reads the rows straight from those slices (`serving/rows_servable.py`).
    """
    v1 = tf.compat.v1
    with atomic_directory(path) as scratch:
        variables = os.path.join(scratch, "variables")
        os.makedirs(variables)
        parts = []
        for table in tables:
            tf_dtype = tf.as_dtype(table.dtype)
            written = 0
            for start, values in table.chunks:
                prefix = os.path.join(variables, f"part-{len(parts):06d}")
                tf.raw_ops.SaveV2(prefix=prefix, tensor_names=[table.name], tensors=[tf.constant(values, tf_dtype)],
                                  shape_and_slices=[f"{table.rows} {table.dim} {start},{len(values)}:-"])
                parts.append(prefix)
                written += len(values)
            if not written:  # an empty shard of this table (more shards than rows)
                prefix = os.path.join(variables, f"part-{len(parts):06d}")
                tf.raw_ops.SaveV2(prefix=prefix, tensor_names=[table.name], shape_and_slices=[""],
                                  tensors=[tf.zeros([0, table.dim], tf_dtype)])
                parts.append(prefix)
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts,
                                      destination_prefix=os.path.join(variables, "variables"))
        inputs, outputs = {}, {}
        with tf.Graph().as_default() as graph:
            variables_ = []
            for table in tables:
                variable = v1.get_variable(table.name, shape=[table.rows, table.dim], dtype=tf.as_dtype(table.dtype),
                                           trainable=False, use_resource=False, initializer=v1.zeros_initializer())
                inputs[table.name] = v1.placeholder(tf.int64, [None], name=f"{table.name}_ids")
                outputs[table.name] = tf.gather(variable, inputs[table.name], name=f"{table.name}_rows")
                variables_.append(variable)
            saver = v1.train.Saver(variables_)
            signature = predict_signature(inputs, outputs)
            meta_graph = v1.train.export_meta_graph(graph=graph, saver_def=saver.as_saver_def())
        meta_graph.meta_info_def.tags.append("serve")
        meta_graph.signature_def[LOOKUP_SIGNATURE].CopyFrom(signature)
        meta_graph.signature_def["serving_default"].CopyFrom(signature)
        saved_model = saved_model_pb2.SavedModel(saved_model_schema_version=1, meta_graphs=[meta_graph])
        with open(os.path.join(scratch, "saved_model.pb"), "wb") as f:
            f.write(saved_model.SerializeToString())


def predict_signature(inputs: dict[str, tf.Tensor], outputs: dict[str, tf.Tensor]) -> meta_graph_pb2.SignatureDef:
    """A Predict SignatureDef of graph tensors, built as a proto: TF1's builder for it (`build_tensor_info`)
    logs a deprecation warning into the splitter's progress lines."""
    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for infos, tensors in ((signature.inputs, inputs), (signature.outputs, outputs)):
        for alias, tensor in tensors.items():
            infos[alias].name = tensor.name
            infos[alias].dtype = tensor.dtype.as_datatype_enum
            infos[alias].tensor_shape.CopyFrom(tensor.shape.as_proto())
    return signature


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

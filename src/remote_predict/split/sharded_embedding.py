"""The master's stand-in for an Embedding layer: look rows up on the shards, in parallel, in request order.

For a batch of ids it counts negative ids from the end of the table and checks that every id is then
in range, as Keras' Embedding does (the same INVALID_ARGUMENT as the unsplit model's gather), looks each
distinct id up once, sends each shard its ids (one RemotePredict op per
shard), and stitches the rows back in request order. The ops are built in a TF1-style graph
(`tf.compat.v1.wrap_function`) because `tf.function` chains stateful ops in program order, which would
make the calls to the shards run one after another instead of at the same time.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from remote_predict.op import api as remote_predict
from remote_predict.split.partition import Partition

IDS = "ids"
EMBEDDINGS = "embeddings"


def lookup_function(partition: Partition, dim: int, dtype: tf.DType, targets: Sequence[str],
                    models: Sequence[str], version: int, deadline_ms: int, name: str, wrap_negative: bool = True):
    """A concrete function ids (int64, [n]) -> rows ([n, dim]).

    `wrap_negative` counts negative ids from the end, as Keras' Embedding does before its gather; a
    gather itself (what a graph rewrite replaces) refuses them.
    """

    def lookup(ids):
        ids = tf.reshape(ids, [-1])
        if wrap_negative:
            ids = tf.where(ids < 0, ids + partition.rows, ids)
        bad = tf.where((ids < 0) | (ids >= partition.rows))[:, 0]
        first_bad = tf.gather(tf.concat([bad, [0]], 0), 0)
        message = tf.strings.format("indices[{}] = {} is not in [0, {})",
                                    (first_bad, tf.gather(tf.concat([ids, [0]], 0), first_bad), partition.rows))
        check = tf.debugging.Assert(tf.equal(tf.size(bad), 0), [message], name=f"{name}_ids_in_range")
        with tf.control_dependencies([check]):
            unique, index = tf.unique(ids)
        shard_of, local = partition.assign_tf(unique)
        positions, parts = [], []
        for shard, (target, model) in enumerate(zip(targets, models, strict=True)):
            where = tf.where(tf.equal(shard_of, shard))[:, 0]
            rows = remote_predict.run(
                [IDS], [tf.gather(local, where)], [EMBEDDINGS], target_address=target, model_name=model,
                model_version=version, max_rpc_deadline_millis=deadline_ms, output_types=[dtype],
                name=f"{name}_shard_{shard}")[0]
            rows.set_shape([None, dim])
            positions.append(tf.cast(where, tf.int32))
            parts.append(rows)
        stitched = tf.dynamic_stitch(positions, parts)
        return tf.gather(stitched, index)

    return tf.compat.v1.wrap_function(lookup, [tf.TensorSpec([None], tf.int64)])


@keras.saving.register_keras_serializable(package="remote_predict")
class ShardedEmbedding(keras.layers.Layer):
    """Answers as `keras.layers.Embedding(input_dim, output_dim)` would, from rows held on shard servers."""

    def __init__(self, input_dim: int, output_dim: int, targets: Sequence[str], shard_models: Sequence[str],
                 partition_strategy: str = "mod", model_version: int = -1, deadline_ms: int = 10000,
                 mask_zero: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)
        self.targets, self.shard_models = list(targets), list(shard_models)
        self.partition_strategy, self.model_version = partition_strategy, int(model_version)
        self.deadline_ms, self.mask_zero = int(deadline_ms), bool(mask_zero)
        self.partition = Partition(partition_strategy, self.input_dim, len(self.targets))
        self._lookup = None

    def call(self, inputs):
        ids = inputs
        if ids.dtype not in (tf.int32, tf.int64):
            ids = tf.cast(ids, tf.int32)  # as keras.layers.Embedding does
        ids = tf.cast(ids, tf.int64)
        if self._lookup is None:
            self._lookup = lookup_function(self.partition, self.output_dim, tf.as_dtype(self.compute_dtype),
                                           self.targets, self.shard_models, self.model_version,
                                           self.deadline_ms, self.name)
        rows = self._lookup(tf.reshape(ids, [-1]))
        return tf.reshape(rows, tf.concat([tf.shape(ids), [self.output_dim]], 0))

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def compute_mask(self, inputs, mask=None):
        return None if not self.mask_zero else tf.not_equal(inputs, 0)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(input_dim=self.input_dim, output_dim=self.output_dim, targets=self.targets,
                      shard_models=self.shard_models, partition_strategy=self.partition_strategy,
                      model_version=self.model_version, deadline_ms=self.deadline_ms, mask_zero=self.mask_zero)
        return config

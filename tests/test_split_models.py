"""The model kinds TF Serving users have, split and served: every answer equals the unsplit model's, bit for bit.

TF1 SavedModels (Estimator-era `tf.compat.v1.saved_model.Builder` exports, partitioned tables included) and
Keras models with `Embedding(mask_zero=True)` feeding mask-aware layers.
"""

import re
import subprocess
import sys
import time

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from remote_predict.checkpoint_bundle import Bundle
from remote_predict.split import cli as split_cli
from remote_predict.split.tf1_source import InterleavedRows, Part, matching_strategies
from split_helpers import Split, shard_tables

v1 = tf.compat.v1
USERS, ITEMS, DIM = 60, 40, 8


def tf1_recommender(base_path, kind: str) -> str:
    """A TF1 export as Estimators wrote them: ref or resource variables, a partitioned user table.

    ref_div: `embedding_lookup(partition_strategy="div")` of a user id over a 3-part user table, a plain
      item table, and a partitioned Dense kernel (concatenated, so not a table).
    resource_mod_sparse: resource variables; the user's history (ids, -1 padded) averaged by
      `safe_embedding_lookup_sparse(partition_strategy="mod")` over the 3-part table, the items gathered
      with ResourceGather.
    """
    resource = kind.startswith("resource")
    with tf.Graph().as_default():
        v1.set_random_seed(7)
        v1.train.get_or_create_global_step()
        items = v1.placeholder(tf.int64, [None, 3], name="items")
        user_table = v1.get_variable("user/embedding_weights", [USERS, DIM], use_resource=resource,
                                     partitioner=v1.fixed_size_partitioner(3),
                                     initializer=v1.random_normal_initializer())
        item_table = v1.get_variable("item/embedding_weights", [ITEMS, DIM], use_resource=resource,
                                     initializer=v1.random_normal_initializer())
        if kind == "ref_div":
            user = v1.placeholder(tf.int64, [None], name="user")
            inputs = {"user": user, "items": items}
            u = v1.nn.embedding_lookup(user_table, user, partition_strategy="div")
            kernel = v1.get_variable("tower/kernel", [4 * DIM, 1], partitioner=v1.fixed_size_partitioner(2),
                                     use_resource=resource)
        else:
            history = v1.placeholder(tf.int64, [None, None], name="history")
            inputs = {"history": history, "items": items}
            where = tf.where(history >= 0)
            ids = tf.SparseTensor(where, tf.gather_nd(history, where), tf.shape(history, out_type=tf.int64))
            u = v1.nn.safe_embedding_lookup_sparse(list(user_table), ids, combiner="mean",
                                                   partition_strategy="mod")
            kernel = v1.get_variable("tower/kernel", [4 * DIM, 1], use_resource=resource)
        i = tf.reshape(v1.nn.embedding_lookup(item_table, items), [-1, 3 * DIM])
        bias = v1.get_variable("tower/bias", [1], initializer=v1.constant_initializer(0.25), use_resource=resource)
        score = tf.matmul(tf.concat([u, i], 1), kernel) + bias
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(base_path / "1"))
            signature = v1.saved_model.signature_def_utils.build_signature_def(
                inputs={k: v1.saved_model.utils.build_tensor_info(t) for k, t in inputs.items()},
                outputs={"score": v1.saved_model.utils.build_tensor_info(score)},
                method_name=v1.saved_model.signature_constants.PREDICT_METHOD_NAME)
            builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": signature})
            builder.save()
    return str(base_path)


def tf1_inputs(kind: str, rng, batch: int) -> dict:
    items = rng.integers(0, ITEMS, (batch, 3))
    if kind == "ref_div":
        return {"user": rng.integers(0, USERS, batch), "items": items}
    history = rng.integers(-1, USERS, (batch, 5))  # -1 pads; a row may hold no id at all
    return {"history": history, "items": items}


@pytest.mark.parametrize(("kind", "shards", "strategy"), [("ref_div", 2, "mod"), ("resource_mod_sparse", 3, "div")])
def test_split_a_tf1_saved_model_bit_for_bit(tmp_path, kind, shards, strategy):
    model = tf1_recommender(tmp_path / "rec", kind)
    split = Split(model, tmp_path / "out", shards, "--threshold_mib=0", f"--partition={strategy}")
    try:
        assert shard_tables(tmp_path / "out", 0) == {"user", "item"}
        master = tmp_path / "out" / "master" / "1"
        stored = Bundle(str(master / "variables" / "variables"))
        assert not {"user/embedding_weights", "item/embedding_weights"} & set(stored.entries), \
            "the master's checkpoint holds no rows of the sharded tables"
        assert {"tower/kernel", "tower/bias", "global_step"} <= set(stored.entries)
        graph = saved_model_pb2.SavedModel.FromString((master / "saved_model.pb").read_bytes()).meta_graphs[0]
        ops = [n.op for n in graph.graph_def.node]
        assert ops.count("EagerPyFunc") == 1, "both tables' lookups are one step: one lookup node"
        assert not {"DynamicStitch", "ParallelDynamicStitch", "DynamicPartition"} & set(ops), \
            "the partitioned lookup's gathers and stitch are gone"
        assert graph.saver_def.restore_op_name, "the master restores its variables with a Saver, as TF1 does"
        rng = np.random.default_rng(shards)
        for batch in (1, 7, 50):
            got, expected = split.answers(tf1_inputs(kind, rng, batch), output="score")
            assert got.shape == (batch, 1) and got.tobytes() == expected.tobytes()
        edges = tf1_inputs(kind, rng, 4)
        edges["items"][:] = [0, ITEMS - 1, 0]
        edges["user" if kind == "ref_div" else "history"][:] = USERS - 1
        got, expected = split.answers(edges, output="score")
        assert got.tobytes() == expected.tobytes(), "duplicate ids, the first and last rows of each part"
        empty = tf1_inputs(kind, rng, 0)
        got, expected = split.answers(empty, output="score")
        assert got.shape == expected.shape == (0, 1)
        bad_user = tf1_inputs(kind, rng, 2)
        bad_user["user" if kind == "ref_div" else "history"][0] = USERS
        bad_item = tf1_inputs(kind, rng, 2)
        bad_item["items"][1, 2] = ITEMS
        for bad in (bad_user, bad_item):
            for name in (split.name, "unsplit"):
                with pytest.raises(grpc.RpcError) as caught:
                    split.master.predict(name, bad)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, caught.value.details())
    finally:
        split.stop()


def test_split_command_prints_its_progress_and_its_whole_time(tmp_path):
    """Run as users run it: no TensorFlow deprecation warning among the progress lines, and "done in" says
    the command's whole time (starting Python and importing TensorFlow are most of a small split's)."""
    model = tf1_recommender(tmp_path / "rec", "resource_mod_sparse")
    started = time.monotonic()
    command = [sys.executable, "-m", "remote_predict", "split", model, f"--output_dir={tmp_path / 'out'}",
               "--threshold_mib=0", "--export_unsplit"]
    split = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, seen = [], None
    for line in split.stderr:
        lines.append(line.rstrip("\n"))
        if line.startswith("done in "):
            seen = time.monotonic() - started  # no later than the line was printed
    assert split.wait() == 0, lines
    assert not [line for line in lines if "deprecat" in line.lower() or "Instructions for updating" in line], lines
    assert "  table user (60 x 8) shard 2/2: 100%" in lines and "  master rec version 1" in lines
    done = next(line for line in lines if line.startswith("done in "))
    reported = float(re.match(r"done in ([0-9.]+)s;", done).group(1))
    # The figure is the process's age: at most what the parent saw (plus rounding), and not a fraction of it.
    assert 0.8 * seen <= reported <= seen + 0.1, (reported, seen)


def test_tf1_refusals(tmp_path):
    model = tf1_recommender(tmp_path / "rec", "ref_div")
    with pytest.raises(SystemExit, match="'tower/kernel' is used other than by gathering rows"):
        split_cli.main([model, f"--output_dir={tmp_path / 'a'}", "--tables=tower"])
    with pytest.raises(SystemExit, match=r"no table named 'nope' .*\(tables: user, item, tower\)"):
        split_cli.main([model, f"--output_dir={tmp_path / 'b'}", "--tables=nope"])


def test_partition_strategies_are_recognised_from_what_the_graph_computes():
    parts = [Part("p0", 0, 4), Part("p1", 4, 3), Part("p2", 7, 3)]  # 10 rows as fixed_size_partitioner cuts them
    ids = np.arange(10)
    div_part = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert matching_strategies(ids, div_part, ids - np.array([0, 4, 7])[div_part], parts) == {"div"}
    assert matching_strategies(ids, ids % 3, ids // 3, parts) == {"mod"}
    assert matching_strategies(ids, ids % 3, ids // 3 + 1, parts) == set()
    uneven = [Part("p0", 0, 3), Part("p1", 3, 4), Part("p2", 7, 3)]  # mod would read past part 0's rows
    assert "mod" not in matching_strategies(ids, ids % 3, ids // 3, uneven)
    table = np.arange(20, dtype=np.float32).reshape(10, 2)
    rows = InterleavedRows(table, parts)
    logical = np.stack([table[parts[r % 3].offset + r // 3] for r in range(10)])
    for start, stop in ((0, 10), (1, 8), (4, 5), (9, 10), (3, 3)):
        np.testing.assert_array_equal(rows[start:stop], logical[start:stop])


def masked_model(path) -> str:
    """Embedding(mask_zero=True) read by mask-aware layers: an LSTM (weights in its nested cell) and a
    masked average."""
    keras.utils.set_random_seed(4)
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    embedded = keras.layers.Embedding(40, 4, mask_zero=True, name="words", embeddings_initializer="normal")(tokens)
    sequence = keras.layers.LSTM(3, name="lstm")(embedded)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(embedded)
    out = keras.layers.Dense(1, name="score")(keras.layers.Concatenate()([sequence, pooled]))
    keras.Model(tokens, out, name="masked").save(path)
    return str(path)


def test_split_embedding_with_mask_zero_bit_for_bit(tmp_path):
    model = masked_model(tmp_path / "masked.keras")
    split = Split(model, tmp_path / "out", 2, "--tables=words", name="masked")
    try:
        rng = np.random.default_rng(0)
        tokens = rng.integers(1, 40, (8, 6)).astype(np.int32)
        tokens[0, 3:] = 0  # padding at the end
        tokens[1, :2] = 0  # and at the start
        tokens[2, 1::2] = 0
        for batch in (tokens, tokens[:1]):
            got, expected = split.answers({"tokens": batch})
            assert got.shape == (len(batch), 1) and got.tobytes() == expected.tobytes()
        unmasked = np.where(tokens == 0, 39, tokens)
        assert not np.array_equal(split.answers({"tokens": unmasked})[0], split.answers({"tokens": tokens})[0]), \
            "the mask changes the answer: the comparison above covers it"
    finally:
        split.stop()

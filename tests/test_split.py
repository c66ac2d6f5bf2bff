"""`remote-predict split`: shard tables over real servers and compare every answer with the unsplit model."""

import os
import shutil
import subprocess
import sys
import threading
import time

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from helpers import HALF_PLUS_TWO, REPO, InProcessServer, ServerProcess, float_val, free_port, wait_until, write_config
from remote_predict.checkpoint_bundle import Bundle
from remote_predict.op.partition import Partition
from remote_predict.split import cli as split_cli
from split_helpers import Split, shard_tables


def recommender(path, users=100, items=50, dim=8, seed=0) -> str:
    """Two tables, ids of two shapes: a user id [1] and three item ids [3]."""
    keras.utils.set_random_seed(seed)
    user = keras.Input(shape=(1,), dtype="int32", name="user")
    items_in = keras.Input(shape=(3,), dtype="int32", name="items")
    u = keras.layers.Embedding(users, dim, name="user_table")(user)
    i = keras.layers.Embedding(items, dim, name="item_table", embeddings_initializer="normal")(items_in)
    x = keras.layers.Flatten()(keras.layers.Concatenate(axis=1)([u, i]))
    x = keras.layers.Dense(16, activation="relu", name="tower")(x)
    out = keras.layers.Dense(1, name="score")(x)
    model = keras.Model([user, items_in], out, name="rec")
    model.save(path)
    return str(path)


def sequential(path, rows=40) -> str:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,), dtype="int32", name="tokens"),
                              keras.layers.Embedding(rows, 4, name="words", embeddings_initializer="normal"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2, name="logits")],
                             name="seq")
    model.save(path)
    return str(path)


def random_ids(rng, batch, users=100, items=50):
    return {"user": rng.integers(0, users, (batch, 1)).astype(np.int32),
            "items": rng.integers(0, items, (batch, 3)).astype(np.int32)}


@pytest.mark.parametrize(("strategy", "shards"), [("mod", 1), ("mod", 2), ("mod", 4), ("div", 2), ("div", 4)])
def test_split_answers_bit_for_bit(tmp_path, strategy, shards):
    model = recommender(tmp_path / "rec.keras")
    split = Split(model, tmp_path / "out", shards, f"--partition={strategy}", "--tables=user_table,item_table")
    try:
        rng = np.random.default_rng(shards)
        for batch in (1, 7, 64):
            got, expected = split.answers(random_ids(rng, batch))
            assert got.dtype == np.float32 and got.shape == (batch, 1)
            assert got.tobytes() == expected.tobytes(), "split answers must equal the unsplit model's bit for bit"
        # Duplicate ids, the first and last rows, a negative id (counted from the end, as Keras does).
        same = {"user": np.full((5, 1), 99, np.int32), "items": np.tile(np.array([[0, 49, -1]], np.int32), (5, 1))}
        got, expected = split.answers(same)
        assert got.tobytes() == expected.tobytes()
        empty = {"user": np.zeros((0, 1), np.int32), "items": np.zeros((0, 3), np.int32)}
        got, expected = split.answers(empty)
        assert got.shape == expected.shape == (0, 1)
        for bad in ({"user": np.array([[100]], np.int32), "items": np.array([[1, 2, 3]], np.int32)},
                    {"user": np.array([[1]], np.int32), "items": np.array([[1, -51, 3]], np.int32)}):
            codes = []
            for model_name in (split.name, "unsplit"):
                with pytest.raises(grpc.RpcError) as caught:
                    split.master.predict(model_name, bad)
                codes.append(caught.value.code())
                assert "is not in [0, " in caught.value.details(), caught.value.details()
            assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    finally:
        split.stop()


def test_concurrent_requests_lookups_merge_and_never_mix(tmp_path):
    """Requests in flight together share one call per shard; each still gets exactly its own rows."""
    model = recommender(tmp_path / "rec.keras", users=2000, items=500)
    split = Split(model, tmp_path / "out", 2, "--tables=user_table,item_table")
    try:
        rng = np.random.default_rng(5)
        cases = [random_ids(rng, 4, users=2000, items=500) for _ in range(24)]
        expected = [split.answers(inputs)[1].tobytes() for inputs in cases]
        shard_calls = [s.server.metrics.registry.get_sample_value(
            "remote_predict_requests_total", {"model": f"rec_shard_{k}", "api": "predict", "protocol": "tcp",
                                              "code": "OK"}) or 0.0 for k, s in enumerate(split.shards)]
        got: dict[tuple[int, int], bytes] = {}

        def client(index: int) -> None:
            for round_ in range(5):
                case = (index + round_) % len(cases)
                got[(index, round_)] = tf.make_ndarray(
                    split.master.predict(split.name, cases[case]).outputs["output_0"]).tobytes()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(got) == 60
        assert all(answer == expected[(i + r) % len(cases)] for (i, r), answer in got.items()), "rows mixed"
        calls = [s.server.metrics.registry.get_sample_value(
            "remote_predict_requests_total", {"model": f"rec_shard_{k}", "api": "predict", "protocol": "tcp",
                                              "code": "OK"}) - before for k, (s, before) in
            enumerate(zip(split.shards, shard_calls, strict=True))]
        assert all(c < 60 for c in calls), f"{calls} shard calls for 60 requests: lookups were not merged"
    finally:
        split.stop()


def test_hot_row_cache_answers_bit_for_bit_within_its_budget(tmp_path):
    model = recommender(tmp_path / "rec.keras", users=2000, items=500)
    budget_mib = 0.02  # 20 KiB: 640 rows of 8 floats over both tables
    split = Split(model, tmp_path / "out", 2, "--tables=user_table,item_table",
                  master_flags=[f"--remote_predict_cache_mib={budget_mib}"])
    try:
        rng = np.random.default_rng(11)
        for _ in range(40):  # skewed ids: the same few users and items come back
            inputs = {"user": np.minimum(rng.zipf(1.3, (8, 1)), 2000).astype(np.int32) - 1,
                      "items": np.minimum(rng.zipf(1.3, (8, 3)), 500).astype(np.int32) - 1}
            got, expected = split.answers(inputs)
            assert got.tobytes() == expected.tobytes()
        registry = split.master.server.metrics.registry
        tables = [{"table": f"rec/{t}", "version": "1"} for t in ("user_table", "item_table")]
        hits = sum(registry.get_sample_value("remote_predict_lookup_cache_hits_total", labels) for labels in tables)
        held = sum(registry.get_sample_value("remote_predict_lookup_cache_bytes", labels) for labels in tables)
        assert hits > 0 and 0 < held <= budget_mib * (1 << 20)
    finally:
        split.stop()


def _resident_bytes(paths) -> int:
    """How much of the files is in the page cache (util-linux's fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output=RES", *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line) for line in out.split())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="fincore (util-linux) is not installed")
def test_a_shard_reads_its_rows_into_memory_when_it_loads(tmp_path):
    """A shard's rows are memory-mapped; read at load, they are in the page cache by the time it serves,
    so no first lookup waits on the disk (a table of tens of MiB: beyond one read-ahead window)."""
    model = recommender(tmp_path / "rec.keras", users=400_000, items=300, dim=16)
    assert split_cli.main([model, f"--output_dir={tmp_path / 'out'}", "--shards=2", "--partition=div",
                           "--tables=user_table,item_table"]) == 0
    data = sorted((tmp_path / "out" / "shards" / "rec_shard_1").glob("*/variables/variables.data-*"))
    size = sum(path.stat().st_size for path in data)
    assert size > 12 << 20
    for path in data:  # out of the page cache, as after a reboot or on a fresh host
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    assert _resident_bytes(data) < size // 10
    shard = InProcessServer(f"--model_config_file={tmp_path / 'out' / 'config' / 'shard_1.config'}", rest=False)
    try:
        resident = _resident_bytes(data)
        assert resident >= 0.9 * size, f"{resident} of {size} bytes in the page cache after the load"
    finally:
        shard.stop()


def test_the_master_runs_as_one_graph_without_function_calls(tmp_path):
    """Grappler inlines the master's functions, lookup included, as it does the unsplit model's: each
    request runs one graph, not TensorFlow's function runtime twice around the lookup."""
    from tensorflow.core.protobuf import config_pb2

    split = Split(recommender(tmp_path / "rec.keras"), tmp_path / "out", 2, "--tables=user_table,item_table")
    try:
        ops = {}
        for model in ("master", "unsplit"):
            graph = tf.Graph()
            with tf.compat.v1.Session(graph=graph) as session:
                path = str(tmp_path / "out" / model / "1")
                meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
                signature = meta_graph.signature_def["serving_default"]
                feeds = {graph.get_tensor_by_name(signature.inputs[alias].name): ids
                         for alias, ids in random_ids(np.random.default_rng(3), 4).items()}
                metadata = config_pb2.RunMetadata()
                answer = session.run(graph.get_tensor_by_name(signature.outputs["output_0"].name), feeds,
                                     options=config_pb2.RunOptions(output_partition_graphs=True),
                                     run_metadata=metadata)
                ops[model] = {node.op for partition in metadata.partition_graphs for node in partition.node}
                assert answer.shape == (4, 1)
        assert "EagerPyFunc" in ops["master"]
        for model, kinds in ops.items():
            assert not kinds & {"StatefulPartitionedCall", "PartitionedCall"}, f"{model}: {sorted(kinds)}"
    finally:
        split.stop()


def test_shard_fast_path_answers_as_the_session(tmp_path, monkeypatch):
    """A shard served from its checkpoint's rows answers exactly as the same SavedModel in a Session."""
    from remote_predict.serving.rows_servable import RowsServable
    from remote_predict.split import writers

    monkeypatch.setattr(writers, "CHUNK_BYTES", 256)  # tables in many slices: the rows span several files
    model = recommender(tmp_path / "rec.keras", users=1000, items=300)
    assert split_cli.main([model, f"--output_dir={tmp_path / 'out'}", "--shards=2", "--partition=div",
                           "--tables=user_table,item_table"]) == 0
    config = f"--model_config_file={tmp_path / 'out' / 'config' / 'shard_1.config'}"
    fast, plain = InProcessServer(config, rest=False), InProcessServer(config, "--lookup_fast_path=false", rest=False)
    try:
        assert [type(s).__name__ for s in fast.server.manager.loaded_servables()] == [RowsServable.__name__]
        assert [type(s).__name__ for s in plain.server.manager.loaded_servables()] == ["Servable"]
        rng = np.random.default_rng(7)
        users, items = 500, 150  # the shard's rows of each table
        cases = [{"user_table": rng.integers(0, users, n), "item_table": rng.integers(0, items, n)}
                 for n in (1, 17, 300)]
        cases += [{"user_table": np.array([0, users - 1, 0, 3, 3]), "item_table": np.array([items - 1, 0, 0])},
                  {"user_table": np.zeros(0, np.int64), "item_table": np.array([5])}]
        for ids in cases:
            inputs = {k: v.astype(np.int64) for k, v in ids.items()}
            for alias in ("user_table", "item_table"):
                answers = [float_val(s.predict("rec_shard_1", inputs, signature_name="lookup"), alias)
                           for s in (fast, plain)]
                assert answers[0].dtype == answers[1].dtype and answers[0].tobytes() == answers[1].tobytes()
                assert answers[0].shape == (len(inputs[alias]), 8)
        for bad in ({"user_table": np.array([3, users]), "item_table": np.array([1])},
                    {"user_table": np.array([3]), "item_table": np.array([-1, 2])}):
            errors = []
            for s in (fast, plain):
                with pytest.raises(grpc.RpcError) as caught:
                    s.predict("rec_shard_1", {k: v.astype(np.int64) for k, v in bad.items()}, signature_name="lookup")
                errors.append((caught.value.code(), caught.value.details()))
            assert errors[0] == errors[1] and errors[0][0] == grpc.StatusCode.INVALID_ARGUMENT, errors
    finally:
        fast.stop()
        plain.stop()


def exported(keras_file: str, base_path, version: int = 1) -> str:
    """The model as TF Serving users have it: `model.export()` into a base path's version directory."""
    keras.models.load_model(keras_file).export(str(base_path / str(version)), verbose=False)
    return str(base_path)


@pytest.mark.parametrize(("strategy", "shards", "tables"), [("mod", 2, "--threshold_mib=0"),
                                                             ("div", 3, "--tables=user_table")])
def test_split_a_saved_model_export_bit_for_bit(tmp_path, strategy, shards, tables):
    """A Keras export has no layer config: split rewrites its graph, and answers exactly as the export does."""
    model = exported(recommender(tmp_path / "rec.keras"), tmp_path / "rec")
    split = Split(model, tmp_path / "out", shards, f"--partition={strategy}", tables)
    try:
        assert "rec_shard_0" in (tmp_path / "out" / "config" / "shard_0.config").read_text()
        both = tables == "--threshold_mib=0"
        assert shard_tables(tmp_path / "out", 0) == ({"user_table", "item_table"} if both else {"user_table"}), \
            "one shard model holds every table's part; a Dense kernel is not a table, whatever its size"
        master = Bundle(str(tmp_path / "out" / "master" / "1" / "variables" / "variables"))
        emptied = sorted(master.shape(key) for key in master.entries if master.shape(key)[:1] == (0,))
        assert emptied == [(0, 8)] * (2 if both else 1), "the master's checkpoint holds no rows of sharded tables"
        rng = np.random.default_rng(shards)
        for batch in (1, 9, 64):
            got, expected = split.answers(random_ids(rng, batch))
            assert got.shape == (batch, 1) and got.tobytes() == expected.tobytes()
        same = {"user": np.full((4, 1), 99, np.int32), "items": np.tile(np.array([[0, 49, -1]], np.int32), (4, 1))}
        got, expected = split.answers(same)
        assert got.tobytes() == expected.tobytes(), "duplicate ids, first and last rows, a negative id"
        empty = {"user": np.zeros((0, 1), np.int32), "items": np.zeros((0, 3), np.int32)}
        got, expected = split.answers(empty)
        assert got.shape == expected.shape == (0, 1)
        for bad in ({"user": np.array([[100]], np.int32), "items": np.array([[1, 2, 3]], np.int32)},
                    {"user": np.array([[1]], np.int32), "items": np.array([[1, -51, 3]], np.int32)}):
            for model_name in (split.name, "unsplit"):
                with pytest.raises(grpc.RpcError) as caught:
                    split.master.predict(model_name, bad)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "is not in [0, " in caught.value.details(), caught.value.details()
    finally:
        split.stop()


def saved(module: tf.Module, signature, base_path) -> str:
    """A module saved as version 1 under a TF Serving base path, with `signature` as serving_default."""
    tf.saved_model.save(module, str(base_path / "1"), signatures={"serving_default": signature})
    return str(base_path)


def nothing_sharded(model: str, tmp_path, capsys) -> str:
    """Split with every table eligible, when none may be sharded: what the splitter said."""
    with pytest.raises(SystemExit, match="no Embedding table is larger than 0 MiB"):
        split_cli.main([model, f"--output_dir={tmp_path / 'auto'}", "--threshold_mib=0"])
    return capsys.readouterr().err


class Ranker(tf.Module):
    """Not Keras: a module whose tables are gathered with tf.nn.embedding_lookup (ResourceGather ops)."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(3)
        self.words = tf.Variable(rng.normal(size=(30, 4)).astype(np.float32), name="words")
        self.weights = tf.Variable(rng.normal(size=(4, 1)).astype(np.float32), name="weights")

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64, name="query"),
                                  tf.TensorSpec([None], tf.int64, name="doc")])
    def score(self, query, doc):
        q = tf.reduce_mean(tf.nn.embedding_lookup(self.words, query), axis=1)
        d = tf.nn.embedding_lookup(self.words, doc)
        return {"score": tf.matmul(q * d, self.weights)}


def test_split_a_saved_model_that_is_not_keras(tmp_path):
    ranker = Ranker()
    split = Split(saved(ranker, ranker.score, tmp_path / "ranker"), tmp_path / "out", 2, "--tables=words",
                  name="ranker")
    try:
        rng = np.random.default_rng(0)
        for batch in (1, 5):
            inputs = {"query": rng.integers(0, 30, (batch, 6)), "doc": rng.integers(0, 30, (batch,))}
            got = tf.make_ndarray(split.master.predict("ranker", inputs).outputs["score"])
            expected = tf.make_ndarray(split.master.predict("unsplit", inputs).outputs["score"])
            assert got.shape == (batch, 1) and got.tobytes() == expected.tobytes()
        with pytest.raises(grpc.RpcError) as caught:
            split.master.predict("ranker", {"query": np.array([[1, 30]]), "doc": np.array([2])})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not in [0, 30)" in caught.value.details()
    finally:
        split.stop()


def test_split_a_keras_2_saved_model(tmp_path):
    """`model.save(dir)` of Keras 2 (TF up to 2.15, or tf_keras): its many traced functions all gather."""
    import tf_keras

    user = tf_keras.Input(shape=(1,), dtype="int32", name="user")
    items = tf_keras.Input(shape=(3,), dtype="int32", name="items")
    u = tf_keras.layers.Embedding(100, 8, name="user_table")(user)
    i = tf_keras.layers.Embedding(50, 8, name="item_table", embeddings_initializer="normal")(items)
    x = tf_keras.layers.Dense(16, activation="relu", name="tower")(tf_keras.layers.Flatten()(
        tf_keras.layers.Concatenate(axis=1)([u, i])))
    tf_keras.Model([user, items], tf_keras.layers.Dense(1, name="score")(x)).save(str(tmp_path / "rec" / "1"),
                                                                                save_format="tf")
    split = Split(str(tmp_path / "rec"), tmp_path / "out", 2, "--threshold_mib=0", "--partition=div")
    try:
        assert "rec_shard_1" in (tmp_path / "out" / "config" / "shard_1.config").read_text()
        assert shard_tables(tmp_path / "out", 1) == {"user_table", "item_table"}
        rng = np.random.default_rng(5)
        for batch in (1, 16):
            inputs = random_ids(rng, batch)
            got = tf.make_ndarray(split.master.predict("rec", inputs).outputs["score"])
            expected = tf.make_ndarray(split.master.predict("unsplit", inputs).outputs["score"])
            assert got.shape == (batch, 1) and got.tobytes() == expected.tobytes()
    finally:
        split.stop()


class TiedLanguageModel(tf.Module):
    """Tied weights: the table is gathered from and also multiplied with, so it cannot live on shards."""

    def __init__(self):
        super().__init__()
        self.words = tf.Variable(tf.random.normal([20, 4], seed=1), name="words")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="token")])
    def next_token_logits(self, token):
        return {"logits": tf.matmul(tf.nn.embedding_lookup(self.words, token), self.words, transpose_b=True)}


def test_a_table_also_used_otherwise_is_not_sharded(tmp_path, capsys):
    lm = TiedLanguageModel()
    model = saved(lm, lm.next_token_logits, tmp_path / "lm")
    said = nothing_sharded(model, tmp_path, capsys)
    assert "not sharding words (0.0 MiB): the graph also uses it otherwise (MatMul" in said
    with pytest.raises(SystemExit, match="'words' is used other than by gathering rows"):
        split_cli.main([model, f"--output_dir={tmp_path / 'b'}", "--tables=words"])


class SharedLookup(tf.Module):
    """One traced function gathers from two variables: rewriting it for one would break the other."""

    def __init__(self):
        super().__init__()
        self.users = tf.Variable(tf.random.normal([30, 4], seed=1), name="users")
        self.items = tf.Variable(tf.random.normal([30, 4], seed=2), name="items")

    @tf.function
    def rows(self, table, ids):
        return tf.gather(table, ids)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="user"),
                                  tf.TensorSpec([None], tf.int64, name="item")])
    def score(self, user, item):
        return {"score": tf.reduce_sum(self.rows(self.users, user) * self.rows(self.items, item), axis=1)}


def test_a_function_shared_by_two_variables_is_not_rewritten(tmp_path, capsys):
    model = SharedLookup()
    said = nothing_sharded(saved(model, model.score, tmp_path / "m"), tmp_path, capsys)
    assert "also runs on other variables than this table" in said


def test_saved_model_refusals(tmp_path):
    model = exported(recommender(tmp_path / "rec.keras"), tmp_path / "rec")
    with pytest.raises(SystemExit, match="'tower/kernel' is used other than by gathering rows"):
        split_cli.main([model, f"--output_dir={tmp_path / 'a'}", "--tables=tower"])
    with pytest.raises(SystemExit, match="no table named 'nope'"):
        split_cli.main([model, f"--output_dir={tmp_path / 'b'}", "--tables=nope"])
    with pytest.raises(SystemExit, match="--cut needs the model's layers"):
        split_cli.main([model, f"--output_dir={tmp_path / 'c'}", "--cut=tower"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"holds no saved_model\.pb"):
        split_cli.main([str(tmp_path / "empty"), f"--output_dir={tmp_path / 'd'}"])
    with pytest.raises(SystemExit, match="no Embedding table is larger than 64 MiB"):
        split_cli.main([model, f"--output_dir={tmp_path / 'e'}"])


def test_sequential_model_and_ids_of_another_shape(tmp_path):
    model = sequential(tmp_path / "seq.keras")
    split = Split(model, tmp_path / "out", 3, "--threshold_mib=0", "--partition=div", name="seq")
    try:
        tokens = np.random.default_rng(0).integers(0, 40, (6, 5)).astype(np.int32)
        got, expected = split.answers({"tokens": tokens})
        assert got.tobytes() == expected.tobytes()
    finally:
        split.stop()


def test_partition_strategies_agree_with_tf_embedding_lookup():
    for strategy in ("mod", "div"):
        for rows, shards in ((10, 3), (7, 7), (100, 4), (3, 5)):
            partition = Partition(strategy, rows, shards)
            table = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
            ids = np.arange(rows)
            shard_of, local = partition.assign(ids)
            parts = [table[shard_of == k][np.argsort(local[shard_of == k])] for k in range(shards)]
            assert [len(p) for p in parts] == [partition.shard_rows(k) for k in range(shards)]
            assert sum(len(p) for p in parts) == rows
            if all(len(p) for p in parts):  # TensorFlow's lookup wants no empty shard
                theirs = tf.compat.v1.nn.embedding_lookup([tf.constant(p) for p in parts], ids,
                                                          partition_strategy=strategy)
                np.testing.assert_array_equal(theirs.numpy(), table)


def test_table_choice_and_refusals(tmp_path, capsys):
    model = recommender(tmp_path / "rec.keras")
    with pytest.raises(SystemExit, match="no Embedding table is larger than 64 MiB"):
        split_cli.main([model, f"--output_dir={tmp_path / 'a'}"])
    with pytest.raises(SystemExit, match="is a Dense, not an Embedding"):
        split_cli.main([model, f"--output_dir={tmp_path / 'b'}", "--tables=tower"])
    with pytest.raises(SystemExit, match="lists 1 addresses for 2 shards"):
        split_cli.main([model, f"--output_dir={tmp_path / 'c'}", "--tables=user_table", "--shard_addresses=a:1"])
    assert split_cli.main([model, f"--output_dir={tmp_path / 'd'}", "--threshold_mib=0.002"]) == 0
    assert shard_tables(tmp_path / "d", 0) == {"user_table"}  # 3.2 kB vs 1.6 kB


def version_dirs(out) -> list[str]:
    """Every version directory (and scratch directory) in a split's output, relative to it."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_dir() and (p.name.isdigit()
                                                                                     or p.name.startswith(".")))


def test_a_failed_split_leaves_no_half_output_and_a_rerun_says_what_to_do(tmp_path):
    model = recommender(tmp_path / "rec.keras")
    out = tmp_path / "out"
    out.mkdir()
    (out / "master").write_text("a file where the master's base path goes")
    command = [model, f"--output_dir={out}", "--shards=2", "--tables=user_table,item_table", "--export_unsplit"]
    with pytest.raises(SystemExit, match=r"remote-predict split: .*master"):
        split_cli.main(command)
    assert version_dirs(out) == [], "the shards were written, but nothing of a failed split stays"
    (out / "master").unlink()
    assert split_cli.main(command) == 0
    written = ["master/1", "shards/rec_shard_0/1", "shards/rec_shard_1/1", "unsplit/1"]
    assert version_dirs(out) == written
    before = {d: (out / d / "saved_model.pb").stat().st_mtime_ns for d in written}
    with pytest.raises(SystemExit) as refused:
        split_cli.main(command)
    assert str(refused.value) == (f"remote-predict split: version 1 is already in {out} (shards/rec_shard_0/1, "
                                  "shards/rec_shard_1/1, master/1, unsplit/1); pick another --version, or remove "
                                  "them to write it again")
    assert {d: (out / d / "saved_model.pb").stat().st_mtime_ns for d in written} == before
    assert version_dirs(out) == written, "and nothing was written aside"
    shutil.rmtree(out / "master" / "1")  # as after a run that stopped while it waited for its shards
    shutil.rmtree(out / "unsplit" / "1")
    with pytest.raises(SystemExit, match="run with --only=master"):
        split_cli.main(command[:-1])
    assert split_cli.main([*command[:-1], "--only=master"]) == 0
    assert split_cli.main([*command, "--version=2"]) == 0


def test_launch_script_starts_a_working_deployment(tmp_path):
    """launch.sh starts every server and says, in one line, when all of them answer their health checks:
    from then on the master answers."""
    model = recommender(tmp_path / "rec.keras")
    ports = [free_port() for _ in range(3)]
    assert split_cli.main([model, f"--output_dir={tmp_path / 'out'}", "--shards=2", "--tables=user_table,item_table",
                           f"--shard_addresses=localhost:{ports[0]};localhost:{ports[1]}",
                           f"--master_port={ports[2]}", f"--master_rest_port={free_port()}"]) == 0
    assert "Procfile" in os.listdir(tmp_path / "out")
    env = {**os.environ, "REMOTE_PREDICT": f"{sys.executable} -m remote_predict"}
    log = open(tmp_path / "launch.log", "w")  # noqa: SIM115 (the servers write it until they stop)
    launch = subprocess.Popen(["bash", str(tmp_path / "out" / "launch.sh")], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        lines = []
        for line in launch.stdout:  # the servers' own lines, then the health line
            lines.append(line)
            if "health checks" in line:
                break
        assert lines[-1].startswith("all 3 servers answer their health checks: master (grpc://127.0.0.1:"), lines
        assert f"shard_0 (tcp://127.0.0.1:{ports[0]})" in lines[-1]
        assert f"shard_1 (tcp://127.0.0.1:{ports[1]})" in lines[-1]
        with grpc.insecure_channel(f"127.0.0.1:{ports[2]}") as channel:
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "rec"
            for alias, array in {"user": np.array([[3]], np.int32), "items": np.array([[1, 2, 3]], np.int32)}.items():
                request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
            assert len(stub.Predict(request, timeout=30).outputs["output_0"].float_val) == 1
    finally:
        os.killpg(launch.pid, 15)
        try:
            code = launch.wait(timeout=60)
        finally:
            log.close()
        # launch.sh stops everything within its bound (killing, and naming, a server that does not stop)
        print((tmp_path / "launch.log").read_text()[-4000:])
    assert code == 0


def test_health_command_says_which_servers_do_not_answer(capsys):
    from remote_predict.tools import health

    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=m", f"--tcp_port={free_port()}",
                         rest=False) as server:
        up = [f"a=grpc://127.0.0.1:{server.grpc_port}", f"b=tcp://127.0.0.1:{server.server.tcp_port}"]
        closed = f"c=tcp://127.0.0.1:{free_port()}"
        assert health.main(up) == 0
        assert health.main([*up, closed]) == 1
        assert capsys.readouterr().out.splitlines()[-1] == f"c ({closed[2:]}): NOT SERVING"
        # Each check speaks its own protocol: a tcp port is no gRPC server, nor the gRPC port a tcp one.
        assert not health.grpc_serving(f"127.0.0.1:{server.server.tcp_port}", 2)
        assert not health.tcp_serving(f"127.0.0.1:{server.grpc_port}", 2)
        assert health.main(["--wait=5", *up]) == 0
        assert capsys.readouterr().out.startswith("all 2 servers answer their health checks: a (grpc://")
        assert health.main(["--wait=1", *up, closed]) == 1
        assert "1 of 3 servers do not answer their health checks: c (tcp://" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        health.main(["http://x:1"])


def test_replica_stopped_under_load_no_request_fails(tmp_path):
    model = recommender(tmp_path / "rec.keras")
    replicas = [free_port(), free_port()]
    other = free_port()
    addresses = f"127.0.0.1:{replicas[0]},127.0.0.1:{replicas[1]};127.0.0.1:{other}"
    assert split_cli.main([model, f"--output_dir={tmp_path / 'out'}", "--shards=2", "--tables=user_table,item_table",
                           f"--shard_addresses={addresses}"]) == 0
    config = tmp_path / "out" / "config"
    servers = [ServerProcess(f"--model_config_file={config / 'shard_0.config'}", f"--tcp_port={p}", rest=False,
                             wait=False) for p in replicas]
    servers.append(ServerProcess(f"--model_config_file={config / 'shard_1.config'}", f"--tcp_port={other}",
                                 rest=False, wait=False))
    master = InProcessServer(f"--model_config_file={config / 'master.config'}", "--file_system_poll_wait_seconds=0")
    try:
        for server in servers:
            server.wait_ready()
        inputs = random_ids(np.random.default_rng(0), 4)
        expected = tf.make_ndarray(master.predict("rec", inputs).outputs["output_0"])
        outcomes, stop_at = [], time.monotonic() + 6

        def client():
            while time.monotonic() < stop_at:
                try:
                    got = tf.make_ndarray(master.predict("rec", inputs, timeout=10).outputs["output_0"])
                    outcomes.append("OK" if got.tobytes() == expected.tobytes() else "WRONG")
                except grpc.RpcError as e:
                    outcomes.append(e.code().name)

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        time.sleep(2.0)
        servers[0].proc.kill()  # one replica of shard 0 dies; calls in flight to it are retried on the other
        for thread in clients:
            thread.join()
        assert outcomes and set(outcomes) == {"OK"}, {o: outcomes.count(o) for o in set(outcomes)}
    finally:
        master.stop()
        for server in servers:
            server.stop()


def test_rollout_under_load_every_answer_from_one_version(tmp_path):
    """Shards of version 2 load beside version 1, then master 2 replaces master 1: no failure, no mix, with
    the master's hot-row cache on."""
    v1, v2 = recommender(tmp_path / "v1.keras", seed=0), recommender(tmp_path / "v2.keras", seed=1)
    out = tmp_path / "out"
    ports = [free_port(), free_port()]
    common = [f"--output_dir={out}", "--shards=2", "--tables=user_table,item_table",
              f"--shard_addresses=127.0.0.1:{ports[0]};127.0.0.1:{ports[1]}"]
    assert split_cli.main([v1, *common, "--version=1"]) == 0
    shards = [InProcessServer(f"--model_config_file={out / 'config' / f'shard_{k}.config'}",
                              "--file_system_poll_wait_seconds=1", f"--tcp_port={port}", rest=False)
              for k, port in enumerate(ports)]
    # The hot-row cache is on: a cache belongs to one version, so none of its rows may leak across.
    master = InProcessServer(f"--model_config_file={out / 'config' / 'master.config'}",
                             "--file_system_poll_wait_seconds=1", "--remote_predict_loopback_in_process=false",
                             "--remote_predict_cache_mib=1")
    inputs = random_ids(np.random.default_rng(3), 8)
    answers, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                response = master.predict("rec", inputs)
                answers.append((response.model_spec.version.value,
                                tf.make_ndarray(response.outputs["output_0"]).tobytes()))
            except grpc.RpcError as e:
                failures.append(e.code().name)

    try:
        v1_answer = tf.make_ndarray(master.predict("rec", inputs).outputs["output_0"]).tobytes()
        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        time.sleep(1.0)
        assert split_cli.main([v2, *common, "--version=2", "--only=shards"]) == 0
        assert split_cli.main([v2, *common, "--version=2", "--only=master", "--wait_for_shards"]) == 0
        wait_until(lambda: answers and answers[-1][0] == 2, 60, "master version 2 to serve")
        time.sleep(1.0)
        stop.set()
        for thread in clients:
            thread.join()
        v2_answer = tf.make_ndarray(master.predict("rec", inputs).outputs["output_0"]).tobytes()
    finally:
        stop.set()
        master.stop()
        for server in shards:
            server.stop()
    assert not failures, f"the roll-out failed {len(failures)} requests: {set(failures)}"
    assert v1_answer != v2_answer
    expected = {1: v1_answer, 2: v2_answer}
    mixed = [version for version, answer in answers if answer != expected[version]]
    assert not mixed, f"{len(mixed)} answers mixed versions"
    versions = [version for version, _ in answers]
    assert versions == sorted(versions) and set(versions) == {1, 2}, "one switch from version 1 to 2"


def test_shared_base_example_from_the_readme(tmp_path):
    """Two models share a base: the base is hosted once, each head answers as its whole model did."""
    sys.path.insert(0, str(REPO / "examples"))
    import shared_base

    model_a, model_b = shared_base.build(str(tmp_path))
    base_port = free_port()
    for model, name, only in ((model_a, "model_a", "all"), (model_b, "model_b", "master")):
        assert split_cli.main([str(model), "--cut=shared_2", f"--name={name}", "--base_name=shared_base",
                               f"--base_address=localhost:{base_port}", f"--output_dir={tmp_path / name}",
                               f"--only={only}"]) == 0
    assert not (tmp_path / "model_b" / "base").exists(), "the second split reuses the hosted base"
    wholes = {}
    for model, name in ((model_a, "model_a"), (model_b, "model_b")):
        keras.models.load_model(model).export(str(tmp_path / "whole" / name / "1"), verbose=False)
        wholes[f"whole_{name}"] = tmp_path / "whole" / name
    base = InProcessServer(f"--model_config_file={tmp_path / 'model_a' / 'config' / 'base.config'}", rest=False,
                           grpc_port=base_port)
    config = write_config(tmp_path / "heads.config", {"model_a": tmp_path / "model_a" / "head",
                                                       "model_b": tmp_path / "model_b" / "head", **wholes})
    heads = InProcessServer(f"--model_config_file={config}", "--remote_predict_loopback_in_process=false")
    try:
        features = {"features": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)}
        for name in ("model_a", "model_b"):
            split_answer = tf.make_ndarray(heads.predict(name, features).outputs["output_0"])
            whole_answer = tf.make_ndarray(heads.predict(f"whole_{name}", features).outputs["output_0"])
            assert split_answer.shape == whole_answer.shape
            assert split_answer.tobytes() == whole_answer.tobytes()
        calls = base.server.metrics.registry.get_sample_value(
            "remote_predict_requests_total", {"model": "shared_base", "api": "predict", "protocol": "grpc",
                                              "code": "OK"})
        assert calls == 2.0, "both heads called the one hosted base"
    finally:
        heads.stop()
        base.stop()


@pytest.mark.timeout(900)  # 2-2.5 minutes here: a margin for a slower machine
@pytest.mark.parametrize("strategy", ["mod", "div"])
def test_splitter_holds_about_one_shard_not_the_table(tmp_path, strategy):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scale

    tiny = scale.write_recommender(tmp_path / "tiny.keras", rows=1000, dim=64)
    big = scale.write_recommender(tmp_path / "big.keras", rows=2_097_152, dim=64)  # 512 MiB
    peaks = {}
    for name, model in (("tiny", tiny), ("big", big)):
        _, peaks[name] = scale.run_measured([
            sys.executable, "-m", "remote_predict", "split", str(model), f"--output_dir={tmp_path / name}",
            "--shards=16", f"--partition={strategy}", "--tables=user_table"])
    extra = peaks["big"] - peaks["tiny"]
    assert extra < 512 / 3, f"splitting a 512 MiB table into 32 MiB shards took {extra:.0f} MB more than a tiny one"


@pytest.mark.timeout(900)  # 2-2.5 minutes here: a margin for a slower machine
def test_splitting_a_saved_model_reads_the_table_by_rows(tmp_path):
    """Checkpoint slices of a whole tensor would be read whole: the splitter maps the bundle's bytes instead."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scale

    peaks, sizes = {}, {}
    for name, rows in (("tiny", 1000), ("big", 1_048_576)):  # 256 MiB
        keras_file = scale.write_recommender(tmp_path / f"{name}.keras", rows=rows, dim=64)
        export = tmp_path / name / "1"
        subprocess.run([sys.executable, "-c", "import sys, keras; keras.models.load_model(sys.argv[1])"
                        ".export(sys.argv[2], verbose=False)", str(keras_file), str(export)], check=True)
        _, peaks[name] = scale.run_measured([
            sys.executable, "-m", "remote_predict", "split", str(export), f"--output_dir={tmp_path / (name + '_out')}",
            "--shards=8", "--tables=user_table"])
        master = tmp_path / f"{name}_out" / "master" / "1" / "variables"
        sizes[name] = sum(f.stat().st_size for f in master.iterdir())
    extra = peaks["big"] - peaks["tiny"]
    assert extra < 256 / 3, f"splitting a 256 MiB table into 32 MiB shards took {extra:.0f} MB more than a tiny one"
    assert sizes["big"] - sizes["tiny"] < 1 << 20, "the master's checkpoint holds neither copy of the table"

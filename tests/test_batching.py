"""Server-side batching with TF Serving's parameters: real servers and the official client, or the batcher
driven directly with real loaded SavedModels where a test needs a request's deadline."""

import gc
import shutil
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import models
from helpers import HALF_PLUS_TWO, TESTDATA, InProcessServer, wait_until, write_config
from remote_predict.errors import Code, ServingError
from remote_predict.serving import servable as servable_lib
from remote_predict.serving.batching import (
    Batcher,
    BatchingOptions,
    choose_runner,
    parameters_from_file,
    split_sizes,
)
from remote_predict.serving.servable import run_timeout_ms

# ------------------------------------------------------------------------------------- parameters


def test_tf_serving_batching_file_parses():
    options = parameters_from_file(str(TESTDATA / "batching_config.txt"))
    assert (options.max_batch_size, options.batch_timeout_micros, options.max_enqueued_batches,
            options.num_batch_threads) == (128, 0, 1000000, 8)


def test_invalid_parameters_are_refused():
    with pytest.raises(ServingError, match="last allowed_batch_sizes entry must equal max_batch_size"):
        BatchingOptions(max_batch_size=8, allowed_batch_sizes=(2, 4))
    with pytest.raises(ServingError, match=r"must equal max_execution_batch_size \(4\)"):
        BatchingOptions(max_batch_size=8, enable_large_batch_splitting=True, max_execution_batch_size=4,
                        allowed_batch_sizes=(2, 8))
    # As TF Serving: with splitting, the allowed sizes end at the execution batch size.
    BatchingOptions(max_batch_size=8, enable_large_batch_splitting=True, max_execution_batch_size=4,
                    allowed_batch_sizes=(2, 4))


def test_execution_batch_larger_than_max_batch_is_refused_at_start_up(tmp_path):
    """Issue 13: such a piece fitted no batch; the batcher spun on empty batches and the request hung."""
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 4 } enable_large_batch_splitting { value: true } "
                      "max_execution_batch_size { value: 8 }")
    result = subprocess.run(
        [sys.executable, "-m", "remote_predict", "serve", "--port=0", f"--model_base_path={HALF_PLUS_TWO}",
         "--model_name=half_plus_two", "--enable_batching", f"--batching_parameters_file={params}"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "max_execution_batch_size (8) must not be larger than max_batch_size (4)" in result.stderr


def test_decisions():
    assert run_timeout_ms(None, 5.0) == 0
    assert run_timeout_ms(5.0 + 0.0001, 5.0) == 1
    assert 100 <= run_timeout_ms(5.0 + 0.1, 5.0) <= 125  # rounded up, never below what is left, 25 % at most
    assert run_timeout_ms(5.0 - 1.0, 5.0) == 1
    steps = {run_timeout_ms(5.0 + s / 1000, 5.0) for s in range(1, 86_400_000, 997)}
    assert len(steps) <= 82  # few callables per signature, whatever the deadlines (up to a day)
    # The runner is the request with the latest deadline (None: none) ...
    assert choose_runner([1.0, None, 2.0], None, 0.0, None) == 1
    assert choose_runner([1.0, 3.0, 2.0], 0, 0.0, None) == 1
    # ... unless the deciding request's own deadline cannot pass during the run.
    assert choose_runner([1.0, 3.0, 2.0], 0, 0.0, 0.01) == 0
    assert choose_runner([1.0, 3.0, 2.0], 0, 0.0, 0.5) == 1
    assert choose_runner([None, None], 1, 0.0, None) == 1
    assert split_sizes(5, 2, 0) == [2, 2, 1]
    assert split_sizes(5, 4, 3) == [1, 4]  # the first piece fills the open batch
    assert split_sizes(3, 4, 0) == [3]


# ------------------------------------------------------------------------------------ real servers


def serve(tmp_path, params: str, *flags: str):
    models.slow_scale(tmp_path / "slow" / "1", 2.0, delay_ms=100)
    models.scale(tmp_path / "scale" / "1", 3.0)
    config = write_config(tmp_path / "models.config", {"slow": tmp_path / "slow", "scale": tmp_path / "scale",
                                                         "half_plus_two": HALF_PLUS_TWO})
    (tmp_path / "batching.txt").write_text(params)
    return InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0", "--enable_batching",
                           f"--batching_parameters_file={tmp_path / 'batching.txt'}", *flags)


def batches(server) -> tuple[float, float]:
    """(batches run, rows run) from the server's batch-size histogram."""
    registry = server.server.metrics.registry
    return (registry.get_sample_value("remote_predict_batch_size_count") or 0,
            registry.get_sample_value("remote_predict_batch_size_sum") or 0)


def at_most(server, rows: int) -> float:
    """Batches of at most `rows` rows, from the histogram's bucket (rows must be a bucket bound)."""
    return server.server.metrics.registry.get_sample_value("remote_predict_batch_size_bucket", {"le": f"{rows:.1f}"})


def test_concurrent_requests_merge_and_each_gets_its_own_answer(tmp_path):
    with serve(tmp_path, "max_batch_size { value: 16 } batch_timeout_micros { value: 20000 } "
                         "num_batch_threads { value: 1 } allowed_batch_sizes: 8 allowed_batch_sizes: 16") as s:
        def call(i):
            x = np.array([[i, i + 0.5]], np.float32)
            response = s.predict("slow", {"x": x})
            return i, np.array(response.outputs["y"].float_val).reshape(1, 2)

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(call, range(24)))
        for i, y in results:
            np.testing.assert_array_equal(y, [[2 * i, 2 * i + 1.0]])
        # 24 requests of 100 ms each, one run at a time: they ran in a few batches, not 24 runs.
        count, rows = batches(s)
        assert rows == 24 and count <= 6


def test_a_grpc_deadline_bounds_the_time_in_the_batch_queue(tmp_path):
    """The client's deadline reaches the batcher: a request queued behind a long run gives up at it,
    server side, and is never run."""
    models.slow_scale(tmp_path / "slower" / "1", 2.0, delay_ms=1500)
    config = write_config(tmp_path / "slower.config", {"slower": tmp_path / "slower"})
    (tmp_path / "b.txt").write_text("max_batch_size { value: 8 } num_batch_threads { value: 1 }")
    with InProcessServer(f"--model_config_file={config}", "--enable_batching",
                         f"--batching_parameters_file={tmp_path / 'b.txt'}") as s, ThreadPoolExecutor(1) as pool:
        first = pool.submit(s.predict, "slower", {"x": np.ones((1, 1), np.float32)})
        wait_until(lambda: batches(s)[0] == 1, 30, "the first request's run to start")
        with pytest.raises(grpc.RpcError) as caught:
            s.predict("slower", {"x": np.ones((1, 1), np.float32)}, timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        registry = s.server.metrics.registry
        wait_until(lambda: registry.get_sample_value("remote_predict_requests_total", {
            "model": "slower", "api": "predict", "protocol": "grpc", "code": "DEADLINE_EXCEEDED"}) == 1, 5,
            "the server to answer the queued request DEADLINE_EXCEEDED")
        assert first.result(timeout=30).outputs["y"].float_val == [2.0]
        assert batches(s) == (1, 1), "the late request never ran"


def test_without_batch_timeout_requests_merge_while_a_batch_runs(tmp_path):
    """batch_timeout_micros 0: a request that finds the run slot free runs at once; those arriving
    meanwhile merge into the next batch, run by one of them."""
    with serve(tmp_path, "max_batch_size { value: 32 } batch_timeout_micros { value: 0 } "
                         "num_batch_threads { value: 1 }") as s:
        start = threading.Barrier(16)

        def call(i):
            start.wait()
            response = s.predict("slow", {"x": np.array([[i]], np.float32)})
            return list(response.outputs["y"].float_val)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, range(16)))
        assert results == [[2.0 * i] for i in range(16)]
        count, rows = batches(s)
        assert rows == 16 and count <= 8


def test_batched_answers_equal_unbatched_answers_row_for_row(tmp_path):
    with serve(tmp_path, "max_batch_size { value: 64 } batch_timeout_micros { value: 5000 } "
                         "num_batch_threads { value: 2 } allowed_batch_sizes: 32 allowed_batch_sizes: 64") as s:
        rng = np.random.default_rng(7)
        requests = [rng.standard_normal((int(rng.integers(1, 5)), 1)).astype(np.float32) for _ in range(96)]
        unbatched = servable_lib.load("half_plus_two", 1, str(HALF_PLUS_TWO / "00000123"),
                                      servable_lib.LoadOptions())
        try:
            signature = unbatched.signature("")
            expected = [unbatched.run(signature, {"x": x}, ["y"])["y"] for x in requests]
        finally:
            unbatched.close()

        def call(x):
            return np.array(s.predict("half_plus_two", {"x": x}).outputs["y"].float_val).reshape(x.shape)

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(call, requests))
        for answer, want in zip(answers, expected, strict=True):
            np.testing.assert_array_equal(answer, want)
        count, rows = batches(s)
        assert rows >= sum(len(x) for x in requests) and count < len(requests)  # padded rows count too


def test_oversized_request_is_refused_or_split(tmp_path):
    with serve(tmp_path, "max_batch_size { value: 4 } enable_large_batch_splitting { value: false }") as s:
        with pytest.raises(grpc.RpcError) as caught:
            s.predict("scale", {"x": np.ones((5, 1), np.float32)})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Task size 5 is larger than maximum input batch size 4" in caught.value.details()
    with serve(tmp_path / "split", "max_batch_size { value: 4 } enable_large_batch_splitting { value: true } "
                                   "max_execution_batch_size { value: 2 }") as s:
        # As TF Serving: max_batch_size still bounds a request; larger ones run in pieces of 2 rows.
        with pytest.raises(grpc.RpcError) as caught:
            s.predict("scale", {"x": np.ones((5, 1), np.float32)})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        x = np.arange(6, dtype=np.float32).reshape(3, 2)
        response = s.predict("scale", {"x": x})
        np.testing.assert_array_equal(np.array(response.outputs["y"].float_val).reshape(3, 2), 3 * x)
        count, rows = batches(s)
        assert (count, rows) == (2, 3) and at_most(s, 2) == 2  # no batch ran more than 2 rows


def test_split_requests_under_load_never_form_an_empty_or_oversized_batch(tmp_path):
    with serve(tmp_path, "max_batch_size { value: 8 } enable_large_batch_splitting { value: true } "
                         "max_execution_batch_size { value: 4 } num_batch_threads { value: 2 } "
                         "max_enqueued_batches { value: 1000 }") as s:
        sizes = [2, 4, 6, 8, 2, 6, 4, 8] * 4

        def call(i):
            x = np.full((sizes[i], 1), i, np.float32)
            y = np.array(s.predict("slow", {"x": x}).outputs["y"].float_val)
            return np.array_equal(y, np.full(sizes[i], 2.0 * i))

        with ThreadPoolExecutor(16) as pool:
            assert all(pool.map(call, range(len(sizes))))
        count, rows = batches(s)
        assert rows == sum(sizes)
        # Every request has an even number of rows and pieces never break a pair, so no batch holds
        # fewer than 2 rows (an empty batch would be counted in the le=1 bucket) or more than 4.
        assert at_most(s, 1) == 0 and at_most(s, 4) == count


def test_different_inner_shapes_do_not_fail_each_other(tmp_path):
    """Without pad_variable_length_inputs, requests of other inner shapes queue apart instead of failing
    the batch they would have been merged into."""
    with serve(tmp_path, "max_batch_size { value: 8 } batch_timeout_micros { value: 100000 } "
                         "num_batch_threads { value: 1 }") as s:
        shapes = [(1, 2), (1, 3)] * 4

        def call(shape):
            x = np.ones(shape, np.float32)
            return list(s.predict("scale", {"x": x}).outputs["y"].float_val)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, shapes))
        assert results == [[3.0] * shape[1] for shape in shapes]


def test_full_queue_answers_unavailable(tmp_path):
    with serve(tmp_path, "max_batch_size { value: 1 } max_enqueued_batches { value: 1 } "
                         "num_batch_threads { value: 1 }") as s:
        codes = []
        lock = threading.Lock()

        def call(_):
            try:
                s.predict("slow", {"x": np.ones((1, 1), np.float32)})
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                assert "queue to which this task was submitted is full" in e.details()
            with lock:
                codes.append(code)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(call, range(8)))
        assert "UNAVAILABLE" in codes and "OK" in codes
        assert set(codes) <= {"OK", "UNAVAILABLE"}


def test_variable_length_inputs_are_padded_when_asked(tmp_path):
    with serve(tmp_path, "max_batch_size { value: 8 } batch_timeout_micros { value: 200000 } "
                         "num_batch_threads { value: 1 } pad_variable_length_inputs: true") as s:
        with ThreadPoolExecutor(2) as pool:
            short, long = pool.map(lambda x: s.predict("scale", {"x": x}),
                                   [np.array([[1.0, 2.0]], np.float32), np.array([[1.0, 2.0, 3.0]], np.float32)])
        assert list(long.outputs["y"].float_val) == [3.0, 6.0, 9.0]
        assert list(short.outputs["y"].float_val)[:2] == [3.0, 6.0]
        assert batches(s) == (1, 2)


def test_scalar_and_empty_inputs_run_unbatched(tmp_path):
    with serve(tmp_path, "max_batch_size { value: 8 }") as s:
        assert s.predict("scale", {"x": np.float32(2.0)}).outputs["y"].float_val == [6.0]
        assert s.predict("scale", {"x": np.zeros((0, 2), np.float32)}).outputs["y"].float_val == []
        assert s.predict("half_plus_two", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val == [3.0]
        assert batches(s) == (1, 1)  # only the last one was a batch


def test_queues_of_unloaded_versions_are_freed(tmp_path):
    """Issue 13: queues were kept per id(servable) forever, each holding its unloaded version."""
    base = tmp_path / "slow"
    models.slow_scale(base / "1", 2.0, delay_ms=20)
    (tmp_path / "batching.txt").write_text("max_batch_size { value: 8 } num_batch_threads { value: 1 }")
    with InProcessServer(f"--model_base_path={base}", "--model_name=slow", "--file_system_poll_wait_seconds=1",
                         "--enable_batching", f"--batching_parameters_file={tmp_path / 'batching.txt'}",
                         "--grpc_max_threads=16") as s:
        with s.server.manager.acquire("slow", 1) as handle:
            version_1 = weakref.ref(handle.servable)
        del handle
        batcher = s.server.data_plane.batcher
        stop = threading.Event()
        outcomes: list[str] = []
        seen_queues = []

        def load():
            while not stop.is_set():
                try:
                    s.predict("slow", {"x": np.ones((1, 1), np.float32)})
                    outcomes.append("OK")
                except grpc.RpcError as e:
                    outcomes.append(e.code().name)
                seen_queues.append(batcher.queue_count)

        with ThreadPoolExecutor(8) as pool:
            try:
                for _ in range(8):
                    pool.submit(load)
                wait_until(lambda: len(outcomes) >= 100, 60, "load on version 1")
                shutil.copytree(base / "1", tmp_path / "next")
                (tmp_path / "next").rename(base / "2")  # appears whole: the manager never sees half a version
                wait_until(lambda: s.server.manager.status("slow", 1)[0].state.value == "END", 60,
                           "version 1 unloaded")
                served = len(outcomes)
                wait_until(lambda: len(outcomes) >= served + 100, 60, "load on version 2")
            finally:
                stop.set()
        assert set(outcomes) == {"OK"}
        assert max(seen_queues) >= 1  # requests did queue behind each other
        gc.collect()
        assert version_1() is None, "the batcher still holds the unloaded version"
        assert batcher.queue_count == 0


# ------------------------------------------------------------------- deadlines (the batcher itself)
#
# The data plane passes each request's deadline to Batcher.run; these tests give it deadlines directly,
# with real loaded SavedModels.


@pytest.fixture(scope="module")
def slow_servable(tmp_path_factory):
    path = models.slow_scale(tmp_path_factory.mktemp("slow") / "1", 2.0, delay_ms=1000)
    servable = servable_lib.load("slow", 1, str(path), servable_lib.LoadOptions())
    yield servable
    servable.close()


def _outcome(call):
    try:
        return call()
    except ServingError as e:
        return e


def test_a_request_still_queued_at_its_deadline_is_answered_and_never_run(slow_servable):
    runs: list[int] = []
    started = threading.Event()

    def on_batch(rows):
        runs.append(rows)
        started.set()

    batcher = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1), on_batch)
    signature = slow_servable.signature("")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.run, slow_servable, signature, {"x": np.ones((1, 1), np.float32)}, ["y"])
        started.wait(30)
        late = batcher.run  # queued behind the running batch, with 100 ms to live
        error = _outcome(lambda: late(slow_servable, signature, {"x": np.ones((1, 1), np.float32)}, ["y"],
                                      deadline=time.monotonic() + 0.1))
        assert batcher.queue_count == 0
        assert not first.done()
        np.testing.assert_array_equal(first.result()["y"], [[2.0]])
    assert isinstance(error, ServingError) and error.code is Code.DEADLINE_EXCEEDED
    assert "waited in the batch queue" in error.message
    assert runs == [1]  # the late request never ran


def test_a_past_deadline_is_refused_before_queueing(slow_servable):
    batcher = Batcher(BatchingOptions(max_batch_size=8), [].append)
    x = {"x": np.ones((1, 1), np.float32)}
    error = _outcome(lambda: batcher.run(slow_servable, slow_servable.signature(""), x, ["y"],
                                         deadline=time.monotonic() - 1))
    assert error.code is Code.DEADLINE_EXCEEDED


def test_a_merged_run_covers_the_latest_deadline_and_each_request_ends_at_its_own(slow_servable):
    """Two requests merge (the batch closes when full); the run takes 1 s. The one with 0.5 s to live is
    answered DEADLINE_EXCEEDED while the run goes on; the one with 5 s gets its rows: its deadline, not the
    other's, bounds the Session run."""
    runs: list[int] = []
    batcher = Batcher(BatchingOptions(max_batch_size=2, batch_timeout_micros=30_000_000, num_batch_threads=1),
                      runs.append)
    signature = slow_servable.signature("")
    with ThreadPoolExecutor(2) as pool:
        short = pool.submit(_outcome, lambda: batcher.run(
            slow_servable, signature, {"x": np.full((1, 1), 1.0, np.float32)}, ["y"], deadline=time.monotonic() + 0.5))
        wait_until(lambda: batcher.queue_count == 1, 10, "the first request queued")
        long = pool.submit(_outcome, lambda: batcher.run(
            slow_servable, signature, {"x": np.full((1, 1), 4.0, np.float32)}, ["y"], deadline=time.monotonic() + 5))
        error = short.result()
        assert not long.done()  # answered while the batch still ran
        assert isinstance(error, ServingError) and error.code is Code.DEADLINE_EXCEEDED
        assert "batch was running" in error.message
        np.testing.assert_array_equal(long.result()["y"], [[8.0]])
    assert runs == [2]


def test_a_run_past_every_deadline_is_cancelled(slow_servable):
    """The Session run gets a timeout covering the deadline: TensorFlow cancels the 1 s run (its own
    DEADLINE_EXCEEDED), rather than the run finishing and its answer being dropped."""
    batcher = Batcher(BatchingOptions(max_batch_size=8), [].append)
    x = {"x": np.ones((1, 1), np.float32)}
    error = _outcome(lambda: batcher.run(slow_servable, slow_servable.signature(""), x, ["y"],
                                         deadline=time.monotonic() + 0.2))
    assert error.code is Code.DEADLINE_EXCEEDED
    assert "Timed out waiting for notification" in error.message

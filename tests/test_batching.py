"""Server-side batching with TF Serving's parameters, through real servers and the official client."""

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import models
from helpers import HALF_PLUS_TWO, TESTDATA, InProcessServer, write_config
from remote_predict.serving.batching import BatchingOptions, parameters_from_file


def test_tf_serving_batching_file_parses():
    options = parameters_from_file(str(TESTDATA / "batching_config.txt"))
    assert (options.max_batch_size, options.batch_timeout_micros, options.max_enqueued_batches,
            options.num_batch_threads) == (128, 0, 1000000, 8)


def test_invalid_parameters_are_refused():
    with pytest.raises(Exception, match="last allowed_batch_sizes entry must equal max_batch_size"):
        BatchingOptions(max_batch_size=8, allowed_batch_sizes=(2, 4))


def serve(tmp_path, params: str):
    models.slow_scale(tmp_path / "slow" / "1", 2.0, delay_ms=100)
    models.scale(tmp_path / "scale" / "1", 3.0)
    config = write_config(tmp_path / "models.config", {"slow": tmp_path / "slow", "scale": tmp_path / "scale",
                                                         "half_plus_two": HALF_PLUS_TWO})
    (tmp_path / "batching.txt").write_text(params)
    return InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0", "--enable_batching",
                           f"--batching_parameters_file={tmp_path / 'batching.txt'}")


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
        # 24 requests of 100 ms each, one batch thread: they ran in a few batches, not 24 runs.
        registry = s.server.metrics.registry
        assert registry.get_sample_value("remote_predict_batch_size_sum") == 24
        assert registry.get_sample_value("remote_predict_batch_size_count") <= 6


def test_oversized_request_is_refused_or_split(tmp_path):
    with serve(tmp_path, "max_batch_size { value: 4 } enable_large_batch_splitting { value: false }") as s:
        with pytest.raises(grpc.RpcError) as caught:
            s.predict("scale", {"x": np.ones((5, 1), np.float32)})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Task size 5 is larger than maximum input batch size 4" in caught.value.details()
    with serve(tmp_path / "split", "max_batch_size { value: 4 } enable_large_batch_splitting { value: true } "
                                   "max_execution_batch_size { value: 2 }") as s:
        x = np.arange(10, dtype=np.float32).reshape(5, 2)
        response = s.predict("scale", {"x": x})
        np.testing.assert_array_equal(np.array(response.outputs["y"].float_val).reshape(5, 2), 3 * x)


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


def test_scalar_inputs_run_unbatched(tmp_path):
    with serve(tmp_path, "max_batch_size { value: 8 }") as s:
        assert s.predict("scale", {"x": np.float32(2.0)}).outputs["y"].float_val == [6.0]
        assert s.predict("half_plus_two", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val == [3.0]

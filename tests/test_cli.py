"""`remote-predict serve` as users run it: flags, config errors, UNIX sockets, signals and draining."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import models
from helpers import HALF_PLUS_THREE, HALF_PLUS_TWO, TESTDATA, ServerProcess, free_port
from remote_predict import cli


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remote_predict", *args], capture_output=True, text=True,
                          timeout=timeout)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The same entry point, in this process (no TensorFlow import per case)."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse exits on its own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("args", "code", "message"), [
    (["serve", "--model_base_path=/x", "--no_such_flag=1"], 2, "unrecognized arguments: --no_such_flag=1"),
    (["serve", "--model_base_path=/x", "--platform_config_file=/p.txt"], 2,
     "--platform_config_file=/p.txt: this tensorflow_model_server flag is not supported by remote-predict yet"),
    (["serve"], 2, "Both server_model_base_path and model_config_file are empty"),
    (["serve", "--model_base_path=/x", "--port=8500", "--rest_api_port=8500"], 2, "cannot be the same"),
    (["serve", f"--model_config_file={TESTDATA / 'bad_model_config.txt'}"], 1,
     f"Invalid protobuf file: '{TESTDATA / 'bad_model_config.txt'}': Error parsing text-format "
     "tensorflow.serving.ModelServerConfig: 1:1: "),
    (["serve", "--model_base_path=/does/not/exist", "--port=0"], 1,
     "Could not find base path /does/not/exist for servable default"),
    (["serve", "--model_config_file=/no/such/config.txt"], 1, "Cannot read '/no/such/config.txt'"),
    (["serve", "--model_base_path=/x", "--num_tflite_interpreters_per_pool=4"], 2,
     "--num_tflite_interpreters_per_pool=4: TF Serving's splitting of one request's batch over several TFLite "
     "interpreters is not implemented"),
    (["serve", "--model_base_path=/x", "--num_tflite_pools=-1"], 2, "--num_tflite_pools must be >= 0"),
    (["serve", "--model_base_path=/x", "--grpc_max_threads=-1"], 2, "--grpc_max_threads must be >= 0"),
    (["serve", "--model_base_path=/x", "--remote_predict_hedge_percentile=100"], 2,
     "--remote_predict_hedge_percentile must be in [0, 100)"),
    (["frobnicate"], 2, "unknown command 'frobnicate'"),
])
def test_refusals_name_the_problem(capsys, args, code, message):
    returncode, _, err = run_main(capsys, *args)
    assert returncode == code, err[-2000:]
    assert message in err


def test_version_and_defaults_accepted(capsys):
    returncode, out, _ = run_main(capsys, "serve", "--model_base_path=/x", "--enable_profiler=true",
                                  "--num_tflite_interpreters_per_pool=1", "--version")
    assert returncode == 0 and "remote-predict" in out


def test_bad_config_file_gets_tf_serving_wording_with_line_and_column(tmp_path):
    """TF Serving's test reads the server's stderr for this phrase; the line and column say where."""
    config = tmp_path / "models.config"
    config.write_text('model_config_list {\n  config { name: "a" base_path: "/x"\n    bogus: 1 }\n}\n')
    result = run_cli("serve", f"--model_config_file={config}", "--port=0")
    assert result.returncode == 1
    assert (f"Invalid protobuf file: '{config}': Error parsing text-format tensorflow.serving.ModelServerConfig: "
            '3:5: Message type "tensorflow.serving.ModelConfig" has no field named "bogus".') in result.stderr


def test_tf_serving_config_file_unix_socket_and_sigterm(tmp_path):
    config = (TESTDATA / "good_model_config.txt").read_text()
    config = config.replace("${TEST_HALF_PLUS_TWO_DIR}", str(HALF_PLUS_TWO))
    config = config.replace("${TEST_HALF_PLUS_THREE_DIR}", str(HALF_PLUS_THREE))
    (tmp_path / "good.config").write_text(config)
    socket_path = tmp_path / "serving.sock"
    with ServerProcess(f"--model_config_file={tmp_path / 'good.config'}", f"--grpc_socket_path={socket_path}") as s:
        assert s.predict("half_plus_three", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val == [4.0]
        assert s.get("/v1/models/half_plus_two")[1]["model_version_status"][0]["state"] == "AVAILABLE"
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "half_plus_two"
            request.inputs["x"].CopyFrom(_tensor([[2.0]]))
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
            assert response.outputs["y"].float_val == [3.0]
        s.signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
        assert "Stopped" in s.output()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to run on fewer")
def test_request_pools_are_sized_by_the_cpus_the_process_may_run_on():
    """TF Serving's NumSchedulableCPUs: the affinity mask (a container's cpuset), not the host's CPUs."""
    with ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                       prefix=("taskset", "--cpu-list", "0")) as s:
        assert s.predict("half_plus_two", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val == [3.0]
        started = next(line for line in s.output().splitlines() if "Serving models" in line)
        assert re.search(r"gRPC on 127\.0\.0\.1:\d+ \(4 threads\), REST on 127\.0\.0\.1:\d+ \(4 threads\)",
                         started), started


def _tensor(value):
    import tensorflow as tf

    return tf.make_tensor_proto(np.array(value, np.float32))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_finishes_in_flight_requests_and_refuses_new_ones(tmp_path, signum):
    base = tmp_path / "sleepy"
    models.sleepy(base / "1")
    with ServerProcess(f"--model_base_path={base}", "--model_name=sleepy", "--drain_timeout_seconds=20") as s:
        outcome = {}

        def slow():
            try:
                response = s.predict("sleepy", {"x": np.array([5.0], np.float32), "delay_ms": np.int64(2000)})
                outcome["y"] = list(response.outputs["y"].float_val)
            except grpc.RpcError as e:
                outcome["error"] = e.code()

        s.predict("sleepy", {"x": np.array([1.0], np.float32), "delay_ms": np.int64(1)})  # warm up
        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        s.signal(signum)
        time.sleep(0.3)
        with grpc.insecure_channel(s.address) as fresh:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "sleepy"
            with pytest.raises(grpc.RpcError) as caught:
                prediction_service_pb2_grpc.PredictionServiceStub(fresh).Predict(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        thread.join()
        assert outcome == {"y": [5.0]}, "the request in flight at the signal must complete"
        assert s.proc.wait(30) == 0
        assert time.monotonic() - started < 20


def test_port_in_use_is_reported():
    port = free_port()
    with ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", grpc_port=port, rest=False):
        result = run_cli("serve", f"--model_base_path={HALF_PLUS_TWO}", "--host=127.0.0.1", f"--port={port}")
        assert result.returncode == 1
        assert f"Cannot listen for gRPC on 127.0.0.1:{port}" in result.stderr

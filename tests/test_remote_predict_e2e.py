"""RemotePredict end to end: real servers on loopback, real SavedModels, the official clients."""

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, op_def_pb2, types_pb2
from tensorflow.core.protobuf import saved_model_pb2

import models
from helpers import HALF_PLUS_TWO, REPO, InProcessServer, ServerProcess, free_port, wait_until, write_config
from remote_predict.op.config import OpConfig
from remote_predict.serving.cpus import budget
from remote_predict.tools import export


@pytest.fixture(scope="module")
def leaf(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaf")
    models.scale(root / "scaled" / "1", 1.0)
    models.scale(root / "scaled" / "2", 10.0)
    models.sleepy(root / "sleepy" / "1")
    config = write_config(root / "leaf.config", {"half_plus_two": HALF_PLUS_TWO, "scaled": root / "scaled",
                                                  "sleepy": root / "sleepy"},
                          extra={"scaled": "model_version_policy { all {} }"})
    with InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0") as s:
        yield s


def serve_master(tmp: Path, built: dict[str, Path], *flags: str, port: int | None = None) -> InProcessServer:
    config = write_config(tmp / "master.config", {name: path.parent for name, path in built.items()})
    # Leaves run in this test process too: keep their calls on the network, as between machines.
    return InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0",
                           "--remote_predict_loopback_in_process=false", *flags, grpc_port=port)


def test_seed_walkthrough_with_the_cli(tmp_path):
    """The seed's steps with our commands: export, config file, serve, curl-equivalent request."""
    port, rest_port = free_port(), free_port()
    export.main(["half_plus_two", f"--output_dir={tmp_path / 'half_plus_two' / '00000123'}"])
    export.main(["half_plus_two_with_rpop", f"--target_address=localhost:{port}",
                 f"--output_dir={tmp_path / 'half_plus_two_with_rpop' / '1'}"])
    config = write_config(tmp_path / "config_file.txt", {
        "half_plus_two": tmp_path / "half_plus_two", "half_plus_two_with_rpop": tmp_path / "half_plus_two_with_rpop"})
    with ServerProcess(f"--model_config_file={config}", grpc_port=port, rest_port=rest_port) as server:
        status, body = server.post("/v1/models/half_plus_two_with_rpop:predict", {"instances": [1.0, 2.0, 5.0]})
        assert (status, body) == (200, {"predictions": [3.5, 4.0, 5.5]})
        response = server.predict("half_plus_two_with_rpop", {"x": np.array([[1.0], [2.0]], np.float32)})
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["y"]), [[3.5], [4.0]])


def test_version_pin_and_signature_name(leaf, tmp_path):
    built = {
        "pinned": models.caller(tmp_path / "pinned" / "1", leaf.address, "scaled", version=1),
        "latest": models.caller(tmp_path / "latest" / "1", leaf.address, "scaled"),
        "double": models.caller(tmp_path / "double" / "1", leaf.address, "scaled", version=2, signature="double"),
        # gRPC name syntax for the target
        "via_dns": models.caller(tmp_path / "via_dns" / "1", f"dns:///{leaf.address}", "scaled", version=1),
        "via_ipv4": models.caller(tmp_path / "via_ipv4" / "1", f"ipv4:{leaf.address}", "scaled", version=1),
    }
    with serve_master(tmp_path, built) as master:
        x = {"x": np.array([1.0, 2.0], np.float32)}
        assert list(master.predict("pinned", x).outputs["y"].float_val) == [1.0, 2.0]
        assert list(master.predict("latest", x).outputs["y"].float_val) == [10.0, 20.0]
        assert list(master.predict("double", x).outputs["y"].float_val) == [20.0, 40.0]
        for model in ("via_dns", "via_ipv4"):
            assert list(master.predict(model, x).outputs["y"].float_val) == [1.0, 2.0]


def test_stopped_target_unknown_model_and_slow_target(leaf, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    built = {
        "dead_status": models.caller(tmp_path / "dead_status" / "1", dead, "half_plus_two", returning_status=True),
        "dead_run": models.caller(tmp_path / "dead_run" / "1", dead, "half_plus_two"),
        "unknown": models.caller(tmp_path / "unknown" / "1", leaf.address, "no_such_model", returning_status=True),
        "unknown_run": models.caller(tmp_path / "unknown_run" / "1", leaf.address, "no_such_model"),
        "slow": models.fan_out(tmp_path / "slow" / "1", [leaf.address], deadline_ms=300),
    }
    with serve_master(tmp_path, built) as master:
        x = {"x": np.array([2.0], np.float32)}
        response = master.predict("dead_status", x)
        assert response.outputs["code"].int_val == [14]
        assert f"at {dead}" in response.outputs["message"].string_val[0].decode()
        assert tf.make_ndarray(response.outputs["y"]).shape == ()  # empty scalar of the declared type
        with pytest.raises(grpc.RpcError) as caught:
            master.predict("dead_run", x)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "half_plus_two" in caught.value.details() and dead in caught.value.details()

        assert master.predict("unknown", x).outputs["code"].int_val == [5]
        with pytest.raises(grpc.RpcError) as caught:
            master.predict("unknown_run", x)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "Servable not found for request: Latest(no_such_model)" in caught.value.details()

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            master.predict("slow", {"x": np.array([1.0], np.float32), "delay_ms": np.int64(3000)})
        elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # without the deadline: 3 s; the margin is for the master's first run of the model on a busy machine
        assert elapsed < 0.3 + 1.5, f"deadline 300 ms, failed after {elapsed * 1000:.0f} ms"


def test_max_inflight_per_target_refuses_calls_over_the_cap(leaf, tmp_path):
    built = {"slow": models.fan_out(tmp_path / "slow" / "1", [leaf.address], deadline_ms=20000)}
    with serve_master(tmp_path, built, "--remote_predict_max_inflight_per_target=1",
                      "--grpc_max_threads=8") as master:
        assert master.server.grpc_threads == 8  # the flag, when given, decides
        x = {"x": np.array([1.0], np.float32)}
        results: dict[str, object] = {}

        def first():
            results["first"] = master.predict("slow", {**x, "delay_ms": np.int64(3000)})

        thread = threading.Thread(target=first)
        thread.start()
        wait_until(lambda: master.server.metrics.registry.get_sample_value(
            "remote_predict_op_inflight_calls", {"target": leaf.address}) == 1, 10, "the first call to be in flight")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            master.predict("slow", {**x, "delay_ms": np.int64(0)})
        assert time.monotonic() - started < 1.5, "a call over the cap must fail at once, not wait for a slot"
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--remote_predict_max_inflight_per_target" in caught.value.details()
        thread.join()
        assert list(results["first"].outputs["y"].float_val) == [1.0]
        # With the first call done, a call fits under the cap again.
        assert list(master.predict("slow", {**x, "delay_ms": np.int64(0)}).outputs["y"].float_val) == [1.0]


def test_a_server_of_remote_calls_runs_more_requests_at_once_than_a_plain_one(leaf, tmp_path):
    """--grpc_max_threads=0 (the default): 4 per CPU for plain models, as TF Serving; 16 per CPU for a server
    whose models make remote calls, whose requests mostly wait (flags.request_threads)."""
    cpus = budget().cpus  # as the server counts them (a container's cpuset and CPU quota)
    assert (leaf.server.grpc_threads, leaf.server.rest_threads) == (4 * cpus, 4 * cpus)
    waiting = 4 * cpus + 4  # more than TF Serving's default would run at once
    sleepy = InProcessServer(f"--model_base_path={models.sleepy(tmp_path / 'sleepy' / '1').parent}",
                             "--model_name=sleepy", f"--grpc_max_threads={2 * waiting}", rest=False)
    built = {"slow": models.fan_out(tmp_path / "slow" / "1", [sleepy.address], deadline_ms=20000)}
    with sleepy, serve_master(tmp_path, built) as master:
        assert master.server.grpc_threads == 16 * cpus
        answers: list[list[float]] = []

        def call():
            response = master.predict("slow", {"x": np.array([1.0], np.float32), "delay_ms": np.int64(1000)})
            answers.append(list(response.outputs["y"].float_val))

        threads = [threading.Thread(target=call) for _ in range(waiting)]
        for thread in threads:
            thread.start()
        wait_until(lambda: master.server.metrics.registry.get_sample_value(
            "remote_predict_op_inflight_calls", {"target": sleepy.address}) == waiting, 10,
            f"{waiting} requests' remote calls in flight at once")
        for thread in threads:
            thread.join()
        assert answers == [[1.0]] * waiting


def test_fan_out_runs_the_calls_concurrently(tmp_path):
    leaves = [InProcessServer(f"--model_base_path={models.sleepy(tmp_path / f'sleepy{i}' / '1').parent}",
                              "--model_name=sleepy", rest=False) for i in range(4)]
    try:
        built = {"fan": models.fan_out(tmp_path / "fan" / "1", [s.address for s in leaves])}
        with serve_master(tmp_path, built) as master:
            x = {"x": np.array([1.0, 2.0], np.float32), "delay_ms": np.int64(1000)}
            master.predict("fan", {"x": np.array([1.0], np.float32), "delay_ms": np.int64(1)})  # warm up
            started = time.monotonic()
            response = master.predict("fan", x)
            elapsed = time.monotonic() - started
            assert list(response.outputs["y"].float_val) == [4.0, 8.0]
            assert elapsed < 1.0 * 4 * 0.6, (
                f"4 calls of 1 s each took {elapsed * 1000:.0f} ms in all; sequential calls would take 4 s")
    finally:
        for s in leaves:
            s.stop()


def test_rest_and_inprocess_stubs(leaf, tmp_path):
    port = free_port()  # two servers run in this test process: the in-process target names the master
    built = {
        "via_rest": models.caller(tmp_path / "via_rest" / "1", leaf.rest, "scaled", version=2),
        "via_rest_missing": models.caller(tmp_path / "via_rest_missing" / "1", leaf.rest, "nope",
                                          returning_status=True),
        "local_leaf": models.scale(tmp_path / "local_leaf" / "1", 3.0),
        "via_inprocess": models.caller(tmp_path / "via_inprocess" / "1", f"inprocess:{port}", "local_leaf"),
    }
    with serve_master(tmp_path, built, port=port) as master:
        x = {"x": np.array([[1.0, 2.0]], np.float32)}
        assert list(master.predict("via_rest", x).outputs["y"].float_val) == [10.0, 20.0]
        assert master.predict("via_rest_missing", x).outputs["code"].int_val == [5]
        assert list(master.predict("via_inprocess", x).outputs["y"].float_val) == [3.0, 6.0]


def test_a_call_to_this_same_server_skips_the_network(tmp_path):
    """The seed's set-up: both models on one server, the op naming it as localhost:PORT."""
    port = free_port()
    built = {"half_plus_two": export.export_half_plus_two(str(tmp_path / "half_plus_two" / "1")),
             "rpop": export.export_half_plus_two_with_rpop(str(tmp_path / "rpop" / "1"), f"localhost:{port}")}
    config = write_config(tmp_path / "c.config", {name: Path(path).parent for name, path in built.items()})
    with InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0", grpc_port=port) as s:
        answer = s.post("/v1/models/rpop:predict", {"instances": [1.0, 2.0, 5.0]})
        assert answer == (200, {"predictions": [3.5, 4.0, 5.5]})
        registry = s.server.metrics.registry
        ok = {"target": f"localhost:{port}", "model": "half_plus_two", "code": "OK"}
        assert registry.get_sample_value("remote_predict_op_calls_total", ok) == 1.0
        grpc_calls = {"model": "half_plus_two", "api": "predict", "protocol": "grpc", "code": "OK"}
        assert registry.get_sample_value("remote_predict_requests_total", grpc_calls) is None  # no network call


def test_custom_stub_from_the_readme(leaf, tmp_path, monkeypatch):
    example = (REPO / "examples" / "custom_stub.py").read_text()
    assert example.strip() in (REPO / "README.md").read_text(), "README must show examples/custom_stub.py as is"
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    built = {"traced": models.caller(tmp_path / "traced" / "1", f"traced://{leaf.address}", "half_plus_two")}
    with serve_master(tmp_path, built, "--remote_predict_plugins=custom_stub") as master:
        import custom_stub

        before = next(custom_stub.TracedStub._ids)
        assert list(master.predict("traced", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val) == [3.0]
        assert next(custom_stub.TracedStub._ids) == before + 2


def _tf_serving_op_def() -> op_def_pb2.OpDef:
    op = op_def_pb2.OpDef(name="TfServingRemotePredict", is_stateful=True)
    op.input_arg.add(name="input_tensor_aliases", type=types_pb2.DT_STRING)
    op.input_arg.add(name="input_tensors", type_list_attr="T")
    op.input_arg.add(name="output_tensor_aliases", type=types_pb2.DT_STRING)
    op.output_arg.add(name="status_code", type=types_pb2.DT_INT32)
    op.output_arg.add(name="status_error_message", type=types_pb2.DT_STRING)
    op.output_arg.add(name="output_tensors", type_list_attr="output_types")
    for name, kind in [("T", "list(type)"), ("target_address", "string"), ("model_name", "string"),
                       ("model_version", "int"), ("fail_op_on_rpc_error", "bool"),
                       ("max_rpc_deadline_millis", "int"), ("signature_name", "string"),
                       ("output_types", "list(type)")]:
        op.attr.add(name=name, type=kind)
    return op


def _as_tf_serving_model(source: Path, dest: Path) -> Path:
    """Rewrite our op's nodes into TF Serving's TfServingRemotePredict, as its exporter would write them."""
    shutil.copytree(source, dest)
    saved = saved_model_pb2.SavedModel.FromString((dest / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    count = 0
    for node in graph.node:
        if node.op != "EagerPyFunc":
            continue
        config = OpConfig.from_token(node.attr["token"].s.decode())
        tin = list(node.attr["Tin"].list.type)
        node.op = "TfServingRemotePredict"
        node.ClearField("attr")
        node.attr["T"].list.type.extend(tin[1:-1])
        node.attr["output_types"].list.type.extend(config.output_types)
        node.attr["target_address"].CopyFrom(attr_value_pb2.AttrValue(s=config.target_address.encode()))
        node.attr["model_name"].CopyFrom(attr_value_pb2.AttrValue(s=config.model_name.encode()))
        node.attr["model_version"].CopyFrom(attr_value_pb2.AttrValue(i=config.model_version))
        node.attr["max_rpc_deadline_millis"].CopyFrom(attr_value_pb2.AttrValue(i=config.max_rpc_deadline_millis))
        node.attr["fail_op_on_rpc_error"].CopyFrom(attr_value_pb2.AttrValue(b=config.fail_op_on_rpc_error))
        count += 1
    assert count == 1
    saved.meta_graphs[0].meta_info_def.stripped_op_list.op.append(_tf_serving_op_def())
    (dest / "saved_model.pb").write_bytes(saved.SerializeToString())
    return dest


def test_tf_serving_op_nodes_are_translated_when_loaded(leaf, tmp_path):
    ours = models.caller(tmp_path / "ours" / "1", leaf.address, "scaled", version=2, returning_status=True)
    theirs = _as_tf_serving_model(ours, tmp_path / "theirs" / "1")
    assert b"TfServingRemotePredict" in (theirs / "saved_model.pb").read_bytes()
    with pytest.raises(Exception, match="TfServingRemotePredict"):  # stock TensorFlow cannot load it
        tf.compat.v1.saved_model.loader.load(tf.compat.v1.Session(graph=tf.Graph()), ["serve"], str(theirs))
    with serve_master(tmp_path, {"theirs": theirs}) as master:
        response = master.predict("theirs", {"x": np.array([1.5], np.float32)})
        assert list(response.outputs["y"].float_val) == [15.0]
        assert response.outputs["code"].int_val == [0]


def test_allowed_targets_refuse_without_connecting(leaf, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    forbidden = f"127.0.0.1:{listener.getsockname()[1]}"
    accepted = []

    def watch():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    stop = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    built = {"bad": models.caller(tmp_path / "bad" / "1", forbidden, "half_plus_two"),
             "bad_dns": models.caller(tmp_path / "bad_dns" / "1", f"dns:///{forbidden}", "half_plus_two"),
             "good": models.caller(tmp_path / "good" / "1", leaf.address, "half_plus_two")}
    try:
        with serve_master(tmp_path, built, f"--remote_predict_allowed_targets={leaf.address},localhost:1") as master:
            x = {"x": np.array([[2.0]], np.float32)}
            assert master.predict("good", x).outputs["y"].float_val == [3.0]
            for model in ("bad", "bad_dns"):
                with pytest.raises(grpc.RpcError) as caught:
                    master.predict(model, x)
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "--remote_predict_allowed_targets" in caught.value.details()
            time.sleep(0.5)
    finally:
        stop.set()
        watcher.join()
        listener.close()
    assert accepted == [], "a refused target must never see a connection"


def test_per_target_metrics_and_one_log_line_per_kind_of_failure(leaf, tmp_path, caplog):
    dead = f"127.0.0.1:{free_port()}"
    built = {"dead": models.caller(tmp_path / "dead" / "1", dead, "half_plus_two", returning_status=True),
             "good": models.caller(tmp_path / "good" / "1", leaf.address, "half_plus_two")}
    with serve_master(tmp_path, built) as master:
        x = {"x": np.array([[2.0]], np.float32)}
        with caplog.at_level("WARNING", logger="remote_predict.remote_calls"):
            for _ in range(50):
                assert master.predict("dead", x).outputs["code"].int_val == [14]
        for _ in range(3):
            master.predict("good", x)
        registry = master.server.metrics.registry
        assert registry.get_sample_value("remote_predict_op_calls_total",
                                         {"target": dead, "model": "half_plus_two", "code": "UNAVAILABLE"}) == 50
        assert registry.get_sample_value("remote_predict_op_calls_total",
                                         {"target": leaf.address, "model": "half_plus_two", "code": "OK"}) == 3
        assert registry.get_sample_value("remote_predict_op_call_duration_seconds_count", {"target": dead}) == 50
        assert registry.get_sample_value("remote_predict_op_inflight_calls", {"target": dead}) == 0
    lines = [r for r in caplog.records if dead in r.getMessage()]
    assert len(lines) == 1, "repeated identical failures are logged once, not once per request"
    assert "UNAVAILABLE" in lines[0].getMessage() and "half_plus_two" in lines[0].getMessage()

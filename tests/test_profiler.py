"""TF Serving's ProfilerService on the gRPC port: `tf.profiler.experimental.client.trace` against a server
process collects a trace, as TF Serving's own test does it; nothing is started until someone profiles."""

import threading

import grpc
import numpy as np
import psutil
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from helpers import HALF_PLUS_TWO, InProcessServer, ServerProcess


def listening_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_trace_through_the_grpc_port_writes_a_trace_of_the_server(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    with ServerProcess(f"--model_base_path={HALF_PLUS_TWO}") as server:
        unused = listening_ports(server.proc.pid)
        assert unused == {server.grpc_port, server.rest_port}  # no profiler server before the first trace
        stop = threading.Event()
        answers: list[float] = []

        def traffic() -> None:  # requests during the trace, as TF Serving's test sends them
            while not stop.is_set():
                answers.append(server.predict("default", {"x": np.array([2.0], np.float32)}).outputs["y"].float_val[0])

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            tf.profiler.experimental.client.trace(f"grpc://127.0.0.1:{server.grpc_port}", str(logdir), 2000)
        finally:
            stop.set()
            thread.join()
        traces = list(logdir.glob("plugins/profile/*/*.xplane.pb"))
        assert traces, sorted(str(p.relative_to(logdir)) for p in logdir.rglob("*"))
        space = xplane_pb2.XSpace.FromString(traces[0].read_bytes())
        events = [plane.event_metadata[event.metadata_id].name
                  for plane in space.planes for line in plane.lines for event in line.events]
        assert "SessionRun" in events  # the server's Session runs of the Predicts sent during the trace
        assert answers and set(answers) == {3.0}
        # TensorFlow's profiler server now listens on a port of its own; the server still serves.
        assert len(listening_ports(server.proc.pid) - unused) == 1
        assert server.predict("default", {"x": np.array([4.0], np.float32)}).outputs["y"].float_val[0] == 4.0


def test_enable_profiler_false_leaves_the_service_unimplemented():
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--enable_profiler=false", rest=False) as server:
        profile = server.channel().unary_unary("/tensorflow.ProfilerService/Profile")
        try:
            profile(b"", timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNIMPLEMENTED
        else:
            raise AssertionError("ProfilerService answered with --enable_profiler=false")

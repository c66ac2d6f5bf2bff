"""TF Serving's ProfilerService on the gRPC port, answered in the server's process: TensorFlow's profiler client
traces a server through the port it serves on, as TF Serving's own test does it, and no other socket opens."""

import contextlib
import functools
import ipaddress
import threading
from concurrent import futures

import grpc
import numpy as np
import psutil
import pytest
import tensorflow as tf
from google.protobuf import empty_pb2
from google.protobuf.unknown_fields import UnknownFieldSet
from tensorflow.python.profiler.internal import _pywrap_profiler
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from helpers import HALF_PLUS_TWO, InProcessServer, ServerProcess, wait_until
from remote_predict.serving import profiler
from remote_predict.serving.profiler import ANOTHER_SESSION
from remote_predict.serving.profiler_protos import ProfileRequest, ProfileResponse, TerminateRequest, TerminateResponse

SERVICE = "/tensorflow.ProfilerService"


@contextlib.contextmanager
def predicting(server, each=None):
    """Predict on `server` back to back while the block runs (a trace with work in it); `each(response)`
    sees every answer."""
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            response = server.predict("default", {"x": np.array([2.0], np.float32)})
            if each is not None:
                each(response)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def listening(pid: int) -> set[tuple[str, int]]:
    """The process's listening sockets, as (address, port); an IPv4-mapped IPv6 address as its IPv4 one."""
    def address(ip: str) -> str:
        return str(ipaddress.ip_address(ip).ipv4_mapped or ip) if ":" in ip else ip

    return {(address(c.laddr.ip), c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def call(server, method: str, request, response_type, timeout: float = 60):
    rpc = server.channel().unary_unary(f"{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=response_type.FromString)
    return rpc.future(request, timeout=timeout)


def profile_request(logdir, session_id: str, duration_ms: int, **fields):
    request = ProfileRequest(repository_root=str(logdir), session_id=session_id, host_name="server:8500", **fields)
    for field, value in profiler.SESSION_OPTIONS.items():  # what TensorFlow's client sends
        setattr(request.opts, field, value)
    request.opts.duration_ms = duration_ms
    return request


def event_names(space: xplane_pb2.XSpace) -> list[str]:
    return [plane.event_metadata[event.metadata_id].name
            for plane in space.planes for line in plane.lines for event in line.events]


def test_trace_through_the_grpc_port_writes_a_trace_of_the_server(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    with ServerProcess(f"--model_base_path={HALF_PLUS_TWO}") as server:
        ours = {("127.0.0.1", server.grpc_port), ("127.0.0.1", server.rest_port)}
        assert listening(server.proc.pid) == ours
        answers: list[float] = []
        sockets: list[set[tuple[str, int]]] = []

        def each(response) -> None:  # requests during the trace, as TF Serving's test sends them
            answers.append(response.outputs["y"].float_val[0])
            sockets.append(listening(server.proc.pid))

        with predicting(server, each):
            tf.profiler.experimental.client.trace(f"grpc://127.0.0.1:{server.grpc_port}", str(logdir), 2000)
        # Where TensorFlow's server writes it: <logdir>/plugins/profile/<run>/<host>_<port>.xplane.pb
        traces = list(logdir.glob("plugins/profile/*/*.xplane.pb"))
        assert [t.name for t in traces] == [f"127.0.0.1_{server.grpc_port}.xplane.pb"], \
            sorted(str(p.relative_to(logdir)) for p in logdir.rglob("*"))
        events = event_names(xplane_pb2.XSpace.FromString(traces[0].read_bytes()))
        assert "SessionRun" in events  # the server's Session runs of the Predicts sent during the trace
        assert answers and set(answers) == {3.0}
        # No port of the profiler's, during the trace or after: only ours, on the address we were given.
        assert sockets and all(s == ours for s in sockets), sockets
        assert listening(server.proc.pid) == ours
        assert server.predict("default", {"x": np.array([4.0], np.float32)}).outputs["y"].float_val[0] == 4.0


class WireTap(grpc.GenericRpcHandler):
    """A loopback gRPC server that passes every call's bytes on to `target` unchanged and keeps them: what
    TensorFlow's own client sends our server, and what it answered, byte for byte."""

    def __init__(self, target: grpc.Channel):
        self.target = target
        self.calls: list[tuple[str, bytes, bytes]] = []  # (method, request, response)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers([self])
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def service(self, handler_call_details):
        method = handler_call_details.method

        def forward(raw: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                answer = self.target.unary_unary(method)(raw, timeout=context.time_remaining())
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())
            self.calls.append((method, raw, answer))
            return answer

        return grpc.unary_unary_rpc_method_handler(forward)

    def __enter__(self) -> "WireTap":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(grace=None)


def wire_records(raw: bytes) -> list[tuple[int, int, object]]:
    """A message's bytes as its (field number, wire type, value) records, whatever the order they came in."""
    return sorted((f.field_number, f.wire_type, f.data) for f in UnknownFieldSet(empty_pb2.Empty.FromString(raw)))


@pytest.fixture(scope="module")
def server():
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", rest=False) as s:
        yield s


def hold_the_profiler(server, other, tmp_path, session_id: str):
    """A trace of an hour on `server`, once it holds the process's profiler: a short trace on `other` (a server
    in the same process) is refused. Returns the hour's call and that refusal. A probe that held the profiler
    just when the hour's trace started makes that one fail instead; then it starts again."""
    for _ in range(10):
        hour = call(server, "Profile", profile_request(tmp_path, session_id, duration_ms=3_600_000),
                    ProfileResponse, timeout=120)
        refused: list[grpc.RpcError] = []
        wait_until(functools.partial(_settled, hour, other, tmp_path, refused), timeout=60,
                   what="a trace to hold the profiler")
        if not hour.done():
            return hour, refused[0]
        assert hour.exception().details() == ANOTHER_SESSION, hour.exception()
    raise AssertionError("no trace held the profiler in 10 attempts")


def _settled(hour, other, tmp_path, refused: list[grpc.RpcError]) -> bool:
    if hour.done():
        return True
    try:
        call(other, "Profile", profile_request(tmp_path, "probe", duration_ms=1), ProfileResponse).result()
    except grpc.RpcError as e:
        refused.append(e)
        return True
    return False


def test_the_declared_messages_round_trip_what_tensorflows_client_sends(server, tmp_path):
    """profiler_protos declares the service's messages by hand: here TensorFlow's own client is the judge of
    their field numbers and types, through a tap that keeps the bytes it sends and the bytes we answer."""
    with WireTap(server.channel()) as tap:
        address = f"grpc://127.0.0.1:{tap.port}"
        # An idle server's trace is empty: the client reads our empty_trace and says so.
        with pytest.raises(RuntimeError, match="No trace event was collected"):
            tf.profiler.experimental.client.trace(address, str(tmp_path / "idle"), 100, num_tracing_attempts=1)
        with predicting(server):
            tf.profiler.experimental.client.trace(address, str(tmp_path / "busy"), 1000, num_tracing_attempts=1)
    assert [method for method, _, _ in tap.calls] == [f"{SERVICE}/Profile"] * 2
    (_, _, idle_answer), (_, raw, answer) = tap.calls
    assert ProfileResponse.FromString(idle_answer).empty_trace and not ProfileResponse.FromString(answer).empty_trace

    request = ProfileRequest.FromString(raw)
    traces = list((tmp_path / "busy").glob("plugins/profile/*/*.xplane.pb"))
    assert [t.relative_to(tmp_path / "busy").parts for t in traces] == \
        [("plugins", "profile", request.session_id, f"127.0.0.1_{tap.port}.xplane.pb")]
    assert request.repository_root == str(tmp_path / "busy" / "plugins" / "profile")
    assert request.host_name == f"127.0.0.1:{tap.port}" and request.session_id
    assert profiler.trace_duration_ms(request) == request.opts.duration_ms == 1000 and not request.emit_xspace
    assert profiler.unsupported_options(request.opts) == []  # the client's options, read as TensorFlow reads them
    # What the client sends that is not declared is kept, unread: max_events (2, a varint) and the names of the
    # tools it asks for (3, strings), nothing else. A declared field with a wrong number or wire type would show
    # up here too.
    assert {(f.field_number, f.wire_type) for f in UnknownFieldSet(request)} == {(2, 0), (3, 2)}
    assert list(UnknownFieldSet(request.opts)) == []
    # Parsed and serialized again, the request is the client's bytes (unknown fields move to the end).
    assert wire_records(request.SerializeToString()) == wire_records(raw)


def test_one_trace_at_a_time_and_terminate_ends_one(server, tmp_path):
    first, refused = hold_the_profiler(server, server, tmp_path, "first")
    assert refused.code() == grpc.StatusCode.INTERNAL and refused.details() == ANOTHER_SESSION
    assert not first.done()
    call(server, "Terminate", TerminateRequest(session_id="first"), TerminateResponse).result()
    first.result()  # answered, well before its hour
    assert (tmp_path / "first" / "server_8500.xplane.pb").stat().st_size > 0
    # The profiler is free again.
    call(server, "Profile", profile_request(tmp_path, "third", duration_ms=1), ProfileResponse).result()
    assert (tmp_path / "third" / "server_8500.xplane.pb").exists()


def test_a_terminate_that_comes_first_ends_its_trace_at_once(server, tmp_path):
    call(server, "Terminate", TerminateRequest(session_id="early"), TerminateResponse).result()
    call(server, "Profile", profile_request(tmp_path, "early", duration_ms=3_600_000), ProfileResponse,
         timeout=120).result()
    assert (tmp_path / "early" / "server_8500.xplane.pb").exists()


def test_a_trace_whose_client_gave_up_frees_the_profiler(server, tmp_path):
    gone = call(server, "Profile", profile_request(tmp_path, "gone", duration_ms=3_600_000), ProfileResponse,
                timeout=1)
    with pytest.raises(grpc.RpcError) as e:
        gone.result()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def traced() -> bool:
        try:
            call(server, "Profile", profile_request(tmp_path, "after", duration_ms=1), ProfileResponse).result()
        except grpc.RpcError as e:
            assert e.details() == ANOTHER_SESSION  # only while the abandoned one winds down
            return False
        return True

    wait_until(traced, timeout=60, what="the profiler to be free after a cancelled trace")
    assert not (tmp_path / "gone").exists()  # nobody is waiting for it: not written


def test_emit_xspace_answers_the_trace_in_the_response(server, tmp_path):
    with predicting(server):
        response = call(server, "Profile", profile_request(tmp_path, "inline", duration_ms=1000, emit_xspace=True),
                        ProfileResponse).result()
    assert not response.empty_trace
    assert "SessionRun" in event_names(xplane_pb2.XSpace.FromString(response.xspace.SerializeToString()))
    assert list(tmp_path.iterdir()) == []  # in the answer, not on the server's disk


def test_what_the_session_cannot_do_is_refused(server, tmp_path):
    request = profile_request(tmp_path, "levels", duration_ms=1)
    request.opts.host_tracer_level = 3
    request.opts.advanced_configuration["tracemark_lower"].int64_value = 1
    with pytest.raises(grpc.RpcError) as e:
        call(server, "Profile", request, ProfileResponse).result()
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "host_tracer_level=3" in e.value.details() and "tracemark_lower" in e.value.details()
    for method, code, details in [("Profile", grpc.StatusCode.INVALID_ARGUMENT, "ProfileRequest could not be parsed"),
                                  ("Monitor", grpc.StatusCode.UNIMPLEMENTED, "unimplemented."),
                                  ("GetSnapshot", grpc.StatusCode.UNIMPLEMENTED, "continuous profiling"),
                                  ("StartContinuousProfiling", grpc.StatusCode.UNIMPLEMENTED, "continuous profiling")]:
        with pytest.raises(grpc.RpcError) as e:
            server.channel().unary_unary(f"{SERVICE}/{method}")(b"\xff\xff\xff", timeout=10)
        assert e.value.code() == code and details in e.value.details(), (method, e.value)
    assert list(tmp_path.iterdir()) == []
    assert server.predict("default", {"x": np.array([4.0], np.float32)}).outputs["y"].float_val[0] == 4.0


def test_enable_profiler_false_leaves_the_service_unimplemented():
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--enable_profiler=false", rest=False) as server:
        profile = server.channel().unary_unary(f"{SERVICE}/Profile")
        with pytest.raises(grpc.RpcError) as e:
            profile(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tf_internals_the_profiler_relies_on_are_there():
    """Fails loudly when a TensorFlow upgrade moves the private session profiler.py traces with."""
    assert tf.__version__.startswith("2.21."), "the profiler is pinned to TF 2.21; re-check profiler.py"
    assert all(callable(getattr(_pywrap_profiler.ProfilerSession, name)) for name in ("start", "export_to_tb"))


def test_paths_and_emptiness_as_tensorflow_decides_them():
    assert profiler.join_path("/a", "b", "c.pb") == "/a/b/c.pb"
    assert profiler.join_path("/a/", "/b", "", "c.pb") == "/a/b/c.pb"
    assert profiler.join_path("", "", "x.pb") == "x.pb"
    assert profiler.join_path("gs://bucket/logs", "run", "h.pb") == "gs://bucket/logs/run/h.pb"
    request = ProfileRequest(repository_root="/l/plugins/profile", session_id="run",
                                                    host_name="10.0.0.1:8500")
    assert profiler.xplane_path(request) == "/l/plugins/profile/run/10.0.0.1_8500.xplane.pb"
    request.opts.override_hostname = "worker:0"
    assert profiler.xplane_path(request) == "/l/plugins/profile/run/worker_0.xplane.pb"
    space = xplane_pb2.XSpace()
    space.planes.add().lines.add()
    assert profiler.is_empty(space)
    space.planes[0].lines[0].events.add()
    assert not profiler.is_empty(space)
    assert profiler.trace_duration_ms(ProfileRequest(duration_ms=7)) == 7
    options = ProfileRequest().opts
    for field, value in profiler.SESSION_OPTIONS.items():
        setattr(options, field, value)
    assert profiler.unsupported_options(options) == []
    options.python_tracer_level = 1
    assert profiler.unsupported_options(options) == ["python_tracer_level=1 (this server traces with "
                                                     "python_tracer_level=0)"]


def test_concurrent_profiles_on_two_servers_share_one_profiler(tmp_path):
    """The profiler is the process's: a trace on one server refuses a trace on another in the same process."""
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", rest=False) as a, \
            InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", rest=False) as b:
        long, refused = hold_the_profiler(a, b, tmp_path, "a")
        assert refused.code() == grpc.StatusCode.INTERNAL and refused.details() == ANOTHER_SESSION
        call(a, "Terminate", TerminateRequest(session_id="a"), TerminateResponse).result()
        long.result()

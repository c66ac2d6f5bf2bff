"""TF Serving's `tensorflow.ProfilerService` on our gRPC port, answered in this process.

TF Serving serves the profiler service on its gRPC port (`--enable_profiler`, on by default), so that
`tf.profiler.experimental.client.trace('grpc://host:port', logdir, duration_ms)` traces the server. TensorFlow's
own service only comes as a server of its own (`tf.profiler.experimental.server.start`), which binds every
interface whatever address we were told. So we answer the methods here, with TensorFlow's in-process profiler
session (what `tf.profiler.experimental.start/stop` use), and open no port: `Profile` traces the whole process
for the asked duration and writes the XSpace where TensorFlow's server writes it,
`<repository_root>/<session_id>/<host_name>.xplane.pb` (the client names all three; ':' becomes '_').
Answers follow TensorFlow 2.21's server: a second trace while one runs gets INTERNAL "Another profiling
session active." (TensorFlow's profiler lock is per process), `Terminate` ends a running trace early (or the
next one of that session id, as TensorFlow remembers it), `Monitor` is UNIMPLEMENTED "unimplemented.".
Where we cannot do what TensorFlow's server does, we refuse rather than trace something else: the
continuous-profiling methods are UNIMPLEMENTED, and so is a Profile whose options ask for tracer levels or
filters other than TensorFlow's defaults (TensorFlow 2.21's Python session cannot take them).

The protos: TensorFlow's pip package has no Python module for profiler_service.proto (only for its
dependencies), so profiler_protos.py declares the messages we parse and answer from their public field names
and numbers.

What it costs when unused: one entry in gRPC's table of services and four small message classes. A trace
runs on the gRPC thread that answers it, and no socket opens before, during or after one.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import tensorflow as tf
from google.protobuf import message
from tensorflow.python.profiler.internal import _pywrap_profiler
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from remote_predict.protocol import PROFILER_SERVICE
from remote_predict.serving.profiler_protos import ProfileRequest, ProfileResponse, TerminateRequest, TerminateResponse

# What TensorFlow 2.21's in-process session traces with (ProfilerSession::DefaultOptions; the Python session
# takes no other levels), as ProfileOptions fields. A request asking for other values is refused.
SESSION_OPTIONS = {"include_dataset_ops": True, "host_tracer_level": 2, "device_tracer_level": 1,
                   "python_tracer_level": 0, "enable_hlo_proto": True, "device_type": 0}
ANOTHER_SESSION = "Another profiling session active."  # TensorFlow's words for its profiler lock's contention
_CONTINUOUS = ("StartContinuousProfiling", "StopContinuousProfiling", "GetSnapshot")
_MAX_REMEMBERED_STOPS = 1024  # Terminates for sessions not running yet, kept for the Profile they may precede


# ---- decisions ----

def unsupported_options(opts: message.Message) -> list[str]:
    """What a request's ProfileOptions asks for that the in-process session cannot trace with, in words."""
    unsupported = [f"{field}={getattr(opts, field)} (this server traces with {field}={value})"
                   for field, value in SESSION_OPTIONS.items() if getattr(opts, field) != value]
    if opts.trace_options.host_traceme_filter_mask:
        unsupported.append(f"trace_options.host_traceme_filter_mask={opts.trace_options.host_traceme_filter_mask}"
                           " (this server traces every TraceMe)")
    unsupported += [f"advanced_configuration {key!r} (this server takes none)"
                    for key in sorted(opts.advanced_configuration)]
    return unsupported


def trace_duration_ms(request: message.Message) -> int:
    """How long to trace: the options' duration, as TensorFlow's server reads it; older clients only set the
    request's own (deprecated) `duration_ms`."""
    return request.opts.duration_ms or request.duration_ms


def join_path(*parts: str) -> str:
    """tsl::io::JoinPath, which TensorFlow's server names its files with: empty parts are skipped, one
    leading '/' of a later part is dropped, and one '/' separates the parts ('/a', '/b' gives '/a/b')."""
    result = ""
    for part in parts:
        if not part:
            continue
        if not result:
            result = part
            continue
        part = part[1:] if part.startswith("/") else part
        result += part if result.endswith("/") else "/" + part
    return result


def xplane_path(request: message.Message) -> str:
    """Where TensorFlow's server writes a Profile request's trace (SaveXSpace)."""
    host = request.opts.override_hostname or request.host_name
    return join_path(request.repository_root, request.session_id, f"{host}.xplane.pb".replace(":", "_"))


def is_empty(space: xplane_pb2.XSpace) -> bool:
    """No event on any line of any plane: TensorFlow's server then answers `empty_trace`, and the client
    retries, then reports "No trace event was collected"."""
    return not any(line.events for plane in space.planes for line in plane.lines)


# ---- the service ----

class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class ProfilerService:
    """One server's ProfilerService: the sessions being traced and the Terminates waiting for theirs. The
    profiler itself is TensorFlow's, one per process, which is why a second trace anywhere in it is refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, set[threading.Event]] = collections.defaultdict(set)
        self._stopped: collections.OrderedDict[str, None] = collections.OrderedDict()

    def profile(self, request: message.Message, context: grpc.ServicerContext) -> message.Message:
        unsupported = unsupported_options(request.opts)
        if unsupported:
            raise _Refused(grpc.StatusCode.UNIMPLEMENTED, "Profile options not supported: " + "; ".join(unsupported))
        stop = threading.Event()
        if not context.add_callback(stop.set):  # the call already ended
            raise _Refused(grpc.StatusCode.CANCELLED, "Cancelled")
        with self._watch(request.session_id, stop):
            if request.opts.start_timestamp_ns:  # a client's delay_ms: start then, not now
                stop.wait(max(0.0, (request.opts.start_timestamp_ns - time.time_ns()) / 1e9))
            space = self._trace(duration_s=trace_duration_ms(request) / 1000, stop=stop)
        if not context.is_active():
            raise _Refused(grpc.StatusCode.CANCELLED, "Cancelled")
        response = ProfileResponse(empty_trace=is_empty(xplane_pb2.XSpace.FromString(space)))
        if request.emit_xspace:
            response.xspace.MergeFromString(space)
            return response
        path = xplane_path(request)
        try:
            tf.io.gfile.makedirs(os.path.dirname(path) or ".")
            with tf.io.gfile.GFile(path, "wb") as f:
                f.write(space)
        except tf.errors.OpError as e:
            raise _Refused(grpc.StatusCode.INTERNAL, e.message) from None
        return response

    def terminate(self, request: message.Message, context: grpc.ServicerContext) -> message.Message:
        with self._lock:
            running = self._running.get(request.session_id)
            if running:
                for stop in running:
                    stop.set()
            else:
                self._stopped[request.session_id] = None
                while len(self._stopped) > _MAX_REMEMBERED_STOPS:
                    self._stopped.popitem(last=False)
        return TerminateResponse()

    @staticmethod
    def _trace(duration_s: float, stop: threading.Event) -> bytes:
        """The process traced for `duration_s` or until `stop`: the serialized XSpace. The Python session
        hands its XSpace over only as a file in a TensorBoard log directory, so it goes through a private one."""
        session = _pywrap_profiler.ProfilerSession()
        with tempfile.TemporaryDirectory(prefix="remote-predict-profile-") as logdir:
            try:
                session.start(logdir, {})
            except tf.errors.OpError as e:  # AlreadyExistsError: another trace holds the process's profiler
                raise _Refused(grpc.StatusCode.INTERNAL, e.message) from None
            try:
                stop.wait(duration_s)
            finally:
                try:
                    session.export_to_tb()  # also ends the session, releasing the profiler
                except tf.errors.OpError as e:
                    raise _Refused(grpc.StatusCode.INTERNAL, e.message) from None
            traces = list(Path(logdir).glob("plugins/profile/*/*.xplane.pb"))
            if len(traces) != 1:
                raise _Refused(grpc.StatusCode.INTERNAL, f"the profiler session wrote {len(traces)} traces, not one")
            return traces[0].read_bytes()

    @contextlib.contextmanager
    def _watch(self, session_id: str, stop: threading.Event):
        """`stop` is set by a Terminate of `session_id`, including one that came first."""
        with self._lock:
            if session_id in self._stopped:
                del self._stopped[session_id]
                stop.set()
            self._running[session_id].add(stop)
        try:
            yield
        finally:
            with self._lock:
                self._running[session_id].discard(stop)
                if not self._running[session_id]:
                    del self._running[session_id]


def _method(serve: Callable[[message.Message, grpc.ServicerContext], message.Message],
            request_type: type[message.Message]):
    """A unary method on bytes: we parse the request ourselves (a bad one is INVALID_ARGUMENT, with why) and
    turn a refusal into its status."""
    name = request_type.DESCRIPTOR.name

    def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            request = request_type.FromString(raw)
        except message.DecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} could not be parsed: {e}")
        try:
            return serve(request, context).SerializeToString()
        except _Refused as e:
            context.abort(e.code, e.details)

    return grpc.unary_unary_rpc_method_handler(handle)


def _refuse(code: grpc.StatusCode, details: str):
    def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(handle)


def profiler_handler() -> grpc.GenericRpcHandler:
    """tensorflow.ProfilerService for one gRPC server."""
    service = ProfilerService()
    continuous = _refuse(grpc.StatusCode.UNIMPLEMENTED,
                         "continuous profiling is not served by remote-predict; Profile traces for a duration")
    return grpc.method_handlers_generic_handler(PROFILER_SERVICE, {
        "Profile": _method(service.profile, ProfileRequest),
        "Terminate": _method(service.terminate, TerminateRequest),
        "Monitor": _refuse(grpc.StatusCode.UNIMPLEMENTED, "unimplemented."),  # as TensorFlow's server answers
        **{name: continuous for name in _CONTINUOUS},
    })

"""TF Serving's `tensorflow.ProfilerService` on our gRPC port, answered by TensorFlow's own profiler server.

TF Serving serves the profiler service on its gRPC port (`--enable_profiler`, on by default), so that
`tf.profiler.experimental.client.trace('grpc://host:port', logdir, duration_ms)` traces the server. TensorFlow
ships that service as a server of its own (`tf.profiler.experimental.server.start(port)`), which can only
listen on a port of its own. So this module forwards the service's calls, as raw bytes, from our port to
that server: no profiler code here, and no profiler proto to decode.

What it costs when unused: nothing. The forwarding handler is one more entry in gRPC's table of services,
reached only by ProfilerService calls; TensorFlow's profiler server is started by the first such call, not
before. Once started it stays for the life of the process (TensorFlow cannot stop it): a gRPC server with its
threads, idle until the next trace, listening on a free port that TensorFlow binds on every interface.
"""

from __future__ import annotations

import socket
import threading

import grpc
import tensorflow as tf

from remote_predict.protocol import PROFILER_SERVICE

# The methods of tensorflow.ProfilerService (tsl/profiler/protobuf/profiler_service.proto); all unary.
PROFILER_METHODS = ("Profile", "Terminate", "Monitor")
_MAX_MESSAGE = (1 << 31) - 1  # a trace can be large


def _free_port() -> int:
    """A port free on every interface, as TensorFlow's profiler server binds it ([::]:port)."""
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TensorFlowProfilerServer:
    """The process's one TensorFlow profiler server (a trace covers the whole process, whichever server
    asked), started on first use, and a channel to it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self.port: int | None = None

    def channel(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None:
                port = _free_port()
                tf.profiler.experimental.server.start(port)
                self.port = port
                self._channel = grpc.insecure_channel(
                    f"localhost:{port}", options=[("grpc.max_receive_message_length", _MAX_MESSAGE),
                                                  ("grpc.max_send_message_length", _MAX_MESSAGE)])
            return self._channel


PROCESS_PROFILER = TensorFlowProfilerServer()


def _forwarder(method: str, backend: TensorFlowProfilerServer):
    path = f"/{PROFILER_SERVICE}/{method}"

    def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
        call = backend.channel().unary_unary(path)  # no serializers: bytes in, bytes out
        try:
            return call(request, timeout=context.time_remaining())
        except grpc.RpcError as e:
            context.abort(e.code(), e.details() or "")
            raise AssertionError("unreachable") from None

    return grpc.unary_unary_rpc_method_handler(forward)


def profiler_handler(backend: TensorFlowProfilerServer = PROCESS_PROFILER) -> grpc.GenericRpcHandler:
    """The ProfilerService methods, each forwarded to `backend`."""
    return grpc.method_handlers_generic_handler(
        PROFILER_SERVICE, {method: _forwarder(method, backend) for method in PROFILER_METHODS})

"""The framed-TCP front-end (`--tcp_port`): Predict for remote-predict's own RemotePredict ops.

Same data plane, same checks, same status codes as gRPC and REST; only the framing differs (see
`remote_predict.frames` for the format and for why it exists). A connection gets a thread of its own,
which reads a frame, answers it and reads the next: no hand-off between threads on the way, which is
where most of a Python gRPC call's cost goes. Clients are our masters, each keeping a few connections
per server, so the number of threads stays small; past `MAX_CONNECTIONS` new connections are closed.
Each frame is served inside the data plane's `serve` (its span and stage times), continuing the W3C
trace context of the frame's metadata.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time

from remote_predict import frames, wire
from remote_predict.errors import Code, ServingError
from remote_predict.protocol import trace_context
from remote_predict.serving.data_plane import DataPlane
from remote_predict.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024


class TcpServer:
    def __init__(self, data_plane: DataPlane, metrics: ServerMetrics, host: str, port: int,
                 ssl_context: ssl.SSLContext | None, drain_seconds: float):
        self.data_plane = data_plane
        self.metrics = metrics
        self.ssl_context = ssl_context
        self.drain_seconds = drain_seconds
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as e:
            self._listener.close()
            raise OSError(f"Cannot listen for tcp on {host}:{port}: {e.strerror or e}") from None
        self._listener.listen(256)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._connections: set[socket.socket] = set()
        self._busy = 0  # frames being answered
        self.draining = False
        self._thread = threading.Thread(target=self._accept, name="tcp-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: stopping
            with self._lock:
                if self.draining or len(self._connections) >= MAX_CONNECTIONS:
                    conn.close()
                    if not self.draining:
                        log.warning("tcp: %d connections already; closing a new one", MAX_CONNECTIONS)
                    continue
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="tcp-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        sock = conn
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(conn, server_side=True)
                with self._lock:  # the wrapped socket is the one to shut down on stop
                    self._connections.discard(conn)
                    self._connections.add(sock)
            reader = frames.FrameReader()
            while True:
                try:
                    kind, value, meta, body = reader.read(sock)
                except EOFError:
                    return
                with self._lock:
                    self._busy += 1
                try:
                    frames.send(sock, self._answer(kind, value, meta, body))
                finally:
                    with self._lock:
                        self._busy -= 1
                        self._idle.notify_all()
        except frames.FrameError as e:
            log.warning("tcp: closing a connection: %s", e)
        except (OSError, ssl.SSLError):
            pass  # the client went away (or we are stopping)
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._connections.discard(sock)
            sock.close()

    def _answer(self, kind: int, value: int, meta: bytes, body: memoryview) -> list:
        if kind == frames.HEALTH:
            code = Code.UNAVAILABLE if self.draining else Code.OK
            return frames.encode(kind, code, b"", b"")
        start = time.perf_counter()
        model, code, message, answer = "", Code.OK, "", b""
        try:
            if self.draining:
                raise ServingError(Code.UNAVAILABLE, "the server is shutting down")
            try:
                metadata = trace_context(frames.decode_meta(meta).items())
            except frames.FrameError as e:
                raise ServingError(Code.INVALID_ARGUMENT, str(e)) from None
            with self.data_plane.serve("predict", "tcp", metadata) as served:
                request, inputs = wire.decode_predict_request(body, self.data_plane.max_tensor_elements)
                model = request.model_spec.name
                served.decoded()
                deadline = time.monotonic() + value / 1000 if value else None
                spec, outputs = self.data_plane.predict_arrays(request, inputs, deadline=deadline, served=served)
                encoding = time.perf_counter()
                answer = wire.encode_predict_response(spec, outputs, tensor_content=True)
                served.stages.encode = time.perf_counter() - encoding
        except ServingError as e:
            code, message = e.code, e.message
        except Exception as e:  # a bug must not take the server down; say what happened
            log.exception("tcp Predict on model %s failed", model)
            code, message = Code.INTERNAL, f"{type(e).__name__}: {e}"
        self.metrics.observe_request(model, "predict", "tcp", code, time.perf_counter() - start)
        return frames.encode(kind, code, message.encode("utf-8"), answer)

    def stop(self) -> None:
        """Refuse new frames, let those being answered finish (up to the drain time), close everything."""
        with self._lock:
            self.draining = True
        self._listener.close()
        give_up = time.monotonic() + self.drain_seconds
        with self._lock:
            while self._busy and time.monotonic() < give_up:
                self._idle.wait(timeout=max(0.0, give_up - time.monotonic()))
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

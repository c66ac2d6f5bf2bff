"""A stub that calls a model served by this same process, without the network.

Target `inprocess` means "the server running in this process"; `inprocess:PORT` picks the server whose
gRPC port is PORT when a process runs several (tests do). Servers register themselves at start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from tensorflow_serving.apis import predict_pb2

from remote_predict.errors import Code
from remote_predict.op.stubs.base import StubError

LocalPredict = Callable[[predict_pb2.PredictRequest, float], predict_pb2.PredictResponse]

_lock = threading.Lock()
_servers: dict[int, LocalPredict] = {}


def register_local_server(port: int, predict: LocalPredict) -> None:
    with _lock:
        _servers[port] = predict


def unregister_local_server(port: int) -> None:
    with _lock:
        _servers.pop(port, None)


class InProcessStub:
    def __init__(self, target: str):
        self.target = target
        rest = target.split(":", 1)[1].strip("/") if ":" in target else ""
        if rest and not rest.isdigit():
            raise StubError(Code.INVALID_ARGUMENT, f"in-process target must be 'inprocess' or 'inprocess:PORT', "
                                                   f"got {target!r}")
        self.port = int(rest) if rest else None

    def _server(self) -> LocalPredict:
        servers = dict(_servers)
        if self.port is not None:
            if self.port in servers:
                return servers[self.port]
            raise StubError(
                Code.UNAVAILABLE, f"no remote-predict server with gRPC port {self.port} runs in this process"
            )
        if len(servers) == 1:
            return next(iter(servers.values()))
        if not servers:
            raise StubError(Code.UNAVAILABLE, "no remote-predict server runs in this process")
        raise StubError(Code.FAILED_PRECONDITION,
                        f"{len(servers)} servers run in this process; name one as inprocess:PORT")

    def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        return self._server()(request, timeout)

"""A stub that calls a model served by this same process, without the network.

Target `inprocess` means "the server running in this process"; `inprocess:PORT` picks the server whose
gRPC port is PORT when a process runs several (tests do). Servers register themselves at start.

A gRPC or tcp target that names this very server over loopback (`localhost:8500` in a server listening on
8500, as in the seed's walk-through) is served in-process too: the answer is the same, without the network.
The registry of servers by port is process-wide by nature (it is what "this process" means); servers
add and remove themselves.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping

import numpy as np
from tensorflow_serving.apis import model_pb2, predict_pb2

from remote_predict import tensor_codec
from remote_predict.errors import Code
from remote_predict.op import addresses
from remote_predict.op.stubs.base import StubError

# (request without inputs, inputs, timeout in seconds) -> (model spec, outputs); raises StubError.
LocalPredict = Callable[[predict_pb2.PredictRequest, Mapping[str, np.ndarray], float],
                        tuple[model_pb2.ModelSpec, dict[str, np.ndarray]]]

_lock = threading.Lock()
_servers: dict[int, LocalPredict] = {}


def register_local_server(port: int, predict: LocalPredict) -> None:
    with _lock:
        _servers[port] = predict


def unregister_local_server(port: int) -> None:
    with _lock:
        _servers.pop(port, None)


def loopback_port(target: addresses.Target) -> int | None:
    """The port of a single-address gRPC or tcp target on this machine that a server of this process serves."""
    if target.kind not in (addresses.GRPC, addresses.TCP) or len(target.endpoints) != 1:
        return None
    host, port = addresses.split_host_port(target.endpoints[0])
    if port is None or not (addresses.is_loopback(host) or host == socket.gethostname().lower()):
        return None
    return port if port in _servers else None


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

    def predict_arrays(self, request: predict_pb2.PredictRequest, inputs: Mapping[str, np.ndarray],
                       timeout: float) -> tuple[model_pb2.ModelSpec, dict[str, np.ndarray]]:
        return self._server()(request, inputs, timeout)

    def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        inputs = {alias: tensor_codec.to_ndarray(proto) for alias, proto in request.inputs.items()}
        bare = predict_pb2.PredictRequest(model_spec=request.model_spec, output_filter=request.output_filter)
        spec, outputs = self.predict_arrays(bare, inputs, timeout)
        response = predict_pb2.PredictResponse(model_spec=spec)
        tensor_codec.put_arrays(response.outputs, outputs, tensor_content=True)
        return response

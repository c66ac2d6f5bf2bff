"""The stub interface, the process-wide registry of stub factories, and choosing a stub for a target."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from tensorflow_serving.apis import predict_pb2

from remote_predict.errors import Code, code_from_int
from remote_predict.op import addresses

if TYPE_CHECKING:
    from remote_predict.op.runtime import OpRuntime


class StubError(Exception):
    """A Predict call failed with a canonical status code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code_from_int(code)
        self.message = message


class PredictionStub(Protocol):
    """What a stub must do. A stub may also offer `predict_arrays(request, inputs, timeout) ->
    (model_spec, outputs)`, taking and returning numpy arrays: the op then uses it and skips converting
    tensors to protos and back (the built-in stubs do)."""

    def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        """Call Predict; raise StubError on failure. `timeout` is in seconds."""
        ...


StubFactory = Callable[[str], PredictionStub]

# Stub factories are process-wide on purpose: a plug-in registers its scheme once, on import, for every
# server in the process (each server's runtime then makes its own stub instances).
_lock = threading.Lock()
_factories: dict[str, StubFactory] = {}


def register_stub(scheme: str, factory: StubFactory) -> None:
    """Use `factory(target_address)` for every target written `scheme://...`."""
    scheme = scheme.lower().rstrip(":/")
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"invalid stub scheme {scheme!r}")
    if scheme in ("http", "https", addresses.TCP, "dns", "unix", "unix-abstract", "ipv4", "ipv6", "inprocess"):
        raise ValueError(f"scheme {scheme!r} is built in")
    with _lock:
        _factories[scheme] = factory
    from remote_predict.op.runtime import live_runtimes

    for runtime in live_runtimes():
        runtime.forget_stubs(scheme)


def create_stub(target: str, runtime: OpRuntime) -> PredictionStub:
    """A new stub for `target`, for `runtime`'s calls."""
    parsed = addresses.parse(target)
    if parsed.kind == addresses.CUSTOM:
        factory = _factories.get(parsed.scheme)
        if factory is None:
            raise StubError(Code.INVALID_ARGUMENT, f"no stub is registered for the scheme of target {target!r}")
        return factory(target)
    if parsed.kind == addresses.REST:
        from remote_predict.op.stubs.rest_stub import RestStub

        return RestStub(target)
    from remote_predict.op.stubs.inprocess_stub import InProcessStub, loopback_port

    if parsed.kind == addresses.INPROCESS:
        return InProcessStub(target)
    if runtime.settings.loopback_in_process:
        port = loopback_port(parsed)
        if port is not None:  # this very server: skip the network
            return InProcessStub(f"inprocess:{port}")
    if parsed.kind == addresses.TCP:
        from remote_predict.op.stubs.tcp_stub import TcpStub

        return TcpStub(parsed, runtime)
    from remote_predict.op.stubs.grpc_stub import GrpcStub

    return GrpcStub(target, runtime)

"""The stub interface, and the per-process registry of stubs by target address."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Protocol

from tensorflow_serving.apis import predict_pb2

from remote_predict.errors import Code, code_from_int
from remote_predict.op import targets


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

_lock = threading.Lock()
_factories: dict[str, StubFactory] = {}
_stubs: dict[str, PredictionStub] = {}


def register_stub(scheme: str, factory: StubFactory) -> None:
    """Use `factory(target_address)` for every target written `scheme://...`."""
    scheme = scheme.lower().rstrip(":/")
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"invalid stub scheme {scheme!r}")
    with _lock:
        _factories[scheme] = factory
        for target in [t for t in _stubs if t.lower().startswith(scheme + "://")]:
            del _stubs[target]


def reset_stubs() -> None:
    """Forget every created stub (their channels close when garbage collected)."""
    with _lock:
        stubs = list(_stubs.values())
        _stubs.clear()
    for stub in stubs:
        close = getattr(stub, "close", None)
        if close is not None:
            close()


def _factory_for(target: str) -> StubFactory:
    lowered = target.lower()
    scheme = lowered.split("://", 1)[0] if "://" in lowered else None
    if scheme in _factories:
        return _factories[scheme]
    if scheme in ("http", "https"):
        from remote_predict.op.stubs.rest_stub import RestStub

        return RestStub
    if lowered == "inprocess" or lowered.startswith("inprocess:"):
        from remote_predict.op.stubs.inprocess_stub import InProcessStub

        return InProcessStub
    if scheme is not None and scheme not in ("dns", "unix", "unix-abstract", "ipv4", "ipv6"):
        raise StubError(Code.INVALID_ARGUMENT, f"no stub is registered for the scheme of target {target!r}")
    from remote_predict.op.stubs.inprocess_stub import InProcessStub, loopback_port

    port = loopback_port(target)
    if port is not None:  # this very server: skip the network
        return lambda _: InProcessStub(f"inprocess:{port}")
    from remote_predict.op.stubs.grpc_stub import GrpcStub

    return GrpcStub


def stub_for(target: str) -> PredictionStub:
    """The process-wide stub for a target: one per address, shared by every op and call."""
    targets.check_allowed(target)
    stub = _stubs.get(target)
    if stub is not None:
        return stub
    with _lock:
        stub = _stubs.get(target)
        if stub is None:
            stub = _factory_for(target)(target)
            _stubs[target] = stub
    return stub

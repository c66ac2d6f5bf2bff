"""Pluggable transports for the RemotePredict op (TF Serving's kernel is templated on the stub type).

A stub is created from a target address and answers `predict(request, timeout_seconds)`. The scheme
of the address picks the stub: `http://`/`https://` use TF Serving's REST API, `inprocess` calls a
model on the same server without the network, a scheme registered with `register_stub` uses that
factory, and anything else (`host:port`, `dns:///`, `ipv4:`, `unix:`) is a gRPC target.
"""

from remote_predict.op.stubs.base import PredictionStub, StubError, register_stub, reset_stubs, stub_for

__all__ = ["PredictionStub", "StubError", "register_stub", "reset_stubs", "stub_for"]

"""Pluggable transports for the RemotePredict op (TF Serving's kernel is templated on the stub type).

A stub is created from a target address and answers `predict(request, timeout_seconds)`. The target's
form picks the stub (see `op/addresses.py`): `tcp://` uses remote-predict's framed TCP transport,
`http://`/`https://` TF Serving's REST API, `inprocess` a model on the same server without the network,
a scheme registered with `register_stub` that factory, and anything else (`host:port`, `dns:///`,
`ipv4:`, `unix:`) is a gRPC target.
"""

from remote_predict.op.stubs.base import PredictionStub, StubError, register_stub

__all__ = ["PredictionStub", "StubError", "register_stub"]

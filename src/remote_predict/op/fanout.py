"""Several Predict calls at once, each to its own target, for one op (a lookup's shards).

`tcp://` calls are all made from the calling thread, together (`tcp_stub.run`: one selector waits for
every answer), so a fan-out to N shards costs no thread hand-off at all. Calls through other stubs
(gRPC, REST, custom), which block, run on the runtime's pool, all but the last, which runs here.

With tracing on (`runtime.tracing`), each call gets a CLIENT span, child of the thread's current span (a
RemotePredict op's `run`, a lookup's `lookup`), and sends that span's W3C context with the call, so the
server's span for it is the client span's child. A span records the target, the endpoint that answered
(the replica, for tcp:// targets; the target itself for gRPC), the model, version and signature asked
for, the canonical code, and the bytes of the serialized request and answer (tcp and gRPC stubs; the
REST, in-process and custom stubs do not say). It ends when its own call does.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tensorflow_serving.apis import predict_pb2

from remote_predict import tracing as attrs
from remote_predict import wire
from remote_predict.errors import Code, ServingError
from remote_predict.op import request_context
from remote_predict.op.runtime import OpRuntime
from remote_predict.op.stubs import StubError

POOL_THREADS = 64  # blocking calls in flight at once, per runtime


@dataclass
class Call:
    target: str
    request: predict_pb2.PredictRequest  # model spec and output filter; the inputs travel beside it
    inputs: Mapping[str, np.ndarray]
    shard: int | None = None  # which shard of a lookup (for its span)


@dataclass
class Result:
    code: Code
    message: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    endpoint: str = ""  # who answered, when known
    request_bytes: int | None = None  # the serialized request and answer, when the stub says
    response_bytes: int | None = None
    finished: float | None = None  # time.monotonic() when it finished (tracing on)


def _blocking(runtime: OpRuntime, call: Call, timeout: float, headers: Mapping[str, str] | None = None) -> Result:
    """One call through a blocking stub; `headers` (tracing on) is the W3C context of its client span."""
    from remote_predict.op.kernel import call_stub

    if headers is None:
        try:
            return Result(Code.OK, "", call_stub(runtime.stub_for(call.target), call.request, dict(call.inputs),
                                                 timeout))
        except (StubError, ServingError) as e:
            return Result(e.code, e.message)
    from remote_predict.op.stubs.grpc_stub import GrpcStub

    with request_context.scope(metadata=headers):
        try:
            stub = runtime.stub_for(call.target)
            if isinstance(stub, GrpcStub):  # the bytes are known: measure them
                data = wire.encode_predict_request(call.request, call.inputs)
                answer = stub.predict_bytes(data, timeout)
                result = Result(Code.OK, "", wire.decode_predict_response(answer)[1], endpoint=call.target,
                                request_bytes=len(data), response_bytes=len(answer))
            else:
                result = Result(Code.OK, "", call_stub(stub, call.request, dict(call.inputs), timeout))
        except (StubError, ServingError) as e:
            result = Result(e.code, e.message)
    result.finished = time.monotonic()
    return result


def _tcp_result(call) -> Result:
    if call.code != Code.OK:
        return Result(call.code, call.message, endpoint=call.endpoint)
    try:
        outputs = call.outcome()[1]
    except ServingError as e:
        return Result(e.code, e.message, endpoint=call.endpoint)
    return Result(Code.OK, "", outputs, endpoint=call.endpoint, request_bytes=len(call.body),
                  response_bytes=call.answer_body.nbytes)


def predict_many(runtime: OpRuntime, calls: Sequence[Call], timeout: float) -> list[Result]:
    """Every call's result, in order; never raises for a failed call."""
    from remote_predict.op.stubs.tcp_stub import TcpCall, TcpStub, run

    if timeout <= 0:
        return [Result(Code.DEADLINE_EXCEEDED, "the request's own deadline has passed; not calling") for _ in calls]
    tracing = runtime.tracing
    spans = [_client_span(tracing, call) for call in calls] if tracing is not None else None
    deadline = time.monotonic() + timeout
    results: list[Result | None] = [None] * len(calls)
    tcp: list[tuple[int, TcpCall]] = []
    blocking: list[int] = []
    for i, call in enumerate(calls):
        try:
            stub = runtime.stub_for(call.target)
        except (StubError, ServingError) as e:
            results[i] = Result(e.code, e.message)
            continue
        if isinstance(stub, TcpStub):
            body = wire.encode_predict_request(call.request, call.inputs)
            if spans is None:
                tcp.append((i, TcpCall(stub, body, call.request.model_spec.name)))
            else:
                with request_context.scope(metadata=tracing.headers(spans[i])):  # the frame's metadata
                    tcp.append((i, _stamped_tcp_call()(stub, body, call.request.model_spec.name)))
        else:
            blocking.append(i)
    pool = runtime.service("fanout-pool", lambda: ThreadPoolExecutor(POOL_THREADS, "remote-predict-fanout"))
    here = blocking.pop() if blocking and not tcp else None
    headers = (lambda i: None) if spans is None else (lambda i: tracing.headers(spans[i]))
    futures = {i: pool.submit(_blocking, runtime, calls[i], timeout, headers(i)) for i in blocking}
    if tcp:
        run([c for _, c in tcp], deadline)
        for i, c in tcp:
            results[i] = _tcp_result(c)
            results[i].finished = getattr(c, "finished_at", None)
    if here is not None:
        results[here] = _blocking(runtime, calls[here], timeout, headers(here))
    for i, future in futures.items():
        results[i] = future.result()
    if spans is not None:
        for span, result in zip(spans, results, strict=True):
            _end_client_span(tracing, span, result)
    return results  # type: ignore[return-value]


def _client_span(tracing, call: Call):
    spec = call.request.model_spec
    attributes = {attrs.TARGET: call.target, attrs.MODEL: spec.name,
                  attrs.SIGNATURE: spec.signature_name or "serving_default"}
    if spec.HasField("version"):
        attributes[attrs.VERSION] = spec.version.value
    if call.shard is not None:
        attributes[attrs.SHARD] = call.shard
    return tracing.start("RemotePredict", kind=tracing.CLIENT, attributes=attributes)


def _end_client_span(tracing, span, result: Result) -> None:
    if result.endpoint:
        span.set_attribute(attrs.ENDPOINT, result.endpoint)
    if result.request_bytes is not None:
        span.set_attribute(attrs.REQUEST_BYTES, result.request_bytes)
    if result.response_bytes is not None:
        span.set_attribute(attrs.RESPONSE_BYTES, result.response_bytes)
    tracing.end(span, result.code, result.message, end_monotonic=result.finished)


@functools.cache
def _stamped_tcp_call() -> type:
    from remote_predict.op.stubs.tcp_stub import TcpCall

    class StampedTcpCall(TcpCall):
        """A TcpCall that notes when it finished, so each call's span ends with it, not with the fan-out."""

        def finish(self, *args, **kwargs) -> None:
            super().finish(*args, **kwargs)
            self.finished_at = time.monotonic()

    return StampedTcpCall


"""Several Predict calls at once, each to its own target, for one op (a lookup's shards).

`tcp://` calls are all made from the calling thread, together (`tcp_stub.run`: one selector waits for
every answer), so a fan-out to N shards costs no thread hand-off at all. Calls through other stubs
(gRPC, REST, custom), which block, run on the runtime's pool, all but the last, which runs here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tensorflow_serving.apis import predict_pb2

from remote_predict import wire
from remote_predict.errors import Code, ServingError
from remote_predict.op.runtime import OpRuntime
from remote_predict.op.stubs import StubError

POOL_THREADS = 64  # blocking calls in flight at once, per runtime


@dataclass
class Call:
    target: str
    request: predict_pb2.PredictRequest  # model spec and output filter; the inputs travel beside it
    inputs: Mapping[str, np.ndarray]


@dataclass
class Result:
    code: Code
    message: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


def _blocking(runtime: OpRuntime, call: Call, timeout: float) -> Result:
    from remote_predict.op.kernel import call_stub

    try:
        return Result(Code.OK, "", call_stub(runtime.stub_for(call.target), call.request, dict(call.inputs), timeout))
    except (StubError, ServingError) as e:
        return Result(e.code, e.message)


def predict_many(runtime: OpRuntime, calls: Sequence[Call], timeout: float) -> list[Result]:
    """Every call's result, in order; never raises for a failed call."""
    from remote_predict.op.stubs.tcp_stub import TcpCall, TcpStub, run

    if timeout <= 0:
        return [Result(Code.DEADLINE_EXCEEDED, "the request's own deadline has passed; not calling") for _ in calls]
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
            tcp.append((i, TcpCall(stub, body, call.request.model_spec.name)))
        else:
            blocking.append(i)
    pool = runtime.service("fanout-pool", lambda: ThreadPoolExecutor(POOL_THREADS, "remote-predict-fanout"))
    here = blocking.pop() if blocking and not tcp else None
    futures = {i: pool.submit(_blocking, runtime, calls[i], timeout) for i in blocking}
    if tcp:
        run([c for _, c in tcp], deadline)
        for i, c in tcp:
            if c.code == Code.OK:
                try:
                    results[i] = Result(Code.OK, "", c.outcome()[1])
                except ServingError as e:
                    results[i] = Result(e.code, e.message)
            else:
                results[i] = Result(c.code, c.message)
    if here is not None:
        results[here] = _blocking(runtime, calls[here], timeout)
    for i, future in futures.items():
        results[i] = future.result()
    return results  # type: ignore[return-value]

"""What a RemotePredict node does when it runs: build a PredictRequest, call the stub, map the answer.

`call_remote` is the whole behaviour on numpy values (testable without a graph); `RemotePredictKernel`
adapts it to the EagerPyFunc calling convention: inputs are `[input_tensor_aliases, *input_tensors,
output_tensor_aliases]`, outputs are `[status_code, status_error_message, *output_tensors]`.

With tracing on, a call goes through `fanout.predict_many` (one call), which gives it its CLIENT span
and sends that span's context on. Either way its time counts in the request's `remote` stage.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2

from remote_predict import tensor_codec
from remote_predict.errors import Code, ServingError
from remote_predict.op import addresses, fanout, request_context
from remote_predict.op.config import OpConfig
from remote_predict.op.errors import RemotePredictError
from remote_predict.op.runtime import CallRecord, OpRuntime, runtime_for
from remote_predict.op.stubs import StubError


def build_request(config: OpConfig, output_aliases: Sequence[str]) -> predict_pb2.PredictRequest:
    """The request's model spec and output filter; inputs travel beside it, as arrays."""
    request = predict_pb2.PredictRequest()
    spec = request.model_spec
    spec.name = config.model_name
    spec.signature_name = config.signature_name
    if config.model_version >= 0:
        spec.version.value = config.model_version
    request.output_filter.extend(output_aliases)
    return request


def _named_inputs(input_aliases: Sequence[str], inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    named: dict[str, np.ndarray] = {}
    for alias, array in zip(input_aliases, inputs, strict=True):
        if alias in named:
            raise ServingError(Code.INVALID_ARGUMENT, f"input alias {alias!r} is given twice")
        named[alias] = array
    return named


def call_stub(stub, request: predict_pb2.PredictRequest, inputs: dict[str, np.ndarray],
              timeout: float) -> dict[str, np.ndarray]:
    """Outputs of one Predict through `stub`; `predict_arrays` where the stub has it (no proto copies)."""
    fast = getattr(stub, "predict_arrays", None)
    if fast is not None:
        return fast(request, inputs, timeout)[1]
    # Numeric tensors travel as one buffer; strings as string_val (tensor_content cannot hold them).
    tensor_codec.put_arrays(request.inputs, inputs, tensor_content=True)
    response = stub.predict(request, timeout)
    return {alias: tensor_codec.to_ndarray(proto) for alias, proto in response.outputs.items()}


def _check_outputs(
    config: OpConfig, outputs: dict[str, np.ndarray], output_aliases: Sequence[str]
) -> list[np.ndarray]:
    checked = []
    for alias, dtype in zip(output_aliases, config.output_types, strict=True):
        if alias not in outputs:
            raise ServingError(Code.INTERNAL, f"the answer has no output {alias!r}")
        array = outputs[alias]
        got = tensor_codec.tf_dtype_of(array)
        if got != dtype:
            raise ServingError(
                Code.INTERNAL,
                f"output {alias!r} has dtype {tensor_codec.dtype_name(got)} but the op declares "
                f"{tensor_codec.dtype_name(dtype)}",
            )
        checked.append(array)
    return checked


@functools.lru_cache(maxsize=4096)
def watched_by_breaker(target: str) -> bool:
    """Targets whose replicas are watched elsewhere (tcp endpoints, gRPC's keepalive) skip the breaker's
    stall rule: it sheds every call of a target, which would fail a healthy replica's calls too."""
    parsed = addresses.parse(target)
    return parsed.kind != addresses.TCP and not (parsed.kind == addresses.GRPC and parsed.is_multi)


def call_remote(
    config: OpConfig, input_aliases: Sequence[str], inputs: Sequence[np.ndarray], output_aliases: Sequence[str],
    runtime: OpRuntime | None = None,
) -> tuple[Code, str, list[np.ndarray]]:
    """Run one remote Predict; returns (code, message, outputs) and never raises for call failures."""
    runtime = runtime or runtime_for(None)
    start = time.perf_counter()
    target = config.target_address
    timeout = request_context.call_timeout(config.max_rpc_deadline_millis / 1000)
    if timeout <= 0:
        message = describe_failure(config, "the request's own deadline has passed; not calling")
        runtime.report(CallRecord(target, config.model_name, Code.DEADLINE_EXCEEDED, message, 0.0))
        return Code.DEADLINE_EXCEEDED, message, []
    call, code, message = runtime.breaker.begin(target, timeout, watched=watched_by_breaker(target))
    if call is None:
        message = describe_failure(config, message)
        runtime.report(CallRecord(target, config.model_name, code, message, 0.0))
        return code, message, []
    runtime.inflight(target, +1)
    code = Code.UNKNOWN
    try:
        if len(input_aliases) != len(inputs):
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"'input_tensors' should be equal in length to 'input_tensor_aliases'. Length of "
                f"'input_tensors': {len(inputs)}, length of 'input_tensor_aliases': {len(input_aliases)}",
            )
        if len(output_aliases) != len(config.output_types):
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"'output_types' should be equal in length to 'output_tensor_aliases'. Length of "
                f"'output_types': {len(config.output_types)}, length of 'output_tensor_aliases': "
                f"{len(output_aliases)}",
            )
        stub = runtime.stub_for(target)
        request = build_request(config, output_aliases)
        if runtime.tracing is None:
            answer = call_stub(stub, request, _named_inputs(input_aliases, inputs), timeout)
        else:
            answer = _traced_call(runtime, fanout.Call(target, request, _named_inputs(input_aliases, inputs)), timeout)
        outputs = _check_outputs(config, answer, output_aliases)
        code, message = Code.OK, ""
    except (StubError, ServingError) as e:
        code, message, outputs = e.code, describe_failure(config, e.message), []
    finally:
        runtime.inflight(target, -1)
        runtime.breaker.end(target, call, code)
    if call.shed and code != Code.OK:
        code, message = Code.UNAVAILABLE, describe_failure(
            config, "cancelled: another call to the target has waited a quarter of its deadline; "
            "failing fast until it answers again")
    seconds = time.perf_counter() - start
    stages = request_context.current().stages
    if stages is not None:
        stages.add_remote(seconds)
    runtime.report(CallRecord(target, config.model_name, code, message, seconds))
    return code, message, outputs


def _traced_call(runtime: OpRuntime, call: fanout.Call, timeout: float) -> dict[str, np.ndarray]:
    result = fanout.predict_many(runtime, [call], timeout)[0]
    if result.code != Code.OK:
        raise StubError(result.code, result.message)
    return result.outputs


def describe_failure(config: OpConfig, message: str) -> str:
    version = f" version {config.model_version}" if config.model_version >= 0 else ""
    return f"RemotePredict to model '{config.model_name}'{version} at {config.target_address}: {message}"


def _empty(dtype: int) -> np.ndarray:
    if dtype == types_pb2.DT_STRING:
        return np.array(b"", dtype=object)
    return np.zeros((), dtype=tensor_codec.numpy_dtype(dtype))


def _aliases(tensor) -> list[str]:
    values = np.asarray(tensor._numpy()).reshape(-1)
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.tolist()]


class RemotePredictKernel:
    """The Python body of one kind of RemotePredict node (one per distinct configuration and runtime)."""

    def __init__(self, config: OpConfig, runtime_id: int | None = None):
        self.config = config
        self.runtime_id = runtime_id
        self.output_dtypes = [types_pb2.DT_INT32, types_pb2.DT_STRING, *config.output_types]

    def __call__(self, input_aliases, *rest):
        *inputs, output_aliases = rest
        try:
            runtime = runtime_for(self.runtime_id)
        except ServingError as e:
            code, message, outputs = e.code, describe_failure(self.config, e.message), []
        else:
            # `_numpy()` is a read-only view of the tensor's buffer; `numpy()` would copy it.
            code, message, outputs = call_remote(
                self.config, _aliases(input_aliases), [t._numpy() for t in inputs], _aliases(output_aliases),
                runtime)
        if code == Code.OK:
            return [_OK, _NO_MESSAGE, *outputs]
        if self.config.fail_op_on_rpc_error:
            raise RemotePredictError(code, message)
        return [np.int32(code), message.encode("utf-8"), *(_empty(dtype) for dtype in self.config.output_types)]


_OK = np.int32(0)
_NO_MESSAGE = b""

"""The Python API of the RemotePredict op, mirroring TF Serving's `remote_predict_ops` module.

`run` returns the output tensors and fails the op when the call fails; `run_returning_status` returns
`(status_code, status_error_message, output_tensors)` and never fails on a call error, leaving empty
scalars of the declared types as outputs. Both work eagerly, inside `tf.function`, in TF1 graphs and in
Keras layers, and the node they create survives SavedModel export.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Sequence

import tensorflow as tf

from remote_predict.op import pyfunc_registry, tokens
from remote_predict.op.config import DEFAULT_DEADLINE_MILLIS, DEFAULT_SIGNATURE, OpConfig
from remote_predict.op.kernel import RemotePredictKernel

RemotePredictResult = namedtuple("RemotePredictResult", ["status_code", "status_error_message", "output_tensors"])


def _resolve(token: str):
    _, runtime_id, _ = tokens.split(token)
    kernel = RemotePredictKernel(OpConfig.from_token(token), runtime_id)
    return kernel, [tf.as_dtype(t) for t in kernel.output_dtypes]


pyfunc_registry.register_resolver(tokens.REMOTE_PREDICT, _resolve)


def _aliases_tensor(aliases, what: str) -> tf.Tensor:
    tensor = tf.convert_to_tensor(aliases, dtype=tf.string, name=what)
    if tensor.shape.rank is not None and tensor.shape.rank != 1:
        raise ValueError(f"'{what}' must be a 1-D string tensor, got shape {tensor.shape}")
    return tensor


def _static_length(tensor: tf.Tensor) -> int | None:
    return tensor.shape[0] if tensor.shape.rank == 1 else None


def _remote_predict(
    input_tensor_aliases,
    input_tensors: Sequence,
    output_tensor_aliases,
    target_address: str,
    model_name: str,
    model_version: int,
    max_rpc_deadline_millis: int,
    output_types: Sequence,
    name: str | None,
    signature_name: str,
    fail_op_on_rpc_error: bool,
) -> RemotePredictResult:
    if model_name is None or model_name == "":
        raise ValueError("model_name must be specified.")
    if output_types is None:
        raise ValueError("output_types must be specified, one dtype per output alias.")
    input_tensors = list(input_tensors)
    output_dtypes = [tf.as_dtype(t) for t in output_types]
    in_aliases = _aliases_tensor(input_tensor_aliases, "input_tensor_aliases")
    out_aliases = _aliases_tensor(output_tensor_aliases, "output_tensor_aliases")
    n_in, n_out = _static_length(in_aliases), _static_length(out_aliases)
    if n_in is not None and n_in != len(input_tensors):
        raise ValueError(
            "'input_tensors' should be equal in length to 'input_tensor_aliases'. Length of 'input_tensors': "
            f"{len(input_tensors)}, length of 'input_tensor_aliases': {n_in}"
        )
    if n_out is not None and n_out != len(output_dtypes):
        raise ValueError(
            "'output_types' should be equal in length to 'output_tensor_aliases'. Length of 'output_types': "
            f"{len(output_dtypes)}, length of 'output_tensor_aliases': {n_out}"
        )
    config = OpConfig(
        target_address=target_address,
        model_name=model_name,
        model_version=int(model_version),
        max_rpc_deadline_millis=int(max_rpc_deadline_millis),
        signature_name=signature_name or DEFAULT_SIGNATURE,
        fail_op_on_rpc_error=fail_op_on_rpc_error,
        output_types=tuple(d.as_datatype_enum for d in output_dtypes),
    )
    outputs = pyfunc_registry.eager_py_func(
        [in_aliases, *input_tensors, out_aliases],
        config.to_token(),
        [tf.int32, tf.string, *output_dtypes],
        name=name,
    )
    status_code, message, *tensors = outputs
    if isinstance(status_code, tf.Tensor) and not tf.executing_eagerly():
        status_code.set_shape([])
        message.set_shape([])
    return RemotePredictResult(status_code, message, tensors)


def run(
    input_tensor_aliases,
    input_tensors: Sequence,
    output_tensor_aliases,
    target_address: str,
    model_name: str,
    model_version: int = -1,
    max_rpc_deadline_millis: int = DEFAULT_DEADLINE_MILLIS,
    output_types: Sequence | None = None,
    name: str | None = None,
    signature_name: str = DEFAULT_SIGNATURE,
) -> list[tf.Tensor]:
    """Call Predict on `model_name` at `target_address`; the op fails if the call fails."""
    return _remote_predict(
        input_tensor_aliases, input_tensors, output_tensor_aliases, target_address, model_name, model_version,
        max_rpc_deadline_millis, output_types, name, signature_name, fail_op_on_rpc_error=True,
    ).output_tensors


def run_returning_status(
    input_tensor_aliases,
    input_tensors: Sequence,
    output_tensor_aliases,
    target_address: str,
    model_name: str,
    model_version: int = -1,
    max_rpc_deadline_millis: int = DEFAULT_DEADLINE_MILLIS,
    output_types: Sequence | None = None,
    name: str | None = None,
    signature_name: str = DEFAULT_SIGNATURE,
) -> RemotePredictResult:
    """Call Predict and return its status with the outputs; never fails on a call error."""
    return _remote_predict(
        input_tensor_aliases, input_tensors, output_tensor_aliases, target_address, model_name, model_version,
        max_rpc_deadline_millis, output_types, name, signature_name, fail_op_on_rpc_error=False,
    )

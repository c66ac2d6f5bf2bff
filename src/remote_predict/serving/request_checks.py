"""The checks TF Serving makes on a Predict request against its signature (predict_util.cc)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from remote_predict import tensor_codec
from remote_predict.errors import Code, ServingError, invalid_argument
from remote_predict.serving.servable import Signature

PREDICT_METHODS = {"tensorflow/serving/predict", "tensorflow/serving/classify", "tensorflow/serving/regress"}


def check_predict_request(
    signature: Signature, inputs: Mapping[str, np.ndarray], output_filter: Sequence[str]
) -> list[str]:
    """TF Serving's Predict checks (predict_util.cc); returns the output aliases to fetch."""
    if signature.method_name not in PREDICT_METHODS:
        raise ServingError(
            Code.INTERNAL,
            "Expected prediction signature method_name to be one of {" + ", ".join(sorted(PREDICT_METHODS))
            + f"}}. Was: {signature.method_name}",
        )
    sent, expected = set(inputs), set(signature.inputs)
    if len(sent) != len(expected):
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} len({{{','.join(sorted(sent))}}}) "
            f"!= len({{{','.join(sorted(expected))}}}). Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
        )
    for alias in sorted(sent):
        if alias not in expected:
            raise invalid_argument(
                f"input tensor alias not found in signature: {alias}. Inputs expected to be in the set "
                f"{{{','.join(sorted(expected))}}}."
            )
        want = tensor_codec.base_dtype(signature.inputs[alias].dtype)
        got = tensor_codec.tf_dtype_of(inputs[alias])
        if want != got and want != 0:
            raise invalid_argument(
                f"input tensor alias {alias} expects {tensor_codec.dtype_name(want)} but "
                f"{tensor_codec.dtype_name(got)} is provided"
            )
    if not output_filter:
        return sorted(signature.outputs)
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in signature.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                f"{{{','.join(sorted(signature.outputs))}}}."
            )
        if alias in seen:
            raise invalid_argument(f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return list(output_filter)

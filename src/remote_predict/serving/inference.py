"""Classify and Regress: the tf.Example-based APIs, as TF Serving's classifier and regressor run them.

The signature takes one DT_STRING tensor of serialized `tf.Example`s. Classification reads the outputs
`classes` and/or `scores` of shape [batch, num_classes]; regression reads `outputs` of shape [batch] or
[batch, 1]. As in TF Serving (with its default of not checking method names), a signature is usable
by either API when its inputs and outputs have these shapes.
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from remote_predict.errors import invalid_argument
from remote_predict.serving.servable import Servable, Signature
from remote_predict.tensor_codec import base_dtype

CLASSES = "classes"
SCORES = "scores"
REGRESS_OUTPUT = "outputs"


def serialized_examples(request_input: input_pb2.Input) -> np.ndarray:
    """The examples as a 1-D object array of serialized bytes; context features merge into each one."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = [e.SerializeToString() for e in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        # Concatenated serializations merge: an example's own features override the context's.
        context = request_input.example_list_with_context.context.SerializeToString()
        examples = [context + e.SerializeToString() for e in request_input.example_list_with_context.examples]
    else:
        examples = []
    if not examples:
        raise invalid_argument("Input is empty.")
    array = np.empty(len(examples), dtype=object)
    array[:] = examples
    return array


def _single_string_input(signature: Signature) -> str:
    if len(signature.inputs) != 1:
        raise invalid_argument(f"Expected one input Tensor in signature '{signature.key}', found "
                               f"{len(signature.inputs)}.")
    (alias, spec), = signature.inputs.items()
    if base_dtype(spec.dtype) != types_pb2.DT_STRING:
        raise invalid_argument(f"Input '{alias}' of signature '{signature.key}' must be a DT_STRING tensor of "
                               "serialized tf.Example.")
    return alias


def classify(servable: Servable, signature: Signature, examples: np.ndarray) -> classification_pb2.ClassificationResult:
    alias = _single_string_input(signature)
    wanted = [name for name in (CLASSES, SCORES) if name in signature.outputs]
    if not wanted:
        raise invalid_argument(f"Expected classification signature '{signature.key}' outputs to contain at least "
                               f"one of '{CLASSES}' or '{SCORES}'.")
    outputs = servable.run(signature, {alias: examples}, wanted)
    batch = examples.shape[0]
    classes, scores = outputs.get(CLASSES), outputs.get(SCORES)
    num_classes = None
    for name, array in ((CLASSES, classes), (SCORES, scores)):
        if array is None:
            continue
        if array.ndim != 2 or array.shape[0] != batch:
            raise invalid_argument(f"Expected Tensor shape: [{batch} num_classes] but got {list(array.shape)} for "
                                   f"output '{name}'.")
        if num_classes is not None and array.shape[1] != num_classes:
            raise invalid_argument("Tensors classes and scores should match in shape dimension 1.")
        num_classes = array.shape[1]
    if classes is not None and classes.dtype.kind not in "OSU":
        raise invalid_argument("Expected classes Tensor of DT_STRING.")
    result = classification_pb2.ClassificationResult()
    for i in range(batch):
        row = result.classifications.add()
        for j in range(num_classes or 0):
            entry = row.classes.add()
            if classes is not None:
                label = classes[i, j]
                entry.label = label.decode("utf-8", "replace") if isinstance(label, bytes) else str(label)
            if scores is not None:
                entry.score = float(scores[i, j])
    return result


def regress(servable: Servable, signature: Signature, examples: np.ndarray) -> regression_pb2.RegressionResult:
    alias = _single_string_input(signature)
    if REGRESS_OUTPUT not in signature.outputs:
        raise invalid_argument(f"No output Tensor named '{REGRESS_OUTPUT}' in signature '{signature.key}'.")
    values = servable.run(signature, {alias: examples}, [REGRESS_OUTPUT])[REGRESS_OUTPUT]
    batch = examples.shape[0]
    if not (values.shape == (batch,) or values.shape == (batch, 1)):
        raise invalid_argument(f"Expected output Tensor shape to be either [{batch}] or [{batch}, 1] but got "
                               f"{list(values.shape)}")
    if values.dtype.kind != "f":
        raise invalid_argument(f"Expected output Tensor of DT_FLOAT, got {values.dtype}.")
    result = regression_pb2.RegressionResult()
    for value in values.reshape(-1).tolist():
        result.regressions.add(value=value)
    return result

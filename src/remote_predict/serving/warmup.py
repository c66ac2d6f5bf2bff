"""Model warmup: replay `assets.extra/tf_serving_warmup_requests` when a version loads, as TF Serving does.

The file is a TFRecord of PredictionLog protos (predict, classify, regress or multi_inference logs).
Replaying them before a version becomes AVAILABLE pays the first-run costs (graph optimisation, memory
allocation) before real traffic arrives. A failing warmup request fails the load.
"""

from __future__ import annotations

import os

import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from remote_predict.errors import ServingError, invalid_argument
from remote_predict.serving import inference
from remote_predict.serving.request_checks import check_predict_request
from remote_predict.serving.servable import Servable
from remote_predict.tensor_codec import to_ndarray

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = 1000  # TF Serving's limit


def _replay(servable: Servable, log: prediction_log_pb2.PredictionLog) -> None:
    kind = log.WhichOneof("log_type")
    if kind == "predict_log":
        request = log.predict_log.request
        signature = servable.signature(request.model_spec.signature_name)
        inputs = {alias: to_ndarray(proto) for alias, proto in request.inputs.items()}
        servable.run(signature, inputs, check_predict_request(signature, inputs, request.output_filter))
    elif kind in ("classify_log", "regress_log"):
        request = getattr(log, kind).request
        signature = servable.signature(request.model_spec.signature_name)
        run = inference.classify if kind == "classify_log" else inference.regress
        run(servable, signature, inference.serialized_examples(request.input))
    elif kind == "multi_inference_log":
        request = log.multi_inference_log.request
        examples = inference.serialized_examples(request.input)
        for task in request.tasks:
            signature = servable.signature(task.model_spec.signature_name)
            run = inference.classify if task.method_name.endswith("classify") else inference.regress
            run(servable, signature, examples)
    else:
        raise invalid_argument(f"unsupported warmup record type {kind!r}")


def run(servable: Servable) -> int:
    """Replay the version's warmup requests; returns how many ran."""
    path = os.path.join(servable.path, WARMUP_FILE)
    if not os.path.exists(path):
        return 0
    count = 0
    try:
        for record in tf.data.TFRecordDataset(path).take(MAX_RECORDS):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            _replay(servable, log)
            count += 1
    except ServingError as e:
        raise ServingError(e.code, f"Warmup request {count} in {path} failed: {e.message}") from None
    except (tf.errors.OpError, ValueError) as e:
        raise invalid_argument(f"Cannot read warmup requests from {path}: {e}") from None
    return count

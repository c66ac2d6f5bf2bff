"""The data plane: every serving API, once, for both front-ends.

The gRPC, REST and tcp front-ends are thin codecs around these methods, so every protocol validates,
runs and fails the same way. Requests resolve a model spec to a held version (`acquire`), check the
request against the signature exactly as TF Serving does, and run the version's Session.

Each front-end serves a request inside `serve(api, protocol, metadata)` (telemetry.py), which names its
span and times its stages the same way for every protocol; the methods here take that request's `served`
(None: nothing recorded) and tell it which model version the request resolved to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import numpy as np
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)
from tensorflow_serving.apis import status_pb2 as serving_status_pb2

from remote_predict import tensor_codec
from remote_predict.errors import ServingError, invalid_argument
from remote_predict.op import request_context
from remote_predict.serving import inference
from remote_predict.serving import servable as servable_lib
from remote_predict.serving.manager import ModelManager, ServableHandle
from remote_predict.serving.request_checks import check_predict_request
from remote_predict.serving.servable import Signature
from remote_predict.serving.telemetry import Served, Telemetry

CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
SIGNATURE_DEF_FIELD = "signature_def"


def _model_spec(name: str, version: int, signature_name: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature_name)
    spec.version.value = version
    return spec


class DataPlane:
    def __init__(
        self, manager: ModelManager, batcher=None, max_tensor_elements: int = tensor_codec.DEFAULT_MAX_ELEMENTS,
        telemetry: Telemetry | None = None,
    ):
        self.manager = manager
        self.batcher = batcher
        self.max_tensor_elements = max_tensor_elements
        self.telemetry = telemetry or Telemetry()

    def serve(self, api: str, protocol: str, metadata: Mapping[str, str] | None = None):
        """The context a front-end serves one request in (see telemetry.Telemetry.serve)."""
        return self.telemetry.serve(api, protocol, metadata)

    # ---------------------------------------------------------------------------------- resolving

    def acquire(self, spec: model_pb2.ModelSpec) -> ServableHandle:
        if not spec.name:
            raise invalid_argument("Missing model name in request.")
        # version and version_label are a oneof: a spec carries at most one of them.
        version = spec.version.value if spec.HasField("version") else None
        return self.manager.acquire(spec.name, version, spec.version_label or None)

    # ------------------------------------------------------------------------------------ Predict

    def decode_inputs(self, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        arrays = {}
        for alias, proto in inputs.items():
            try:
                arrays[alias] = tensor_codec.to_ndarray(proto, self.max_tensor_elements)
            except ServingError as e:
                raise invalid_argument(f"tensor parsing error: {alias}: {e.message}") from None
        return arrays

    def run_predict(
        self, handle: ServableHandle, signature: Signature, inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (), deadline: float | None = None, served: Served | None = None,
    ) -> dict[str, np.ndarray]:
        """Check and run one Predict. `deadline` (time.monotonic(), or None) bounds its queueing and its
        Session run, whichever front-end it came from, and the RemotePredict calls it makes."""
        if served is not None:
            served.identify(handle.name, handle.version, signature.key)
        aliases = check_predict_request(signature, inputs, output_filter)
        servable = handle.servable
        if self.batcher is not None:
            with request_context.scope(deadline):
                return self.batcher.run(servable, signature, inputs, aliases, deadline=deadline, served=served)
        # Only remote calls read the request's deadline from its context; a run without them needs none.
        scope = request_context.scope(deadline) if servable.remote_ops else contextlib.nullcontext()
        with scope, self.telemetry.running(served):
            return servable.run(signature, inputs, aliases, servable_lib.run_timeout_ms(deadline))

    def predict_arrays(
        self, request: predict_pb2.PredictRequest, inputs: Mapping[str, np.ndarray], deadline: float | None = None,
        served: Served | None = None,
    ) -> tuple[model_pb2.ModelSpec, dict[str, np.ndarray]]:
        """Predict on decoded inputs (`request` supplies model_spec and output_filter)."""
        with self.acquire(request.model_spec) as handle:
            if served is not None:
                served.identify(handle.name, handle.version)
            signature = handle.servable.signature(request.model_spec.signature_name)
            outputs = self.run_predict(handle, signature, inputs, request.output_filter, deadline, served)
            return _model_spec(handle.name, handle.version, signature.key), outputs

    def predict(self, request: predict_pb2.PredictRequest, tensor_content: bool = False,
                deadline: float | None = None) -> predict_pb2.PredictResponse:
        spec, outputs = self.predict_arrays(request, self.decode_inputs(request.inputs), deadline)
        response = predict_pb2.PredictResponse(model_spec=spec)
        tensor_codec.put_arrays(response.outputs, outputs, tensor_content)
        return response

    # ------------------------------------------------------------------------- Classify, Regress

    def _signature(self, handle: ServableHandle, spec: model_pb2.ModelSpec) -> Signature:
        return handle.servable.signature(spec.signature_name)

    def _resolved(self, handle: ServableHandle, spec: model_pb2.ModelSpec, served: Served | None) -> Signature:
        if served is not None:
            served.identify(handle.name, handle.version)
        signature = self._signature(handle, spec)
        if served is not None:
            served.identify(handle.name, handle.version, signature.key)
        return signature

    def classify(self, request: classification_pb2.ClassificationRequest,
                 served: Served | None = None) -> classification_pb2.ClassificationResponse:
        examples = inference.serialized_examples(request.input)
        with self.acquire(request.model_spec) as handle:
            signature = self._resolved(handle, request.model_spec, served)
            with self.telemetry.running(served):
                result = inference.classify(handle.servable, signature, examples)
            spec = _model_spec(handle.name, handle.version, signature.key)
        return classification_pb2.ClassificationResponse(model_spec=spec, result=result)

    def regress(self, request: regression_pb2.RegressionRequest,
                served: Served | None = None) -> regression_pb2.RegressionResponse:
        examples = inference.serialized_examples(request.input)
        with self.acquire(request.model_spec) as handle:
            signature = self._resolved(handle, request.model_spec, served)
            with self.telemetry.running(served):
                result = inference.regress(handle.servable, signature, examples)
            spec = _model_spec(handle.name, handle.version, signature.key)
        return regression_pb2.RegressionResponse(model_spec=spec, result=result)

    def multi_inference(self, request: inference_pb2.MultiInferenceRequest,
                        served: Served | None = None) -> inference_pb2.MultiInferenceResponse:
        if not request.tasks:
            raise invalid_argument("MultiInferenceRequest must contain at least one task.")
        name = request.tasks[0].model_spec.name
        seen: set[str] = set()
        for task in request.tasks:
            if task.model_spec.name != name:
                raise invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
            signature_name = task.model_spec.signature_name or "serving_default"
            if signature_name in seen:
                raise invalid_argument(f"Duplicate evaluation of signature: {signature_name}")
            seen.add(signature_name)
            if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise invalid_argument(f"Unsupported signature method_name: {task.method_name}")
        examples = inference.serialized_examples(request.input)
        response = inference_pb2.MultiInferenceResponse()
        with self.acquire(request.tasks[0].model_spec) as handle:
            if served is not None:
                served.identify(handle.name, handle.version)
            for task in request.tasks:
                signature = self._signature(handle, task.model_spec)
                result = response.results.add()
                result.model_spec.CopyFrom(_model_spec(handle.name, handle.version, signature.key))
                with self.telemetry.running(served):
                    if task.method_name == CLASSIFY_METHOD:
                        result.classification_result.CopyFrom(inference.classify(handle.servable, signature,
                                                                                 examples))
                    else:
                        result.regression_result.CopyFrom(inference.regress(handle.servable, signature, examples))
        return response

    # --------------------------------------------------------------------------- metadata, status

    def metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, served: Served | None = None,
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if not fields:
            raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != SIGNATURE_DEF_FIELD:
                raise invalid_argument(f"Metadata field {field} is not supported")
        with self.acquire(request.model_spec) as handle:
            if served is not None:
                served.identify(handle.name, handle.version)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            for key, signature_def in handle.servable.signature_defs.items():
                signatures.signature_def[key].CopyFrom(signature_def)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.CopyFrom(_model_spec(handle.name, handle.version))
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signatures)
        return response

    def model_status(
        self, request: get_model_status_pb2.GetModelStatusRequest, served: Served | None = None,
    ) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        if not spec.name:
            raise invalid_argument("Missing model name in request.")
        if served is not None:
            served.identify(spec.name, spec.version.value if spec.HasField("version") else None)
        version = spec.version.value if spec.HasField("version") else None
        statuses = self.manager.status(spec.name, version, spec.version_label or None)
        response = get_model_status_pb2.GetModelStatusResponse()
        # A version that ended says why; the others say so when their base path cannot be listed (the
        # store is unreachable): they keep serving, and the status tells the operator.
        store_error = self.manager.store_error(spec.name)
        for status in statuses:
            entry = response.model_version_status.add(version=status.version)
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state.value)
            error = status.error if status.state.value == "END" else store_error
            entry.status.CopyFrom(serving_status_pb2.StatusProto(
                error_code=int(error.code) if error else 0, error_message=error.message if error else ""))
        return response


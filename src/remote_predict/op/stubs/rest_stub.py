"""A stub for TF Serving's REST API (`http://host:port`), for targets that only expose HTTP.

REST answers carry no dtypes and, for a signature with a single output, no output name; the stub reads
the model's metadata once (per model spec and signature) to know both, so that a wrong alias or dtype
is reported instead of silently mislabelled.
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import quote

import numpy as np
import urllib3
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2

from remote_predict import json_codec, tensor_codec
from remote_predict.errors import HTTP_STATUS, Code, ServingError
from remote_predict.op import request_context
from remote_predict.op.stubs.base import StubError

_CODE_BY_HTTP = {status: code for code, status in reversed(HTTP_STATUS.items())}
_CODE_BY_HTTP.update({400: Code.INVALID_ARGUMENT, 404: Code.NOT_FOUND, 500: Code.INTERNAL, 409: Code.ABORTED})
_METADATA_TTL_SECONDS = 30.0


class RestStub:
    def __init__(self, target: str):
        self.base = target.rstrip("/")
        self._http = urllib3.PoolManager(maxsize=64, retries=False)
        self._outputs: dict[tuple, tuple[float, dict[str, int]]] = {}
        self._lock = threading.Lock()

    def _model_path(self, spec) -> str:
        path = f"{self.base}/v1/models/{quote(spec.name, safe='')}"
        if spec.HasField("version"):
            path += f"/versions/{spec.version.value}"
        elif spec.version_label:
            path += f"/labels/{quote(spec.version_label, safe='')}"
        return path

    def _request(self, method: str, url: str, body: bytes | None, timeout: float) -> dict:
        headers = {"Content-Type": "application/json"}
        headers.update(request_context.current().metadata)  # W3C trace context (tracing on: the client span's)
        try:
            response = self._http.request(
                method, url, body=body, headers=headers,
                timeout=urllib3.Timeout(total=max(timeout, 0.001)),
            )
        except urllib3.exceptions.TimeoutError:
            raise StubError(Code.DEADLINE_EXCEEDED, f"Deadline Exceeded: no answer from {url}") from None
        except urllib3.exceptions.HTTPError as e:
            raise StubError(Code.UNAVAILABLE, f"failed to connect to {url}: {e}") from None
        try:
            doc = json.loads(response.data or b"{}")
        except ValueError:
            doc = {"error": response.data[:200].decode("utf-8", "replace")}
        if response.status != 200:
            code = _CODE_BY_HTTP.get(response.status, Code.UNKNOWN)
            raise StubError(code, str(doc.get("error", f"HTTP {response.status}")) if isinstance(doc, dict) else "")
        if not isinstance(doc, dict):
            raise StubError(Code.INTERNAL, f"answer from {url} is not a JSON object")
        return doc

    def _output_dtypes(self, request: predict_pb2.PredictRequest, deadline: float) -> dict[str, int]:
        spec = request.model_spec
        key = (spec.name, spec.version.value if spec.HasField("version") else None, spec.version_label,
               spec.signature_name or "serving_default")
        cached = self._outputs.get(key)
        if cached is not None and time.monotonic() - cached[0] < _METADATA_TTL_SECONDS:
            return cached[1]
        doc = self._request("GET", self._model_path(spec) + "/metadata", None, deadline - time.monotonic())
        try:
            signature = doc["metadata"]["signature_def"]["signature_def"][key[3]]
            dtypes = {alias: types_pb2.DataType.Value(info["dtype"])
                      for alias, info in signature["outputs"].items()}
        except (KeyError, TypeError, ValueError):
            raise StubError(Code.NOT_FOUND, f"signature {key[3]!r} not found in metadata of {spec.name}") from None
        with self._lock:
            self._outputs[key] = (time.monotonic(), dtypes)
        return dtypes

    def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        deadline = time.monotonic() + timeout
        dtypes = self._output_dtypes(request, deadline)
        inputs = {alias: tensor_codec.to_ndarray(tp) for alias, tp in request.inputs.items()}
        body = json_codec.encode_columnar_request(request.model_spec.signature_name, inputs).encode("utf-8")
        doc = self._request("POST", self._model_path(request.model_spec) + ":predict", body,
                            deadline - time.monotonic())
        outputs = doc.get("outputs")
        if len(dtypes) == 1 and not json_codec.is_named_object(outputs):
            outputs = {next(iter(dtypes)): outputs}
        if not isinstance(outputs, dict):
            raise StubError(Code.INTERNAL, "REST answer has no 'outputs' object")
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        wanted = list(request.output_filter) or list(outputs)
        for alias in wanted:
            if alias not in outputs or alias not in dtypes:
                continue  # the op reports the missing alias by name
            try:
                array = json_codec.decode_tensor(outputs[alias], dtypes[alias])
            except ServingError as e:
                raise StubError(Code.INTERNAL, f"output {alias!r}: {e.message}") from None
            response.outputs[alias].CopyFrom(tensor_codec.from_ndarray(np.asarray(array), dtype=dtypes[alias]))
        return response

"""The gRPC front-end: TF Serving's PredictionService and ModelService, plus the standard health service.

Each method decodes nothing itself beyond the protos gRPC already parsed; it calls the data plane and
maps a ServingError to the same canonical status code on the wire. Each call is served inside the data
plane's `serve` (its span and stage times), continuing the W3C trace context of its metadata.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.apis import status_pb2 as serving_status_pb2

from remote_predict import wire
from remote_predict.errors import Code, ServingError
from remote_predict.protocol import (
    MODEL_SERVICE,
    PREDICTION_SERVICE,
    TENSOR_CONTENT,
    TENSOR_ENCODING_KEY,
    trace_context,
)
from remote_predict.serving.data_plane import DataPlane
from remote_predict.serving.metrics import ServerMetrics
from remote_predict.serving.profiler import profiler_handler
from remote_predict.serving.telemetry import Served

log = logging.getLogger(__name__)

NO_DEADLINE_SECONDS = 10 * 365 * 24 * 3600.0  # see deadline_of
T = TypeVar("T")
_GRPC_CODE = {code.value[0]: code for code in grpc.StatusCode}


def grpc_code(code: Code) -> grpc.StatusCode:
    return _GRPC_CODE.get(int(code), grpc.StatusCode.UNKNOWN)


class _Call:
    """What a request turned out to be about, for its metrics line."""

    model = ""


class _Servicer:
    def __init__(self, data_plane: DataPlane, metrics: ServerMetrics, on_reload: Callable | None = None):
        self.data_plane = data_plane
        self.metrics = metrics
        self.on_reload = on_reload

    def _serve(self, api: str, context: grpc.ServicerContext, work: Callable[[_Call, Served], T],
               metadata: dict[str, str] | None = None) -> T:
        start = time.perf_counter()
        call = _Call()
        code = Code.OK
        if metadata is None:
            metadata = trace_metadata(context.invocation_metadata())
        try:
            with self.data_plane.serve(api, "grpc", metadata) as served:
                return work(call, served)
        except ServingError as e:
            code, message = e.code, e.message
        except Exception as e:  # a bug must not take the server down; say what happened
            log.exception("%s on model %s failed", api, call.model)
            code, message = Code.INTERNAL, f"{type(e).__name__}: {e}"
        finally:
            self.metrics.observe_request(call.model, api, "grpc", code, time.perf_counter() - start)
        context.abort(grpc_code(code), message)
        raise AssertionError("unreachable")

    def _proto_api(self, api: str, method: Callable, request, context: grpc.ServicerContext, name: str):
        def work(call: _Call, served: Served):
            call.model = name
            return method(request, served=served)

        return self._serve(api, context, work)


def _wants_tensor_content(metadata) -> bool:
    return any(k == TENSOR_ENCODING_KEY and v == TENSOR_CONTENT for k, v in metadata)


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's gRPC deadline as a time.monotonic() value (None: the client set none).

    grpcio reports a call without a deadline as one due in the far future (gRPC's infinite deadline, some
    3e11 years away), not as None: taken as it is, the Session's timeout overflowed its int64 and every
    such call failed INTERNAL. A deadline further than `NO_DEADLINE_SECONDS` away is no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return time.monotonic() + remaining


def trace_metadata(metadata) -> dict[str, str]:
    """The W3C trace context headers of a call, to be carried on by the RemotePredict calls it makes."""
    return trace_context(metadata)


class PredictionServicer(_Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, data: bytes, context):
        """Takes and returns raw bytes: big tensors skip the generated classes' copies (see wire.py)."""
        dp = self.data_plane

        metadata = context.invocation_metadata()

        def work(call: _Call, served: Served) -> bytes:
            request, inputs = wire.decode_predict_request(data, dp.max_tensor_elements)
            call.model = request.model_spec.name
            served.decoded()
            spec, outputs = dp.predict_arrays(request, inputs, deadline=deadline_of(context), served=served)
            started = time.perf_counter()
            answer = wire.encode_predict_response(spec, outputs, _wants_tensor_content(metadata))
            served.stages.encode = time.perf_counter() - started
            return answer

        return self._serve("predict", context, work, trace_metadata(metadata))

    def Classify(self, request, context):
        return self._proto_api("classify", self.data_plane.classify, request, context, request.model_spec.name)

    def Regress(self, request, context):
        return self._proto_api("regress", self.data_plane.regress, request, context, request.model_spec.name)

    def MultiInference(self, request, context):
        name = request.tasks[0].model_spec.name if request.tasks else ""
        return self._proto_api("multi_inference", self.data_plane.multi_inference, request, context, name)

    def GetModelMetadata(self, request, context):
        return self._proto_api("metadata", self.data_plane.metadata, request, context, request.model_spec.name)


class ModelServicer(_Servicer, model_service_pb2_grpc.ModelServiceServicer):
    def GetModelStatus(self, request, context):
        return self._proto_api("status", self.data_plane.model_status, request, context, request.model_spec.name)

    def HandleReloadConfigRequest(self, request, context):
        def reload(call: _Call, served: Served):
            self.on_reload(request.config)
            response = model_management_pb2.ReloadConfigResponse()
            response.status.CopyFrom(serving_status_pb2.StatusProto(error_code=0, error_message=""))
            return response

        return self._serve("reload_config", context, reload)


def _prediction_handlers(servicer: PredictionServicer) -> grpc.GenericRpcHandler:
    """TF Serving's PredictionService, with Predict taking raw bytes (the others use the generated codecs)."""
    def method(behaviour, request_type, response_type):
        return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=request_type.FromString,
                                                   response_serializer=response_type.SerializeToString)

    return grpc.method_handlers_generic_handler(PREDICTION_SERVICE, {
        "Predict": grpc.unary_unary_rpc_method_handler(servicer.Predict),  # bytes in, bytes out
        "Classify": method(servicer.Classify, classification_pb2.ClassificationRequest,
                           classification_pb2.ClassificationResponse),
        "Regress": method(servicer.Regress, regression_pb2.RegressionRequest, regression_pb2.RegressionResponse),
        "MultiInference": method(servicer.MultiInference, inference_pb2.MultiInferenceRequest,
                                 inference_pb2.MultiInferenceResponse),
        "GetModelMetadata": method(servicer.GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest,
                                   get_model_metadata_pb2.GetModelMetadataResponse),
    })


def build_server(
    data_plane: DataPlane,
    metrics: ServerMetrics,
    on_reload: Callable,
    max_threads: int,
    channel_arguments: list[tuple[str, object]],
    profiler: bool = True,
) -> tuple[grpc.Server, health.HealthServicer]:
    """The gRPC server; `profiler` adds TF Serving's ProfilerService (see profiler.py)."""
    # TF Serving's defaults (messages up to 2 GiB), then --grpc_channel_arguments, which win.
    defaults = {"grpc.max_receive_message_length": (1 << 31) - 1, "grpc.max_send_message_length": (1 << 31) - 1,
                "grpc.so_reuseport": 0}
    options = [*((k, v) for k, v in defaults.items() if k not in dict(channel_arguments)), *channel_arguments]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grpc"),
                         options=options)
    server.add_generic_rpc_handlers([_prediction_handlers(PredictionServicer(data_plane, metrics))])
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(data_plane, metrics, on_reload), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    if profiler:
        server.add_generic_rpc_handlers([profiler_handler()])
    return server, health_servicer


def set_health(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
        health_servicer.set(service, status)

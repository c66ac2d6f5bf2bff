"""The gRPC front-end: TF Serving's PredictionService and ModelService, plus the standard health service.

Each method decodes nothing itself beyond the protos gRPC already parsed; it calls the data plane and
maps a ServingError to the same canonical status code on the wire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc
from tensorflow_serving.apis import status_pb2 as serving_status_pb2

from remote_predict.errors import Code, ServingError
from remote_predict.protocol import MODEL_SERVICE, PREDICTION_SERVICE, TENSOR_CONTENT, TENSOR_ENCODING_KEY
from remote_predict.serving.data_plane import DataPlane
from remote_predict.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
_GRPC_CODE = {code.value[0]: code for code in grpc.StatusCode}


def grpc_code(code: Code) -> grpc.StatusCode:
    return _GRPC_CODE.get(int(code), grpc.StatusCode.UNKNOWN)


class _Servicer:
    def __init__(self, data_plane: DataPlane, metrics: ServerMetrics, on_reload: Callable | None = None):
        self.data_plane = data_plane
        self.metrics = metrics
        self.on_reload = on_reload

    def _serve(self, api: str, model: str, context: grpc.ServicerContext, work: Callable[[], T]) -> T:
        start = time.perf_counter()
        code = Code.OK
        try:
            return work()
        except ServingError as e:
            code, message = e.code, e.message
        except Exception as e:  # a bug must not take the server down; say what happened
            log.exception("%s on model %s failed", api, model)
            code, message = Code.INTERNAL, f"{type(e).__name__}: {e}"
        finally:
            self.metrics.observe_request(model, api, "grpc", code, time.perf_counter() - start)
        context.abort(grpc_code(code), message)
        raise AssertionError("unreachable")


def _wants_tensor_content(context: grpc.ServicerContext) -> bool:
    return any(k == TENSOR_ENCODING_KEY and v == TENSOR_CONTENT for k, v in context.invocation_metadata())


class PredictionServicer(_Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, request, context):
        dp = self.data_plane
        return self._serve("predict", request.model_spec.name, context,
                           lambda: dp.predict(request, tensor_content=_wants_tensor_content(context)))

    def Classify(self, request, context):
        return self._serve("classify", request.model_spec.name, context, lambda: self.data_plane.classify(request))

    def Regress(self, request, context):
        return self._serve("regress", request.model_spec.name, context, lambda: self.data_plane.regress(request))

    def MultiInference(self, request, context):
        name = request.tasks[0].model_spec.name if request.tasks else ""
        return self._serve("multi_inference", name, context, lambda: self.data_plane.multi_inference(request))

    def GetModelMetadata(self, request, context):
        return self._serve("metadata", request.model_spec.name, context, lambda: self.data_plane.metadata(request))


class ModelServicer(_Servicer, model_service_pb2_grpc.ModelServiceServicer):
    def GetModelStatus(self, request, context):
        return self._serve("status", request.model_spec.name, context, lambda: self.data_plane.model_status(request))

    def HandleReloadConfigRequest(self, request, context):
        def reload():
            self.on_reload(request.config)
            response = model_management_pb2.ReloadConfigResponse()
            response.status.CopyFrom(serving_status_pb2.StatusProto(error_code=0, error_message=""))
            return response

        return self._serve("reload_config", "", context, reload)


def build_server(
    data_plane: DataPlane,
    metrics: ServerMetrics,
    on_reload: Callable,
    max_threads: int,
    channel_arguments: list[tuple[str, object]],
) -> tuple[grpc.Server, health.HealthServicer]:
    options = [("grpc.max_receive_message_length", (1 << 31) - 1), ("grpc.max_send_message_length", (1 << 31) - 1),
               ("grpc.so_reuseport", 0), *channel_arguments]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grpc"),
                         options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(data_plane, metrics), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(data_plane, metrics, on_reload), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health_servicer


def set_health(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
        health_servicer.set(service, status)

"""A user-written RemotePredict stub: `traced://HOST:PORT` targets go over gRPC with a trace id.

Register it in the serving process (`remote-predict serve --remote_predict_plugins=custom_stub`, with
this file on PYTHONPATH) or in any process that runs such a model, then export a model whose op has
`target_address="traced://127.0.0.1:8500"`.
"""

import itertools

import grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

import remote_predict


class TracedStub:
    """Calls TF Serving's gRPC Predict and sends an `x-trace-id` header with every request."""

    _ids = itertools.count(1)

    def __init__(self, target: str):
        address = target.split("://", 1)[1]
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address)).Predict

    def predict(self, request, timeout):
        trace_id = f"trace-{next(self._ids)}"
        try:
            return self._predict(request, timeout=timeout, metadata=[("x-trace-id", trace_id)])
        except grpc.RpcError as e:
            raise remote_predict.StubError(e.code().value[0], e.details()) from None


remote_predict.register_stub("traced", TracedStub)

"""The default stub: TF Serving's gRPC PredictionService over one shared channel per target."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping

import grpc
import numpy as np
from tensorflow_serving.apis import model_pb2, predict_pb2

from remote_predict import wire
from remote_predict.op.inflight import register_cancel, should_give_up
from remote_predict.op.stubs.base import StubError
from remote_predict.protocol import PREDICTION_SERVICE, TENSOR_CONTENT_METADATA

# Spread calls over every address the target resolves to (`ipv4:h1:p1,h2:p2`, DNS with several
# records) and let gRPC itself retry a Predict that failed with UNAVAILABLE on another replica.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": PREDICTION_SERVICE, "method": "Predict"}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Requests larger than the retry buffer are not retried; tensors can be large.
    ("grpc.per_rpc_retry_buffer_size", 256 << 20),
    ("grpc.retry_buffer_size", 1 << 30),
    # A restarted leaf should be reachable again within about a second, not after gRPC's default
    # exponential backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

_SHED_CHECK_SECONDS = 0.05  # how often a waiting call asks whether its target has stalled
_credentials_lock = threading.Lock()
_client_credentials: grpc.ChannelCredentials | None = None


def set_client_credentials(credentials: grpc.ChannelCredentials | None) -> None:
    """TLS credentials for every channel created from now on (None: plaintext)."""
    global _client_credentials
    with _credentials_lock:
        _client_credentials = credentials


class GrpcStub:
    def __init__(self, target: str):
        self.target = target
        credentials = _client_credentials
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._predict = self._channel.unary_unary(f"/{PREDICTION_SERVICE}/Predict")  # bytes in, bytes out

    def _call(self, data: bytes, timeout: float) -> bytes:
        future = self._predict.future(data, timeout=timeout, metadata=TENSOR_CONTENT_METADATA)
        register_cancel(future.cancel)  # the op sheds calls to a target that stopped answering
        try:
            while True:
                try:
                    return future.result(timeout=_SHED_CHECK_SECONDS)
                except grpc.FutureTimeoutError:
                    if should_give_up():
                        future.cancel()
                        raise grpc.FutureCancelledError() from None
        except grpc.FutureCancelledError:
            raise StubError(grpc.StatusCode.CANCELLED.value[0], "cancelled") from None
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            raise StubError(code.value[0], details or code.name) from None

    def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        return predict_pb2.PredictResponse.FromString(self._call(request.SerializeToString(), timeout))

    def predict_arrays(self, request: predict_pb2.PredictRequest, inputs: Mapping[str, np.ndarray],
                       timeout: float) -> tuple[model_pb2.ModelSpec, dict[str, np.ndarray]]:
        return wire.decode_predict_response(self._call(wire.encode_predict_request(request, inputs), timeout))

    def close(self) -> None:
        self._channel.close()

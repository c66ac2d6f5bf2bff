"""The default stub: TF Serving's gRPC PredictionService over one shared channel per target."""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Mapping

import grpc
import numpy as np
from tensorflow_serving.apis import model_pb2, predict_pb2

from remote_predict import wire
from remote_predict.op import request_context
from remote_predict.op.runtime import ClientTls, OpRuntime
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

# Options of every channel the op opens; `--remote_predict_channel_arguments` adds to and overrides them.
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
    # Each channel keeps its own connections: a channel opened to replace one whose calls were shed
    # must not pick up the same (hung) connection from the process-wide subchannel pool.
    ("grpc.use_local_subchannel_pool", 1),
    # HTTP/2 keepalive while calls wait: a replica that stops acknowledging pings (a stopped process, a
    # cut link) has its connection closed within about 1.5 s; the calls in flight on it fail UNAVAILABLE
    # and gRPC's retry policy re-sends them to another replica, and round robin skips it until it
    # reconnects. remote-predict servers accept pings this often; TF Serving's own server does not
    # (after two pings without data it answers "too_many_pings"): calling it with long calls, raise
    # grpc.keepalive_time_ms with --remote_predict_channel_arguments.
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 500),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)


def channel_options(overrides: tuple[tuple[str, object], ...]) -> list[tuple[str, object]]:
    """Our defaults, with `overrides` (the user's channel arguments) replacing those of the same key."""
    keys = {key for key, _ in overrides}
    return [*(o for o in CHANNEL_OPTIONS if o[0] not in keys), *overrides]


def credentials(tls: ClientTls | None) -> grpc.ChannelCredentials | None:
    if tls is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.encode() if tls.ca else None,
        private_key=tls.key.encode() if tls.key else None,
        certificate_chain=tls.cert.encode() if tls.cert else None,
    )


class GrpcStub:
    """Blocking calls: they cost about half the client CPU of `future()` calls, which start a thread.

    A blocking call cannot be cancelled on its own, so shedding a stalled target's calls closes the
    channel they are on, which cancels them all; the one call that was not shed (the probe) is sent
    again on a fresh channel, within its own deadline. Predict has no side effects, so that is safe.
    Shedding is only for targets naming one server: for a target listing several replicas, the
    keepalive above finds a replica that stopped answering, and the retry policy moves its calls.
    """

    def __init__(self, target: str, runtime: OpRuntime):
        self.target = target
        self.breaker = runtime.breaker
        self._credentials = credentials(runtime.settings.tls)
        self._options = channel_options(runtime.settings.channel_arguments)
        self._lock = threading.Lock()
        self._channel, self._predict = self._open()

    def _open(self) -> tuple[grpc.Channel, grpc.UnaryUnaryMultiCallable]:
        if self._credentials is None:
            channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            channel = grpc.secure_channel(self.target, self._credentials, options=self._options)
        return channel, channel.unary_unary(f"/{PREDICTION_SERVICE}/Predict")  # bytes in, bytes out

    def _cancel_calls_on(self, channel: grpc.Channel) -> None:
        with self._lock:
            if channel is not self._channel:
                return  # already replaced
            self._channel, self._predict = self._open()
        channel.close()

    def predict_bytes(self, data: bytes, timeout: float) -> bytes:
        """A serialized PredictRequest in, the serialized PredictResponse out. Sends the request's W3C trace
        context (`request_context`: with tracing on, the client span's) as gRPC metadata."""
        trace = request_context.current().metadata
        metadata = (*TENSOR_CONTENT_METADATA, *trace.items()) if trace else TENSOR_CONTENT_METADATA
        give_up_at = time.monotonic() + timeout
        while True:
            channel, predict = self._channel, self._predict
            # the op sheds calls to a stalled target
            self.breaker.on_cancel(functools.partial(self._cancel_calls_on, channel))
            try:
                return predict(data, timeout=timeout, metadata=metadata)
            except (grpc.RpcError, ValueError) as e:  # ValueError: the channel was closed before the call
                if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
                    code, details = e.code(), e.details() or e.code().name
                elif isinstance(e, ValueError):
                    code, details = grpc.StatusCode.CANCELLED, str(e)
                else:
                    code, details = grpc.StatusCode.UNKNOWN, str(e)
                timeout = give_up_at - time.monotonic()
                if code == grpc.StatusCode.CANCELLED and channel is not self._channel and \
                        not self.breaker.current_call_shed() and timeout > 0:
                    continue  # its channel was closed to shed the other calls; this one is the probe
                raise StubError(code.value[0], details) from None

    def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        return predict_pb2.PredictResponse.FromString(self.predict_bytes(request.SerializeToString(), timeout))

    def predict_arrays(self, request: predict_pb2.PredictRequest, inputs: Mapping[str, np.ndarray],
                       timeout: float) -> tuple[model_pb2.ModelSpec, dict[str, np.ndarray]]:
        return wire.decode_predict_response(self.predict_bytes(wire.encode_predict_request(request, inputs), timeout))

    def close(self) -> None:
        self._channel.close()

"""TLS: TF Serving's --ssl_config_file (with client verification), and the op's outgoing TLS channels."""

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import models
from helpers import HALF_PLUS_TWO, InProcessServer, ServerProcess, write_config
from tls import make_pki, ssl_config


@pytest.fixture(scope="module")
def pki():
    return make_pki()


def predict(channel: grpc.Channel, model: str = "half_plus_two") -> float:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[2.0]], np.float32)))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    return response.outputs["y"].float_val[0]


def test_mutual_tls_refuses_clients_without_a_certificate(pki, tmp_path):
    ca, server, client = pki
    config = ssl_config(tmp_path / "ssl.txt", server.key, server.cert, ca.cert, client_verify=True)
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                         f"--ssl_config_file={config}", rest=False) as s:
        good = grpc.ssl_channel_credentials(ca.cert.encode(), client.key.encode(), client.cert.encode())
        with grpc.secure_channel(s.address, good) as channel:
            assert predict(channel) == 3.0
        anonymous = grpc.ssl_channel_credentials(ca.cert.encode())
        with grpc.secure_channel(s.address, anonymous) as channel, pytest.raises(grpc.RpcError) as caught:
            predict(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(s.address) as channel, pytest.raises(grpc.RpcError):
            predict(channel)


def test_server_tls_without_client_verification(pki, tmp_path):
    ca, server, _ = pki
    config = ssl_config(tmp_path / "ssl.txt", server.key, server.cert)
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                         f"--ssl_config_file={config}", rest=False) as s, \
            grpc.secure_channel(s.address, grpc.ssl_channel_credentials(ca.cert.encode())) as channel:
        assert predict(channel) == 3.0


def test_remote_predict_calls_a_tls_leaf(pki, tmp_path):
    ca, server, client = pki
    leaf_ssl = ssl_config(tmp_path / "leaf_ssl.txt", server.key, server.cert, ca.cert, client_verify=True)
    with ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two",
                       f"--ssl_config_file={leaf_ssl}", rest=False, wait=False) as leaf:
        models.caller(tmp_path / "caller" / "1", leaf.address, "half_plus_two", deadline_ms=5000)
        config = write_config(tmp_path / "m.config", {"caller": tmp_path / "caller"})
        client_tls = ssl_config(tmp_path / "client_tls.txt", client.key, client.cert, ca.cert)
        with grpc.secure_channel(leaf.address, grpc.ssl_channel_credentials(
                ca.cert.encode(), client.key.encode(), client.cert.encode())) as channel:
            from helpers import wait_until

            wait_until(lambda: _serves(channel), 90, "the TLS leaf")
        with InProcessServer(f"--model_config_file={config}", f"--remote_predict_client_tls_config_file={client_tls}",
                             "--remote_predict_loopback_in_process=false", rest=False) as master:
            assert master.predict("caller", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val == [3.0]
        with InProcessServer(f"--model_config_file={config}", rest=False) as plaintext_master:
            with pytest.raises(grpc.RpcError) as caught:
                plaintext_master.predict("caller", {"x": np.array([[2.0]], np.float32)})
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _serves(channel) -> bool:
    try:
        return predict(channel) == 3.0
    except grpc.RpcError:
        return False

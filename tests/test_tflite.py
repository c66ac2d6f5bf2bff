"""TensorFlow Lite models (`--prefer_tflite_model=true`), checked as TF Serving's own test checks them, plus
errors, metadata, status and concurrency, over gRPC and REST with the official client."""

import shutil
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

import tflite_models
from helpers import HALF_PLUS_THREE, HALF_PLUS_TWO, InProcessServer, write_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite")
    both = shutil.copytree(HALF_PLUS_THREE, root / "both")  # a SavedModel (y = 0.5 x + 3) beside ...
    tflite_models.half_plus_two(both, with_signature_def=False)  # ... a model.tflite (y = 0.5 x + 2)
    corrupt = root / "corrupt" / "1"
    corrupt.mkdir(parents=True)
    (corrupt / "model.tflite").write_bytes(b"TFL3 is not enough to be a model")
    return {
        "tflite": tflite_models.half_plus_two(root / "plain", with_signature_def=False),
        "tflite_sigdef": tflite_models.half_plus_two(root / "sigdef", with_signature_def=True),
        "multi": tflite_models.multi_signature(root / "multi"),
        "saved_model": HALF_PLUS_TWO,  # no model.tflite: served from its SavedModel
        "both": both,
        "corrupt": root / "corrupt",
    }


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("cfg") / "models.config", models)
    with InProcessServer(f"--model_config_file={config}", "--prefer_tflite_model=true", "--num_tflite_pools=2",
                         "--file_system_poll_wait_seconds=0", "--max_num_load_retries=0") as s:
        yield s


def predict_request(model: str, x: list[float], signature: str = "serving_default", output_filter=("y",)):
    """The request TF Serving's VerifyPredictRequest sends: x of shape [len(x)] as float_val."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].float_val.extend(x)
    request.inputs["x"].tensor_shape.dim.add().size = len(x)
    request.output_filter.extend(output_filter)
    return request


@pytest.mark.parametrize("model", ["tflite", "tflite_sigdef"])
@pytest.mark.parametrize("output_filter", [("y",), ()])
def test_half_plus_two_over_grpc_as_tf_serving_checks_it(server, model, output_filter):
    response = server.prediction().Predict(predict_request(model, [2.0], output_filter=output_filter), 10)
    assert list(response.outputs) == ["y"]
    assert response.outputs["y"].dtype == types_pb2.DT_FLOAT
    assert list(response.outputs["y"].float_val) == [3.0]
    assert (response.model_spec.name, response.model_spec.signature_name) == (model, "serving_default")
    assert response.model_spec.version.value == 123


@pytest.mark.parametrize("model", ["tflite", "tflite_sigdef"])
def test_half_plus_two_over_rest_row_and_columnar(server, model):
    # The model was converted for x of shape [1, 1]; inputs are resized to what the request sends.
    status, body = server.post(f"/v1/models/{model}:predict", {"instances": [2.0, 3.0, 4.0]})
    assert (status, body) == (200, {"predictions": [3.0, 3.5, 4.0]})
    status, body = server.post(f"/v1/models/{model}:predict", {"inputs": {"x": [[2.0], [5.0]]}})
    assert (status, body) == (200, {"outputs": [[3.0], [4.5]]})
    status, body = server.post(f"/v1/models/{model}/versions/123:predict",
                               {"signature_name": "serving_default", "instances": [[10.0]]})
    assert (status, body) == (200, {"predictions": [[7.0]]})


def test_prefer_tflite_model_picks_model_tflite_and_falls_back_to_the_saved_model(server, models, tmp_path):
    # `both` holds half_plus_three's SavedModel and half_plus_two's model.tflite: the flag picks the latter.
    assert list(server.predict("both", {"x": np.array([2.0], np.float32)}).outputs["y"].float_val) == [3.0]
    # No model.tflite: the SavedModel is served, classify signatures and all.
    assert list(server.predict("saved_model", {"x": np.array([2.0], np.float32)}).outputs["y"].float_val) == [3.0]
    status, body = server.post("/v1/models/saved_model:regress",
                               {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]})
    assert (status, body) == (200, {"results": [3.0]})
    # Without the flag the same directory serves its SavedModel.
    config = write_config(tmp_path / "one.config", {"both": models["both"]})
    with InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0", rest=False) as s:
        assert list(s.predict("both", {"x": np.array([2.0], np.float32)}).outputs["y"].float_val) == [4.0]


def metadata(server, model: str) -> get_model_metadata_pb2.SignatureDefMap:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    response = server.prediction().GetModelMetadata(request, 10)
    assert response.model_spec.name == model and response.model_spec.version.value == 123
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    return signatures


@pytest.mark.parametrize(("model", "tensor"), [("tflite", "x"), ("tflite_sigdef", "tflite_input")])
def test_metadata_derived_from_the_model_as_tf_serving_does(server, model, tensor):
    signatures = metadata(server, model)
    assert list(signatures.signature_def) == ["serving_default"]
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    (alias, x), = signature.inputs.items()
    assert (alias, x.name, x.dtype, [d.size for d in x.tensor_shape.dim]) == ("x", tensor, types_pb2.DT_FLOAT, [1, 1])
    (alias, y), = signature.outputs.items()
    assert (alias, y.name, y.dtype) == ("y", "y", types_pb2.DT_FLOAT)
    status, body = server.get(f"/v1/models/{model}/metadata")
    assert status == 200
    assert body["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["x"]["name"] == tensor


def test_model_with_tflite_signatures_serves_each_of_them(server):
    signatures = metadata(server, "multi").signature_def
    assert sorted(signatures) == ["dense", "serving_default", "times_three"]
    k = signatures["times_three"].inputs["k"]
    assert (k.dtype, [d.size for d in k.tensor_shape.dim]) == (types_pb2.DT_INT64, [-1])
    assert sorted(signatures["times_three"].outputs) == ["w", "z"]
    response = server.predict("multi", {"k": np.array([1, 2, 5], np.int64)}, signature_name="times_three")
    assert tf.make_ndarray(response.outputs["z"]).tolist() == [3, 6, 15]
    assert tf.make_ndarray(response.outputs["w"]).tolist() == [1.0, 2.0, 5.0]
    assert response.outputs["z"].dtype == types_pb2.DT_INT64
    response = server.predict("multi", {"x": np.array([[2.0], [4.0]], np.float32)})
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [[3.0], [4.0]]
    status, body = server.post("/v1/models/multi:predict",
                               {"signature_name": "dense", "instances": [[1.0, 2.0, 3.0]]})
    assert (status, body) == (200, {"predictions": [[4.0, 5.0]]})
    status, body = server.post("/v1/models/multi:predict", {"signature_name": "times_three", "instances": [4]})
    assert (status, body) == (200, {"predictions": [{"w": 4.0, "z": 12}]})


def rpc_error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def bad_requests() -> dict[str, predict_pb2.PredictRequest]:
    cases = {}
    wrong_dtype = predict_request("", [2.0])
    wrong_dtype.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([2.0], np.float64)))
    cases["wrong dtype"] = wrong_dtype
    missing = predict_request("", [2.0])
    del missing.inputs["x"]
    cases["missing input"] = missing
    extra = predict_request("", [2.0])
    extra.inputs["z"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    cases["extra input"] = extra
    cases["unknown signature"] = predict_request("", [2.0], signature="nope")
    cases["unknown output"] = predict_request("", [2.0], output_filter=("nope",))
    cases["duplicate output"] = predict_request("", [2.0], output_filter=("y", "y"))
    return cases


@pytest.mark.parametrize("case", sorted(bad_requests()))
def test_bad_requests_fail_as_they_do_on_the_saved_model(server, case):
    """The same bad request gets the same code and message from the TFLite model as from the SavedModel."""
    answers = {}
    for model in ("tflite", "tflite_sigdef", "saved_model"):
        request = bad_requests()[case]
        request.model_spec.name = model
        answers[model] = rpc_error(lambda r=request: server.prediction().Predict(r, 10))
    assert answers["tflite"] == answers["tflite_sigdef"] == answers["saved_model"]
    assert answers["tflite"][0] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def test_rest_errors_match_the_saved_model(server):
    for body in ({"instances": ["text"]}, {"signature_name": "nope", "instances": [1.0]}, {"inputs": {"q": [1.0]}}):
        tflite = server.post("/v1/models/tflite:predict", body)
        saved_model = server.post("/v1/models/saved_model:predict", body)
        assert tflite == saved_model and tflite[0] == 400, (body, tflite, saved_model)


def test_input_the_model_cannot_take_is_invalid_argument_and_the_server_keeps_serving(server):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "multi"
    request.model_spec.signature_name = "dense"
    request.inputs["v"].CopyFrom(tf.make_tensor_proto(np.ones([1, 4], np.float32)))  # [None, 3] expected
    for _ in range(3):  # every interpreter of the pool gets it at least once
        code, message = rpc_error(lambda: server.prediction().Predict(request, 10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot run signature 'dense' on inputs of shapes {v: [1, 4]}" in message
    for _ in range(4):
        response = server.predict("multi", {"v": np.array([[1.0, 1.0, 1.0]], np.float32)}, signature_name="dense")
        assert tf.make_ndarray(response.outputs["out"]).tolist() == [[2.0, 2.0]]


def test_concurrent_requests_on_the_interpreter_pool_get_their_own_answers(server):
    errors: list[str] = []

    def client(worker: int) -> None:
        for i in range(25):
            x = np.array([[float(worker * 100 + i)], [float(i)]], np.float32)
            model = ("tflite", "multi")[worker % 2]
            y = tf.make_ndarray(server.predict(model, {"x": x}).outputs["y"])
            if y.tolist() != (0.5 * x + 2).tolist():
                errors.append(f"worker {worker} request {i}: {x.tolist()} -> {y.tolist()}")

    threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_model_status_over_grpc_and_rest(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "tflite_sigdef"
    (status,) = server.models().GetModelStatus(request, 10).model_version_status
    assert (status.version, status.state, status.status.error_code) == (
        123, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)
    assert server.get("/v1/models/tflite") == (200, {"model_version_status": [
        {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})


def test_corrupt_tflite_model_fails_its_load_with_the_reason(server, models):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "corrupt"
    (status,) = server.models().GetModelStatus(request, 10).model_version_status
    assert status.state == get_model_status_pb2.ModelVersionStatus.END
    assert status.status.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert f"Failed to load TFLite model at {models['corrupt'] / '1'}" in status.status.error_message
    code, _ = rpc_error(lambda: server.predict("corrupt", {"x": np.array([1.0], np.float32)}))
    assert code == grpc.StatusCode.NOT_FOUND
    assert json_format.MessageToDict(metadata(server, "tflite"))  # the others still serve


def test_batching_merges_requests_for_a_tflite_model(models, tmp_path):
    """The batcher runs merged batches through the same interface; each request gets its own rows back."""
    config = write_config(tmp_path / "one.config", {"tflite": models["tflite"]})
    with InProcessServer(f"--model_config_file={config}", "--prefer_tflite_model=true", "--enable_batching",
                         "--file_system_poll_wait_seconds=0", rest=False) as s:
        errors: list[str] = []

        def client(worker: int) -> None:
            for i in range(10):
                x = np.array([[float(worker)], [float(i)]], np.float32)
                y = tf.make_ndarray(s.predict("tflite", {"x": x}).outputs["y"])
                if y.tolist() != (0.5 * x + 2).tolist():
                    errors.append(f"{x.tolist()} -> {y.tolist()}")

        threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []

"""The gRPC API against TF Serving's own test models, with the official tensorflow-serving-api client."""

import json

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    predict_pb2,
    regression_pb2,
)

from helpers import (
    COUNTER,
    HALF_PLUS_THREE,
    HALF_PLUS_TWO,
    HALF_PLUS_TWO_TF2,
    TESTDATA,
    TWO_VERSIONS,
    InProcessServer,
    write_config,
)
from remote_predict.protocol import TENSOR_CONTENT_METADATA


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("cfg") / "models.config", {
        "half_plus_two": HALF_PLUS_TWO, "half_plus_three": HALF_PLUS_THREE, "counter": COUNTER,
        "tf2": HALF_PLUS_TWO_TF2, "two_versions": TWO_VERSIONS,
    }, extra={"two_versions": 'model_version_policy { all {} } version_labels { key: "stable" value: 123 } '
                              'version_labels { key: "canary" value: 124 }'})
    with InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0") as s:
        yield s


def example(**features: float) -> example_pb2.Example:
    return example_pb2.Example(features=feature_pb2.Features(feature={
        k: feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[v])) for k, v in features.items()}))


def test_predict_half_plus_two_answers_like_tf_serving(server):
    response = server.predict("half_plus_two", {"x": np.array([[2.0]], np.float32)})
    # TF Serving's own test reads the typed field directly.
    assert response.outputs["y"].float_val[0] == 3.0
    assert not response.outputs["y"].tensor_content
    assert response.model_spec.name == "half_plus_two"
    assert response.model_spec.version.value == 123
    assert response.model_spec.signature_name == "serving_default"


def test_a_call_without_a_deadline_is_answered(server):
    """The official client's calls without a timeout (as many clients make them) carry no gRPC deadline."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[2.0]], np.float32)))
    assert server.prediction().Predict(request).outputs["y"].float_val[0] == 3.0  # no timeout given


def test_predict_accepts_rank_one_input_for_rank_two_signature(server):
    response = server.predict("half_plus_two", {"x": np.array([2.0, 3.0, 4.0], np.float32)})
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["y"]), [3.0, 3.5, 4.0])


def test_tensor_content_answers_when_asked(server):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0], [2.0]], np.float32)))
    response = server.prediction().Predict(request, metadata=TENSOR_CONTENT_METADATA, timeout=10)
    assert response.outputs["y"].tensor_content
    assert not response.outputs["y"].float_val
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["y"]), [[2.5], [3.0]])


def test_tf2_model_and_other_model(server):
    assert server.predict("tf2", {"x": np.array([2.0], np.float32)}).outputs["y"].float_val == [3.0]
    assert server.predict("half_plus_three", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val == [4.0]


def test_version_and_label_select_the_version(server):
    by_version = server.predict("two_versions", {"x": np.array([[2.0]], np.float32)}, version=124)
    by_label = server.predict("two_versions", {"x": np.array([[2.0]], np.float32)}, version_label="stable")
    latest = server.predict("two_versions", {"x": np.array([[2.0]], np.float32)})
    assert by_version.model_spec.version.value == 124
    assert by_label.model_spec.version.value == 123
    assert latest.model_spec.version.value == 124


def test_stateful_counter_model_keeps_state(server):
    def call(signature, inputs=None):
        return server.predict("counter", inputs or {}, signature_name=signature).outputs["output"].float_val[0]

    call("reset_counter")
    assert call("incr_counter") == 1.0
    assert call("incr_counter") == 2.0
    assert call("incr_counter_by", {"delta": np.float32(3.0)}) == 5.0
    assert call("get_counter") == 5.0


def test_output_filter_fetches_only_what_was_asked(server):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.model_spec.signature_name = "regress_x2_to_y3"
    request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(np.array([[2.0]], np.float32)))
    request.output_filter.append("outputs")
    response = server.prediction().Predict(request, timeout=10)
    assert list(response.outputs) == ["outputs"]
    assert response.outputs["outputs"].float_val == [4.0]


def test_metadata_matches_tf_serving_answer(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "half_plus_two"
    response = server.prediction().GetModelMetadata(request, timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    expected = json.loads((TESTDATA / "half_plus_two_model_metadata.json").read_text())
    actual = json_format.MessageToDict(signatures, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    assert actual == expected["metadata"]["signature_def"]
    assert response.model_spec.version.value == 123


def test_model_status(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "two_versions"
    response = server.models().GetModelStatus(request, timeout=10)
    states = {s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state)
              for s in response.model_version_status}
    assert states == {123: "AVAILABLE", 124: "AVAILABLE"}
    assert all(s.status.error_code == 0 for s in response.model_version_status)


def test_classify_regress_and_multi_inference(server):
    request_input = input_pb2.Input(example_list=input_pb2.ExampleList(examples=[example(x=2.0), example(x=4.0)]))
    classify = classification_pb2.ClassificationRequest(input=request_input)
    classify.model_spec.name = "half_plus_two"
    classify.model_spec.signature_name = "classify_x_to_y"
    result = server.prediction().Classify(classify, timeout=10)
    assert [[c.score for c in row.classes] for row in result.result.classifications] == [[3.0], [4.0]]
    assert result.model_spec.signature_name == "classify_x_to_y"

    regress = regression_pb2.RegressionRequest(input=request_input)
    regress.model_spec.name = "half_plus_two"
    regress.model_spec.signature_name = "regress_x_to_y2"
    assert [r.value for r in server.prediction().Regress(regress, timeout=10).result.regressions] == [4.0, 5.0]

    multi = inference_pb2.MultiInferenceRequest(input=request_input)
    for signature, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                              ("regress_x_to_y", "tensorflow/serving/regress")):
        task = multi.tasks.add(method_name=method)
        task.model_spec.name = "half_plus_two"
        task.model_spec.signature_name = signature
    results = server.prediction().MultiInference(multi, timeout=10).results
    assert [c.classes[0].score for c in results[0].classification_result.classifications] == [3.0, 4.0]
    assert [r.value for r in results[1].regression_result.regressions] == [3.0, 4.0]


def test_context_features_merge_into_examples(server):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "half_plus_two"
    request.model_spec.signature_name = "regress_x_to_y"
    request.input.example_list_with_context.context.CopyFrom(example(x=10.0))
    request.input.example_list_with_context.examples.add()  # takes x from the context
    request.input.example_list_with_context.examples.append(example(x=2.0))  # its own x wins
    assert [r.value for r in server.prediction().Regress(request, timeout=10).result.regressions] == [7.0, 3.0]


def test_health_service_reports_serving(server):
    stub = health_pb2_grpc.HealthStub(server.channel())
    for service in ("", "tensorflow.serving.PredictionService"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("model", "inputs", "spec", "code", "fragment"),
    [
        ("nope", {"x": np.array([[1.0]], np.float32)}, {}, grpc.StatusCode.NOT_FOUND, "Latest(nope)"),
        ("half_plus_two", {"x": np.array([[1.0]], np.float32)}, {"version": 7}, grpc.StatusCode.NOT_FOUND,
         "Specific(half_plus_two, 7)"),
        ("two_versions", {"x": np.array([[1.0]], np.float32)}, {"version_label": "gold"},
         grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: gold"),
        ("half_plus_two", {"y": np.array([[1.0]], np.float32)}, {}, grpc.StatusCode.INVALID_ARGUMENT,
         "input tensor alias not found in signature: y"),
        ("half_plus_two", {"x": np.array([[1.0]], np.float32), "z": np.float32(1)}, {},
         grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {z}"),
        ("half_plus_two", {"x": np.array([["a"]])}, {}, grpc.StatusCode.INVALID_ARGUMENT,
         "expects float but string is provided"),
        ("half_plus_two", {"x": np.array([[1.0]], np.float32)}, {"signature_name": "nope"},
         grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'),
        ("counter", {"delta": np.ones(2, np.float32)}, {"signature_name": "incr_counter_by"},
         grpc.StatusCode.INVALID_ARGUMENT, "must be the same size"),
    ],
)
def test_bad_requests_get_tf_serving_codes(server, model, inputs, spec, code, fragment):
    with pytest.raises(grpc.RpcError) as caught:
        server.predict(model, inputs, **spec)
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details()
    # ... and the server answers the next good request.
    assert server.predict("half_plus_two", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val == [3.0]


def test_tensor_proto_inconsistent_with_its_shape(server):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    proto = request.inputs["x"]
    proto.dtype = tf.float32.as_datatype_enum
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_content = b"\x00" * 12  # three floats for a shape of two
    with pytest.raises(grpc.RpcError) as caught:
        server.prediction().Predict(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor parsing error: x" in caught.value.details()


def test_metadata_field_is_required(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "half_plus_two"
    with pytest.raises(grpc.RpcError) as caught:
        server.prediction().GetModelMetadata(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

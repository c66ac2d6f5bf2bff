"""The REST API: TF Serving's URLs, JSON shapes, error bodies and HTTP codes, over plain HTTP."""

import base64
import json

import pytest

import models
from helpers import HALF_PLUS_TWO, TESTDATA, TWO_VERSIONS, InProcessServer, http, write_config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rest")
    built = {
        "strings": models.strings(root / "strings" / "1"),
        "pair": models.two_in_two_out(root / "pair" / "1"),
        "types": models.int_types(root / "types" / "1"),
        "sleepy": models.sleepy(root / "sleepy" / "1"),
    }
    config = write_config(root / "models.config", {
        "default": HALF_PLUS_TWO, "two_versions": TWO_VERSIONS,
        **{name: path.parent for name, path in built.items()},
    }, extra={"two_versions": 'model_version_policy { all {} } version_labels { key: "stable" value: 123 }'})
    with InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0",
                         f"--monitoring_config_file={TESTDATA / 'monitoring_config.txt'}",
                         "--rest_api_timeout_in_ms=1500", "--rest_api_max_body_bytes=100000") as s:
        yield s


def test_row_and_columnar_predict_as_tf_serving(server):
    assert server.post("/v1/models/default:predict", {"instances": [2.0, 3.0, 4.0]}) == \
        (200, {"predictions": [3.0, 3.5, 4.0]})
    assert server.post("/v1/models/default:predict", {"inputs": [2.0, 3.0, 4.0]}) == \
        (200, {"outputs": [3.0, 3.5, 4.0]})
    assert server.post("/v1/models/default:predict", {"instances": [[2.0], [3.0]]}) == \
        (200, {"predictions": [[3.0], [3.5]]})


def test_model_status_as_tf_serving(server):
    status, body = server.get("/v1/models/default")
    assert status == 200
    assert body == {"model_version_status": [
        {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert server.get("/v1/models/two_versions/versions/124")[1]["model_version_status"][0]["version"] == "124"
    assert server.get("/v1/models/two_versions/labels/stable")[1]["model_version_status"][0]["version"] == "123"


def test_metadata_matches_tf_serving_file(server):
    status, body = server.get("/v1/models/default/metadata")
    assert status == 200
    assert body == json.loads((TESTDATA / "half_plus_two_model_metadata.json").read_text())


def test_versions_labels_and_signature_name(server):
    assert server.post("/v1/models/two_versions/versions/123:predict", {"instances": [[2.0]]})[0] == 200
    assert server.post("/v1/models/two_versions/labels/stable:predict", {"instances": [[2.0]]})[0] == 200
    body = {"signature_name": "regress_x2_to_y3", "instances": [[2.0]]}
    assert server.post("/v1/models/default:predict", body) == (200, {"predictions": [[4.0]]})
    # TF Serving matches paths case-insensitively.
    assert server.post("/V1/Models/default:PREDICT", {"instances": [2.0]})[0] == 200


def test_classify_and_regress(server):
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}, {"x": 4.0}]}
    assert server.post("/v1/models/default:classify", body) == (200, {"results": [[["", 3.0]], [["", 4.0]]]})
    body = {"signature_name": "regress_x_to_y2", "context": {"x": 1.0}, "examples": [{}, {"x": 4.0}]}
    assert server.post("/v1/models/default:regress", body) == (200, {"results": [3.5, 5.0]})


def test_named_inputs_and_several_outputs(server):
    status, body = server.post("/v1/models/pair:predict", {"instances": [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}]})
    assert (status, body) == (200, {"predictions": [{"product": 2.0, "sum": 3.0}, {"product": 12.0, "sum": 7.0}]})
    status, body = server.post("/v1/models/pair:predict", {"inputs": {"a": [1.0, 3.0], "b": [2.0, 4.0]}})
    assert (status, body) == (200, {"outputs": {"product": [2.0, 12.0], "sum": [3.0, 7.0]}})


def test_strings_and_base64(server):
    raw = bytes(range(256))
    body = {"instances": [{"b64": base64.b64encode(raw).decode()}, "héllo"]}
    status, answer = server.post("/v1/models/strings:predict", body)
    assert status == 200
    first, second = answer["predictions"]
    assert base64.b64decode(first["text_bytes"]["b64"]) == raw  # *_bytes outputs are base64
    assert second["upper"] == "HéLLO" and second["length"] == len("héllo".encode())
    assert first["upper"] == {"b64": base64.b64encode(raw.upper()).decode()}  # not UTF-8: base64, never garbled


def test_each_dtype_round_trips(server):
    values = {"i8": [-128, 127], "u8": [0, 255], "i32": [-(2**31), 2**31 - 1], "i64": [-(2**63), 2**63 - 1],
              "f64": [0.1, 1e300], "flag": [True, False], "half": [0.5, 65504.0]}
    status, answer = server.post("/v1/models/types:predict", {"inputs": values})
    assert status == 200, answer
    assert answer["outputs"] == {f"{k}_out": v for k, v in values.items()}


def test_non_finite_floats_use_tf_serving_tokens(server):
    response = http.request("POST", server.rest + "/v1/models/default:predict",
                            body='{"instances": [NaN, Infinity, -Infinity]}')
    assert response.status == 200
    assert response.data.decode() == '{"predictions": [NaN, Infinity, -Infinity]}'


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/models/default:predict", "{not json", 400, "JSON Parse error"),
        ("/v1/models/default:predict", "", 400, "The document is empty"),
        ("/v1/models/default:predict", "[1, 2]", 400, "Is not object"),
        ("/v1/models/default:predict", {"instances": [[1.0], [1.0, 2.0]]}, 400, "Expecting tensor size"),
        ("/v1/models/default:predict", {"instances": [[[1.0], 2.0]]}, 400, "found at incorrect level"),
        ("/v1/models/default:predict", {"instances": ["a"]}, 400, "is not of expected type: float"),
        ("/v1/models/default:predict", {"instances": [True]}, 400, "is not of expected type: float"),
        ("/v1/models/default:predict", {"instances": [16777217]}, 400, "without loss of precision"),
        ("/v1/models/default:predict", {"instances": []}, 400, "No values in 'instances' array"),
        ("/v1/models/default:predict", {"nothing": 1}, 400, "Missing 'inputs' or 'instances' key"),
        ("/v1/models/default:predict", {"inputs": 1, "instances": [1]}, 400, "only one of"),
        ("/v1/models/default:predict", {"signature_name": 5, "inputs": 1}, 400, "must be a string"),
        ("/v1/models/default:predict", {"signature_name": "nope", "inputs": [1.0]}, 400, "not found"),
        ("/v1/models/pair:predict", {"instances": [1.0]}, 400, "expecting list of objects"),
        ("/v1/models/pair:predict", {"inputs": {"a": [1.0], "b": [1.0], "c": [1.0]}}, 400, "not inputs of"),
        ("/v1/models/pair:predict", {"instances": [{"a": 1.0}]}, 400, "keys must be equal to: a,b"),
        ("/v1/models/types:predict", {"inputs": {"i8": [300], "u8": [0], "i32": [0], "i64": [0], "f64": [0.0],
                                                 "flag": [True], "half": [0.0]}}, 400, "out of range"),
        ("/v1/models/strings:predict", {"instances": [{"b64": "%%%"}]}, 400, "Unable to base64 decode"),
        ("/v1/models/nope:predict", {"instances": [1.0]}, 404, "Servable not found for request: Latest(nope)"),
        ("/v1/models/default/versions/9:predict", {"instances": [1.0]}, 404, "Specific(default, 9)"),
        ("/v1/models/default:classify", {"examples": []}, 400, "empty array"),
        ("/v1/models/default:classify", {"signature_name": "classify_x_to_y", "examples": [{"x": [1.0, None]}]},
         400, "unexpected JSON type: Null"),
    ],
)
def test_bad_requests_get_clear_errors(server, path, body, status, fragment):
    got_status, answer = server.post(path, body)
    assert got_status == status, answer
    assert fragment in answer["error"]
    assert server.post("/v1/models/default:predict", {"instances": [2.0]}) == (200, {"predictions": [3.0]})


def test_deeply_nested_json_is_a_400_not_a_crash(server):
    status, answer = server.post("/v1/models/default:predict", '{"instances": ' + "[" * 40000 + "]" * 40000 + "}")
    assert status == 400 and "JSON" in answer["error"]


def test_wrong_method_unknown_path_and_missing_name(server):
    status, answer = server.post("/v1/models/default:predict", None, method="GET")
    assert status == 405 and "Malformed request" in answer["error"]
    response = http.request("PUT", server.rest + "/v1/models/default")
    assert response.status == 405 and response.headers["Allow"] == "GET"
    assert server.get("/v2/other")[0] == 404
    status, answer = server.get("/v1/models")
    assert status == 400 and answer["error"] == "Missing model name in request."


def test_body_over_limit_is_413(server):
    status, answer = server.post("/v1/models/default:predict", {"instances": [1.0] * 50000})
    assert status == 413 and "limit" in answer["error"]


def test_rest_timeout_answers_504(server):
    status, answer = server.post("/v1/models/sleepy:predict", {"inputs": {"x": [1.0], "delay_ms": 2500}})
    assert status == 504 and "--rest_api_timeout_in_ms" in answer["error"]


def test_prometheus_metrics(server):
    server.post("/v1/models/default:predict", {"instances": [2.0]})
    response = http.request("GET", server.rest + "/monitoring/prometheus/metrics")
    assert response.status == 200
    text = response.data.decode()
    assert 'remote_predict_requests_total{api="predict",code="OK",model="default",protocol="rest"}' in text
    assert 'remote_predict_model_versions{model="default",state="AVAILABLE"} 1.0' in text
    assert "remote_predict_request_duration_seconds_bucket" in text

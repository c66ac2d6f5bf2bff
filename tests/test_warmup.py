"""Warmup: a version replays assets.extra/tf_serving_warmup_requests before it serves, as in TF Serving."""

import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, prediction_log_pb2

from helpers import COUNTER, InProcessServer, copy_model


def with_warmup(tmp_path, signatures: list[str]):
    """TF Serving's counter model with warmup requests that call `signatures` in order."""
    base = copy_model(COUNTER, tmp_path / "counter", {"00000123": "1"})
    extra = base / "1" / "assets.extra"
    extra.mkdir()
    with tf.io.TFRecordWriter(str(extra / "tf_serving_warmup_requests")) as writer:
        for signature in signatures:
            log = prediction_log_pb2.PredictionLog()
            log.predict_log.request.model_spec.name = "counter"
            log.predict_log.request.model_spec.signature_name = signature
            writer.write(log.SerializeToString())
    return base


def counter_value(server) -> float:
    return server.predict("counter", {}, signature_name="get_counter").outputs["output"].float_val[0]


@pytest.mark.parametrize(("flag", "expected"), [("--enable_model_warmup=true", 3.0),
                                               ("--enable_model_warmup=false", 0.0)])
def test_warmup_requests_run_before_serving(tmp_path, flag, expected):
    base = with_warmup(tmp_path, ["reset_counter", "incr_counter", "incr_counter", "incr_counter"])
    with InProcessServer(f"--model_base_path={base}", "--model_name=counter", flag, rest=False) as s:
        assert counter_value(s) == expected


def test_a_failing_warmup_request_fails_the_load(tmp_path):
    base = with_warmup(tmp_path, ["no_such_signature"])
    with InProcessServer(f"--model_base_path={base}", "--model_name=counter", "--max_num_load_retries=0",
                         rest=False) as s:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "counter"
        version = s.models().GetModelStatus(request, timeout=10).model_version_status[0]
        assert version.state == get_model_status_pb2.ModelVersionStatus.END
        assert "Warmup request 0" in version.status.error_message
        assert "no_such_signature" in version.status.error_message

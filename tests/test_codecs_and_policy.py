"""Pure parts: tensor and JSON codecs, the version policy, flag defaults. Checked against TensorFlow itself."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.config import file_system_storage_path_source_pb2 as fs_pb2

from remote_predict import json_codec, tensor_codec
from remote_predict.errors import ServingError
from remote_predict.serving import flags
from remote_predict.serving.version_policy import aspired_versions

ARRAYS = [
    np.array([[1.5, -2.0], [np.inf, 0.1]], np.float32),
    np.array([1e300, -0.0], np.float64),
    np.array([[-(2**31), 2**31 - 1]], np.int32),
    np.array([-(2**63), 2**63 - 1], np.int64),
    np.array([0, 255], np.uint8),
    np.array([-128, 127], np.int8),
    np.array([-32768, 32767], np.int16),
    np.array([65535], np.uint16),
    np.array([2**32 - 1], np.uint32),
    np.array([2**64 - 1], np.uint64),
    np.array([True, False]),
    np.array([0.5, 65504.0], np.float16),
    np.array([1 + 2j, -3j], np.complex64),
    np.array([1 + 2j], np.complex128),
    np.array([[b"a", b"\x00\xff"], [b"", "é".encode()]], dtype=object),
    np.zeros((0, 3), np.float32),
    np.float32(7.0),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(np.shape(a))}")
@pytest.mark.parametrize("tensor_content", [False, True])
def test_tensor_round_trip_agrees_with_tensorflow(array, tensor_content):
    proto = tensor_codec.from_ndarray(array, tensor_content=tensor_content)
    ours, theirs = tensor_codec.to_ndarray(proto), tf.make_ndarray(proto)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == np.shape(array)
    np.testing.assert_array_equal(ours, array)
    np.testing.assert_array_equal(ours, theirs)
    # ... and we read what TensorFlow writes.
    if array.dtype != object:
        np.testing.assert_array_equal(tensor_codec.to_ndarray(tf.make_tensor_proto(array)), array)


def test_short_value_lists_repeat_the_last_value_as_tensorflow_does():
    proto = tf.make_tensor_proto(3.0, shape=[2, 2])  # one value for four elements
    np.testing.assert_array_equal(tensor_codec.to_ndarray(proto), tf.make_ndarray(proto))
    proto.ClearField("float_val")
    np.testing.assert_array_equal(tensor_codec.to_ndarray(proto), np.zeros((2, 2), np.float32))


@pytest.mark.parametrize(("mutate", "fragment"), [
    (lambda p: p.float_val.extend([1.0] * 5), "holds 4"),
    (lambda p: setattr(p, "tensor_content", b"\x00" * 3), "needs 16"),
    (lambda p: p.tensor_shape.dim.add(size=-1), "negative"),
    (lambda p: setattr(p, "dtype", types_pb2.DT_RESOURCE), "unsupported tensor dtype resource"),
    (lambda p: setattr(p.tensor_shape, "unknown_rank", True), "unknown rank"),
])
def test_inconsistent_protos_are_invalid_arguments(mutate, fragment):
    proto = tensor_codec.from_ndarray(np.zeros((2, 2), np.float32))
    proto.ClearField("float_val")
    mutate(proto)
    with pytest.raises(ServingError) as caught:
        tensor_codec.to_ndarray(proto)
    assert caught.value.code.name == "INVALID_ARGUMENT" and fragment in caught.value.message


def test_declared_size_is_checked_before_allocating():
    proto = tensor_codec.from_ndarray(np.zeros(1, np.float32))
    proto.tensor_shape.dim[0].size = 1 << 40
    with pytest.raises(ServingError, match="more than the limit"):
        tensor_codec.to_ndarray(proto, max_elements=1 << 31)


@pytest.mark.parametrize(("value", "text"), [
    (np.float32(0.1), "0.1"), (np.float32(3), "3.0"), (np.float32(1e20), "1e+20"), (np.float32(-2.5e-7), "-2.5e-07"),
    (np.float32("nan"), "NaN"), (np.float32("-inf"), "-Infinity"), (np.float64(0.1), "0.1"), (np.int64(-7), "-7"),
    (np.bool_(True), "true"), (np.array(b"hi", dtype=object), '"hi"'),
])
def test_json_scalars_print_as_tf_serving(value, text):
    assert json_codec.tensor_json(np.asarray(value)) == text


def test_json_float32_text_reads_back_exactly():
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 1e6
    parsed = np.array(__import__("json").loads(json_codec.tensor_json(values)), np.float32)
    np.testing.assert_array_equal(parsed, values)


def test_json_decode_shapes_and_b64():
    array = json_codec.decode_tensor([[1, 2], [3, 4]], types_pb2.DT_FLOAT)
    assert array.dtype == np.float32 and array.shape == (2, 2)
    assert json_codec.decode_tensor([], types_pb2.DT_FLOAT).shape == (0,)
    strings = json_codec.decode_tensor([{"b64": "AP8="}, "x"], types_pb2.DT_STRING)
    assert strings.tolist() == [b"\x00\xff", b"x"]


def policy(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, fs_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy())


@pytest.mark.parametrize(("text", "failed", "expected"), [
    ("", (), {5}),
    ("latest { num_versions: 2 }", (), {5, 3}),
    ("latest { num_versions: 2 }", (5,), {3, 1}),
    ("all {}", (3,), {1, 5}),
    ("specific { versions: 1 versions: 9 }", (), {1}),
])
def test_version_policy(text, failed, expected):
    assert aspired_versions(policy(text), [1, 3, 5], failed) == expected


def test_flag_defaults_are_tf_servings():
    options, _ = flags.parse(["--model_base_path=/m"])
    assert (options.port, options.rest_api_port, options.model_name, options.file_system_poll_wait_seconds,
            options.rest_api_timeout_in_ms, options.max_num_load_retries, options.load_retry_interval_micros,
            options.enable_batching, options.enable_model_warmup, options.saved_model_tags) == (
        8500, 0, "default", 1, 30000, 5, 60_000_000, False, True, "serve")


def test_flag_syntax():
    options, _ = flags.parse(["--model_base_path=/m", "--enable_batching", "--rest_api_port", "9000",
                              "--enable_model_warmup=false", "--grpc_channel_arguments=a=1,b=x"])
    assert options.enable_batching and options.rest_api_port == 9000 and not options.enable_model_warmup
    assert flags.channel_arguments(options) == [("a", 1), ("b", "x")]

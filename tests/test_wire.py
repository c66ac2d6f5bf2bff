"""The zero-copy wire codec must read and write exactly what the generated protobuf classes do."""

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf.internal import decoder, encoder
from tensorflow_serving.apis import predict_pb2

from remote_predict import tensor_codec, varint, wire
from remote_predict.errors import ServingError

BIG = 300_000  # elements: past the large-message threshold


def request_with(inputs: dict, tensor_content: bool) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.version.value = 7
    request.model_spec.signature_name = "s"
    request.output_filter.extend(["y", "z"])
    for alias, array in inputs.items():
        request.inputs[alias].CopyFrom(tensor_codec.from_ndarray(array, tensor_content=tensor_content))
    return request


ARRAYS = {
    "f": np.random.default_rng(1).standard_normal((BIG // 3, 3)).astype(np.float32),
    "i": np.arange(BIG, dtype=np.int64),
    "h": np.ones((4, 5), np.float16),
    "b": np.array([True, False]),
    "s": np.array([b"a", b"\xff\x00"], dtype=object),
    "e": np.zeros((0, 4), np.float32),
    "scalar": np.float64(2.5),
}


@pytest.mark.parametrize("tensor_content", [True, False])
def test_decoding_large_requests_matches_protobuf(tensor_content):
    data = request_with(ARRAYS, tensor_content).SerializeToString()
    assert len(data) >= wire.LARGE_MESSAGE_BYTES
    rest, inputs = wire.decode_predict_request(data)
    assert rest.model_spec.version.value == 7 and list(rest.output_filter) == ["y", "z"] and not rest.inputs
    for alias, expected in ARRAYS.items():
        assert inputs[alias].dtype == np.asarray(expected).dtype
        np.testing.assert_array_equal(inputs[alias], expected)
    if tensor_content:
        assert not inputs["f"].flags.owndata  # a view of the received bytes, not a copy


SMALL = {alias: (array[:3] if np.ndim(array) else array) for alias, array in ARRAYS.items()}  # a lookup's size


@pytest.mark.parametrize("arrays", [ARRAYS, SMALL], ids=["large", "small"])
def test_encoding_matches_protobuf(arrays):
    bare = request_with({}, True)
    data = wire.encode_predict_request(bare, arrays)
    assert (len(data) >= wire.LARGE_MESSAGE_BYTES) == (arrays is ARRAYS)
    parsed = predict_pb2.PredictRequest.FromString(data)
    assert parsed == request_with(arrays, True)
    for alias, expected in arrays.items():
        np.testing.assert_array_equal(tf.make_ndarray(parsed.inputs[alias]), expected)
    answer = wire.encode_predict_response(bare.model_spec, arrays, tensor_content=True)
    spec, outputs = wire.decode_predict_response(answer)
    assert spec == bare.model_spec
    for alias, expected in arrays.items():
        np.testing.assert_array_equal(outputs[alias], expected)
    typed = predict_pb2.PredictResponse.FromString(wire.encode_predict_response(spec, {"f": arrays["f"][:2]}, False))
    assert list(typed.outputs["f"].float_val) == arrays["f"][:2].ravel().tolist()


def test_small_messages_encode_the_same_in_every_process():
    """Map entries in key order: answers compared byte for byte (the split benchmark does) never differ by
    the order a hash table keeps them in."""
    spec = request_with({}, True).model_spec
    forward = wire.encode_predict_response(spec, {"a": SMALL["f"], "b": SMALL["i"]}, tensor_content=True)
    backward = wire.encode_predict_response(spec, {"b": SMALL["i"], "a": SMALL["f"]}, tensor_content=True)
    assert forward == backward


KINDS = {**SMALL, "d": np.array([[1.5, -np.inf], [np.nan, 0.0]]), "c64": np.array([1 + 2j, -3j], np.complex64),
         "c128": np.array([[0.5 - 1j]]), "f64_empty": np.zeros((2, 0)), "f_strided": ARRAYS["f"][:6:2, 1:]}


@pytest.mark.parametrize("tensor_content", [True, False], ids=["tensor_content", "typed"])
def test_each_tensor_is_written_as_the_generated_classes_write_it(tensor_content):
    """Byte for byte, for every kind of tensor (empty, scalar, half, bool, strings, complex, a strided view), as
    tensor_content and in the typed fields, one output at a time (with several, entries are
    in key order, which the generated classes' deterministic order differs from only for keys that are
    prefixes of others)."""
    spec = request_with({}, True).model_spec
    for alias, array in KINDS.items():
        expected = predict_pb2.PredictResponse(model_spec=spec)
        tensor_codec.put_arrays(expected.outputs, {alias: array}, tensor_content=tensor_content)
        assert wire.encode_predict_response(spec, {alias: array}, tensor_content=tensor_content) == \
            expected.SerializeToString(deterministic=True), alias


def test_typed_floats_keep_their_bits():
    """A NaN's payload survives in float_val as in tensor_content (a Python float on the way would quiet a
    signalling NaN), as TensorFlow's own AsProtoField copies the floats."""
    signalling = np.array([0x7FA00001, 0x3F800000], np.uint32)
    answer = wire.encode_predict_response(request_with({}, True).model_spec, {"n": signalling.view(np.float32)}, False)
    assert signalling.tobytes() in answer
    assert predict_pb2.PredictResponse.FromString(answer).outputs["n"].float_val[1] == 1.0


@pytest.mark.parametrize("mutate", [
    lambda d: d[: len(d) // 2],  # truncated
    lambda d: d + b"\x0f",  # an invalid wire type
])
def test_malformed_messages_are_invalid_arguments(mutate):
    data = mutate(request_with({"f": ARRAYS["f"]}, True).SerializeToString())
    with pytest.raises(ServingError) as caught:
        wire.decode_predict_request(data)
    assert caught.value.code.name == "INVALID_ARGUMENT"


def test_content_size_must_match_shape():
    request = request_with({"f": ARRAYS["f"]}, True)
    request.inputs["f"].tensor_shape.dim[0].size += 1
    with pytest.raises(ServingError, match="tensor parsing error: f: tensor_content has"):
        wire.decode_predict_request(request.SerializeToString())


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 1 << 31, (1 << 63) - 1, (1 << 64) - 1])
def test_varints_are_protobufs_own(value):
    """The one varint reader and writer (requests and checkpoint indexes) against protobuf's."""
    ours = varint.encode(value)
    assert ours == encoder._VarintBytes(value)
    assert varint.read(ours, 0) == decoder._DecodeVarint(ours, 0) == (value, len(ours))
    assert varint.read(memoryview(b"\x07" + ours), 1) == (value, 1 + len(ours))
    with pytest.raises(ValueError, match="truncated varint"):
        varint.read(ours[:-1], 0)


def test_a_varint_longer_than_64_bits_is_refused():
    with pytest.raises(ValueError, match="varint too long"):
        varint.read(b"\xff" * 10 + b"\x01", 0)

"""PredictRequest/PredictResponse on the wire, without copying big tensors around.

The generated protobuf classes copy a `tensor_content` buffer several times on its way between the
socket and numpy (parse into the message, read the field into `bytes`, convert; and the same in
reverse). For large messages this module reads the map entries straight out of the received bytes
(`np.frombuffer` on a slice: no copy). Requests and answers are written here, at every size: a numeric
tensor is a few bytes of head (dtype, shape, the content's key and length) and a view of the array, joined
once into the message, entries in key order (the same bytes in every process). That is also faster than
the generated classes for a lookup's few KiB (12 against 14-16 us for a shard's request, 16 against 19-25 us
for its answer of 44 rows, on the machine of benchmarks/RESULTS.md), because it builds no TensorProto.
Everything else in the message (model_spec, output_filter, string and typed-value tensors, unknown fields)
still goes through the generated classes, so the result parses to exactly what they would produce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import numpy as np
from google.protobuf import message
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import model_pb2, predict_pb2

from remote_predict import tensor_codec, varint
from remote_predict.errors import ServingError, invalid_argument

# Messages at least this large take the zero-copy path.
LARGE_MESSAGE_BYTES = 64 * 1024

_LENGTH_DELIMITED = 2
_VARINT = 0
# Field numbers (predict.proto, tensor.proto, tensor_shape.proto).
_REQUEST_INPUTS = 2
_RESPONSE_OUTPUTS = 1
_RESPONSE_MODEL_SPEC = 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_TENSOR_DTYPE, _TENSOR_SHAPE, _TENSOR_VERSION, _TENSOR_CONTENT = 1, 2, 3, 4
_SHAPE_DIM, _SHAPE_UNKNOWN_RANK = 2, 3
_DIM_SIZE = 1
_DTYPE_KEY = bytes(((_TENSOR_DTYPE << 3) | _VARINT,))
_DIM_SIZE_KEY = bytes(((_DIM_SIZE << 3) | _VARINT,))
# The typed fields written as a packed run of fixed-width little-endian values (float_val, double_val,
# scomplex_val, dcomplex_val): the array's own bytes.
_PACKED_FIELDS = {np.dtype(np.float32): 5, np.dtype(np.float64): 6, np.dtype(np.complex64): 9,
                  np.dtype(np.complex128): 12}
_varint = varint.encode


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    try:
        return varint.read(data, pos)
    except ValueError as e:
        raise invalid_argument(f"malformed protobuf: {e}") from None


def _fields(data: memoryview, start: int = 0, end: int | None = None):
    """Yield (field number, wire type, value, field start, field end); length-delimited values are slices."""
    pos, end = start, len(data) if end is None else end
    while pos < end:
        field_start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            if pos + length > end:
                raise invalid_argument("malformed protobuf: field runs past the end of the message")
            value, pos = (pos, pos + length), pos + length
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise invalid_argument(f"malformed protobuf: unsupported wire type {wire}")
        if pos > end:
            raise invalid_argument("malformed protobuf: truncated field")
        yield number, wire, value, field_start, pos


def _tensor(data: memoryview, start: int, end: int, max_elements: int) -> np.ndarray:
    """A TensorProto slice as an ndarray: a view of `data` for tensor_content, else via the proto."""
    dtype, dims, content, plain = types_pb2.DT_INVALID, [], None, True
    for number, wire, value, _, _ in _fields(data, start, end):
        if number == _TENSOR_DTYPE and wire == _VARINT:
            dtype = value
        elif number == _TENSOR_SHAPE and wire == _LENGTH_DELIMITED:
            for snumber, swire, svalue, _, _ in _fields(data, *value):
                if snumber == _SHAPE_DIM and swire == _LENGTH_DELIMITED:
                    size = 0
                    for dnumber, dwire, dvalue, _, _ in _fields(data, *svalue):
                        if dnumber == _DIM_SIZE and dwire == _VARINT:
                            size = dvalue
                    dims.append(size - (1 << 64) if size >= 1 << 63 else size)
                elif snumber == _SHAPE_UNKNOWN_RANK and svalue:
                    plain = False
        elif number == _TENSOR_CONTENT and wire == _LENGTH_DELIMITED:
            content = value
        elif number != _TENSOR_VERSION:
            plain = False  # typed values or anything else: let the generated class decide
    if not plain or content is None or dtype == types_pb2.DT_STRING or dtype not in tensor_codec.SUPPORTED_DTYPES:
        return tensor_codec.to_ndarray(_parse(tensor_pb2.TensorProto, bytes(data[start:end])), max_elements)
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.CopyFrom(tensor_codec.shape_proto(dims))
    shape = tensor_codec.shape_of(proto, max_elements)
    npdt = tensor_codec.numpy_dtype(dtype)
    size = content[1] - content[0]
    if size != int(np.prod(shape, dtype=np.int64)) * npdt.itemsize:
        raise invalid_argument(f"tensor_content has {size} bytes but shape {list(shape)} of "
                               f"{tensor_codec.dtype_name(dtype)} needs {int(np.prod(shape)) * npdt.itemsize}")
    return np.frombuffer(data[content[0]:content[1]], dtype=npdt).reshape(shape)


@contextlib.contextmanager
def _naming(alias: str):
    """Errors decoding a tensor say which one (TF Serving's wording)."""
    try:
        yield
    except ServingError as e:
        raise invalid_argument(f"tensor parsing error: {alias}: {e.message}") from None


def _split_map(data: bytes, map_field: int, max_elements: int) -> tuple[dict[str, np.ndarray], bytes]:
    """The tensors of one map field, and every other field re-assembled as bytes."""
    view = memoryview(data)
    tensors: dict[str, np.ndarray] = {}
    rest = []
    for number, wire, value, field_start, field_end in _fields(view):
        if number == map_field and wire == _LENGTH_DELIMITED:
            key, tensor_range = "", None
            for enumber, ewire, evalue, _, _ in _fields(view, *value):
                if enumber == _ENTRY_KEY and ewire == _LENGTH_DELIMITED:
                    key = bytes(view[evalue[0]:evalue[1]]).decode("utf-8")
                elif enumber == _ENTRY_VALUE and ewire == _LENGTH_DELIMITED:
                    tensor_range = evalue
            with _naming(key):
                tensors[key] = (_tensor(view, *tensor_range, max_elements) if tensor_range is not None
                                else tensor_codec.to_ndarray(tensor_pb2.TensorProto(), max_elements))
        else:
            rest.append(view[field_start:field_end])
    return tensors, b"".join(rest)


def _parse(message_type, data: bytes):
    try:
        return message_type.FromString(data)
    except message.DecodeError as e:
        raise invalid_argument(f"malformed {message_type.__name__}: {e}") from None


def decode_predict_request(data: bytes, max_elements: int = tensor_codec.DEFAULT_MAX_ELEMENTS
                           ) -> tuple[predict_pb2.PredictRequest, dict[str, np.ndarray]]:
    """The request without its inputs, and the inputs as arrays (views of `data` where possible)."""
    if len(data) < LARGE_MESSAGE_BYTES:
        request = _parse(predict_pb2.PredictRequest, data)
        inputs = {}
        for alias, proto in request.inputs.items():
            with _naming(alias):
                inputs[alias] = tensor_codec.to_ndarray(proto, max_elements)
        request.ClearField("inputs")
        return request, inputs
    inputs, rest = _split_map(data, _REQUEST_INPUTS, max_elements)
    return _parse(predict_pb2.PredictRequest, rest), inputs


def decode_predict_response(data: bytes) -> tuple[model_pb2.ModelSpec, dict[str, np.ndarray]]:
    if len(data) < LARGE_MESSAGE_BYTES:
        response = _parse(predict_pb2.PredictResponse, data)
        return response.model_spec, {a: tensor_codec.to_ndarray(p) for a, p in response.outputs.items()}
    outputs, rest = _split_map(data, _RESPONSE_OUTPUTS, tensor_codec.DEFAULT_MAX_ELEMENTS)
    return _parse(predict_pb2.PredictResponse, rest).model_spec, outputs


def _key(number: int, size: int) -> bytes:
    """The key and length of a length-delimited field of `size` bytes."""
    return _varint((number << 3) | _LENGTH_DELIMITED) + _varint(size)


def _shape(shape: Sequence[int]) -> bytes:
    """A TensorShapeProto: one `dim` per dimension (a size of 0 is the default, so not written)."""
    dims = [_DIM_SIZE_KEY + _varint(d) if d else b"" for d in shape]
    return b"".join(_key(_SHAPE_DIM, len(d)) + d for d in dims)


def _tensor_parts(array: np.ndarray, tensor_content: bool) -> list[bytes | memoryview]:
    """A TensorProto: numeric arrays as a head and a view of the array's buffer (the one copy is the final join),
    in `tensor_content` or, for floating-point types, in their packed typed field, whose bytes are the same
    little-endian buffer (a 64 MiB float answer took 1.9 s and 0.6 GB more through a Python list); anything else
    through the generated class."""
    field = _TENSOR_CONTENT if tensor_content else _PACKED_FIELDS.get(array.dtype)
    if field is None or array.dtype.kind in "OSU" or array.dtype.byteorder == ">":
        return [tensor_codec.from_ndarray(array, tensor_content=tensor_content).SerializeToString()]
    dtype = tensor_codec.tf_dtype_of(array)
    shape = _shape(array.shape)
    head = _DTYPE_KEY + _varint(dtype) + _key(_TENSOR_SHAPE, len(shape)) + shape
    size = array.nbytes
    if not size:
        return [head]
    return [head + _key(field, size), memoryview(np.ascontiguousarray(array)).cast("B")]


def _map_entries(number: int, tensors: Mapping[str, np.ndarray], tensor_content: bool) -> list[bytes | memoryview]:
    """Field `number`, a map<string, TensorProto>, one entry per tensor, in key order: the same bytes in every
    process (the generated classes' deterministic order differs only where a key is a prefix of another)."""
    parts: list[bytes | memoryview] = []
    for alias in sorted(tensors):
        name = alias.encode("utf-8")
        tensor = _tensor_parts(np.asarray(tensors[alias]), tensor_content)
        size = sum(len(p) for p in tensor)
        head = _key(_ENTRY_KEY, len(name)) + name + _key(_ENTRY_VALUE, size)
        parts += [_key(number, len(head) + size) + head, *tensor]
    return parts


def encode_predict_request(request_without_inputs: predict_pb2.PredictRequest, inputs: Mapping[str, np.ndarray]
                           ) -> bytes:
    """Numeric inputs as tensor_content; one copy of each buffer, into the message."""
    return b"".join([request_without_inputs.SerializeToString(),
                     *_map_entries(_REQUEST_INPUTS, inputs, tensor_content=True)])


def encode_predict_response(model_spec: model_pb2.ModelSpec, outputs: Mapping[str, np.ndarray],
                            tensor_content: bool) -> bytes:
    """A PredictResponse; with `tensor_content`, numeric outputs are copied once, into the message."""
    spec = model_spec.SerializeToString()
    return b"".join([*_map_entries(_RESPONSE_OUTPUTS, outputs, tensor_content), _key(_RESPONSE_MODEL_SPEC, len(spec)),
                     spec])

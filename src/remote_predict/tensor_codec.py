"""TensorProto <-> numpy, without TensorFlow's slow generic helpers.

Decoding follows `tensorflow::Tensor::FromProto`: `tensor_content` holds the raw little-endian buffer;
otherwise the typed `*_val` field holds the values, where fewer values than elements means "repeat the
last one" (and none means zeros). Encoding writes either the typed fields (what TF Serving answers and
what most clients read) or `tensor_content` (one memcpy; what our RemotePredict op asks for).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from remote_predict.errors import invalid_argument

# Refuse to allocate tensors larger than this many elements unless a caller raises the limit: a tiny
# request must not be able to declare a shape that makes the server allocate terabytes.
DEFAULT_MAX_ELEMENTS = 1 << 31
# A tensor with fewer values than elements is filled (TensorFlow repeats the last value, or zeros when there
# are none), so a request of a few bytes could make the server allocate gigabytes, and as many again for
# the answer: the fill is refused beyond this size. Values actually sent are bounded by the message limit.
MAX_FILLED_BYTES = 1 << 28

_HALF_TYPES = (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16)
_INT_VAL_TYPES = (types_pb2.DT_INT32, types_pb2.DT_INT16, types_pb2.DT_INT8, types_pb2.DT_UINT8,
                  types_pb2.DT_UINT16)
_FIELD_BY_DTYPE: dict[int, str] = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_COMPLEX64: "scomplex_val",
    types_pb2.DT_COMPLEX128: "dcomplex_val",
    **{dt: "int_val" for dt in _INT_VAL_TYPES},
    **{dt: "half_val" for dt in _HALF_TYPES},
}
SUPPORTED_DTYPES = frozenset(_FIELD_BY_DTYPE)

_NUMPY_BY_DTYPE: dict[int, np.dtype] = {
    dt: np.dtype(object) if dt == types_pb2.DT_STRING else np.dtype(tf.dtypes.as_dtype(dt).as_numpy_dtype)
    for dt in _FIELD_BY_DTYPE
}
_DTYPE_BY_NUMPY: dict[np.dtype, int] = {
    npdt: dt for dt, npdt in _NUMPY_BY_DTYPE.items() if dt not in (types_pb2.DT_STRING,)
}


def dtype_name(dtype: int) -> str:
    """TensorFlow's DataTypeString ("float", "int64", "float_ref"), as its error messages use."""
    try:
        return types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()
    except ValueError:
        return f"unknown dtype {dtype}"


def base_dtype(dtype: int) -> int:
    """Strip the reference flag (DT_FLOAT_REF -> DT_FLOAT) that TF1 variables put in signatures."""
    return dtype - 100 if dtype > 100 else dtype


def numpy_dtype(dtype: int) -> np.dtype:
    try:
        return _NUMPY_BY_DTYPE[base_dtype(dtype)]
    except KeyError:
        raise invalid_argument(f"unsupported tensor dtype {dtype_name(dtype)}") from None


def tf_dtype_of(array: np.ndarray) -> int:
    """The DataType enum for a numpy array; object, bytes and str arrays are DT_STRING."""
    if array.dtype.kind in "OSU":
        return types_pb2.DT_STRING
    try:
        return _DTYPE_BY_NUMPY[array.dtype]
    except KeyError:
        raise invalid_argument(f"unsupported numpy dtype {array.dtype}") from None


def shape_of(proto: tensor_pb2.TensorProto, max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[int, ...]:
    shape = proto.tensor_shape
    if shape.unknown_rank:
        raise invalid_argument("tensor shape must be fully defined, got unknown rank")
    dims = tuple(d.size for d in shape.dim)
    if any(d < 0 for d in dims):
        raise invalid_argument(f"tensor shape must not have negative dimensions, got {list(dims)}")
    # Zero dimensions do not make the others harmless: numpy refuses to allocate (0, 2**31, 2**31) too.
    if math.prod(d for d in dims if d) > max_elements:
        raise invalid_argument(
            f"tensor of shape {list(dims)} has {math.prod(dims)} elements, more than the limit of "
            f"{max_elements}"
        )
    return dims


def to_ndarray(proto: tensor_pb2.TensorProto, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """Decode a TensorProto; raises INVALID_ARGUMENT when the proto is inconsistent."""
    dtype = proto.dtype
    if dtype not in _FIELD_BY_DTYPE:
        raise invalid_argument(f"unsupported tensor dtype {dtype_name(dtype)}")
    shape = shape_of(proto, max_elements)
    count = math.prod(shape)
    npdt = _NUMPY_BY_DTYPE[dtype]
    content = proto.tensor_content  # read once: each read of a bytes field is a copy of it
    if content and dtype != types_pb2.DT_STRING:
        expected = count * npdt.itemsize
        if len(content) != expected:
            raise invalid_argument(
                f"tensor_content has {len(content)} bytes but shape {list(shape)} of "
                f"{dtype_name(dtype)} needs {expected}"
            )
        return np.frombuffer(content, dtype=npdt).reshape(shape)

    values = getattr(proto, _FIELD_BY_DTYPE[dtype])
    if dtype == types_pb2.DT_STRING:
        flat = np.empty(len(values), dtype=object)
        flat[:] = list(values)
    elif dtype in _HALF_TYPES:
        flat = np.array(values, dtype=np.uint16).view(npdt)
    elif dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        if len(values) % 2:
            raise invalid_argument("complex tensor has an odd number of real/imaginary values")
        real = np.float32 if dtype == types_pb2.DT_COMPLEX64 else np.float64
        flat = np.array(values, dtype=real).view(npdt)
    else:
        flat = np.array(values, dtype=npdt)
    n = flat.shape[0]
    if n == count:
        return flat.reshape(shape)
    if n > count:
        raise invalid_argument(f"tensor has {n} values but its shape {list(shape)} holds {count}")
    if count * npdt.itemsize > MAX_FILLED_BYTES:
        raise invalid_argument(
            f"tensor of shape {list(shape)} has {n} values for its {count} elements: filling it would take "
            f"{count * npdt.itemsize} bytes, more than the {MAX_FILLED_BYTES >> 20} MiB a tensor may be filled to; "
            "send all its values (tensor_content)"
        )
    if n == 0:
        return np.full(shape, b"" if dtype == types_pb2.DT_STRING else 0, dtype=npdt)
    # Fewer values than elements: TensorFlow repeats the last value.
    out = np.empty(count, dtype=npdt)
    out[:n] = flat
    out[n:] = flat[-1]
    return out.reshape(shape)


def _as_bytes_list(flat: np.ndarray) -> list[bytes]:
    out = []
    for item in flat.tolist():
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, str):
            out.append(item.encode("utf-8"))
        else:
            raise invalid_argument(f"string tensor holds a non-string value of type {type(item).__name__}")
    return out


def from_ndarray(
    array: np.ndarray, *, tensor_content: bool = False, dtype: int | None = None
) -> tensor_pb2.TensorProto:
    """Encode an array; `tensor_content=True` writes the raw buffer for numeric dtypes."""
    array = np.asarray(array)
    dtype = tf_dtype_of(array) if dtype is None else base_dtype(dtype)
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.CopyFrom(shape_proto(array.shape))
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(_as_bytes_list(array.ravel()))
        return proto
    npdt = _NUMPY_BY_DTYPE.get(dtype)
    if npdt is None:
        raise invalid_argument(f"unsupported tensor dtype {dtype_name(dtype)}")
    if array.dtype != npdt:
        array = array.astype(npdt)
    if tensor_content:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
        return proto
    flat = array.ravel()
    field = getattr(proto, _FIELD_BY_DTYPE[dtype])
    if dtype in _HALF_TYPES:
        field.extend(flat.view(np.uint16).astype(np.int32).tolist())
    elif dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        field.extend(np.ascontiguousarray(flat).view(flat.real.dtype).tolist())
    else:
        field.extend(flat.tolist())
    return proto


def put_arrays(tensors, arrays: Mapping[str, np.ndarray], tensor_content: bool = False) -> None:
    """Encode each array into `tensors`, a proto map of TensorProtos (a request's inputs, a response's
    outputs), under its alias."""
    for alias, array in arrays.items():
        tensors[alias].CopyFrom(from_ndarray(array, tensor_content=tensor_content))


def shape_proto(shape: Sequence[int]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape])

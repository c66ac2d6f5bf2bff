"""TF Serving's REST JSON format for tensors, Predict, Classify and Regress.

Requests: row format (`"instances": [...]`, one item per batch row, objects when a signature has
several inputs) or columnar (`"inputs": value | {name: value}`); `{"b64": "..."}` for binary strings.
Answers: `"predictions"` (row) or `"outputs"` (columnar); DT_STRING outputs whose alias ends in
`_bytes` are written as `{"b64": ...}`; floats are written in their shortest round-tripping form with a
`.0` on whole numbers, and NaN/Infinity as bare tokens, as TF Serving does. Validation follows TF
Serving (rectangular lists, exact JSON types, no lossy number conversion) with its error messages.
Two deliberate differences: columnar keys that are not inputs of the signature are refused (TF Serving
drops them silently), and a string output that is not valid UTF-8 is written as `{"b64": ...}` rather
than as invalid JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from remote_predict.errors import Code, ServingError, invalid_argument
from remote_predict.tensor_codec import base_dtype, dtype_name, numpy_dtype

ROW = "row"
COLUMNAR = "columnar"

_INT_RANGES = {
    types_pb2.DT_INT8: (-(1 << 7), (1 << 7) - 1),
    types_pb2.DT_UINT8: (0, (1 << 8) - 1),
    types_pb2.DT_INT16: (-(1 << 15), (1 << 15) - 1),
    types_pb2.DT_UINT16: (0, (1 << 16) - 1),
    types_pb2.DT_INT32: (-(1 << 31), (1 << 31) - 1),
    types_pb2.DT_UINT32: (0, (1 << 32) - 1),
    types_pb2.DT_INT64: (-(1 << 63), (1 << 63) - 1),
    types_pb2.DT_UINT64: (0, (1 << 64) - 1),
}
# Largest integer each float type holds exactly: ints beyond it would be rounded.
_FLOAT_EXACT_INT = {types_pb2.DT_FLOAT: (1 << 24) - 1, types_pb2.DT_DOUBLE: (1 << 53) - 1,
                    types_pb2.DT_HALF: (1 << 11) - 1, types_pb2.DT_BFLOAT16: (1 << 8) - 1}
_FLOAT_MAX = {types_pb2.DT_FLOAT: float(np.finfo(np.float32).max), types_pb2.DT_DOUBLE: math.inf,
              types_pb2.DT_HALF: float(np.finfo(np.float16).max), types_pb2.DT_BFLOAT16: 3.3895313892515355e38}


# ----------------------------------------------------------------------------------------- parsing


def parse_body(body: bytes | str) -> dict[str, Any]:
    """Parse a request body; TF Serving's messages for empty, malformed and non-object bodies."""
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except RecursionError:
        raise invalid_argument("JSON Parse error: document is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid_argument(f"JSON Parse error: {e}") from None
    if not isinstance(doc, dict):
        raise invalid_argument(f"JSON Value: {_short(doc)} Is not object")
    return doc


def signature_name_of(doc: Mapping[str, Any]) -> str:
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid_argument(
            f"JSON Value: {_short(doc)} not formatted correctly. 'signature_name' key must be a string value."
        )
    return name


def _short(value: Any, limit: int = 200) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _type_error(value: Any, dtype: int) -> ServingError:
    return invalid_argument(
        f"JSON Value: {_short(value)} Type: {_json_type(value)} is not of expected type: {dtype_name(dtype)}"
    )


def is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def decode_b64(value: Any) -> bytes:
    if not is_b64(value):
        raise invalid_argument(f"JSON Value: {_short(value)} not formatted correctly for base64 data")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise invalid_argument("Unable to base64 decode") from None


def _leaf_converter(dtype: int) -> Callable[[Any], Any]:
    if dtype == types_pb2.DT_STRING:

        def to_bytes(v: Any) -> bytes:
            if isinstance(v, str):
                return v.encode("utf-8")
            if isinstance(v, dict):
                return decode_b64(v)
            raise _type_error(v, dtype)

        return to_bytes
    if dtype == types_pb2.DT_BOOL:

        def to_bool(v: Any) -> bool:
            if v is True or v is False:
                return v
            raise _type_error(v, dtype)

        return to_bool
    if dtype in _FLOAT_EXACT_INT:
        exact, largest = _FLOAT_EXACT_INT[dtype], _FLOAT_MAX[dtype]
        target = "float" if dtype != types_pb2.DT_DOUBLE else "double"

        def to_float(v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _type_error(v, dtype)
            if isinstance(v, int):
                if abs(v) > exact:
                    raise invalid_argument(
                        f"Cannot convert JSON value: {v} to {target} without loss of precision."
                    )
                return float(v)
            if math.isfinite(v) and abs(v) > largest:
                raise invalid_argument(f"Cannot convert JSON value: {v} to {target} without loss of precision.")
            return v

        return to_float
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]

        def to_int(v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise _type_error(v, dtype)
            if not low <= v <= high:
                raise invalid_argument(f"JSON Value: {v} is out of range for type: {dtype_name(dtype)}")
            return v

        return to_int
    raise ServingError(Code.UNIMPLEMENTED, f"Conversion of JSON values to type: {dtype_name(dtype)}")


def _dense_shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value: Any, level: int, shape: list[int], convert: Callable[[Any], Any], out: list) -> None:
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise invalid_argument(
                f"JSON Value: {_short(value)} found at incorrect level: {level + 1} in the JSON DOM. "
                f"Expected at level: {rank}"
            )
        out.append(convert(value))
        return
    if level >= rank:
        raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise invalid_argument(
            f"Encountered list at unexpected size: {len(value)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, shape, convert, out)


def decode_tensor(value: Any, dtype: int) -> np.ndarray:
    """A (possibly nested) JSON value as an ndarray of `dtype`; lists must be rectangular."""
    dtype = base_dtype(dtype)
    convert = _leaf_converter(dtype)
    shape = _dense_shape(value)
    flat: list = []
    try:
        _fill(value, 0, shape, convert, flat)
    except RecursionError:
        raise invalid_argument("JSON value is nested too deeply") from None
    npdt = numpy_dtype(dtype)
    if npdt.kind == "O":
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        array = np.array(flat, dtype=npdt)
    return array.reshape(shape)


def is_named_object(value: Any) -> bool:
    return isinstance(value, dict) and not is_b64(value)


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def decode_instances(instances: Any, inputs: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Row format: one item per batch row; `inputs` maps each input alias to its dtype."""
    if not isinstance(instances, list):
        raise invalid_argument("Excepting 'instances' to be an list/array")
    if not instances:
        raise invalid_argument("No values in 'instances' array")
    if not inputs:
        raise invalid_argument("Failed to get input map for signature")
    objects = is_named_object(instances[0])
    if not objects and len(inputs) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input tensors required "
            "as per tensorinfo_map"
        )
    names = sorted(inputs)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for index, item in enumerate(instances):
        if objects:
            if not is_named_object(item):
                raise invalid_argument(f"Expecting object but got list at item {index} of input list")
            if set(item) != set(names):
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. JSON object: {_short(item)} "
                    f"keys must be equal to: {','.join(names)}"
                )
            pairs = [(name, item[name]) for name in names]
        else:
            if is_named_object(item):
                raise invalid_argument(f"Expecting value/list but got object at item {index} of input list")
            pairs = [(names[0], item)]
        for name, value in pairs:
            try:
                tensor = decode_tensor(value, inputs[name])
            except ServingError as e:
                key = f" key: {name}" if objects else ""
                raise invalid_argument(
                    f"Failed to process element: {index}{key} of 'instances' list. Error: {e.message}"
                ) from None
            if rows[name] and tensor.shape != rows[name][0].shape:
                first = rows[name][0]
                if tensor.size != first.size:
                    raise invalid_argument(f"Expecting tensor size: {first.size} but got: {tensor.size}")
                raise invalid_argument(
                    f"Expecting shape {_shape_text(first.shape)} but got: {_shape_text(tensor.shape)}"
                )
            rows[name].append(tensor)
    return {name: np.stack(items) for name, items in rows.items()}


def decode_columnar(value: Any, inputs: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Columnar format: the whole value for one input, or an object of values by input name."""
    if not inputs:
        raise invalid_argument("Failed to get input map for signature")
    if not is_named_object(value):
        if len(inputs) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input tensors required "
                "as per tensorinfo_map"
            )
        (name,) = inputs
        return {name: decode_tensor(value, inputs[name])}
    extra = sorted(set(value) - set(inputs))
    if extra:
        raise invalid_argument(
            f"'inputs' object has keys that are not inputs of the signature: {','.join(extra)}. "
            f"Inputs expected to be in the set {{{','.join(sorted(inputs))}}}."
        )
    out = {}
    for name in sorted(inputs):
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        out[name] = decode_tensor(value[name], inputs[name])
    return out


def decode_predict_inputs(doc: Mapping[str, Any], inputs: Mapping[str, int]) -> tuple[str, dict[str, np.ndarray]]:
    """The request format and the decoded input tensors of a Predict body."""
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise invalid_argument(
            f"JSON Value: {_short(doc)} Not formatted correctly expecting only one of 'inputs' or "
            "'instances' keys to exist "
        )
    if has_instances:
        return ROW, decode_instances(doc["instances"], inputs)
    if has_inputs:
        return COLUMNAR, decode_columnar(doc["inputs"], inputs)
    raise invalid_argument("Missing 'inputs' or 'instances' key")


# ---------------------------------------------------------------------------------------- writing

_NON_FINITE = {"nan": "NaN", "-nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _float_text(strings: np.ndarray) -> np.ndarray:
    """Numpy's shortest round-trip text for floats, made JSON: '3' -> '3.0', 'nan' -> 'NaN'."""
    out = strings.astype(object)
    for index, text in np.ndenumerate(strings):
        if text in _NON_FINITE:
            out[index] = _NON_FINITE[text]
        elif "." not in text and "e" not in text:
            out[index] = text + ".0"
    return out


def _scalar_texts(array: np.ndarray, as_bytes: bool) -> np.ndarray:
    """Every element of `array` as JSON text, same shape."""
    kind = array.dtype.kind
    if kind == "f":
        if array.dtype not in (np.float32, np.float64):
            # half and bfloat16 print via float32: their own shortest text (6.55e+04 for 65504) would not
            # read back as the same value in a consumer that parses JSON numbers as doubles.
            array = array.astype(np.float32)
        return _float_text(array.astype(str))
    if kind in "iu":
        return array.astype(str)
    if kind == "b":
        return np.where(array, "true", "false")
    if kind == "c":
        raise invalid_argument("Failed to write JSON value for tensor type: complex")
    out = np.empty(array.shape, dtype=object)
    for index, item in np.ndenumerate(array):
        raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
        if not as_bytes:
            try:
                out[index] = json.dumps(raw.decode("utf-8"), ensure_ascii=False)
                continue
            except UnicodeDecodeError:
                pass
        out[index] = '{"b64": "' + base64.b64encode(raw).decode("ascii") + '"}'
    return out


def _nest(texts: np.ndarray | str) -> str:
    if isinstance(texts, str):
        return texts
    if texts.ndim == 0:
        return str(texts.item())
    if texts.ndim == 1:
        return "[" + ", ".join(texts.tolist()) + "]"
    return "[" + ", ".join(_nest(sub) for sub in texts) + "]"


def tensor_json(array: np.ndarray, alias: str = "") -> str:
    """One tensor as JSON text; strings of an alias ending in `_bytes` are base64 objects."""
    return _nest(_scalar_texts(np.asarray(array), as_bytes=alias.endswith("_bytes")))


def _key(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def encode_predict_response(outputs: Mapping[str, np.ndarray], fmt: str) -> str:
    if not outputs:
        raise invalid_argument("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == COLUMNAR:
        if len(names) == 1:
            return '{"outputs": ' + tensor_json(outputs[names[0]], names[0]) + "}"
        body = ", ".join(f"{_key(n)}: {tensor_json(outputs[n], n)}" for n in names)
        return '{"outputs": {' + body + "}}"
    batch = None
    for name in names:
        array = np.asarray(outputs[name])
        if array.ndim == 0:
            raise invalid_argument(f"Tensor name: {name} has no shape information ")
        if batch is not None and array.shape[0] != batch:
            raise invalid_argument(
                f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: {batch}"
            )
        batch = array.shape[0]
    texts = {n: _scalar_texts(np.asarray(outputs[n]), n.endswith("_bytes")) for n in names}
    rows = []
    for i in range(batch or 0):
        if len(names) == 1:
            rows.append(_nest(texts[names[0]][i]))
        else:
            rows.append("{" + ", ".join(f"{_key(n)}: {_nest(texts[n][i])}" for n in names) + "}")
    return '{"predictions": [' + ", ".join(rows) + "]}"


def error_json(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


# -------------------------------------------------------------------------- Classify and Regress


def _feature_kind_error(name: str, feature: feature_pb2.Feature) -> ServingError:
    kind = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}.get(
        feature.WhichOneof("kind") or "", "UNKNOWN"
    )
    return invalid_argument(f"Unexpected element type in feature: {name} expecting type: {kind}")


def _add_feature_value(value: Any, name: str, feature: feature_pb2.Feature) -> None:
    kind = feature.WhichOneof("kind")
    if value is None or isinstance(value, list) or (isinstance(value, dict) and not is_b64(value)):
        raise invalid_argument(f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")
    if isinstance(value, bool) or (isinstance(value, int) and not isinstance(value, bool)):
        if kind not in (None, "int64_list"):
            raise _feature_kind_error(name, feature)
        if not isinstance(value, bool) and not -(1 << 63) <= value < (1 << 63):
            raise invalid_argument(f"Feature: {name} has uint64 element. Only int64 is supported.")
        feature.int64_list.value.append(int(value))
    elif isinstance(value, float):
        if kind not in (None, "float_list"):
            raise _feature_kind_error(name, feature)
        if math.isfinite(value) and abs(value) > _FLOAT_MAX[types_pb2.DT_FLOAT]:
            raise invalid_argument(f"Cannot convert JSON value: {value} to float without loss of precision.")
        feature.float_list.value.append(value)
    else:
        if kind not in (None, "bytes_list"):
            raise _feature_kind_error(name, feature)
        feature.bytes_list.value.append(decode_b64(value) if isinstance(value, dict) else value.encode("utf-8"))


def _example(value: Any) -> example_pb2.Example:
    if not isinstance(value, dict):
        raise invalid_argument(f"Example must be JSON object but got JSON {_json_type(value)}")
    example = example_pb2.Example()
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            _add_feature_value(item, name, feature)
    return example


def decode_examples(doc: Mapping[str, Any], method: str) -> input_pb2.Input:
    """The `examples` (and optional `context`) of a Classify or Regress body as an Input proto."""
    result = input_pb2.Input()
    examples = doc.get("examples")
    if "examples" not in doc:
        raise invalid_argument(f"JSON Value: {_short(doc)} When method is {method}, key 'examples' is expected "
                               "and was not found")
    if not isinstance(examples, list):
        raise invalid_argument(f"JSON Value: {_short(doc)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise invalid_argument(f"JSON Value: {_short(doc)} 'examples' value is an empty array")
    if "context" in doc:
        target = result.example_list_with_context
        target.context.CopyFrom(_example(doc["context"]))
    else:
        target = result.example_list
    for item in examples:
        target.examples.add().CopyFrom(_example(item))
    return result


def encode_classification(result: classification_pb2.ClassificationResult) -> str:
    if not result.classifications:
        raise invalid_argument("Cannot convert empty ClassificationResults to JSON")
    rows = []
    for classifications in result.classifications:
        pairs = [
            f"[{json.dumps(c.label, ensure_ascii=False)}, {_nest(_scalar_texts(np.float32(c.score), False))}]"
            for c in classifications.classes
        ]
        rows.append("[" + ", ".join(pairs) + "]")
    return '{"results": [' + ", ".join(rows) + "]}"


def encode_regression(result: regression_pb2.RegressionResult) -> str:
    if not result.regressions:
        raise invalid_argument("Cannot convert empty RegressionResults to JSON")
    values = np.array([r.value for r in result.regressions], dtype=np.float32)
    return '{"results": ' + tensor_json(values) + "}"


def encode_columnar_request(signature_name: str, inputs: Mapping[str, np.ndarray]) -> str:
    """A columnar Predict body (what our REST stub sends); strings always travel as base64."""
    parts = [f'"signature_name": {_key(signature_name)}'] if signature_name else []
    body = ", ".join(
        f"{_key(name)}: {_nest(_scalar_texts(np.asarray(a), as_bytes=True))}" for name, a in inputs.items()
    )
    parts.append('"inputs": {' + body + "}")
    return "{" + ", ".join(parts) + "}"

"""Small real TensorFlow Lite models for tests, converted with TensorFlow's own TFLiteConverter.

`half_plus_two` rebuilds TF Serving's test models `saved_model_half_plus_two_tflite` (a TF1 graph converted
from a session: input `x`, output `y`, no signature) and `..._with_sigdef` (input tensor `tflite_input`, and
a TF1 SignatureDef `serving_default` x -> y stored in the model's `signature_defs_metadata`).
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf
from flatbuffers import flexbuffers
from tensorflow.lite.python import schema_py_generated as tflite_schema
from tensorflow.lite.tools import flatbuffer_utils

v1 = tf.compat.v1
VERSION = "00000123"


def _write(base: Path, model: bytes, version: str = VERSION) -> Path:
    (base / version).mkdir(parents=True, exist_ok=True)
    (base / version / "model.tflite").write_bytes(model)
    return base


def with_signature_defs(model: bytes, signature_defs: dict) -> bytes:
    """`model` with TF1 SignatureDefs in a `signature_defs_metadata` entry, laid out as TFLite's
    signature_def_utils writes it: a FlexBuffer map of key -> the serialized SignatureDef as a String."""
    builder = flexbuffers.Builder()
    with builder.Map():
        for key, signature_def in signature_defs.items():
            builder.Key(key)
            builder.String(signature_def.SerializeToString().decode("ascii"))  # small SignatureDefs are ASCII
    data = bytes(builder.Finish())
    obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    buffer = tflite_schema.BufferT()
    buffer.data = list(data)
    obj.buffers.append(buffer)
    entry = tflite_schema.MetadataT()
    entry.name = b"signature_defs_metadata"
    entry.buffer = len(obj.buffers) - 1
    obj.metadata = [*(obj.metadata or []), entry]
    return flatbuffer_utils.convert_object_to_bytearray(obj)


def half_plus_two(base: Path, *, with_signature_def: bool, version: str = VERSION) -> Path:
    """y = 0.5 x + 2 on x of shape [1, 1], converted from a TF1 session as TF Serving's test models are."""
    input_name = "tflite_input" if with_signature_def else "x"
    with tf.Graph().as_default(), v1.Session() as session:
        x = v1.placeholder(tf.float32, [1, 1], name=input_name)
        a = v1.Variable(0.5, name="a")
        b = v1.Variable(2.0, name="b")
        y = tf.identity(tf.add(tf.multiply(a, x), b), name="y")
        session.run(v1.global_variables_initializer())
        model = v1.lite.TFLiteConverter.from_session(session, [x], [y]).convert()
        if with_signature_def:
            signature = v1.saved_model.signature_def_utils.predict_signature_def({"x": x}, {"y": y})
            model = with_signature_defs(model, {"serving_default": signature})
    return _write(base, model, version)


class _Signatures(tf.Module):
    """Each method becomes a TFLite signature named after it."""

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
    def serving_default(self, x):
        return {"y": 0.5 * x + 2.0}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="k")])
    def times_three(self, k):
        return {"z": k * 3, "w": tf.cast(k, tf.float32)}

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="v")])
    def dense(self, v):
        return {"out": tf.matmul(v, tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))}


def multi_signature(base: Path, version: str = VERSION) -> Path:
    """A model with TFLite signatures of its own: `serving_default` (y = 0.5 x + 2, x [None, 1]),
    `times_three` (int64 k [None] -> z = 3 k, w = float(k)) and `dense` (v [None, 3] @ a 3x2 matrix)."""
    module = _Signatures()
    functions = [module.serving_default, module.times_three, module.dense]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function() for f in functions],
                                                                module)
    return _write(base, converter.convert(), version)

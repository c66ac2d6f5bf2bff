"""Small real SavedModels built for tests (TF1 graphs, saved as TF Serving expects: base/<version>/)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.python.data.experimental.ops import testing as data_testing

import remote_predict

v1 = tf.compat.v1


def save(export_dir: Path, build: Callable[[], dict[str, tuple[dict, dict]]]) -> Path:
    """`build()` creates the graph and returns {signature: (inputs, outputs)} of tensors."""
    with tf.Graph().as_default(), v1.Session() as session:
        signatures = build()
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(export_dir))
        builder.add_meta_graph_and_variables(
            session, ["serve"],
            signature_def_map={
                key: v1.saved_model.signature_def_utils.predict_signature_def(inputs, outputs)
                for key, (inputs, outputs) in signatures.items()
            },
        )
        builder.save()
    return export_dir


def sleepy(export_dir: Path) -> Path:
    """y = x, after sleeping `delay_ms` milliseconds (a tf.data sleep: a real op, no Python)."""

    def build():
        x = v1.placeholder(tf.float32, [None], name="x")
        delay = v1.placeholder(tf.int64, [], name="delay_ms")
        dataset = tf.data.Dataset.from_tensors(x).apply(data_testing.sleep(delay * 1000))
        y = tf.identity(tf.data.experimental.get_single_element(dataset), name="y")
        return {"serving_default": ({"x": x, "delay_ms": delay}, {"y": y})}

    return save(export_dir, build)


def slow_scale(export_dir: Path, factor: float, delay_ms: int) -> Path:
    """y = factor * x after a fixed sleep: a slow model whose requests can be batched."""

    def build():
        x = v1.placeholder(tf.float32, None, name="x")
        dataset = tf.data.Dataset.from_tensors(x).apply(data_testing.sleep(delay_ms * 1000))
        y = tf.multiply(tf.data.experimental.get_single_element(dataset), factor, name="y")
        return {"serving_default": ({"x": x}, {"y": y})}

    return save(export_dir, build)


def dense_stack(export_dir: Path, layers: int = 4, width: int = 1024) -> Path:
    """y = relu(...relu(x W1)... Wn): per request it reads every weight, so merging requests pays off."""
    rng = np.random.default_rng(0)

    def build():
        x = v1.placeholder(tf.float32, [None, width], name="x")
        h = x
        for i in range(layers):
            weights = v1.Variable((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                                  name=f"w{i}")
            h = tf.nn.relu(tf.matmul(h, weights))
        return {"serving_default": ({"x": x}, {"y": tf.identity(h, name="y")})}

    return save(export_dir, build)


def identity(export_dir: Path) -> Path:
    """y = x, for float32 x of any shape (moves bytes, computes nothing)."""

    def build():
        x = v1.placeholder(tf.float32, None, name="x")
        return {"serving_default": ({"x": x}, {"y": tf.identity(x, name="y")})}

    return save(export_dir, build)


def scale(export_dir: Path, factor: float) -> Path:
    """y = factor * x for float x of any shape; also a `double` signature, y = 2 * factor * x."""

    def build():
        x = v1.placeholder(tf.float32, None, name="x")
        return {
            "serving_default": ({"x": x}, {"y": tf.multiply(x, factor, name="y")}),
            "double": ({"x": x}, {"y": tf.multiply(x, 2 * factor, name="y2")}),
        }

    return save(export_dir, build)


def two_in_two_out(export_dir: Path) -> Path:
    """sum = a + b and product = a * b (float32), for row-format objects and multi-output answers."""

    def build():
        a = v1.placeholder(tf.float32, [None], name="a")
        b = v1.placeholder(tf.float32, [None], name="b")
        return {"serving_default": ({"a": a, "b": b}, {"sum": tf.add(a, b), "product": tf.multiply(a, b)})}

    return save(export_dir, build)


def strings(export_dir: Path) -> Path:
    """Strings in, strings out: `text` echoed as `text_bytes` (base64 in REST) and upper-cased as `upper`."""

    def build():
        text = v1.placeholder(tf.string, [None], name="text")
        return {"serving_default": ({"text": text}, {
            "text_bytes": tf.identity(text), "upper": tf.strings.upper(text), "length": tf.strings.length(text)})}

    return save(export_dir, build)


def int_types(export_dir: Path) -> Path:
    """Inputs of several dtypes, each echoed: checks JSON and proto conversions per dtype."""

    def build():
        tensors = {
            "i8": v1.placeholder(tf.int8, [None]), "u8": v1.placeholder(tf.uint8, [None]),
            "i32": v1.placeholder(tf.int32, [None]), "i64": v1.placeholder(tf.int64, [None]),
            "f64": v1.placeholder(tf.float64, [None]), "flag": v1.placeholder(tf.bool, [None]),
            "half": v1.placeholder(tf.float16, [None]),
        }
        return {"serving_default": (tensors, {f"{k}_out": tf.identity(t) for k, t in tensors.items()})}

    return save(export_dir, build)


def fan_out(export_dir: Path, targets: list[str], model: str = "sleepy", deadline_ms: int = 10000,
            with_delay: bool = True) -> Path:
    """Calls `model` on every target concurrently (independent ops), returns the sum of their `y`.

    With `with_delay` the calls pass the `delay_ms` input on (for `sleepy` leaves); without, only `x`.
    """

    def build():
        x = v1.placeholder(tf.float32, [None], name="x")
        delay = v1.placeholder(tf.int64, [], name="delay_ms")
        aliases, inputs = (["x", "delay_ms"], [x, delay]) if with_delay else (["x"], [x])
        ys = [
            remote_predict.run(aliases, inputs, ["y"], target_address=target, model_name=model,
                               output_types=[tf.float32], max_rpc_deadline_millis=deadline_ms,
                               name=f"call_{i}")[0]
            for i, target in enumerate(targets)
        ]
        signature_inputs = {"x": x, "delay_ms": delay} if with_delay else {"x": x}
        return {"serving_default": (signature_inputs, {"y": tf.add_n(ys)})}

    return save(export_dir, build)


def caller(export_dir: Path, target: str, model: str, *, version: int = -1, signature: str = "serving_default",
           deadline_ms: int = 3000, returning_status: bool = False) -> Path:
    """y = remote y of `model` for our x; with `returning_status`, also the call's status outputs."""

    def build():
        x = v1.placeholder(tf.float32, None, name="x")
        kwargs = dict(target_address=target, model_name=model, model_version=version, output_types=[tf.float32],
                      max_rpc_deadline_millis=deadline_ms, signature_name=signature)
        if returning_status:
            result = remote_predict.run_returning_status(["x"], [x], ["y"], **kwargs)
            outputs = {"y": tf.identity(result.output_tensors[0]), "code": tf.identity(result.status_code),
                       "message": tf.identity(result.status_error_message)}
        else:
            outputs = {"y": tf.identity(remote_predict.run(["x"], [x], ["y"], **kwargs)[0])}
        return {"serving_default": ({"x": x}, outputs)}

    return save(export_dir, build)

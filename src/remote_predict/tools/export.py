"""`remote-predict export`: write the seed's example models, so no TF Serving checkout is needed.

* `half_plus_two`: y = 0.5 x + 2, with the same signatures as TF Serving's `saved_model_half_plus_two_cpu`
  (serving_default, classify_x_to_y, regress_x_to_y, regress_x_to_y2, regress_x2_to_y3).
* `half_plus_two_with_rpop`: y = a x + b with a = 0.5 and b the first output of a RemotePredict call to
  `half_plus_two` with x = 2.0, as in the seed's walk-through. One difference from the seed's exporter,
  which ignores the call's status: when the remote call fails, this model fails its Predict with the
  remote status code and message instead of answering with a made-up b.
"""

from __future__ import annotations

import argparse
import os
import shutil

import tensorflow as tf

from remote_predict.op import api as remote_predict

v1 = tf.compat.v1
PREDICT = "tensorflow/serving/predict"
CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"


def _signature(inputs: dict, outputs: dict, method: str):
    return v1.saved_model.signature_def_utils.build_signature_def(
        inputs={k: v1.saved_model.utils.build_tensor_info(t) for k, t in inputs.items()},
        outputs={k: v1.saved_model.utils.build_tensor_info(t) for k, t in outputs.items()},
        method_name=method,
    )


def _save(export_dir: str, session, signatures: dict) -> None:
    if os.path.exists(export_dir):
        shutil.rmtree(export_dir)
    builder = v1.saved_model.Builder(export_dir)
    builder.add_meta_graph_and_variables(
        session, [v1.saved_model.tag_constants.SERVING], signature_def_map=signatures,
        main_op=v1.tables_initializer(), strip_default_attrs=True)
    builder.save()


def export_half_plus_two(export_dir: str) -> str:
    with tf.Graph().as_default(), v1.Session() as session:
        a = v1.Variable(0.5, name="a")
        b = v1.Variable(2.0, name="b")
        c = v1.Variable(3.0, name="c")
        serialized = v1.placeholder(tf.string, shape=[None], name="tf_example")
        parsed = v1.parse_example(serialized, {
            "x": v1.FixedLenFeature([1], tf.float32),
            "x2": v1.FixedLenFeature([1], tf.float32, default_value=[0.0]),
        })
        x = tf.identity(parsed["x"], name="x")
        y = tf.add(a * x, b, name="y")
        y2 = tf.add(a * x, c, name="y2")
        x2 = tf.identity(parsed["x2"], name="x2")
        y3 = tf.add(a * x2, c, name="y3")
        session.run(v1.global_variables_initializer())
        _save(export_dir, session, {
            "serving_default": _signature({"x": x}, {"y": y}, PREDICT),
            "classify_x_to_y": _signature({"inputs": serialized}, {"scores": y}, CLASSIFY),
            "regress_x_to_y": _signature({"inputs": serialized}, {"outputs": y}, REGRESS),
            "regress_x_to_y2": _signature({"inputs": serialized}, {"outputs": y2}, REGRESS),
            "regress_x2_to_y3": _signature({"inputs": x2}, {"outputs": y3}, REGRESS),
        })
    return export_dir


def export_half_plus_two_with_rpop(
    export_dir: str, target_address: str, remote_model_name: str = "half_plus_two", remote_model_version: int = -1,
    max_rpc_deadline_millis: int = 3000,
) -> str:
    with tf.Graph().as_default(), v1.Session() as session:
        a = v1.Variable(0.5, name="a")
        b = remote_predict.run(
            ["x"], [tf.constant(2.0, tf.float32)], ["y"],
            target_address=target_address, model_name=remote_model_name, model_version=remote_model_version,
            max_rpc_deadline_millis=max_rpc_deadline_millis, output_types=[tf.float32], name="remote_predict",
        )[0]
        x = v1.placeholder(tf.float32, shape=[None, 1], name="x")
        y = tf.add(a * x, b, name="y")
        session.run(v1.global_variables_initializer())
        _save(export_dir, session, {"serving_default": _signature({"x": x}, {"y": y}, PREDICT)})
    return export_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="remote-predict export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["half_plus_two", "half_plus_two_with_rpop"])
    parser.add_argument("--output_dir", default=None,
                        help="SavedModel directory (default: /tmp/<model>/1 for the rpop model, "
                             "/tmp/half_plus_two/00000123 for half_plus_two)")
    parser.add_argument("--target_address", default="", help="where the RemotePredict op calls")
    parser.add_argument("--remote_model_name", default="half_plus_two")
    parser.add_argument("--remote_model_version", type=int, default=-1)
    parser.add_argument("--max_rpc_deadline_millis", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.model == "half_plus_two":
        out = export_half_plus_two(args.output_dir or "/tmp/half_plus_two/00000123")
        print(f"SavedModel generated at: {out}")
        return 0
    if not args.target_address:
        parser.error("half_plus_two_with_rpop needs --target_address (for example localhost:8500)")
    out = export_half_plus_two_with_rpop(
        args.output_dir or "/tmp/half_plus_two_with_rpop/1", args.target_address, args.remote_model_name,
        args.remote_model_version, args.max_rpc_deadline_millis)
    print(f"SavedModel generated at: {out} with target_address: {args.target_address}, "
          f"remote_model_name: {args.remote_model_name}.")
    return 0

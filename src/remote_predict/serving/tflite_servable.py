"""One loaded TensorFlow Lite version: a version directory's `model.tflite`, served as TF Serving serves it
with `--prefer_tflite_model=true`.

Why a pool of interpreters: a `tf.lite.Interpreter` is not thread-safe, and TF Serving's answer is a pool of
single-threaded interpreters per model (`--num_tflite_pools` of them), each running one request at a time.
The interpreter releases the GIL while it runs, so requests on different interpreters run in parallel.

Where the signatures come from, in this order:
1. TF1 SignatureDefs stored in the model's `signature_defs_metadata` entry (written by TFLite's
   `signature_def_utils.set_signature_defs`): what TF Serving reads. Their tensor names are matched to the
   main graph's inputs and outputs, with or without the `:0` suffix, as TF Serving matches them.
2. The model's own TFLite signatures (a model converted from a SavedModel or from tf.functions), run
   through the interpreter's signature runners, one signature per TFLite signature key. TF Serving ignores
   these and generates (3) from the main graph, whose aliases are then converter-made tensor names such
   as `serving_default_x`; serving the model's signatures under their own names is what their author meant.
3. Neither: one `serving_default` predict signature made from the main graph's inputs and outputs, each
   alias being the tensor's name without its `:0` suffix (TF Serving's generated signature).

A request's inputs are resized to the shapes it sends (TF Serving does the same), so a model converted with
a batch of 1 answers any batch its operations allow.
"""

from __future__ import annotations

import logging
import os
import queue
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from flatbuffers import flexbuffers
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.lite.python import schema_py_generated as tflite_schema

from remote_predict.errors import Code, ServingError, failed_precondition, invalid_argument
from remote_predict.serving.servable import Signature, TensorSpec

log = logging.getLogger(__name__)

TFLITE_FILE = "model.tflite"
SIGNATURE_DEFS_METADATA = b"signature_defs_metadata"  # TFLite's name for the TF1 SignatureDef map
DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"


def has_tflite_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TFLITE_FILE))


def legacy_tensor_name(name: str) -> str:
    """A TF tensor name without its output index: early TFLite converters dropped the `:0`."""
    return name.split(":", 1)[0]


def resolve_tensor(name: str, tensors: Mapping[str, int]) -> int:
    """The index of the tensor a SignatureDef names, matched as TF Serving matches it (exact, then legacy)."""
    for candidate in (name, legacy_tensor_name(name)):
        if candidate in tensors:
            return tensors[candidate]
    raise KeyError(f"Unknown tensor '{name}'.")


def signature_defs_metadata(model: bytes) -> dict[str, meta_graph_pb2.SignatureDef]:
    """TF1 SignatureDefs stored in a TFLite flatbuffer: a FlexBuffer map of key -> serialized SignatureDef."""
    root = tflite_schema.Model.GetRootAs(model, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() != SIGNATURE_DEFS_METADATA:
            continue
        buffer = root.Buffers(entry.Buffer())
        if buffer.DataLength():
            data = buffer.DataAsNumpy().tobytes()
        else:  # models past 2 GiB keep buffers after the flatbuffer, by offset
            data = model[buffer.Offset():buffer.Offset() + buffer.Size()]
        signature_map = flexbuffers.GetRoot(data).AsMap
        result = {}
        for key, value in zip(signature_map.Keys, signature_map.Values, strict=True):
            raw = value.AsBlob if value.IsBlob else value.AsStringBytes
            result[key.AsKey] = meta_graph_pb2.SignatureDef.FromString(bytes(raw))
        return result
    return {}


def _tf_dtype(numpy_dtype) -> int:
    return tf.as_dtype(numpy_dtype).as_datatype_enum


def _tensor_info(detail: Mapping) -> meta_graph_pb2.TensorInfo:
    """TensorInfo of an interpreter tensor: its name, dtype and shape (-1 where the model leaves it open)."""
    info = meta_graph_pb2.TensorInfo(name=detail["name"], dtype=_tf_dtype(detail["dtype"]))
    shape = detail.get("shape_signature")
    if shape is None or len(shape) != len(detail["shape"]):
        shape = detail["shape"]
    for size in shape:
        info.tensor_shape.dim.add().size = int(size)
    return info


@dataclass(frozen=True)
class _Plan:
    """How one signature runs: on the main graph by tensor index, or through a TFLite signature runner."""

    runner_key: str | None  # None: the main graph, by `inputs`/`outputs` tensor indices
    inputs: Mapping[str, int]  # alias -> tensor index (main graph only)
    outputs: Mapping[str, int]


def _new_interpreter(model: bytes) -> tf.lite.Interpreter:
    with warnings.catch_warnings():
        # tf.lite.Interpreter warns that LiteRT will replace it; it is TensorFlow's own, pinned with TF.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_content=model, num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


def _plans(model: bytes, interpreter: tf.lite.Interpreter) -> tuple[dict[str, meta_graph_pb2.SignatureDef],
                                                                     dict[str, _Plan]]:
    """The SignatureDefs this model is served with, and how to run each (see the module docstring)."""
    main_inputs = {d["name"]: d["index"] for d in interpreter.get_input_details()}
    main_outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
    stored = signature_defs_metadata(model)
    defs: dict[str, meta_graph_pb2.SignatureDef] = {}
    plans: dict[str, _Plan] = {}
    if stored:
        index_names = {index: name for name, index in (*main_inputs.items(), *main_outputs.items())}
        for key, signature_def in stored.items():
            indices = {}
            for kind, tensors in (("input", main_inputs), ("output", main_outputs)):
                infos = signature_def.inputs if kind == "input" else signature_def.outputs
                indices[kind] = {}
                for alias, info in infos.items():
                    try:
                        indices[kind][alias] = resolve_tensor(info.name, tensors)
                    except KeyError as e:
                        raise failed_precondition(f"Signature {kind} {alias} of signature '{key}' references an "
                                                  f"unknown tensor: {e.args[0]}") from None
                    info.name = index_names[indices[kind][alias]]  # the name as the model has it, as TF Serving
            defs[key] = signature_def
            plans[key] = _Plan(runner_key=None, inputs=indices["input"], outputs=indices["output"])
        return defs, plans
    native = interpreter.get_signature_list()
    if native:
        for key in native:
            runner = interpreter.get_signature_runner(key)
            signature_def = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
            for alias, detail in runner.get_input_details().items():
                signature_def.inputs[alias].CopyFrom(_tensor_info(detail))
            for alias, detail in runner.get_output_details().items():
                signature_def.outputs[alias].CopyFrom(_tensor_info(detail))
            defs[key] = signature_def
            plans[key] = _Plan(runner_key=key, inputs={}, outputs={})
        return defs, plans
    signature_def = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
    indices: dict[str, dict[str, int]] = {"input": {}, "output": {}}
    for kind, details in (("input", interpreter.get_input_details()), ("output", interpreter.get_output_details())):
        infos = signature_def.inputs if kind == "input" else signature_def.outputs
        for detail in details:
            alias = legacy_tensor_name(detail["name"])
            if alias in infos:
                raise failed_precondition(f"The model's {kind} tensors {alias!r} and {detail['name']!r} have the "
                                          "same name once ':N' is dropped; give the model a SignatureDef")
            infos[alias].CopyFrom(_tensor_info(detail))
            indices[kind][alias] = detail["index"]
    defs[DEFAULT_SIGNATURE] = signature_def
    plans[DEFAULT_SIGNATURE] = _Plan(runner_key=None, inputs=indices["input"], outputs=indices["output"])
    return defs, plans


def _signatures(defs: Mapping[str, meta_graph_pb2.SignatureDef]) -> dict[str, Signature]:
    def specs(infos: Mapping[str, meta_graph_pb2.TensorInfo]) -> dict[str, TensorSpec]:
        return {alias: TensorSpec(alias=alias, name=info.name, dtype=info.dtype,
                                  shape=None if info.tensor_shape.unknown_rank
                                  else tuple(d.size for d in info.tensor_shape.dim))
                for alias, info in infos.items()}

    return {key: Signature(key, d.method_name or PREDICT_METHOD, specs(d.inputs), specs(d.outputs))
            for key, d in defs.items()}


def _run_main(interpreter: tf.lite.Interpreter, plan: _Plan, inputs: Mapping[str, np.ndarray],
              output_aliases: Sequence[str]) -> dict[str, np.ndarray]:
    current = {d["index"]: tuple(d["shape"]) for d in interpreter.get_input_details()}
    resized = False
    for alias, value in inputs.items():
        index = plan.inputs[alias]
        if current[index] != value.shape:
            interpreter.resize_tensor_input(index, list(value.shape), strict=False)
            resized = True
    if resized:
        interpreter.allocate_tensors()
    for alias, value in inputs.items():
        interpreter.set_tensor(plan.inputs[alias], value)
    interpreter.invoke()
    return {alias: interpreter.get_tensor(plan.outputs[alias]) for alias in output_aliases}


class _Slot:
    """One interpreter and its signature runners; used by one request at a time."""

    def __init__(self, model: bytes):
        self.interpreter = _new_interpreter(model)
        self.runners: dict[str, object] = {}

    def run(self, plan: _Plan, inputs: Mapping[str, np.ndarray], output_aliases: Sequence[str]) -> dict:
        if plan.runner_key is None:
            return _run_main(self.interpreter, plan, inputs, output_aliases)
        runner = self.runners.get(plan.runner_key)
        if runner is None:
            runner = self.runners[plan.runner_key] = self.interpreter.get_signature_runner(plan.runner_key)
        outputs = runner(**inputs)
        return {alias: outputs[alias] for alias in output_aliases}


class TfLiteServable:
    """A loaded TFLite version, with `servable.Servable`'s interface. Thread-safe through its interpreter pool."""

    remote_ops = 0  # a TFLite model cannot hold RemotePredict ops

    def __init__(self, name: str, version: int, path: str, interpreters: int):
        self.name = name
        self.version = version
        self.path = path
        with open(os.path.join(path, TFLITE_FILE), "rb") as f:
            self._model = f.read()
        first = _Slot(self._model)
        self.signature_defs, self._plans = _plans(self._model, first.interpreter)
        self.signatures = _signatures(self.signature_defs)
        self._pool: queue.Queue[_Slot] = queue.Queue()
        self._pool.put(first)
        for _ in range(max(1, interpreters) - 1):
            self._pool.put(_Slot(self._model))
        log.info("%s version %d: TFLite model with signatures %s, %d interpreter(s)", name, version,
                 ", ".join(sorted(self.signatures)), self._pool.qsize())

    def signature(self, key: str) -> Signature:
        key = key or DEFAULT_SIGNATURE
        try:
            return self.signatures[key]
        except KeyError:
            raise failed_precondition(f'Serving signature key "{key}" not found.') from None

    def run(
        self, signature: Signature, inputs: Mapping[str, np.ndarray], output_aliases: Sequence[str],
        timeout_ms: int = 0,
    ) -> dict[str, np.ndarray]:
        """Run one request on a free interpreter; inputs must already be validated against the signature.

        `timeout_ms` (0: none) bounds the wait for a free interpreter; a running interpreter cannot be cut short.
        TFLite reports no status codes: what fails after the load (resizing to the request's shapes, or an
        operation refusing the request's values) is the request's doing, so it is INVALID_ARGUMENT, as the
        same failure is from a SavedModel.
        """
        plan = self._plans[signature.key]
        try:
            slot = self._pool.get(timeout=timeout_ms / 1000 if timeout_ms else None)
        except queue.Empty:
            raise ServingError(Code.DEADLINE_EXCEEDED, f"No TFLite interpreter of {self.name} version "
                               f"{self.version} became free within {timeout_ms} ms") from None
        try:
            outputs = slot.run(plan, inputs, output_aliases)
        except (ValueError, RuntimeError) as e:
            # A failed resize or invoke can leave the interpreter half-allocated: replace it.
            slot = _Slot(self._model)
            shapes = ", ".join(f"{alias}: {list(value.shape)}" for alias, value in sorted(inputs.items()))
            raise invalid_argument(f"TFLite model cannot run signature '{signature.key}' on inputs of shapes "
                                   f"{{{shapes}}}: {str(e).strip()}") from None
        finally:
            self._pool.put(slot)
        return outputs

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                return

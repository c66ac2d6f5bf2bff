"""One loaded SavedModel version: a TF1 Session driven by the SignatureDefs, as TF Serving loads it.

Why a Session and not `tf.saved_model.load`: TF1 models with reference variables (TF Serving's own
`saved_model_counter`) only run in a Session, and feeding/fetching signature tensors by name gives
`output_filter` for free. Why callables: `Session._make_callable_from_options` accepts feeds whose shape
differs from the placeholder's static shape (as the C++ server does) and costs a quarter of `sess.run`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
from tensorflow.python.saved_model import loader_impl

from remote_predict.errors import Code, ServingError, failed_precondition
from remote_predict.op import graph_compat
from remote_predict.op.errors import error_from_tf

if TYPE_CHECKING:
    from remote_predict.serving.tflite_servable import TfLiteServable

log = logging.getLogger(__name__)

REMOTE_PREDICT_POOL = "remote_predict"


_TIMEOUT_STEP = 1.25


def run_timeout_ms(deadline: float | None, now: float | None = None) -> int:
    """A Session run's `timeout_in_ms` for a request due at `deadline` (0: none).

    Rounded up to a step of a geometric series (25 % apart), so that a few callables per signature serve
    every deadline: a run is cancelled at most a quarter after its request's deadline, never before it.
    A deadline already passed gives 1 ms (the run fails at once with DEADLINE_EXCEEDED).
    """
    if deadline is None:
        return 0
    remaining_ms = (deadline - (time.monotonic() if now is None else now)) * 1000
    if remaining_ms <= 1:
        return 1
    return math.ceil(_TIMEOUT_STEP ** math.ceil(math.log(remaining_ms, _TIMEOUT_STEP)))


@dataclass(frozen=True)
class TensorSpec:
    alias: str
    name: str
    dtype: int  # DataType enum as written in the SignatureDef (may be a _REF type or DT_INVALID)
    shape: tuple[int, ...] | None  # None when the rank is unknown; -1 for unknown dimensions


@dataclass(frozen=True)
class Signature:
    key: str
    method_name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]


@dataclass(frozen=True)
class LoadOptions:
    tags: tuple[str, ...] = ("serve",)
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # Threads for models that contain RemotePredict ops: those threads mostly wait on the network.
    remote_predict_threads: int = 64
    warmup: bool = True  # replay assets.extra/tf_serving_warmup_requests after loading
    runtime_id: int | None = None  # the OpRuntime this server's RemotePredict ops use (see op/tokens.py)
    lookup_fast_path: bool = True  # serve row-gathering shards from their checkpoint (rows_servable.py)
    prefer_tflite_model: bool = False  # serve a version's model.tflite when it has one (tflite_servable.py)
    tflite_interpreters: int = 1  # interpreters per TFLite version: the requests it runs at once


def tensor_specs(infos: Mapping[str, meta_graph_pb2.TensorInfo]) -> dict[str, TensorSpec]:
    specs = {}
    for alias, info in infos.items():
        shape = None if info.tensor_shape.unknown_rank else tuple(d.size for d in info.tensor_shape.dim)
        specs[alias] = TensorSpec(alias=alias, name=info.name, dtype=info.dtype, shape=shape)
    return specs


def _session_config(options: LoadOptions, has_remote_ops: bool) -> config_pb2.ConfigProto:
    config = config_pb2.ConfigProto(
        intra_op_parallelism_threads=options.intra_op_threads,
        inter_op_parallelism_threads=options.inter_op_threads,
        allow_soft_placement=True,
    )
    if has_remote_ops:
        # A RemotePredict op holds an inter-op thread while it waits for the network; a fan-out to N
        # targets needs N threads at once. Such models share one process-wide pool sized for waiting.
        pool = config.session_inter_op_thread_pool.add()
        pool.num_threads = options.remote_predict_threads
        pool.global_name = REMOTE_PREDICT_POOL
    return config


def signature_or_fail(signatures: Mapping[str, Signature], key: str) -> Signature:
    """The signature `key` names ("" for serving_default), or TF Serving's FAILED_PRECONDITION."""
    key = key or "serving_default"
    try:
        return signatures[key]
    except KeyError:
        raise failed_precondition(f'Serving signature key "{key}" not found.') from None


class Servable:
    """A loaded version. Thread-safe: any number of requests may `run` concurrently."""

    def __init__(self, name: str, version: int, path: str, options: LoadOptions):
        self.name = name
        self.version = version
        self.path = path
        loader = loader_impl.SavedModelLoader(path)
        meta_graph = loader.get_meta_graph_def_from_tags(list(options.tags))
        # Rewrites TF Serving's own TfServingRemotePredict nodes and binds ours to this server's runtime, in
        # place (the loader reuses this proto).
        remote = graph_compat.prepare_meta_graph(meta_graph, options.runtime_id)
        self.remote_ops = remote.total
        # Remote calls that form one step (one RemotePredict op, or lookups, each a fan-out of its own) run
        # in the request's thread: two thread hand-offs fewer, and the request's deadline and trace
        # context reach the calls (op/request_context.py). Several RemotePredict ops run on the pool, so
        # that they overlap.
        self.calls_in_request_thread = remote.total > 0 and (remote.calls == 0 or remote.total == 1)
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph, config=_session_config(options, self.remote_ops > 0))
        try:
            with self.graph.as_default():
                loader.load(self.session, list(options.tags))
        except Exception:
            self.session.close()
            raise
        self.signature_defs = dict(meta_graph.signature_def)
        self.signatures: dict[str, Signature] = {
            key: Signature(key, sig.method_name, tensor_specs(sig.inputs), tensor_specs(sig.outputs))
            for key, sig in self.signature_defs.items()
        }
        self._callables: dict[tuple, tuple] = {}
        self._callables_lock = threading.Lock()

    def signature(self, key: str) -> Signature:
        return signature_or_fail(self.signatures, key)

    def _callable_for(self, signature: Signature, input_aliases: tuple[str, ...], output_aliases: tuple[str, ...],
                      timeout_ms: int = 0):
        key = (signature.key, input_aliases, output_aliases, timeout_ms)
        entry = self._callables.get(key)
        if entry is not None:
            return entry
        with self._callables_lock:
            entry = self._callables.get(key)
            if entry is None:
                feeds = [signature.inputs[a].name for a in input_aliases]
                fed = set(feeds)
                # A signature may output a tensor it also takes as input (an identity model); TF refuses
                # to fetch a fed tensor, and its value is the fed value anyway.
                fetch_aliases = tuple(a for a in output_aliases if signature.outputs[a].name not in fed)
                fetches = [signature.outputs[a].name for a in fetch_aliases]
                options = config_pb2.CallableOptions(feed=feeds, fetch=fetches)
                if self.calls_in_request_thread:
                    options.run_options.inter_op_thread_pool = -1
                if timeout_ms:
                    options.run_options.timeout_in_ms = timeout_ms
                run = self.session._make_callable_from_options(options) if fetches or feeds else None
                entry = (run, fetch_aliases)
                self._callables[key] = entry
        return entry

    def run(
        self, signature: Signature, inputs: Mapping[str, np.ndarray], output_aliases: Sequence[str],
        timeout_ms: int = 0,
    ) -> dict[str, np.ndarray]:
        """Run one request; inputs must already be validated against the signature.

        `timeout_ms` (0: none) cancels the run with DEADLINE_EXCEEDED; each distinct value gets its own
        callable, so callers use a few fixed values (a RemotePredict op's deadline), not arbitrary ones.
        """
        input_aliases = tuple(sorted(inputs))
        output_aliases = tuple(output_aliases)
        run, fetch_aliases = self._callable_for(signature, input_aliases, output_aliases, timeout_ms)
        try:
            values = run(*(inputs[a] for a in input_aliases)) if fetch_aliases else []
        except tf.errors.OpError as e:
            raise error_from_tf(e) from None
        result = dict(zip(fetch_aliases, values, strict=True))
        if len(result) != len(output_aliases):
            by_name = {signature.inputs[a].name: inputs[a] for a in input_aliases}
            for alias in output_aliases:
                if alias not in result:
                    result[alias] = np.asarray(by_name[signature.outputs[alias].name])
        return {alias: result[alias] for alias in output_aliases}

    def close(self) -> None:
        self._callables.clear()
        self.session.close()


def load(name: str, version: int, path: str, options: LoadOptions) -> Servable | TfLiteServable:
    """Load a version directory (a SavedModel, or its model.tflite when preferred); raises ServingError with a
    message that names the path."""
    if not os.path.isdir(path):
        raise ServingError(Code.NOT_FOUND, f"SavedModel directory {path} does not exist")
    what = "SavedModel"
    try:
        if options.prefer_tflite_model:
            from remote_predict.serving import tflite_servable  # TFLite machinery only for those who ask

            if tflite_servable.has_tflite_model(path):
                what = "TFLite model"
                return tflite_servable.TfLiteServable(name, version, path, options.tflite_interpreters)
        if options.lookup_fast_path:
            from remote_predict.serving import rows_servable

            meta_graph = loader_impl.SavedModelLoader(path).get_meta_graph_def_from_tags(list(options.tags))
            rows = rows_servable.try_load(name, version, path, meta_graph)
            if rows is not None:
                return rows
        return Servable(name, version, path, options)
    except ServingError:
        raise
    except Exception as e:  # a corrupt model can fail in any layer of TF; report, never crash
        detail = getattr(e, "message", None) or str(e) or type(e).__name__
        raise ServingError(Code.FAILED_PRECONDITION, f"Failed to load {what} at {path}: {detail}") from e

"""RemotePredict as a Keras layer, so a functional or Sequential model can call a hosted sub-graph."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from remote_predict.op.api import run
from remote_predict.op.config import DEFAULT_DEADLINE_MILLIS, DEFAULT_SIGNATURE


@keras.saving.register_keras_serializable(package="remote_predict")
class RemotePredictLayer(keras.layers.Layer):
    """Calls `model_name` at `target_address`; inputs map to `input_aliases` in order (or by key).

    Returns one tensor for one output alias, else a dict keyed by alias. `output_shapes` (optional, one
    shape per output, `None` for unknown dimensions) gives downstream layers static shapes.
    """

    def __init__(
        self,
        target_address: str,
        model_name: str,
        input_aliases: Sequence[str],
        output_aliases: Sequence[str],
        output_dtypes: Sequence[str],
        model_version: int = -1,
        max_rpc_deadline_millis: int = DEFAULT_DEADLINE_MILLIS,
        signature_name: str = DEFAULT_SIGNATURE,
        output_shapes: Sequence[Sequence[int | None]] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.target_address = target_address
        self.model_name = model_name
        self.input_aliases = list(input_aliases)
        self.output_aliases = list(output_aliases)
        self.output_dtypes = [tf.as_dtype(d).name for d in output_dtypes]
        self.model_version = model_version
        self.max_rpc_deadline_millis = max_rpc_deadline_millis
        self.signature_name = signature_name
        self.output_shapes = [list(s) for s in output_shapes] if output_shapes is not None else None

    def call(self, inputs):
        if isinstance(inputs, dict):
            tensors = [inputs[alias] for alias in self.input_aliases]
        elif isinstance(inputs, list | tuple):
            tensors = list(inputs)
        else:
            tensors = [inputs]
        outputs = run(
            self.input_aliases, tensors, self.output_aliases,
            target_address=self.target_address, model_name=self.model_name,
            model_version=self.model_version, max_rpc_deadline_millis=self.max_rpc_deadline_millis,
            output_types=self.output_dtypes, signature_name=self.signature_name,
        )
        if self.output_shapes is not None:
            outputs = [tf.ensure_shape(t, shape) for t, shape in zip(outputs, self.output_shapes, strict=True)]
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.output_aliases, outputs, strict=True))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            target_address=self.target_address, model_name=self.model_name, input_aliases=self.input_aliases,
            output_aliases=self.output_aliases, output_dtypes=self.output_dtypes,
            model_version=self.model_version, max_rpc_deadline_millis=self.max_rpc_deadline_millis,
            signature_name=self.signature_name, output_shapes=self.output_shapes,
        )
        return config

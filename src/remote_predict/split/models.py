"""Building the master and the cut pieces as Keras models, from the archive's config and weights.

The original model is never built whole (its tables could be larger than memory): the config is edited
first (a sharded Embedding becomes a `TableStub`, a one-row stand-in; a cut layer becomes an Input), the
edited model is built, and only the weights it still needs are read from the archive. A master built so
is exported and then rewritten like any exported SavedModel (`saved_model_source`): each stub's gather
becomes the sharded lookup, so both kinds of input end in the same master.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import h5py
import keras
import tensorflow as tf

from remote_predict.split.keras_archive import KerasArchive, weights_paths


@dataclass(frozen=True)
class TablePlan:
    layer: str  # the table's name: its Embedding layer, or its slug in an exported SavedModel
    rows: int
    dim: int
    strategy: str
    targets: tuple[str, ...]  # shard k's server
    shard_models: tuple[str, ...]  # shard k's model there
    wrap_negative: bool = False  # the lookup counts negative ids from the end (what Keras' Embedding does)


@keras.saving.register_keras_serializable(package="remote_predict")
class TableStub(keras.layers.Layer):
    """Stands in for a sharded Embedding while the master is exported: a plain gather from a one-row
    table, which the export's rewrite replaces with the sharded lookup (counting negative ids from the
    end there, with the real number of rows, as Keras' Embedding does)."""

    def __init__(self, output_dim: int, mask_zero: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.output_dim, self.mask_zero = int(output_dim), bool(mask_zero)
        self.supports_masking = self.mask_zero

    def build(self, input_shape) -> None:
        self.embeddings = self.add_weight(shape=(1, self.output_dim), initializer="zeros", name="embeddings",
                                          trainable=False)

    def call(self, inputs):
        if inputs.dtype not in ("int32", "int64"):
            inputs = keras.ops.cast(inputs, "int32")  # as keras.layers.Embedding does
        return keras.ops.cast(tf.gather(self.embeddings, inputs), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def compute_mask(self, inputs, mask=None):
        return keras.ops.not_equal(inputs, 0) if self.mask_zero else None

    def get_config(self) -> dict:
        return {**super().get_config(), "output_dim": self.output_dim, "mask_zero": self.mask_zero}


def _build(config: dict) -> keras.Model:
    with keras.saving.custom_object_scope({"TableStub": TableStub}):
        return keras.saving.deserialize_keras_object(config)


def _load_weights(model: keras.Model, archive: KerasArchive, skip: Iterable[str]) -> None:
    """Load the weights of every layer of `model` but those named in `skip` (never read: a table may be
    larger than memory) from the archive, nested ones included (an LSTM keeps its weights in its cell).

    Keras' loader reads each layer from the group its class and position name (`layers/dense_1`); the
    model built here has the original's layers by name, but not always of the same class (a TableStub)
    nor all of them (a base or head). So it is given a weights file holding a copy of each loaded
    layer's group (HDF5 copies them within the files, a chunk at a time; Keras refuses links), named as
    this model names them: Keras' own loader then reads and checks every variable, nested or not.
    """
    skip = set(skip)
    skipped = [layer for layer in model.layers if layer.name in skip]
    paths = weights_paths([type(layer).__name__ for layer in model.layers])
    with tempfile.TemporaryDirectory(prefix="remote-predict-weights-") as scratch:
        links = os.path.join(scratch, "links.weights.h5")
        with h5py.File(links, "w") as f:
            for layer, path in zip(model.layers, paths, strict=True):
                if layer.weights and layer.name not in skip:
                    archive.h5.copy(archive.h5[archive.layer(layer.name).weights_path], f, name=path)
        keras.saving.load_weights(model, links, objects_to_skip=skipped)


def master_model(archive: KerasArchive, tables: Sequence[TablePlan]) -> keras.Model:
    """The original model with each planned table replaced by a TableStub, other weights loaded."""
    config = copy.deepcopy(archive.config)
    plans = {t.layer: t for t in tables}
    for layer in config["config"]["layers"]:
        name = _layer_name(layer)
        plan = plans.get(name)
        if plan is None:
            continue
        original = layer["config"]
        layer["class_name"] = "TableStub"
        layer["module"] = None
        layer["registered_name"] = "remote_predict>TableStub"
        layer["config"] = {"name": name, "trainable": False, "dtype": original.get("dtype"),
                           "output_dim": plan.dim, "mask_zero": original.get("mask_zero", False)}
        layer.pop("build_config", None)
    model = _build(config)
    _load_weights(model, archive, skip=plans)
    return model


def unsplit_model(archive: KerasArchive, chunk_rows: int = 1 << 18) -> keras.Model:
    """The whole original model, tables filled a chunk at a time: memory is the model plus one chunk.

    `keras.models.load_model` would first fill every table with its random initializer (several copies
    of the largest table at once) and then overwrite it.
    """
    config = copy.deepcopy(archive.config)
    tables = []
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "Embedding":
            layer["config"]["embeddings_initializer"] = {
                "module": "keras.initializers",
                "class_name": "Zeros",
                "config": {},
                "registered_name": None,
            }
            tables.append(_layer_name(layer))
    model = _build(config)
    _load_weights(model, archive, skip=tables)
    for name in tables:
        entry = archive.layer(name)
        variable = model.get_layer(name).embeddings.value
        for start, rows in archive.row_chunks(entry, chunk_rows):
            # In place: `variable[a:b].assign()` would read (copy) the whole table for every chunk.
            tf.raw_ops.ResourceStridedSliceAssign(
                ref=variable.handle,
                begin=[start, 0],
                end=[start + len(rows), rows.shape[1]],
                strides=[1, 1],
                value=tf.constant(rows, variable.dtype),
            )
    return model


def _layer_name(layer: dict) -> str:
    return layer.get("name") or layer["config"]["name"]


def _history(value, found: list[str]) -> None:
    """Layer names referenced by keras tensors anywhere in a serialized call's arguments."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            found.append(value["config"]["keras_history"][0])
        for item in value.values():
            _history(item, found)
    elif isinstance(value, list):
        for item in value:
            _history(item, found)


def _outputs(config: dict) -> list[str]:
    outputs = config["config"]["output_layers"]
    if outputs and isinstance(outputs[0], str):
        outputs = [outputs]
    return [o[0] for o in outputs]


def cut_models(archive: KerasArchive, cut: str) -> tuple[keras.Model, keras.Model, list[str]]:
    """(base, head, original inputs the head needs beside the base's output).

    The base maps the model's inputs to the cut layer's output. The head takes the cut layer's output (as
    an input named after the layer) and any original inputs that the layers after the cut still use.
    """
    archive.layer(cut)  # a clear error for an unknown layer
    if archive.config["class_name"] == "Sequential":
        return _cut_sequential(archive, cut)
    config = archive.config["config"]
    by_name = {_layer_name(layer): layer for layer in config["layers"]}
    depends: dict[str, list[str]] = {}
    for name, layer in by_name.items():
        found: list[str] = []
        _history(layer.get("inbound_nodes", []), found)
        depends[name] = found
    # The head: every layer the outputs reach without passing through the cut.
    head, stack = set(), list(_outputs(archive.config))
    while stack:
        name = stack.pop()
        if name in head or name == cut:
            continue
        head.add(name)
        stack.extend(depends[name])
    if cut in head or not any(cut in depends[name] for name in head):
        raise ValueError(f"the outputs do not depend on layer {cut!r}: nothing to cut there")
    inputs = (
        [i[0] for i in config["input_layers"]]
        if isinstance(config["input_layers"][0], list)
        else [config["input_layers"][0]]
    )
    needed = [name for name in inputs if name in head]
    base, stack = set(), [cut]  # the base: every layer the cut layer's output depends on
    while stack:
        name = stack.pop()
        if name not in base:
            base.add(name)
            stack.extend(depends[name])
    base_config = copy.deepcopy(archive.config)
    base_config["config"]["layers"] = [copy.deepcopy(layer) for layer in config["layers"] if _layer_name(layer) in base]
    base_config["config"]["input_layers"] = [[name, 0, 0] for name in inputs if name in base]
    base_config["config"]["output_layers"] = [[cut, 0, 0]]
    base_config["config"]["name"] = f"{config['name']}_base"
    base_model = _build(base_config)
    _load_weights(base_model, archive, skip=())
    cut_layer = by_name[cut]
    cut_shape = [None, *list(base_model.outputs[0].shape)[1:]]
    head_config = copy.deepcopy(archive.config)
    head_layers = [
        {
            "module": "keras.layers",
            "class_name": "InputLayer",
            "registered_name": None,
            "name": cut,
            "config": {"batch_shape": cut_shape, "dtype": _dtype_name(cut_layer), "name": cut},
            "inbound_nodes": [],
        }
    ]
    head_layers += [copy.deepcopy(layer) for layer in config["layers"] if _layer_name(layer) in head]
    head_config["config"]["layers"] = head_layers
    head_config["config"]["input_layers"] = [[cut, 0, 0]] + [[name, 0, 0] for name in needed]
    head_config["config"]["name"] = f"{config['name']}_head"
    head_model = _build(head_config)
    _load_weights(head_model, archive, skip=())
    return base_model, head_model, needed


def _cut_sequential(archive: KerasArchive, cut: str) -> tuple[keras.Model, keras.Model, list[str]]:
    config = archive.config["config"]
    layers = config["layers"]
    index = [_layer_name(layer) for layer in layers].index(cut)
    if index == len(layers) - 1:
        raise ValueError(f"layer {cut!r} is the last layer: nothing would be left for the head")
    base_config = copy.deepcopy(archive.config)
    base_config["config"]["layers"] = copy.deepcopy(layers[: index + 1])
    base_config["config"]["name"] = f"{config['name']}_base"
    base = _build(base_config)
    _load_weights(base, archive, skip=())
    head_config = copy.deepcopy(archive.config)
    head_input = {
        "module": "keras.layers",
        "class_name": "InputLayer",
        "registered_name": None,
        "name": cut,
        "config": {
            "batch_shape": [None, *list(base.outputs[0].shape)[1:]],
            "dtype": _dtype_name(layers[index]),
            "name": cut,
        },
    }
    head_config["config"]["layers"] = [head_input, *copy.deepcopy(layers[index + 1 :])]
    head_config["config"]["name"] = f"{config['name']}_head"
    head = _build(head_config)
    _load_weights(head, archive, skip=())
    return base, head, []


def _dtype_name(layer: dict) -> str:
    dtype = layer["config"].get("dtype")
    if isinstance(dtype, dict):
        return dtype.get("config", {}).get("name", "float32")
    return dtype or "float32"

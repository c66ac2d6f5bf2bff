"""Reading a `.keras` file without building its model: the config, and weights a slice at a time.

A `.keras` file is a zip of `config.json` and `model.weights.h5`. Building the model would allocate every
table in full; the splitter instead reads the architecture from the config and each weight from the
HDF5 file on demand (h5py reads only the rows asked for). Weights live under `layers/<name>/vars/<i>`,
where `<name>` is the snake-cased class name made unique in the order the layers are listed
(`dense`, `dense_1`, ...), which is how Keras writes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

CONFIG = "config.json"
WEIGHTS = "model.weights.h5"


def to_snake_case(name: str) -> str:
    """A class name as Keras names its weights group: `Dense` -> `dense`, `LayerNormalization` ->
    `layer_normalization`, `Conv2D` -> `conv2d` (a digit before a capital is not a word break)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def weights_paths(class_names: list[str]) -> list[str]:
    """The HDF5 group of each layer of a model whose layers have these classes, in order: `layers/<snake
    case class>`, then `_1`, `_2`, ... for the next layers of the same class, as Keras saves them."""
    counts: dict[str, int] = {}
    paths = []
    for class_name in class_names:
        base = to_snake_case(class_name)
        index = counts.get(base, 0)
        counts[base] = index + 1
        paths.append(f"layers/{base}" if index == 0 else f"layers/{base}_{index}")
    return paths


@dataclass
class LayerEntry:
    name: str
    class_name: str
    config: dict[str, Any]
    weights_path: str  # HDF5 group of this layer's own variables


class KerasArchive:
    """An opened `.keras` file; close it (or use `with`) to delete the extracted weights."""

    def __init__(self, path: str):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a .keras file (a zip of config.json and model.weights.h5)")
        self.path = path
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if CONFIG not in names or WEIGHTS not in names:
                raise ValueError(f"{path} has no {CONFIG} or {WEIGHTS}: not a Keras 3 .keras file")
            self.config: dict[str, Any] = json.loads(archive.read(CONFIG))
            # h5py needs a seekable file: copy the weights out, streaming (constant memory).
            self._tmp = tempfile.mkdtemp(prefix="remote-predict-split-")
            weights = os.path.join(self._tmp, WEIGHTS)
            with archive.open(WEIGHTS) as source, open(weights, "wb") as target:
                shutil.copyfileobj(source, target, 16 << 20)
        self.h5 = h5py.File(weights, "r")
        kind = self.config.get("class_name")
        if kind not in ("Functional", "Sequential", "Model"):
            raise ValueError(f"{path}: split needs a functional or Sequential model, not {kind!r}")
        self.layers = self._layer_entries()

    def _layer_entries(self) -> list[LayerEntry]:
        layers = self.config["config"]["layers"]
        paths = weights_paths([layer["class_name"] for layer in layers])
        return [LayerEntry(layer.get("name") or layer["config"]["name"], layer["class_name"], layer["config"], path)
                for layer, path in zip(layers, paths, strict=True)]

    def layer(self, name: str) -> LayerEntry:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"no layer named {name!r} (layers: {', '.join(e.name for e in self.layers)})")

    def own_variables(self, entry: LayerEntry) -> dict[str, h5py.Dataset]:
        """A layer's own variables, keyed "0", "1", ... as Keras' `load_own_variables` expects."""
        group = self.h5.get(f"{entry.weights_path}/vars")
        return {} if group is None else {key: group[key] for key in group}

    def table(self, entry: LayerEntry) -> h5py.Dataset:
        return self.own_variables(entry)["0"]

    def row_chunks(self, entry: LayerEntry, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) of a table, `chunk_rows` at a time."""
        table = self.table(entry)
        for start in range(0, table.shape[0], chunk_rows):
            yield start, table[start:start + chunk_rows]

    def close(self) -> None:
        self.h5.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> KerasArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

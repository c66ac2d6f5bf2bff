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
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


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
        counts: dict[str, int] = {}
        entries = []
        for layer in self.config["config"]["layers"]:
            base = to_snake_case(layer["class_name"])
            index = counts.get(base, 0)
            counts[base] = index + 1
            name = layer.get("name") or layer["config"]["name"]
            path = f"layers/{base}" if index == 0 else f"layers/{base}_{index}"
            entries.append(LayerEntry(name, layer["class_name"], layer["config"], path))
        return entries

    def layer(self, name: str) -> LayerEntry:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"no layer named {name!r} (layers: {', '.join(e.name for e in self.layers)})")

    def own_variables(self, entry: LayerEntry) -> dict[str, h5py.Dataset]:
        """A layer's own variables, keyed "0", "1", ... as Keras' `load_own_variables` expects."""
        group = self.h5.get(f"{entry.weights_path}/vars")
        return {} if group is None else {key: group[key] for key in group}

    def has_nested_variables(self, entry: LayerEntry) -> bool:
        group = self.h5.get(entry.weights_path)
        found = []
        if group is not None:
            group.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset)
                             and not name.startswith("vars/") else None)
        return bool(found)

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

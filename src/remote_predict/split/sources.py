"""What `remote-predict split` reads: a `.keras` file or a SavedModel (TF2 or TF1), behind one small interface.

Each gives the tables that may be sharded (name -> rows, readable a range at a time), writes the master
for a set of table plans, and writes the unsplit model for comparisons.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Protocol

from remote_predict.split import graph_edit, models, tf1_source, writers
from remote_predict.split.keras_archive import KerasArchive
from remote_predict.split.saved_model_source import SavedModelSource


class ModelSource(Protocol):
    name: str

    def tables(self) -> dict: ...  # name -> rows (h5py dataset or StoredRows: shape, dtype, nbytes, slicing)

    def resolve(self, name: str) -> str: ...  # the key in tables() a user's name means; ValueError says why not

    def unshardable(self) -> dict[str, tuple[int, str]]: ...  # tables also used otherwise: name -> (bytes, why)

    def write_master(self, path: str, plans: Sequence[models.TablePlan], version: int, deadline_ms: int) -> None: ...

    def write_unsplit(self, path: str) -> None: ...

    def close(self) -> None: ...


class KerasSource:
    """A `.keras` file: the master is the model rebuilt with one-row stand-ins for its sharded tables,
    exported, and rewritten as an exported SavedModel is (`SavedModelSource.write_master`)."""

    def __init__(self, path: str):
        self.archive = KerasArchive(path)
        self.name = self.archive.config["config"].get("name") or os.path.splitext(os.path.basename(path))[0]

    def tables(self) -> dict:
        return {e.name: self.archive.table(e) for e in self.archive.layers if e.class_name == "Embedding"}

    def resolve(self, name: str) -> str:
        try:
            entry = self.archive.layer(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if entry.class_name != "Embedding":
            raise ValueError(f"layer {name!r} is a {entry.class_name}, not an Embedding")
        return name

    def unshardable(self) -> dict[str, tuple[int, str]]:
        return {}  # an Embedding layer's table is only ever gathered from

    def write_master(self, path: str, plans: Sequence[models.TablePlan], version: int, deadline_ms: int) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=parent, prefix=".master-export-") as scratch:
            export = os.path.join(scratch, "export")
            writers.write_keras(export, models.master_model(self.archive, plans))
            wrapped = [dataclasses.replace(plan, wrap_negative=True) for plan in plans]
            SavedModelSource(export).write_master(path, wrapped, version, deadline_ms)

    def write_unsplit(self, path: str) -> None:
        writers.write_keras(path, models.unsplit_model(self.archive))

    def close(self) -> None:
        self.archive.close()


class SavedModelTables:
    """An exported SavedModel: the master is the same graph with its gathers rewritten into shard calls."""

    def __init__(self, path: str):
        self.model = SavedModelSource(path)
        self.name = self.model.name

    def tables(self) -> dict:
        return {t.slug: self.model.table(t) for t in self.model.shardable()}

    def unshardable(self) -> dict[str, tuple[int, str]]:
        return {t.slug: (self.model.table(t).nbytes, "; ".join(t.other_uses[:3]))
                for t in self.model.tables if t.lookups and t.other_uses}

    def resolve(self, name: str) -> str:
        for table in self.model.tables:
            if name in (table.slug, table.name):
                if table.other_uses:
                    raise ValueError(f"table {table.name!r} is used other than by gathering rows "
                                     f"({'; '.join(table.other_uses[:3])}), so it cannot be sharded")
                return table.slug
        known = ", ".join(t.slug for t in self.model.tables) or "none"
        raise ValueError(f"no table named {name!r} is gathered from in {self.model.path} (tables: {known})")

    def write_master(self, path: str, plans: Sequence[models.TablePlan], version: int, deadline_ms: int) -> None:
        self.model.write_master(path, plans, version, deadline_ms)

    def write_unsplit(self, path: str) -> None:
        with writers.atomic_directory(path) as scratch:
            shutil.copytree(self.model.path, scratch)

    def close(self) -> None:
        pass


def open_source(path: str) -> ModelSource:
    """A `.keras` file, or a SavedModel directory (or base path): TF2 (functions) or TF1 (one GraphDef)."""
    if os.path.isdir(path):
        found = graph_edit.find_saved_model(path)
        if tf1_source.is_tf1(found):
            return tf1_source.TF1Source(found)
        return SavedModelTables(found)
    return KerasSource(path)

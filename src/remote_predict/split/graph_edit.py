"""Reading and editing graphs as protos: what both kinds of SavedModel (TF2 functions, TF1 GraphDefs) share.

Both are rewritten the same way (every gather of a sharded table becomes a lookup), so the pieces that
do not depend on where the nodes live are here: finding the SavedModel, naming tables, reading node
references and constants, and grouping gathers into steps that one lookup node can serve.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import tensorflow as tf
from tensorflow.core.framework import node_def_pb2

from remote_predict.op.lookup import LookupConfig, TableSpec


def find_saved_model(path: str) -> str:
    """`path` itself, or its highest integer version directory (a TF Serving base path)."""
    path = os.path.normpath(path)
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = [int(v) for v in os.listdir(path) if v.isdigit()] if os.path.isdir(path) else []
    for version in sorted(versions, reverse=True):
        candidate = os.path.join(path, str(version))
        if os.path.exists(os.path.join(candidate, "saved_model.pb")):
            return candidate
    raise ValueError(f"{path} holds no saved_model.pb, nor a version directory with one")


def model_name(path: str) -> str:
    """The name TF Serving would serve a SavedModel under: its base path's, or its own directory's."""
    return os.path.basename(os.path.dirname(path) if os.path.basename(path).isdigit() else path)


def slug(name: str) -> str:
    """A table's name as it appears in model names and signature aliases."""
    base = re.sub(r"(:0)$", "", name)
    base = re.sub(r"/(embeddings|kernel|table|embedding_weights)$", "", base)
    return re.sub(r"[^A-Za-z0-9_]+", "_", base).strip("_") or "table"


def source(reference: str) -> str:
    """The node an input names ("node:out:0" -> "node", "node:1" -> "node", "^node" -> "node")."""
    return reference.lstrip("^").split(":")[0]


def const_int(node: node_def_pb2.NodeDef | None) -> int | None:
    """The value of a one-element integer Const node, or None for anything else."""
    if node is None or node.op != "Const":
        return None
    value = tf.make_ndarray(node.attr["value"].tensor)
    return int(value) if value.size == 1 else None


def batch_dims(node: node_def_pb2.NodeDef) -> int:
    # Not `node.attr["batch_dims"]`: reading a missing key of a proto map inserts an empty value,
    # which TensorFlow then refuses to import ("Failed to bind all placeholders").
    return node.attr["batch_dims"].i if "batch_dims" in node.attr else 0


def lookup_steps(nodes: Iterable[node_def_pb2.NodeDef], gathers: Sequence[str]) -> list[list[str]]:
    """`gathers` (node names among `nodes`) in steps: a gather is in the step after every gather its
    inputs depend on, so the gathers of one step can be made by one node without creating a cycle."""
    inputs = {n.name: [source(i) for i in n.input] for n in nodes}
    wanted = set(gathers)
    below: dict[str, set[str]] = {}  # node -> the wanted gathers among its ancestors

    def ancestors(name: str) -> set[str]:
        stack = [name]
        while stack:  # iterative depth-first, so that deep graphs do not hit the recursion limit
            node = stack.pop()
            if node in below or node not in inputs:
                continue
            missing = [i for i in inputs[node] if i in inputs and i not in below]
            if missing:
                stack.append(node)
                stack.extend(missing)
                continue
            found: set[str] = set()
            for i in inputs[node]:
                if i in below:
                    found |= below[i] | ({i} if i in wanted else set())
            below[node] = found
        return below.get(name, set())

    level: dict[str, int] = {}
    for name in sorted(gathers, key=lambda g: len(ancestors(g))):
        level[name] = 1 + max((level[g] for g in ancestors(name) if g in level), default=-1)
    steps: dict[int, list[str]] = {}
    for name in gathers:
        steps.setdefault(level[name], []).append(name)
    return [steps[k] for k in sorted(steps)]


def lookup_config(plans: Sequence, dtypes: dict[str, tf.DType], version: int, deadline_ms: int) -> LookupConfig:
    """The lookup of one step: one input per gather (`plans[i]` is the TablePlan of gather i), each table
    listed once, `dtypes` giving each table's row type."""
    tables: dict[str, object] = {}
    for plan in plans:
        tables.setdefault(plan.layer, plan)
    names = list(tables)
    first = plans[0]
    return LookupConfig(
        tables=tuple(TableSpec(name=name, rows=tables[name].rows, dim=tables[name].dim,
                               dtype=dtypes[name].as_datatype_enum, strategy=tables[name].strategy,
                               wrap_negative=tables[name].wrap_negative) for name in names),
        inputs=tuple(names.index(plan.layer) for plan in plans),
        targets=first.targets, models=first.shard_models, version=version, deadline_ms=deadline_ms)

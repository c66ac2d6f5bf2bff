"""Splitting a SavedModel (TF2, as `model.export()` writes it) by rewriting its graph, not its Keras config.

A Keras 3 export carries functions and variables but no layer config, so the splitter works on the graph:

* tables: a rank-2 variable that the serving functions use only as rows to gather (`ReadVariableOp` then
  `GatherV2` on axis 0, or `ResourceGather`), found by following the variable's handle from the outer
  graph into the functions it is passed to. Its checkpoint key comes from the SavedModel's restore
  function (which assigns each key to a handle), its rows from the checkpoint bundle, a range at a time.
* master: the same SavedModel with each such gather replaced by a call to a lookup function that sends
  every shard its ids with RemotePredict ops, and a checkpoint in which the tables (and any large
  variable that serving never reads, such as the second copy of each table a Keras export keeps) hold
  zero rows: the master never reads them, and loads in the memory of its small variables.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import function_pb2, node_def_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2, trackable_object_graph_pb2

from remote_predict.checkpoint_bundle import Bundle
from remote_predict.op.lookup import lookup_op
from remote_predict.split import graph_edit
from remote_predict.split.models import TablePlan
from remote_predict.split.writers import atomic_directory

CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
UNUSED_ZERO_BYTES = 1 << 20  # a variable serving never reads is written empty above this size


@dataclass
class Table:
    """A rank-2 variable the serving graph reads only by gathering rows."""

    key: str  # checkpoint key
    name: str  # the variable's name, e.g. "item_table/embeddings"
    slug: str  # the name as it appears in model names, e.g. "item_table"
    handles: set[str] = field(default_factory=set)
    lookups: list[tuple[str, str]] = field(default_factory=list)  # (function, node)
    other_uses: list[str] = field(default_factory=list)


class SavedModelSource:
    """An exported SavedModel, read for splitting: its tables, their rows, and a master rewrite."""

    def __init__(self, path: str, tags: Sequence[str] = ("serve",)):
        self.path = graph_edit.find_saved_model(path)
        self.saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(self.path, "saved_model.pb"), "rb") as f:
            self.saved_model.ParseFromString(f.read())
        graphs = [g for g in self.saved_model.meta_graphs if set(tags) <= set(g.meta_info_def.tags)]
        if not graphs:
            raise ValueError(f"{self.path} has no meta graph tagged {list(tags)}")
        self.meta_graph: meta_graph_pb2.MetaGraphDef = graphs[0]
        self.bundle = Bundle(os.path.join(self.path, "variables", "variables"))
        self.functions = {f.signature.name: f for f in self.meta_graph.graph_def.library.function}
        self.nodes = {n.name: n for n in self.meta_graph.graph_def.node}
        self.name = graph_edit.model_name(self.path)
        self._saver_nodes = {graph_edit.source(self.meta_graph.saver_def.restore_op_name),
                             graph_edit.source(self.meta_graph.saver_def.save_tensor_name)}
        self.key_of_handle = self._restored_handles()
        self.object_graph = self._object_graph()
        self.serving_handles: set[str] = set()
        self.tables = self._find_tables()

    # -- analysis ---------------------------------------------------------------------------------
    def _restored_handles(self) -> dict[str, str]:
        """Outer VarHandleOp name -> the checkpoint key the restore function assigns to it."""
        restore = self.nodes.get(graph_edit.source(self.meta_graph.saver_def.restore_op_name))
        if restore is None or restore.op not in CALL_OPS:
            raise ValueError(f"{self.path}: not a TF2 SavedModel (its variables are not restored by a function); "
                             "split reads SavedModels written by model.export() or tf.saved_model.save()")
        function = self.functions[restore.attr["f"].func.name]
        body = {n.name: n for n in function.node_def}
        args = [a.name for a in function.signature.input_arg]
        keys: list[str] = []
        for node in function.node_def:
            if node.op == "RestoreV2":
                names = body[graph_edit.source(node.input[1])].attr["value"].tensor
                keys = [k.decode() for k in tf.make_ndarray(names)]
        handles = {}
        for node in function.node_def:
            if node.op != "AssignVariableOp" or node.input[0] not in args:
                continue
            value = body.get(graph_edit.source(node.input[1]))
            while value is not None and value.op == "Identity":
                source = value.input[0]
                if graph_edit.source(source) in body and body[graph_edit.source(source)].op == "RestoreV2":
                    index = int(source.split(":")[-1])
                    outer = restore.input[args.index(node.input[0])]
                    handles[graph_edit.source(outer)] = keys[index]
                    break
                value = body.get(graph_edit.source(source))
        return handles

    def _object_graph(self) -> trackable_object_graph_pb2.TrackableObjectGraph:
        """The checkpoint's object graph: its node ids are those of the SavedModel's object graph."""
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        if OBJECT_GRAPH_KEY in self.bundle.entries:
            graph.ParseFromString(self.bundle.read(OBJECT_GRAPH_KEY).numpy())
        return graph

    def _find_tables(self) -> list[Table]:
        names: dict[str, str] = {}  # checkpoint key -> variable name
        for node in self.object_graph.nodes:
            for attribute in node.attributes:
                names.setdefault(attribute.checkpoint_key, attribute.full_name)
        candidates: dict[str, Table] = {}
        for handle, key in self.key_of_handle.items():
            entry = self.bundle.entries.get(key)
            if entry is None or len(entry.shape.dim) != 2 or not self.bundle.dtype(key).is_floating:
                continue
            name = names.get(key) or key
            table = candidates.setdefault(key, Table(key, name, graph_edit.slug(name)))
            table.handles.add(handle)
        by_handle = {h: t for t in candidates.values() for h in t.handles}
        seen: set[tuple[str, int, str]] = set()  # a function reached from several call sites is read once
        self._traced_calls: set[tuple[str, str, int]] = set()  # (caller function or "", call node, position)
        self._reached_by: dict[tuple[str, int], set[str]] = {}  # (function, argument) -> tables traced there
        for node in self.meta_graph.graph_def.node:
            if node.op not in CALL_OPS or node.name in self._saver_nodes:
                continue
            for position, reference in enumerate(node.input):
                handle = graph_edit.source(reference)
                if handle in self.key_of_handle:
                    self.serving_handles.add(handle)
                if handle in by_handle and not reference.startswith("^"):
                    self._traced_calls.add(("", node.name, position))
                    self._trace(node.attr["f"].func.name, position, by_handle[handle], seen)
        self._check_functions_are_not_shared(candidates.values())
        tables = [t for t in candidates.values() if t.lookups or t.other_uses]
        slugs = [t.slug for t in tables]
        for table in tables:
            if slugs.count(table.slug) > 1:
                table.slug = graph_edit.slug(table.key)
        return tables

    def _trace(self, function_name: str, position: int, table: Table, seen: set) -> None:
        """Record how `function_name` uses its argument `position`, the table's handle."""
        if (function_name, position, table.key) in seen:
            return
        seen.add((function_name, position, table.key))
        self._reached_by.setdefault((function_name, position), set()).add(table.key)
        function = self.functions[function_name]
        arg = function.signature.input_arg[position].name
        body = {n.name: n for n in function.node_def}
        for node in function.node_def:
            data = [i for i in node.input if not i.startswith("^")]
            if arg not in data:
                continue
            if node.op in CALL_OPS:
                for index, reference in enumerate(data):
                    if reference == arg:
                        self._traced_calls.add((function_name, node.name, index))
                        self._trace(node.attr["f"].func.name, index, table, seen)
            elif node.op == "ResourceGather" and data[0] == arg and graph_edit.batch_dims(node) == 0:
                table.lookups.append((function_name, node.name))
            elif node.op == "ReadVariableOp":
                self._trace_read(function, body, node, table)
            else:
                table.other_uses.append(f"{node.op} {node.name!r} in {function_name}")
        for index, ret in enumerate(function.signature.output_arg):
            if function.ret.get(ret.name) == arg:
                table.other_uses.append(f"returned as output {index} of {function_name}")

    def _check_functions_are_not_shared(self, tables) -> None:
        """Functions are rewritten in place: every call to one the trace went through must pass a table
        where the trace did, or the rewrite would change what the other calls compute."""
        by_key = {t.key: t for t in tables}
        traced: dict[tuple[str, str], set[int]] = {}
        for caller, node, position in self._traced_calls:
            traced.setdefault((caller, node), set()).add(position)
        sites = [("", n) for n in self.meta_graph.graph_def.node]
        sites += [(name, n) for name, f in self.functions.items() for n in f.node_def]
        calls = [(caller, node) for caller, node in sites if node.op in CALL_OPS and node.name not in self._saver_nodes]
        wanted: dict[str, set[int]] = {}
        for caller, node in calls:
            wanted.setdefault(node.attr["f"].func.name, set()).update(traced.get((caller, node.name), set()))
        shared = set()
        for caller, node in calls:
            callee = node.attr["f"].func.name
            if wanted[callee] - traced.get((caller, node.name), set()):
                shared.add(callee)
        shared.update(f for (f, _), keys in self._reached_by.items() if len(keys) > 1)  # two tables, one argument
        for (function, _), keys in sorted(self._reached_by.items()):
            if function in shared:
                for key in keys:
                    by_key[key].other_uses.append(f"{function} also runs on other variables than this table")

    def _trace_read(self, function: function_pb2.FunctionDef, body: dict, read: node_def_pb2.NodeDef,
                    table: Table) -> None:
        value = f"{read.name}:value:0"
        for node in function.node_def:
            data = [i for i in node.input if not i.startswith("^")]
            if value not in data:
                continue
            axis = graph_edit.const_int(body.get(graph_edit.source(data[2]))) if len(data) > 2 else None
            is_gather = (node.op == "GatherV2" and data[0] == value and value not in data[1:] and axis == 0
                         and graph_edit.batch_dims(node) == 0)
            if is_gather:
                table.lookups.append((function.signature.name, node.name))
            else:
                table.other_uses.append(f"{node.op} {node.name!r} in {function.signature.name}")
        if value in function.ret.values():
            table.other_uses.append(f"returned by {function.signature.name}")

    def table_named(self, name: str) -> Table:
        """The table a plan names: by slug, by variable name, or as Keras names a layer's table
        (`<model>/<layer>/embeddings`)."""
        for table in self.tables:
            if name in (table.slug, table.name):
                return table
        keras_style = [t for t in self.tables if f"/{t.name}".endswith(f"/{name}/embeddings")]
        if len(keras_style) == 1:
            return keras_style[0]
        raise KeyError(f"no table {name!r} in {self.path}")

    def shardable(self) -> list[Table]:
        return [t for t in self.tables if t.lookups and not t.other_uses]

    def table(self, table: Table) -> np.memmap:
        return self.bundle.rows(table.key)

    # -- the master -------------------------------------------------------------------------------
    def write_master(self, path: str, plans: Sequence, version: int, deadline_ms: int) -> None:
        """This SavedModel with every planned table's gathers replaced by calls to its shards."""
        saved_model = saved_model_pb2.SavedModel()  # from the file: the analysis must not leak into the master
        with open(os.path.join(self.path, "saved_model.pb"), "rb") as f:
            saved_model.ParseFromString(f.read())
        meta_graph = saved_model.meta_graphs[list(self.saved_model.meta_graphs).index(self.meta_graph)]
        library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
        emptied: set[str] = set()
        gathers: dict[str, list[tuple[str, TablePlan]]] = {}  # function -> its gathers from planned tables
        by_plan = {plan.layer: self.table_named(plan.layer) for plan in plans}
        for plan in plans:
            table = by_plan[plan.layer]
            emptied.add(table.key)
            for function_name, node_name in table.lookups:
                gathers.setdefault(function_name, []).append((node_name, plan))
        for function_name, found in gathers.items():
            function = library[function_name]
            nodes = {n.name: n for n in function.node_def}
            plan_of = dict(found)
            for step in graph_edit.lookup_steps(function.node_def, list(plan_of)):
                entries = [(nodes[name], plan_of[name]) for name in step]
                tables = {plan.layer: self.bundle.dtype(by_plan[plan.layer].key) for _, plan in entries}
                lookup = _add_lookup(library, entries, tables, version=version, deadline_ms=deadline_ms)
                _replace_with_call(function, [node for node, _ in entries], lookup,
                                   [tables[plan.layer] for _, plan in entries])
        for handle, key in self.key_of_handle.items():
            if handle not in self.serving_handles and self._nbytes(key) > UNUSED_ZERO_BYTES:
                emptied.add(key)  # serving never reads it: keep it out of the master's memory
        del meta_graph.graph_def.library.function[:]
        meta_graph.graph_def.library.function.extend(library.values())
        _shrink_saved_variables(meta_graph, self._variable_node_keys(), emptied)
        with atomic_directory(path) as scratch:
            for extra in ("assets", "assets.extra"):
                if os.path.isdir(os.path.join(self.path, extra)):
                    shutil.copytree(os.path.join(self.path, extra), os.path.join(scratch, extra))
            os.makedirs(os.path.join(scratch, "variables"))
            self._write_checkpoint(os.path.join(scratch, "variables", "variables"), emptied)
            with open(os.path.join(scratch, "saved_model.pb"), "wb") as f:
                f.write(saved_model.SerializeToString())

    def _nbytes(self, key: str) -> int:
        return int(np.prod(self.bundle.shape(key), dtype=np.int64)) * self.bundle.dtype(key).size

    def _variable_node_keys(self) -> dict[int, str]:
        """SavedObjectGraph node id -> checkpoint key of the variable's value."""
        return {node_id: attribute.checkpoint_key for node_id, node in enumerate(self.object_graph.nodes)
                for attribute in node.attributes if attribute.name == "VARIABLE_VALUE"}

    def _write_checkpoint(self, prefix: str, emptied: set[str]) -> None:
        names, tensors = [], []
        for key in sorted(self.bundle.entries):
            if key in emptied:
                shape = self.bundle.shape(key)
                tensors.append(tf.zeros([0, *shape[1:]], self.bundle.dtype(key)))
            else:
                tensors.append(self.bundle.read(key))
            names.append(key)
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)


def _shrink_saved_variables(meta_graph: meta_graph_pb2.MetaGraphDef, node_keys: dict[int, str],
                            emptied: set[str]) -> None:
    """Tell `tf.saved_model.load` that the emptied variables hold zero rows, as the checkpoint does."""
    for node_id, node in enumerate(meta_graph.object_graph_def.nodes):
        if node.WhichOneof("kind") == "variable" and node_keys.get(node_id) in emptied and node.variable.shape.dim:
            node.variable.shape.dim[0].size = 0


def _add_lookup(library: dict[str, function_pb2.FunctionDef], entries: Sequence[tuple[node_def_pb2.NodeDef, TablePlan]],
                tables: dict[str, tf.DType], version: int, deadline_ms: int) -> str:
    """Add a function (the gathers' indices, any shapes) -> (their rows) to `library`; return its name."""
    config = graph_edit.lookup_config([plan for _, plan in entries], tables, version=version, deadline_ms=deadline_ms)
    dims = {plan.layer: plan.dim for _, plan in entries}
    names = list(dims)
    index_dtypes = [tf.as_dtype(node.attr["Tindices"].type) for node, _ in entries]

    @tf.function(autograph=False)
    def gather(*indices):
        rows = lookup_op(config, list(indices), name="lookup")
        # Reshape is free (no copy) and tells shape inference the rank and the row width.
        return [tf.reshape(r, tf.concat([tf.shape(i, out_type=tf.int64), [dims[p.layer]]], 0))
                for r, i, (_, p) in zip(rows, indices, entries, strict=True)]

    concrete = gather.get_concrete_function(*(tf.TensorSpec(None, d) for d in index_dtypes))
    functions = [*concrete.graph.as_graph_def().library.function, concrete.function_def]
    renames = {}
    for function in functions:
        name = f"remote_predict_{'_'.join(names)}_{function.signature.name}"
        while name in library:
            name += "_"
        renames[function.signature.name] = name
    for function in functions:
        function = copy.deepcopy(function)
        function.signature.name = renames[function.signature.name]
        for node in function.node_def:
            for attr in node.attr.values():
                if attr.HasField("func") and attr.func.name in renames:
                    attr.func.name = renames[attr.func.name]
        library[function.signature.name] = function
    return renames[concrete.function_def.signature.name]


def _replace_with_call(function: function_pb2.FunctionDef, gathers: Sequence[node_def_pb2.NodeDef], lookup: str,
                       dtypes: Sequence[tf.DType]) -> None:
    """Turn each gather node into an Identity of one output of a new node calling `lookup` on their indices.

    Each gather keeps its name (and output name, "output") for its consumers. The call gets a name of its
    own because inlining prefixes the callee's nodes with the call's name, which must not collide with
    the caller's nodes (`embedding_lookup/Identity` follows a gather named `embedding_lookup`).

    The call is wired as TensorFlow wires a stateful call it traces: one of the function's control outputs,
    and a control input of its return values. Without that, grappler refuses to inline the function (it
    cannot show the call's side effects would still run), and every request then pays two function calls
    of TensorFlow's runtime around the lookup (measured: 0.7-0.9 ms of TensorFlow per request, against
    0.09 ms for the whole unsplit graph).
    """
    names = {n.name for n in function.node_def}
    call_name = f"{gathers[0].name}/remote_predict_lookup"
    while call_name in names:
        call_name += "_"
    call = function.node_def.add()
    call.name = call_name
    call.op = "StatefulPartitionedCall"
    controls = sorted({i for node in gathers for i in node.input if i.startswith("^")})
    call.input.extend([*(node.input[1] for node in gathers), *controls])
    call.attr["Tin"].list.type.extend(tf.as_dtype(node.attr["Tindices"].type).as_datatype_enum for node in gathers)
    call.attr["Tout"].list.type.extend(dtype.as_datatype_enum for dtype in dtypes)
    call.attr["f"].func.name = lookup
    for name in ("config", "config_proto", "executor_type"):
        call.attr[name].s = b""
    shapes = [node.attr["_output_shapes"].list.shape[0] for node in gathers if "_output_shapes" in node.attr]
    if len(shapes) == len(gathers):
        call.attr["_output_shapes"].list.shape.extend(shapes)
    for index, (node, dtype) in enumerate(zip(gathers, dtypes, strict=True)):
        for name in list(node.attr):
            if name != "_output_shapes":  # e.g. `_class` would colocate it with the table it no longer reads
                del node.attr[name]
        node.op = "Identity"
        del node.input[:]
        node.input.append(f"{call_name}:output:{index}")
        node.attr["T"].type = dtype.as_datatype_enum
    function.signature.control_output.append(call_name)
    function.control_ret[call_name] = call_name
    returned = {tensor.split(":")[0] for tensor in function.ret.values()}
    for node in function.node_def:
        if node.name in returned:
            node.input.append(f"^{call_name}")

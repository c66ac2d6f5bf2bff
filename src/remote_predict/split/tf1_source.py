"""Splitting a TF1 SavedModel (Estimator-era, `tf.compat.v1.saved_model.Builder`) by rewriting its GraphDef.

A TF1 export has no functions to follow and no object graph: its variables are nodes of one GraphDef
(`VariableV2`, or `VarHandleOp` for resource variables), listed with their checkpoint names in the
meta graph's `variables` collection, and restored by a Saver (a `RestoreV2` node and one assign per
variable). So here:

* tables: a rank-2 floating variable that the serving graph (everything the signatures' outputs and
  the main op depend on) only gathers rows from (`Gather`, `GatherV2` on axis 0, `ResourceGather`,
  possibly after its snapshot `Identity` or a `ReadVariableOp`). A partitioned variable
  (`fixed_size_partitioner`) is one table whose parts are saved as row slices of one checkpoint tensor;
  `embedding_lookup` over it partitions the ids, gathers from each part and stitches the rows back in
  order. That whole pattern is one lookup of the full table: which partitioning the graph computes
  (`div` or `mod`) is not guessed from op names but found by running the graph's own partition
  arithmetic on every valid id (it must be elementwise, so that proves it for every batch), and the
  rows the shards get are the table in the order the ids count it (for `mod`, row r is row r // N of
  part r % N).
* master: the same GraphDef with each step of such lookups made by one lookup node
  (`op.lookup.lookup_op`: a gather's node, or a partitioned lookup's stitch, becomes an Identity of one
  of its outputs), the nodes only those lookups used removed, and a new Saver over the other
  variables, so the master keeps TF1's restore path and its checkpoint holds no table rows.

Only the serving meta graph is written (a `train` graph would restore the tables the master no longer
holds).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2, variable_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from remote_predict.checkpoint_bundle import Bundle
from remote_predict.op.lookup import lookup_op
from remote_predict.split import graph_edit
from remote_predict.split.writers import atomic_directory

VARIABLE_OPS = ("VariableV2", "Variable", "VarHandleOp")
READ_OPS = ("Identity", "ReadVariableOp")  # a ref variable's snapshot, a resource variable's value
STITCH_OPS = ("DynamicStitch", "ParallelDynamicStitch")
# Variable collections hold VariableDefs: a sharded table's parts leave them with the table.
VARIABLE_COLLECTIONS = ("variables", "trainable_variables", "model_variables", "local_variables",
                        "moving_average_variables", "global_step", "metric_variables")
LOAD_OPS = ("saved_model_main_op", "legacy_init_op")  # collections of ops the loader runs
# Ops a partitioned lookup may compute its partitions with: elementwise, so one id's part never depends
# on the other ids of the batch, and running them on every valid id proves the partitioning.
ELEMENTWISE_OPS = frozenset({
    "Identity", "Cast", "Add", "AddV2", "Sub", "Mul", "Neg", "FloorDiv", "FloorMod", "Div", "Mod", "TruncateDiv",
    "TruncateMod", "Maximum", "Minimum", "Less", "LessEqual", "Greater", "GreaterEqual", "Equal", "NotEqual",
    "Select", "SelectV2", "LogicalAnd", "LogicalOr", "LogicalNot",
})
PROBE_IDS = 1 << 20  # ids run through a partitioned lookup's arithmetic at a time
PROBE_INPUT = "remote_predict_probe_ids"


def is_tf1(path: str) -> bool:
    """Whether the SavedModel at `path` (a version directory) is a TF1 export: no object graph."""
    saved_model = _read(path)
    return bool(saved_model.meta_graphs) and not any(g.object_graph_def.nodes for g in saved_model.meta_graphs)


def _read(path: str) -> saved_model_pb2.SavedModel:
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    return saved_model


def _ref(reference: str) -> str:
    """A data input as "node:index" ("node" names output 0)."""
    return reference if ":" in reference else f"{reference}:0"


def _data(node: node_def_pb2.NodeDef) -> list[str]:
    return [_ref(i) for i in node.input if not i.startswith("^")]


def _key(variable: variable_pb2.VariableDef) -> str:
    """The checkpoint key a variable is saved under (a part of a partitioned variable: its whole's)."""
    if variable.HasField("save_slice_info_def"):
        return variable.save_slice_info_def.full_name
    return graph_edit.source(variable.variable_name)


@dataclass
class Part:
    """One variable holding rows [offset, offset + rows) of a table."""

    node: str
    offset: int
    rows: int


@dataclass
class Lookup:
    """Where the serving graph gathers a table's rows: `node`'s output is gather(table, ids)."""

    node: str  # the gather, or the stitch of a partitioned lookup
    ids: str  # the ids' tensor ("node:index")
    strategy: str = "div"  # how a partitioned lookup counts ids over the parts: div (row order) or mod


@dataclass
class Table:
    key: str  # checkpoint key
    slug: str
    shape: tuple[int, int]
    dtype: tf.DType
    parts: list[Part]
    lookups: list[Lookup] = field(default_factory=list)
    other_uses: list[str] = field(default_factory=list)


class InterleavedRows:
    """The rows a `mod` lookup reads from a partitioned table, in id order: row r is row r // N of part r % N.

    `rows[a:b]` reads one contiguous range from each part (the checkpoint's rows, a range at a time).
    """

    def __init__(self, stored, parts: Sequence[Part]):
        self.stored, self.parts = stored, list(parts)
        self.shape, self.dtype = stored.shape, stored.dtype
        self.nbytes = stored.nbytes

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("interleaved rows are read by contiguous slices only")
        start, stop, _ = rows.indices(self.shape[0])
        count = len(self.parts)
        out = np.empty((max(0, stop - start), *self.shape[1:]), self.dtype)
        for k, part in enumerate(self.parts):
            first = start + (k - start) % count  # the first id >= start that part k holds
            if first >= stop:
                continue
            local = first // count
            taken = (stop - first + count - 1) // count
            out[first - start::count] = self.stored[part.offset + local:part.offset + local + taken]
        return out


class TF1Source:
    """A TF1 SavedModel read for splitting: its tables, their rows, and the master rewrite (a ModelSource)."""

    def __init__(self, path: str, tags: Sequence[str] = ("serve",)):
        self.path = graph_edit.find_saved_model(path)
        self.name = graph_edit.model_name(self.path)
        graphs = [g for g in _read(self.path).meta_graphs if set(tags) <= set(g.meta_info_def.tags)]
        if not graphs:
            raise ValueError(f"{self.path} has no meta graph tagged {list(tags)}")
        self.meta_graph: meta_graph_pb2.MetaGraphDef = graphs[0]
        self.bundle = Bundle(os.path.join(self.path, "variables", "variables"))
        self.nodes = {n.name: n for n in self.meta_graph.graph_def.node}
        self.consumers: dict[str, list[tuple[str, int]]] = {}  # "node:index" -> (consumer, input position)
        for node in self.meta_graph.graph_def.node:
            for position, reference in enumerate(_data(node)):
                self.consumers.setdefault(reference, []).append((node.name, position))
        self.variables = [variable_pb2.VariableDef.FromString(b)
                          for b in self.meta_graph.collection_def["variables"].bytes_list.value] \
            if "variables" in self.meta_graph.collection_def else []
        self.serving = _ancestors(self.nodes, self._roots())
        self._check_saver_restores_variables()
        self.found = self._find_tables()

    # -- analysis ---------------------------------------------------------------------------------
    def _check_saver_restores_variables(self) -> None:
        """The master gets a new Saver over the variables: refuse a model whose Saver restores more."""
        keys = {_key(v) for v in self.variables}
        restored = set()
        for name in self._saver_nodes():
            node = self.nodes[name]
            if node.op in ("RestoreV2", "SaveV2"):
                names = self.nodes.get(graph_edit.source(node.input[1]))
                if names is not None and names.op == "Const":
                    restored.update(k.decode() for k in tf.make_ndarray(names.attr["value"].tensor).reshape(-1))
        missing = sorted(k for k in keys if k not in self.bundle.entries)
        if missing:
            raise ValueError(f"variables {missing[:3]} are not in {self.path}'s checkpoint")
        if restored - keys:
            raise ValueError(f"its Saver also restores {sorted(restored - keys)[:3]}, which are not variables "
                             "(lookup tables?); split cannot carry them over to the master")

    def _roots(self) -> set[str]:
        """What serving runs: the signatures' outputs and the ops the loader runs."""
        roots = set()
        for signature in self.meta_graph.signature_def.values():
            for info in signature.outputs.values():
                roots.update(graph_edit.source(name) for name in _tensor_names(info))
        for key in LOAD_OPS:
            if key in self.meta_graph.collection_def:
                roots.update(graph_edit.source(n) for n in self.meta_graph.collection_def[key].node_list.value)
        return roots

    def _find_tables(self) -> list[Table]:
        by_key: dict[str, list[variable_pb2.VariableDef]] = {}
        for variable in self.variables:
            by_key.setdefault(_key(variable), []).append(variable)
        tables = []
        for key, variables in by_key.items():
            entry = self.bundle.entries.get(key)
            if entry is None or len(entry.shape.dim) != 2 or not self.bundle.dtype(key).is_floating:
                continue
            shape = self.bundle.shape(key)
            parts = _parts(variables, shape)
            if parts is None:
                continue  # sliced other than by rows
            table = Table(key, graph_edit.slug(key), shape, self.bundle.dtype(key), parts)
            self._trace(table)
            if table.lookups or table.other_uses:
                tables.append(table)
        slugs = [t.slug for t in tables]
        for table in tables:
            if slugs.count(table.slug) > 1:
                table.slug = graph_edit.slug(table.key.replace("/", "_"))
        return tables

    def _trace(self, table: Table) -> None:
        """Record how serving reads each part of `table`: as rows to gather, or otherwise."""
        gathers: list[list[str]] = []
        for part in table.parts:
            found, others = self._gathers_of(part.node)
            gathers.append(found)
            table.other_uses.extend(others)
        if len(table.parts) == 1:
            table.lookups.extend(Lookup(g, _data(self.nodes[g])[1]) for g in gathers[0])
            return
        stitches: dict[str, None] = {}
        for k, found in enumerate(gathers):
            for gather in found:
                uses = [(c, p) for c, p in self.consumers.get(f"{gather}:0", []) if c in self.serving]
                stitch = uses[0][0] if len(uses) == 1 else None
                if stitch is None or self.nodes[stitch].op not in STITCH_OPS or uses[0][1] != len(table.parts) + k:
                    table.other_uses.append(f"{self.nodes[gather].op} {gather!r} gathers from part {k} other than "
                                            "into a stitch of every part")
                else:
                    stitches[stitch] = None
        for stitch in stitches:
            try:
                table.lookups.append(self._partitioned_lookup(stitch, table, gathers))
            except ValueError as e:
                table.other_uses.append(f"{self.nodes[stitch].op} {stitch!r}: {e}")
        if len({lookup.strategy for lookup in table.lookups}) > 1:
            table.other_uses.append("looked up with both the div and the mod partition strategy")

    def _gathers_of(self, variable: str) -> tuple[list[str], list[str]]:
        """The gathers serving makes from a variable (through its reads), and its other uses."""
        gathers, others, stack = [], [], [f"{variable}:0"]
        while stack:
            reference = stack.pop()
            for consumer, position in self.consumers.get(reference, []):
                if consumer not in self.serving:
                    continue
                node = self.nodes[consumer]
                data = _data(node)
                on_rows = (node.op in ("Gather", "ResourceGather") or (node.op == "GatherV2"
                           and graph_edit.const_int(self.nodes.get(graph_edit.source(data[2]))) == 0))
                if node.op in READ_OPS and position == 0:
                    stack.append(f"{consumer}:0")
                elif on_rows and position == 0 and reference not in data[1:] and graph_edit.batch_dims(node) == 0:
                    gathers.append(consumer)
                else:
                    others.append(f"{node.op} {consumer!r}")
        return gathers, others

    def _partitioned_lookup(self, stitch: str, table: Table, gathers: list[list[str]]) -> Lookup:
        """The lookup `stitch` completes, as `embedding_lookup` builds it over a partitioned variable:

            flat ids X -> DynamicPartition(new ids, parts) -> gather k from part k ->
            DynamicStitch(DynamicPartition(range(size(X)), parts), gathered)

        or ValueError saying what differs.
        """
        count = len(table.parts)
        data = _data(self.nodes[stitch])
        if len(data) != 2 * count:
            raise ValueError(f"it stitches {len(data) // 2} pieces, the table has {count} parts")
        positions, pieces = data[:count], data[count:]
        id_parts = []
        for k, piece in enumerate(pieces):
            gather = graph_edit.source(piece)
            if piece != f"{gather}:0" or gather not in gathers[k]:
                raise ValueError(f"piece {k} is not a gather from part {k}")
            id_parts.append(_data(self.nodes[gather])[1])
        split_ids = self._partition_node(id_parts, count, "the gathers' ids")
        split_positions = self._partition_node(positions, count, "the stitch's positions")
        partitions = _data(split_ids)[1]
        if _data(split_positions)[1] != partitions:
            raise ValueError("the ids and their positions are partitioned differently")
        positions_range = self.nodes[graph_edit.source(_data(split_positions)[0])]
        start, limit, delta = _data(positions_range) if positions_range.op == "Range" else (None, None, None)
        size = self.nodes.get(graph_edit.source(limit)) if limit else None
        if (size is None or size.op != "Size" or graph_edit.const_int(self.nodes.get(graph_edit.source(start))) != 0
                or graph_edit.const_int(self.nodes.get(graph_edit.source(delta))) != 1):
            raise ValueError("the stitch's positions are not range(size(ids))")
        ids = _data(size)[0]
        strategy = self._probe_strategy(ids, _data(split_ids)[0], partitions, tf.as_dtype(size.attr["T"].type), table)
        return Lookup(stitch, ids, strategy)

    def _partition_node(self, references: list[str], count: int, what: str) -> node_def_pb2.NodeDef:
        node = self.nodes.get(graph_edit.source(references[0]))
        if (node is None or node.op != "DynamicPartition" or node.attr["num_partitions"].i != count
                or references != [f"{node.name}:{k}" for k in range(count)]):
            raise ValueError(f"{what} are not the {count} outputs of one DynamicPartition")
        return node

    def _probe_strategy(self, ids: str, local_ids: str, partitions: str, dtype: tf.DType, table: Table) -> str:
        """Run the graph's partition arithmetic (ids -> part, id within the part) on every valid id, and
        say which strategy it is ("div" when both agree); ValueError when neither."""
        nodes = _ancestors(self.nodes, [graph_edit.source(local_ids), graph_edit.source(partitions)],
                           stop=graph_edit.source(ids))
        nodes.discard(graph_edit.source(ids))
        graph_def = graph_pb2.GraphDef()
        probe = graph_def.node.add(name=PROBE_INPUT, op="Placeholder")
        probe.attr["dtype"].type = dtype.as_datatype_enum
        for name in sorted(nodes):
            node = self.nodes[name]
            if node.op == "Const" and tf.make_ndarray(node.attr["value"].tensor).size == 1:
                pass
            elif node.op not in ELEMENTWISE_OPS:
                raise ValueError(f"its partitions are computed with {node.op} {name!r}, which split does not run")
            copy = graph_def.node.add()
            copy.CopyFrom(node)
            copy.ClearField("device")
            del copy.input[:]
            copy.input.extend(PROBE_INPUT if _ref(i) == ids else i for i in node.input)
        candidates = {"div", "mod"}
        with tf.Graph().as_default() as graph:
            tf.graph_util.import_graph_def(graph_def, name="")
            fetches = [graph.get_tensor_by_name(partitions), graph.get_tensor_by_name(local_ids)]
            with tf.compat.v1.Session(graph=graph) as session:
                for first in range(0, table.shape[0], PROBE_IDS):
                    probe = np.arange(first, min(table.shape[0], first + PROBE_IDS), dtype=dtype.as_numpy_dtype)
                    part, local = session.run(fetches, {f"{PROBE_INPUT}:0": probe})
                    candidates &= matching_strategies(probe, part, local, table.parts)
                    if not candidates:
                        raise ValueError("it spreads ids over the parts neither as the div nor as the mod strategy")
        return "div" if "div" in candidates else "mod"

    # -- the ModelSource interface ----------------------------------------------------------------
    def table_named(self, name: str) -> Table:
        for table in self.found:
            if name in (table.slug, table.key):
                return table
        raise KeyError(f"no table {name!r} in {self.path}")

    def rows(self, table: Table):
        """The table's rows in the order its ids count them, readable a range at a time."""
        stored = self.bundle.rows(table.key)
        if table.lookups and table.lookups[0].strategy == "mod" and len(table.parts) > 1:
            return InterleavedRows(stored, table.parts)
        return stored

    def tables(self) -> dict:
        return {t.slug: self.rows(t) for t in self.found if t.lookups and not t.other_uses}

    def unshardable(self) -> dict[str, tuple[int, str]]:
        return {t.slug: (self.bundle.rows(t.key).nbytes, "; ".join(t.other_uses[:3]))
                for t in self.found if t.lookups and t.other_uses}

    def resolve(self, name: str) -> str:
        for table in self.found:
            if name in (table.slug, table.key) or name in (p.node for p in table.parts):
                if table.other_uses:
                    raise ValueError(f"table {table.key!r} is used other than by gathering rows "
                                     f"({'; '.join(table.other_uses[:3])}), so it cannot be sharded")
                return table.slug
        known = ", ".join(t.slug for t in self.found) or "none"
        raise ValueError(f"no table named {name!r} is gathered from in {self.path} (tables: {known})")

    def write_unsplit(self, path: str) -> None:
        with atomic_directory(path) as scratch:
            shutil.copytree(self.path, scratch)

    def close(self) -> None:
        pass

    # -- the master -------------------------------------------------------------------------------
    def write_master(self, path: str, plans: Sequence, version: int, deadline_ms: int) -> None:
        """This SavedModel with every planned table's lookups replaced by lookups on its shards."""
        by_plan = {plan.layer: self.table_named(plan.layer) for plan in plans}
        entries = {lookup.node: (lookup, plan) for plan in plans for lookup in by_plan[plan.layer].lookups}
        sharded = {part.node for table in by_plan.values() for part in table.parts}
        kept = [v for v in self.variables if graph_edit.source(v.variable_name) not in sharded]
        protected = _named_nodes(self.meta_graph) | {n for n, node in self.nodes.items() if node.op in VARIABLE_OPS}
        graph_def = _without(self.meta_graph.graph_def, self._saver_nodes() - protected)
        importable = meta_graph_pb2.MetaGraphDef(meta_info_def=self.meta_graph.meta_info_def, graph_def=graph_def)
        importable.collection_def["variables"].bytes_list.value.extend(v.SerializeToString() for v in kept)
        rows_of: dict[str, str] = {}  # a replaced node -> the tensor that now holds its rows
        with tf.Graph().as_default() as graph:
            # With no saver in it, importing builds the default Saver: over exactly the kept variables.
            saver = tf.compat.v1.train.import_meta_graph(importable)
            for step in graph_edit.lookup_steps(self.meta_graph.graph_def.node, list(entries)):
                rows_of.update(self._add_lookup(graph, [entries[name] for name in step], version, deadline_ms))
            graph_def = graph.as_graph_def()
        dtypes = {name: by_plan[plan.layer].dtype for name, (_, plan) in entries.items()}
        _replace_with_identities(graph_def, rows_of, dtypes)
        candidates = _ancestors(self.nodes, entries) - set(entries)
        graph_def = _without(graph_def, _unused(graph_def, candidates, protected))
        meta_graph = meta_graph_pb2.MetaGraphDef()
        meta_graph.CopyFrom(self.meta_graph)
        meta_graph.graph_def.CopyFrom(graph_def)
        if saver is None:
            meta_graph.ClearField("saver_def")
        else:
            meta_graph.saver_def.CopyFrom(saver.as_saver_def())
        _drop_variables(meta_graph, sharded)
        if "savers" in meta_graph.collection_def:  # SaverDefs naming the old Saver's nodes, gone now
            del meta_graph.collection_def["savers"]
        saved_model = saved_model_pb2.SavedModel(saved_model_schema_version=1, meta_graphs=[meta_graph])
        with atomic_directory(path) as scratch:
            for extra in ("assets", "assets.extra"):
                if os.path.isdir(os.path.join(self.path, extra)):
                    shutil.copytree(os.path.join(self.path, extra), os.path.join(scratch, extra))
            os.makedirs(os.path.join(scratch, "variables"))
            keys = sorted({_key(v) for v in kept})
            if keys:
                self._write_checkpoint(os.path.join(scratch, "variables", "variables"), keys)
            with open(os.path.join(scratch, "saved_model.pb"), "wb") as f:
                f.write(saved_model.SerializeToString())

    def _saver_nodes(self) -> set[str]:
        """The nodes of the original Saver: what its save and restore ops depend on, and its name scope."""
        saver = self.meta_graph.saver_def
        roots = [graph_edit.source(n) for n in (saver.restore_op_name, saver.save_tensor_name,
                                                saver.filename_tensor_name) if n]
        if not roots:
            return set()
        scope = roots[0].rsplit("/", 1)[0] + "/" if "/" in roots[0] else None
        nodes = _ancestors(self.nodes, roots) | {n for n in self.nodes if scope and n.startswith(scope)}
        return nodes - _ancestors(self.nodes, set(self.nodes) - nodes)

    def _add_lookup(self, graph: tf.Graph, entries: Sequence[tuple[Lookup, object]], version: int,
                    deadline_ms: int) -> dict[str, str]:
        """One lookup node for a step's lookups, in `graph`; returns replaced node -> its rows' tensor."""
        plans = [plan for _, plan in entries]
        dtypes = {plan.layer: self.table_named(plan.layer).dtype for plan in plans}
        config = graph_edit.lookup_config(plans, dtypes, version=version, deadline_ms=deadline_ms)
        ids = [graph.get_tensor_by_name(lookup.ids) for lookup, _ in entries]
        controls = sorted({graph_edit.source(i) for lookup, _ in entries for i in self.nodes[lookup.node].input
                           if i.startswith("^")})
        with (graph.control_dependencies([graph.get_operation_by_name(c) for c in controls]),
              graph.name_scope(f"{entries[0][0].node}/remote_predict")):
            rows = lookup_op(config, ids, name="lookup")
            # EnsureShape keeps the shape that the gather had for shape inference downstream.
            shaped = [r if i.shape.rank is None else tf.ensure_shape(r, i.shape.concatenate([plan.dim]))
                      for r, i, plan in zip(rows, ids, plans, strict=True)]
        return {lookup.node: tensor.name for (lookup, _), tensor in zip(entries, shaped, strict=True)}

    def _write_checkpoint(self, prefix: str, keys: Sequence[str]) -> None:
        """The kept variables' tensors, each whole (a Saver restores a part's slice from a whole tensor)."""
        tensors = [self.bundle.read(key) for key in keys]
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=list(keys), shape_and_slices=[""] * len(keys), tensors=tensors)


def matching_strategies(ids: np.ndarray, part: np.ndarray, local: np.ndarray, parts: Sequence[Part]) -> set[str]:
    """The strategies ("div", "mod") under which each id is row `local` of part `part`, over these parts."""
    ids, part, local = (np.asarray(a, np.int64) for a in (ids, part, local))
    sizes = np.array([p.rows for p in parts], np.int64)
    offsets = np.array([p.offset for p in parts], np.int64)
    found = set()
    div_part = np.searchsorted(offsets + sizes, ids, side="right")
    if np.array_equal(part, div_part) and np.array_equal(local, ids - offsets[np.minimum(div_part, len(parts) - 1)]):
        found.add("div")
    count = len(parts)
    if np.array_equal(part, ids % count) and np.array_equal(local, ids // count) and (local < sizes[ids % count]).all():
        found.add("mod")
    return found


def _tensor_names(info: meta_graph_pb2.TensorInfo) -> list[str]:
    kind = info.WhichOneof("encoding")
    if kind == "name":
        return [info.name]
    if kind == "coo_sparse":
        sparse = info.coo_sparse
        return [sparse.values_tensor_name, sparse.indices_tensor_name, sparse.dense_shape_tensor_name]
    if kind == "composite_tensor":
        return [name for component in info.composite_tensor.components for name in _tensor_names(component)]
    return []


def _parts(variables: Sequence[variable_pb2.VariableDef], shape: tuple[int, ...]) -> list[Part] | None:
    """The variables holding a tensor's rows, in row order; None unless they are row ranges covering it."""
    parts = []
    for variable in variables:
        node = graph_edit.source(variable.variable_name)
        if not variable.HasField("save_slice_info_def"):
            parts.append(Part(node, 0, shape[0]))
            continue
        info = variable.save_slice_info_def
        if list(info.var_offset[1:]) != [0] * (len(shape) - 1) or tuple(info.var_shape[1:]) != shape[1:]:
            return None
        parts.append(Part(node, info.var_offset[0], info.var_shape[0]))
    parts.sort(key=lambda p: p.offset)
    covered = 0
    for part in parts:
        if part.offset != covered:
            return None
        covered += part.rows
    return parts if covered == shape[0] else None


def _ancestors(nodes: dict[str, node_def_pb2.NodeDef], roots: Iterable[str], stop: str | None = None) -> set[str]:
    """`roots` and every node they depend on (data or control), not looking past `stop`."""
    found, stack = set(), [r for r in roots if r in nodes]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        found.add(name)
        if name != stop:
            stack.extend(s for s in (graph_edit.source(i) for i in nodes[name].input) if s in nodes and s not in found)
    return found


def _named_nodes(meta_graph: meta_graph_pb2.MetaGraphDef) -> set[str]:
    """Nodes the meta graph names outside its GraphDef: signatures, collections, variables, assets."""
    names = set()
    for signature in meta_graph.signature_def.values():
        for info in [*signature.inputs.values(), *signature.outputs.values()]:
            names.update(graph_edit.source(n) for n in _tensor_names(info))
    for key, collection in meta_graph.collection_def.items():
        names.update(graph_edit.source(n) for n in collection.node_list.value)
        if key in VARIABLE_COLLECTIONS:
            for blob in collection.bytes_list.value:
                variable = variable_pb2.VariableDef.FromString(blob)
                names.update(graph_edit.source(n) for n in (variable.variable_name, variable.initializer_name,
                                                           variable.snapshot_name, variable.initial_value_name) if n)
    for asset in meta_graph.asset_file_def:
        names.add(graph_edit.source(asset.tensor_info.name))
    return names


def _without(graph_def: graph_pb2.GraphDef, removed: set[str]) -> graph_pb2.GraphDef:
    kept = graph_pb2.GraphDef()
    kept.CopyFrom(graph_def)
    del kept.node[:]
    kept.node.extend(n for n in graph_def.node if n.name not in removed)
    return kept


def _unused(graph_def: graph_pb2.GraphDef, candidates: set[str], protected: set[str]) -> set[str]:
    """The candidates that nothing uses any more (repeatedly: removing one may free its inputs)."""
    users: dict[str, set[str]] = {}
    for node in graph_def.node:
        for i in node.input:
            users.setdefault(graph_edit.source(i), set()).add(node.name)
    inputs = {n.name: {graph_edit.source(i) for i in n.input} for n in graph_def.node}
    removed: set[str] = set()
    stack = [n for n in candidates if n in inputs and n not in protected]
    while stack:
        name = stack.pop()
        if name in removed or users.get(name, set()) - removed:
            continue
        removed.add(name)
        stack.extend(i for i in inputs[name] if i in candidates and i not in protected and i not in removed)
    return removed


def _replace_with_identities(graph_def: graph_pb2.GraphDef, rows_of: dict[str, str],
                             dtypes: dict[str, tf.DType]) -> None:
    """Each replaced node keeps its name for its consumers and becomes an Identity of its new rows."""
    for node in graph_def.node:
        if node.name in rows_of:
            for name in list(node.attr):
                if name != "_output_shapes":  # e.g. `_class` would colocate it with the table it no longer reads
                    del node.attr[name]
            node.op = "Identity"
            node.ClearField("device")
            del node.input[:]
            node.input.append(rows_of[node.name])
            node.attr["T"].type = dtypes[node.name].as_datatype_enum


def _drop_variables(meta_graph: meta_graph_pb2.MetaGraphDef, nodes: set[str]) -> None:
    """Take the sharded tables' variables out of the variable collections: nothing restores them now."""
    for key in VARIABLE_COLLECTIONS:
        if key not in meta_graph.collection_def:
            continue
        values = meta_graph.collection_def[key].bytes_list.value
        kept = [b for b in values
                if graph_edit.source(variable_pb2.VariableDef.FromString(b).variable_name) not in nodes]
        del values[:]
        values.extend(kept)

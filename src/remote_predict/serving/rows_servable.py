"""Lookup shards answered straight from their rows: numpy on the checkpoint's own bytes, no Session.

A shard that `remote-predict split` writes is a SavedModel whose only work is `tf.gather(table, ids)`.
Run in a TensorFlow Session, each call pays for the Session (feeds, an executor step, fetches) and the
process holds its own copy of every table. Here the table is the checkpoint itself, memory-mapped: the
rows are read by `numpy.take` from the page cache, which every process serving the same files shares,
so a shard server's memory is its Python process plus the pages its lookups touch.

Only graphs that do exactly this are taken (`plan`): every signature output a `GatherV2` (axis 0, no
batch dims) of a variable restored whole from the checkpoint by the SavedModel's saver, by a
placeholder that is an input of that signature; and no init or main op. Anything else, or a checkpoint
whose tensor is not stored as row ranges, loads in a Session as any other model. The answers, and the
errors (`indices[i] = v is not in [0, n)`, with the node named as TensorFlow names it), are the
Session's, byte for byte (`tests/test_split.py` compares both paths).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from remote_predict.checkpoint_bundle import Bundle
from remote_predict.errors import invalid_argument
from remote_predict.serving.servable import Signature, signature_or_fail, tensor_specs

_READ_STEP = 8 << 20  # bytes per read while a shard loads its rows into the page cache
_INIT_COLLECTIONS = ("saved_model_main_op", "legacy_init_op", "table_initializer", "saved_model_assets")


def _read_into_page_cache(path: str, offset: int, length: int) -> None:
    """Read a table's bytes once at load, so that they are in the page cache when the shard serves.

    Why: a memory-mapped row not yet in the page cache costs a disk read at its first lookup; an 8 GiB
    table served cold answered at a p50 of 30 ms instead of a few. Read at load, the rows are in memory
    (shared by every process serving the files, and given back under memory pressure, unlike a private
    copy). The bytes are read, not only advised: posix_fadvise(WILLNEED) starts reads without waiting and
    Linux caps each call at the device's read-ahead window (128 KiB on many disks), so how much of a table
    it brought in depended on the machine. Reading waits for the disk as a Session's restore of the same
    bytes would, through one reused buffer."""
    buffer = memoryview(bytearray(min(_READ_STEP, length)))
    with open(path, "rb", buffering=0) as file:
        if hasattr(os, "posix_fadvise"):  # a larger read-ahead window for the sequential pass
            os.posix_fadvise(file.fileno(), offset, length, os.POSIX_FADV_SEQUENTIAL)
        file.seek(offset)
        remaining = length
        while remaining:
            read = file.readinto(buffer[:min(remaining, len(buffer))])
            if not read:
                return  # shorter than the checkpoint says: mapping the range refuses it with the reason
            remaining -= read


ROW_BY_ROW = 32  # up to this many ids, copying rows one by one beats grouping them by range


@dataclass(frozen=True)
class _Gather:
    node: str  # the gather node's name, for error messages
    variable: str  # the variable it reads
    ids: str  # the signature input alias of its indices


class RowStore:
    """A table's rows as the checkpoint stores them: one memory map per row range (slice).

    A split writes a shard's table in slices of 8 MiB, so a lookup's ids usually fall in several ranges.
    Rows are read through plain ndarray views of the maps (a `np.memmap` result costs a subclass
    finalizer on every take); a few ids are read row by row, more are grouped by range with one sort,
    never with a pass over the ids per range.
    """

    def __init__(self, ranges: Sequence[tuple[int, np.ndarray]]):
        self.arrays = [np.asarray(rows) for _, rows in ranges]  # views: each keeps its map (and file) open
        self.starts = np.array([start for start, _ in ranges], np.int64)
        self.rows = sum(len(a) for a in self.arrays)
        self.row_shape, self.dtype = self.arrays[0].shape[1:], self.arrays[0].dtype

    def take(self, ids: np.ndarray) -> np.ndarray:
        """`table[ids]`; ids must already be in range."""
        if len(self.arrays) == 1:
            return self.arrays[0].take(ids, axis=0)
        flat = ids.reshape(-1)
        slot = np.searchsorted(self.starts, flat, side="right") - 1
        local = flat - self.starts[slot]
        out = np.empty((len(flat), *self.row_shape), self.dtype)
        if len(flat) <= ROW_BY_ROW:
            arrays = self.arrays
            for i, (index, row) in enumerate(zip(slot.tolist(), local.tolist(), strict=True)):
                out[i] = arrays[index][row]
        else:
            order = np.argsort(slot, kind="stable")
            bounds = np.searchsorted(slot[order], np.arange(len(self.arrays) + 1))
            for index in np.flatnonzero(np.diff(bounds)).tolist():
                where = order[bounds[index]:bounds[index + 1]]
                out[where] = self.arrays[index].take(local[where], axis=0)
        return out.reshape((*ids.shape, *self.row_shape))


def _node_input(name: str) -> str:
    return name.lstrip("^").split(":")[0]


def _const(node: node_def_pb2.NodeDef | None):
    if node is None or node.op != "Const":
        return None
    return tf.make_ndarray(node.attr["value"].tensor)


def _restored_keys(graph: graph_pb2.GraphDef, nodes: Mapping[str, node_def_pb2.NodeDef]) -> dict[str, str]:
    """Variable -> the checkpoint key a saver restores it from, whole (TF1 `Saver`: RestoreV2 then Assign)."""
    keys = {}
    for node in graph.node:
        if node.op != "Assign" or len(node.input) < 2:
            continue
        source, _, index = node.input[1].partition(":")
        restore = nodes.get(source)
        if restore is None or restore.op != "RestoreV2":
            continue
        names = _const(nodes.get(_node_input(restore.input[1])))
        slices = _const(nodes.get(_node_input(restore.input[2])))
        position = int(index or 0)
        if names is None or slices is None or slices.reshape(-1)[position] != b"":
            continue
        keys[_node_input(node.input[0])] = names.reshape(-1)[position].decode("utf-8")
    return keys


def plan(meta_graph: meta_graph_pb2.MetaGraphDef) -> dict[str, dict[str, _Gather]] | None:
    """signature -> output alias -> the gather that computes it, if this graph only gathers rows; else None."""
    graph = meta_graph.graph_def
    if graph.library.function or any(c in meta_graph.collection_def for c in _INIT_COLLECTIONS):
        return None
    nodes = {n.name: n for n in graph.node}
    restored = _restored_keys(graph, nodes)
    found: dict[str, dict[str, _Gather]] = {}
    for key, signature in meta_graph.signature_def.items():
        inputs = {info.name.split(":")[0]: alias for alias, info in signature.inputs.items()}
        if not signature.outputs or any(nodes.get(n, node_def_pb2.NodeDef()).op != "Placeholder" for n in inputs):
            return None
        outputs = {}
        for alias, info in signature.outputs.items():
            name, _, port = info.name.partition(":")
            gather = nodes.get(name)
            if gather is None or gather.op != "GatherV2" or port not in ("", "0") or len(gather.input) != 3:
                return None
            if gather.attr["batch_dims"].i if "batch_dims" in gather.attr else 0:
                return None
            axis = _const(nodes.get(_node_input(gather.input[2])))
            params = nodes.get(_node_input(gather.input[0]))
            while params is not None and params.op == "Identity":
                params = nodes.get(_node_input(params.input[0]))
            ids = _node_input(gather.input[1])
            if axis is None or axis.size != 1 or int(axis) != 0 or params is None or params.op != "VariableV2" \
                    or params.name not in restored or ids not in inputs:
                return None
            outputs[alias] = _Gather(gather.name, params.name, inputs[ids])
        found[key] = outputs
    return found


class RowsServable:
    """A loaded lookup shard; the same interface as `servable.Servable`."""

    remote_ops = 0

    def __init__(self, name: str, version: int, path: str, meta_graph: meta_graph_pb2.MetaGraphDef,
                 gathers: dict[str, dict[str, _Gather]]):
        self.name, self.version, self.path = name, version, path
        self.signature_defs = dict(meta_graph.signature_def)
        self.signatures = {key: Signature(key, sig.method_name, tensor_specs(sig.inputs), tensor_specs(sig.outputs))
                           for key, sig in self.signature_defs.items()}
        self._gathers = gathers
        nodes = {n.name: n for n in meta_graph.graph_def.node}
        keys = _restored_keys(meta_graph.graph_def, nodes)
        bundle = Bundle(os.path.join(path, "variables", "variables"))
        self._tables: dict[str, RowStore] = {}
        for variable in {g.variable for outputs in gathers.values() for g in outputs.values()}:
            node = nodes[variable]
            shape = tuple(d.size for d in node.attr["shape"].shape.dim)
            key = keys[variable]
            if bundle.shape(key) != shape or bundle.dtype(key).as_datatype_enum != node.attr["dtype"].type:
                raise ValueError(f"checkpoint tensor {key!r} does not match variable {variable!r}")
            stored_ranges = [(start, stored) for start, stored in bundle.row_ranges(key) if stored.shape[0]]
            for _, stored in stored_ranges:
                length = int(np.prod(stored.shape)) * np.dtype(stored.dtype).itemsize
                _read_into_page_cache(stored.path, stored.offset, length)
            ranges = [(start, np.memmap(stored.path, dtype=stored.dtype, mode="r", offset=stored.offset,
                                        shape=stored.shape)) for start, stored in stored_ranges]
            if not ranges:
                ranges = [(0, np.zeros(shape, np.dtype(bundle.dtype(key).as_numpy_dtype)))]
            self._tables[variable] = RowStore(ranges)

    def signature(self, key: str) -> Signature:
        return signature_or_fail(self.signatures, key)

    def run(self, signature: Signature, inputs: Mapping[str, np.ndarray], output_aliases: Sequence[str],
            timeout_ms: int = 0) -> dict[str, np.ndarray]:
        gathers = self._gathers[signature.key]
        outputs = {}
        for alias in output_aliases:
            gather = gathers[alias]
            table = self._tables[gather.variable]
            ids = np.asarray(inputs[gather.ids]).astype(np.int64, copy=False)
            bad = (ids < 0) | (ids >= table.rows)
            if bad.any():
                first = int(np.argmax(bad.reshape(-1)))
                where = ",".join(str(int(i)) for i in np.unravel_index(first, ids.shape)) if ids.ndim else ""
                raise invalid_argument(f"indices[{where}] = {ids.reshape(-1)[first]} is not in [0, {table.rows})"
                                       f"\n\t [[{{{{node {gather.node}}}}}]]")
            outputs[alias] = table.take(ids)
        return outputs

    def close(self) -> None:
        self._tables.clear()


def try_load(name: str, version: int, path: str, meta_graph: meta_graph_pb2.MetaGraphDef) -> RowsServable | None:
    """A RowsServable if this SavedModel only gathers rows from tables stored as row ranges, else None."""
    gathers = plan(meta_graph)
    if gathers is None:
        return None
    try:
        return RowsServable(name, version, path, meta_graph, gathers)
    except (ValueError, KeyError, OSError):
        return None  # not stored so that rows can be read directly: the Session path will say what is wrong

"""Make SavedModels with RemotePredict ops loadable: ours run as they are, TF Serving's are translated.

TF Serving's C++ op (`TfServingRemotePredict`, exported with its op library) is unknown to a stock
TensorFlow, so its nodes are rewritten, before import, into our EagerPyFunc form with the same inputs,
outputs and attributes. Both ops have the same input order and output indices
(status_code, status_error_message, output_tensors...), so edges stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tensorflow.core.framework import attr_value_pb2, function_pb2, node_def_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from remote_predict.op import tokens
from remote_predict.op.config import OpConfig

TFS_OP = "TfServingRemotePredict"
PY_FUNC_OP = "EagerPyFunc"
# TF Serving's op defaults (remote_predict_op.cc).
_TFS_DEFAULTS = {
    "target_address": "",
    "model_name": "",
    "model_version": -1,
    "fail_op_on_rpc_error": True,
    "max_rpc_deadline_millis": 30000,
    "signature_name": "serving_default",
}
_TFS_OUTPUT_ARGS = ("status_code", "status_error_message", "output_tensors")


def _attr(node: node_def_pb2.NodeDef, name: str):
    if name not in node.attr:
        return _TFS_DEFAULTS[name]
    value = node.attr[name]
    kind = value.WhichOneof("value")
    raw = getattr(value, kind)
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def translate_node(node: node_def_pb2.NodeDef) -> None:
    """Rewrite one TfServingRemotePredict node into our op, in place."""
    input_types = list(node.attr["T"].list.type) if "T" in node.attr else []
    output_types = list(node.attr["output_types"].list.type) if "output_types" in node.attr else []
    config = OpConfig(
        target_address=_attr(node, "target_address"),
        model_name=_attr(node, "model_name"),
        model_version=int(_attr(node, "model_version")),
        max_rpc_deadline_millis=int(_attr(node, "max_rpc_deadline_millis")),
        signature_name=_attr(node, "signature_name"),
        fail_op_on_rpc_error=bool(_attr(node, "fail_op_on_rpc_error")),
        output_types=tuple(output_types),
    )
    node.op = PY_FUNC_OP
    node.ClearField("attr")
    node.attr["token"].CopyFrom(attr_value_pb2.AttrValue(s=config.to_token().encode("utf-8")))
    node.attr["is_async"].CopyFrom(attr_value_pb2.AttrValue(b=False))
    node.attr["Tin"].list.type.extend([types_pb2.DT_STRING, *input_types, types_pb2.DT_STRING])
    node.attr["Tout"].list.type.extend([types_pb2.DT_INT32, types_pb2.DT_STRING, *output_types])


def _rewrite_function_refs(function: function_pb2.FunctionDef, names: set[str]) -> None:
    """Inside a function body outputs are named `node:arg:index`; EagerPyFunc has one list `output`."""

    def fix(ref: str) -> str:
        control = ref.startswith("^")
        parts = ref.lstrip("^").split(":")
        if control or len(parts) != 3 or parts[0] not in names or parts[1] not in _TFS_OUTPUT_ARGS:
            return ref
        offset = {"status_code": 0, "status_error_message": 1, "output_tensors": 2}[parts[1]]
        return f"{parts[0]}:output:{offset + int(parts[2])}"

    for node in function.node_def:
        node.input[:] = [fix(i) for i in node.input]
    for key, ref in list(function.ret.items()):
        function.ret[key] = fix(ref)


def _token(node: node_def_pb2.NodeDef) -> str | None:
    if node.op != PY_FUNC_OP or "token" not in node.attr:
        return None
    token = node.attr["token"].s.decode("utf-8", "replace")
    return token if tokens.is_ours(token) else None


@dataclass
class RemoteOps:
    """What a graph holds of ours: RemotePredict ops, and sharded-table lookups (each a whole fan-out)."""

    calls: int = 0
    lookups: int = 0

    @property
    def total(self) -> int:
        return self.calls + self.lookups


def _scan(nodes: Iterable[node_def_pb2.NodeDef], found: RemoteOps, runtime_id: int | None
          ) -> list[node_def_pb2.NodeDef]:
    """TF Serving's nodes to translate; counts ours into `found` and binds them to `runtime_id`."""
    tfs = []
    for node in nodes:
        if node.op == TFS_OP:
            tfs.append(node)
            continue
        token = _token(node)
        if token is None:
            continue
        if tokens.split(token)[0] == tokens.LOOKUP:
            found.lookups += 1
        else:
            found.calls += 1
        if runtime_id is not None:
            node.attr["token"].s = tokens.bind(token, runtime_id).encode("utf-8")
    return tfs


def prepare_meta_graph(meta_graph: meta_graph_pb2.MetaGraphDef, runtime_id: int | None = None) -> RemoteOps:
    """Translate TF Serving's nodes and bind ours to `runtime_id`, in place; returns what the graph holds."""
    found = RemoteOps()
    graph = meta_graph.graph_def
    tfs_nodes = _scan(graph.node, found, runtime_id)
    for node in tfs_nodes:
        translate_node(node)
        _bind(node, runtime_id)
    found.calls += len(tfs_nodes)
    for function in graph.library.function:
        nodes = _scan(function.node_def, found, runtime_id)
        for node in nodes:
            translate_node(node)
            _bind(node, runtime_id)
        if nodes:
            _rewrite_function_refs(function, {n.name for n in nodes})
        found.calls += len(nodes)
    if tfs_nodes or any(op.name == TFS_OP for op in meta_graph.meta_info_def.stripped_op_list.op):
        ops = [op for op in meta_graph.meta_info_def.stripped_op_list.op if op.name != TFS_OP]
        del meta_graph.meta_info_def.stripped_op_list.op[:]
        meta_graph.meta_info_def.stripped_op_list.op.extend(ops)
    return found


def _bind(node: node_def_pb2.NodeDef, runtime_id: int | None) -> None:
    if runtime_id is not None:
        node.attr["token"].s = tokens.bind(node.attr["token"].s.decode("utf-8"), runtime_id).encode("utf-8")

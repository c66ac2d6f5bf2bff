"""A sharded-table lookup: the one op a split master runs for every step of lookups it makes.

A split master replaces each gather from a sharded table with this op. Gathers whose ids do not depend
on each other (a recommender's user and item lookups) become one node, so a request crosses into Python
once per step, not once per table or shard, and each shard server gets one call per request, whatever
the number of tables it holds. In one pass, in numpy:

1. each input's ids are checked (negative ids counted from the end first where the model did that,
   as Keras' Embedding), with the gather's own INVALID_ARGUMENT message: `indices[i,j] = v is not in
   [0, n)`;
2. per table, the distinct ids (all inputs of that table together) are found once;
3. each shard gets the ids it holds, as local row numbers (`partition`), one tensor per table, in one
   Predict (`lookup` signature) to its server; every shard is called at once (`fanout`); the lookups
   of requests in flight together are merged into one such fan-out (`coalesce`);
4. rows come back in the order asked and are stitched into each input's shape.

With `--remote_predict_cache_mib`, rows a cache holds (`row_cache`) are not asked for at all.

The answer equals `tf.gather(table, ids)` bit for bit: the rows are the table's own bytes, never computed.

The time a request waits for its rows counts in its `remote` stage. With tracing on, each request gets a
`lookup` span (child of its `run`). The shard calls of a batch are made by one request, its leader: they
are CLIENT spans (`fanout`) under the leader's `lookup` span, which links to the `lookup` span of every
other request of the batch, and each of those links back to the leader's; so a request whose rows came in
another request's batch shows it, and the batch shows every request it served.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2

from remote_predict import tensor_codec
from remote_predict import tracing as tracing_attrs
from remote_predict.errors import Code, ServingError
from remote_predict.op import fanout, pyfunc_registry, request_context, tokens
from remote_predict.op.coalesce import Coalescer
from remote_predict.op.errors import RemotePredictError
from remote_predict.op.partition import STRATEGIES, Partition
from remote_predict.op.row_cache import RowCache
from remote_predict.op.runtime import CallRecord, OpRuntime, runtime_for

LOOKUP_SIGNATURE = "lookup"


@dataclass(frozen=True)
class TableSpec:
    name: str  # the alias of its ids and rows in a shard's `lookup` signature
    rows: int
    dim: int
    dtype: int  # DataType of the rows
    strategy: str  # "mod" or "div", as tf.nn.embedding_lookup
    wrap_negative: bool = False  # count negative ids from the end first (Keras' Embedding does)


@dataclass(frozen=True)
class LookupConfig:
    tables: tuple[TableSpec, ...]
    inputs: tuple[int, ...]  # for each input of the op, the index of its table (a table may be read twice)
    targets: tuple[str, ...]  # shard k's server
    models: tuple[str, ...]  # shard k's model on it
    version: int  # the shard models' version (a master of version N calls shards of version N)
    deadline_ms: int

    def __post_init__(self) -> None:
        if not self.tables or not self.inputs or not self.targets or len(self.targets) != len(self.models):
            raise ValueError("a lookup needs tables, inputs, and one model per shard target")
        if any(not 0 <= i < len(self.tables) for i in self.inputs):
            raise ValueError("lookup inputs must name tables of the lookup")
        if len({t.name for t in self.tables}) != len(self.tables):
            raise ValueError("lookup tables must have distinct names")
        for table in self.tables:
            if table.strategy not in STRATEGIES or table.rows < 1 or table.dim < 1:
                raise ValueError(f"lookup table {table.name!r} is malformed")
            if table.dtype not in types_pb2.DataType.values() or table.dtype == types_pb2.DT_STRING:
                raise ValueError(f"lookup table {table.name!r} has an unsupported dtype")
        if self.deadline_ms <= 0:
            raise ValueError("deadline_ms must be positive")

    def to_token(self) -> str:
        return tokens.dump(tokens.LOOKUP, asdict(self))

    @classmethod
    def from_token(cls, token: str) -> LookupConfig:
        """Parse a token (bound or not); ValueError for anything but exactly this schema."""
        fields = tokens.load(token, tokens.LOOKUP, cls.__dataclass_fields__, "lookup")
        try:
            tables = fields.pop("tables")
            if not isinstance(tables, list):
                raise ValueError("tables must be a list")
            specs = []
            for table in tables:
                if not isinstance(table, dict) or set(table) != set(TableSpec.__dataclass_fields__):
                    raise ValueError(f"a table needs keys {sorted(TableSpec.__dataclass_fields__)}")
                specs.append(TableSpec(**table))
            for name in ("inputs", "targets", "models"):
                if not isinstance(fields[name], list):
                    raise ValueError(f"{name} must be a list")
                fields[name] = tuple(fields[name])
            return cls(tables=tuple(specs), **fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"malformed lookup token: {e}") from None

    @property
    def output_dtypes(self) -> list[int]:
        return [self.tables[i].dtype for i in self.inputs]


def _checked_ids(table: TableSpec, ids: np.ndarray) -> np.ndarray:
    """The ids as int64 row numbers, or the gather's own error for the first one out of range."""
    flat = ids.reshape(-1).astype(np.int64, copy=False)
    if table.wrap_negative:
        flat = np.where(flat < 0, flat + table.rows, flat)
    bad = (flat < 0) | (flat >= table.rows)
    if bad.any():
        first = int(np.argmax(bad))
        where = ",".join(str(int(i)) for i in np.unravel_index(first, ids.shape)) if ids.ndim else ""
        raise ServingError(Code.INVALID_ARGUMENT, f"indices[{where}] = {flat[first]} is not in [0, {table.rows})")
    return flat


class _Table:
    """One table's part of a batch of lookups: its distinct ids, those the cache has, where the others
    live, and the rows as they arrive."""

    def __init__(self, spec: TableSpec, shards: int, ids: np.ndarray, cache: RowCache | None):
        self.spec = spec
        self.partition = Partition(spec.strategy, spec.rows, shards)
        self.unique, self.inverse = np.unique(ids, return_inverse=True)
        self.rows = np.empty((len(self.unique), spec.dim), tensor_codec.numpy_dtype(spec.dtype))
        self.cache = cache
        if cache is None:
            self.missing = np.arange(len(self.unique))
        else:
            self.missing = np.flatnonzero(~cache.take(self.unique, self.rows))
        self.shard_of, self.local = self.partition.assign(self.unique[self.missing])

    def ids_for(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions among the distinct ids, local row numbers) of the ids shard `shard` must answer."""
        where = self.shard_of == shard
        return self.missing[where], self.local[where]

    def admit(self) -> None:
        if self.cache is not None:
            self.cache.admit(self.unique[self.missing], self.rows[self.missing])


@dataclass
class _Request:
    """A request's lookups, ready to batch: per table, the ids of all its inputs of that table, in order."""

    ids: dict[int, np.ndarray]
    deadline: float
    span_context: object | None = None  # its `lookup` span (tracing on)
    leader_span_context: object | None = None  # the `lookup` span of the request that made its batch's calls


class LookupKernel:
    """The Python body of a lookup node: ids of each input -> rows of each input.

    Concurrent requests' lookups are merged into one fan-out (`coalesce`): each shard server then gets one
    call per batch, not one per request. A request alone waits for nothing.
    """

    def __init__(self, config: LookupConfig, runtime_id: int | None = None):
        self.config = config
        self.runtime_id = runtime_id
        self.output_dtypes = config.output_dtypes
        self.coalescer: Coalescer[_Request, dict[int, np.ndarray]] = Coalescer()

    def __call__(self, *inputs):
        try:
            return self.lookup([np.asarray(t._numpy()) for t in inputs], runtime_for(self.runtime_id))
        except ServingError as e:
            raise RemotePredictError(e.code, e.message) from None

    def lookup(self, inputs: Sequence[np.ndarray], runtime: OpRuntime) -> list[np.ndarray]:
        config = self.config
        flat = [_checked_ids(config.tables[t], ids) for t, ids in zip(config.inputs, inputs, strict=True)]
        by_table = {}
        for t in sorted(set(config.inputs)):
            mine = [f for f, i in zip(flat, config.inputs, strict=True) if i == t]
            by_table[t] = mine[0] if len(mine) == 1 else np.concatenate(mine)
        timeout = request_context.call_timeout(config.deadline_ms / 1000)
        if timeout <= 0:
            raise ServingError(Code.DEADLINE_EXCEEDED, "the request's own deadline has passed; not calling the shards")
        request = _Request(by_table, time.monotonic() + timeout)
        started = time.perf_counter()
        try:
            if runtime.tracing is None:
                rows = self.coalescer.run(request, lambda batch: self._fetch(batch, runtime), request.deadline)
            else:
                rows = self._traced_lookup(request, runtime)
        finally:
            stages = request_context.current().stages
            if stages is not None:
                stages.add_remote(time.perf_counter() - started)
        outputs, offsets = [], dict.fromkeys(by_table, 0)
        for t, ids, f in zip(config.inputs, inputs, flat, strict=True):
            outputs.append(rows[t][offsets[t]:offsets[t] + len(f)].reshape((*ids.shape, config.tables[t].dim)))
            offsets[t] += len(f)
        return outputs

    def _traced_lookup(self, request: _Request, runtime: OpRuntime) -> dict[int, np.ndarray]:
        tracing = runtime.tracing
        span = tracing.start("lookup", attributes={tracing_attrs.MODEL: self.config.models[0].rsplit("_shard_", 1)[0]})
        request.span_context = span.get_span_context()
        code, message = Code.OK, ""
        try:
            with tracing.current(span):
                return self.coalescer.run(request, lambda batch: self._fetch(batch, runtime), request.deadline)
        except ServingError as e:
            code, message = e.code, e.message
            raise
        except BaseException as e:
            code, message = Code.INTERNAL, f"{type(e).__name__}: {e}"
            raise
        finally:
            leader = request.leader_span_context
            if leader is not None and leader != request.span_context:
                span.add_link(leader)
            tracing.end(span, code, message)

    def _fetch(self, batch: Sequence[_Request], runtime: OpRuntime) -> list[dict[int, np.ndarray]]:
        """Rows for every request of the batch: each distinct id asked of its shard once, all shards at once
        (within the latest deadline of the batch: each request's own is kept by its wait)."""
        config = self.config
        tracing = runtime.tracing
        if tracing is not None:  # this thread's current span is the leader's `lookup` span
            leader = tracing.current_span_context()
            span = tracing.current_span()
            span.set_attribute(tracing_attrs.LOOKUP_REQUESTS, len(batch))
            for other in batch:
                other.leader_span_context = leader
                if other.span_context is not None and other.span_context != leader:
                    span.add_link(other.span_context)
        shards = len(config.targets)
        deadline = max(request.deadline for request in batch)
        tables = {}
        for t in batch[0].ids:
            spec = config.tables[t]
            dtype = tensor_codec.numpy_dtype(spec.dtype)
            cache = runtime.row_caches.get((config.models, config.version, spec.name), spec.dim, dtype,
                                           spec.rows * spec.dim * dtype.itemsize)
            ids = batch[0].ids[t] if len(batch) == 1 else np.concatenate([request.ids[t] for request in batch])
            tables[t] = _Table(spec, shards, ids, cache)
        calls, placements = [], []
        for shard in range(shards):
            ids, where = {}, {}
            for t, table in tables.items():
                where[t], ids[table.spec.name] = table.ids_for(shard)
            if not any(len(v) for v in ids.values()):
                continue  # the cache had every row this shard holds
            request = predict_pb2.PredictRequest()
            request.model_spec.name = config.models[shard]
            request.model_spec.signature_name = LOOKUP_SIGNATURE
            if config.version >= 0:
                request.model_spec.version.value = config.version
            request.output_filter.extend(ids)
            calls.append(fanout.Call(config.targets[shard], request, ids, shard=shard))
            placements.append((shard, where))
        started = time.perf_counter()
        results = fanout.predict_many(runtime, calls, deadline - time.monotonic()) if calls else []
        for call, result, (shard, where) in zip(calls, results, placements, strict=True):
            runtime.report(CallRecord(call.target, call.request.model_spec.name, result.code, result.message,
                                      time.perf_counter() - started))
            if result.code != Code.OK:
                raise ServingError(result.code, f"lookup on shard {shard} ({call.request.model_spec.name} at "
                                                f"{call.target}): {result.message}")
            for t, table in tables.items():
                rows = result.outputs.get(table.spec.name)
                if rows is None or rows.shape != (len(where[t]), table.spec.dim) or rows.dtype != table.rows.dtype:
                    got = "nothing" if rows is None else f"{rows.dtype} rows of shape {rows.shape}"
                    raise ServingError(Code.INTERNAL, f"shard {shard} ({call.target}) answered {got} for "
                                                      f"{len(where[t])} ids of table {table.spec.name!r}")
                table.rows[where[t]] = rows
        answers: list[dict[int, np.ndarray]] = [{} for _ in batch]
        for t, table in tables.items():
            table.admit()
            offset = 0
            for answer, request in zip(answers, batch, strict=True):
                count = len(request.ids[t])
                answer[t] = table.rows[table.inverse[offset:offset + count]]
                offset += count
        return answers


def lookup_op(config: LookupConfig, ids: Sequence, name: str | None = None) -> list:
    """The graph node (or, eagerly, the result): one rows tensor per ids tensor, shaped ids.shape + [dim]."""
    import tensorflow as tf

    rows = pyfunc_registry.eager_py_func(list(ids), config.to_token(),
                                         [tf.as_dtype(d) for d in config.output_dtypes], name=name)
    for tensor, t, i in zip(rows, config.inputs, ids, strict=True):
        if isinstance(tensor, tf.Tensor) and not tf.executing_eagerly():
            tensor.set_shape(tf.TensorShape(i.shape).concatenate([config.tables[t].dim]))
    return rows


def _resolve(token: str):
    import tensorflow as tf

    _, runtime_id, _ = tokens.split(token)
    kernel = LookupKernel(LookupConfig.from_token(token), runtime_id)
    return kernel, [tf.as_dtype(d) for d in kernel.output_dtypes]


pyfunc_registry.register_resolver(tokens.LOOKUP, _resolve)

"""An OTLP trace receiver for tests: a gRPC server of OpenTelemetry's own TraceService (the real wire
protocol, from the `opentelemetry-proto` package), on a loopback port, keeping every span it is sent."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from helpers import wait_until

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
INTERNAL = trace_pb2.Span.SPAN_KIND_INTERNAL
ERROR = trace_pb2.Status.STATUS_CODE_ERROR


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    name: str
    kind: int
    attributes: dict
    status: int
    status_message: str
    links: list[tuple[str, str]]  # (trace id, span id)
    start_ns: int
    end_ns: int

    def __repr__(self) -> str:
        return f"<{self.service} {self.name} {self.span_id} parent={self.parent_id or '-'}>"


class OtlpReceiver:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = trace_service_pb2_grpc.TraceServiceServicer()
        handler.Export = self._export
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(handler, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _export(self, request: trace_service_pb2.ExportTraceServiceRequest, context):
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(Span(
                        service=attributes.get("service.name", ""), trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex(), name=span.name,
                        kind=span.kind, attributes={a.key: _value(a.value) for a in span.attributes},
                        status=span.status.code, status_message=span.status.message,
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano))
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for(self, condition: Callable[[list[Span]], bool], what: str, timeout: float = 30) -> list[Span]:
        wait_until(lambda: condition(self.spans()), timeout, what)
        return self.spans()

    def stop(self) -> None:
        self.server.stop(0)


def trace_of(spans: list[Span], trace_id: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent_id == parent.span_id and s.trace_id == parent.trace_id]


def tree(spans: list[Span], root: Span | None = None, depth: int = 0) -> str:
    """The trace as an indented tree (the README shows one), children in start order."""
    if root is None:
        roots = sorted((s for s in spans if not s.parent_id or all(p.span_id != s.parent_id for p in spans)),
                       key=lambda s: s.start_ns)
        return "\n".join(tree(spans, r) for r in roots)
    keys = ("remote_predict.protocol", "remote_predict.model.name", "remote_predict.model.version",
            "remote_predict.target", "remote_predict.endpoint", "remote_predict.shard",
            "remote_predict.batch.rows", "remote_predict.lookup.requests", "remote_predict.status_code")
    shown = " ".join(f"{k.split('.', 1)[1]}={root.attributes[k]}" for k in keys if k in root.attributes)
    line = f"{'  ' * depth}{root.name} [{root.service}] {(root.end_ns - root.start_ns) / 1e6:.2f} ms {shown}"
    return "\n".join([line, *(tree(spans, c, depth + 1) for c in sorted(children(spans, root),
                                                                      key=lambda s: s.start_ns))])

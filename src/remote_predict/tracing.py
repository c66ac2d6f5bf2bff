"""One server's OpenTelemetry tracing: the SDK's tracer, an OTLP exporter, W3C trace context in and out.

Why a small facade over OpenTelemetry rather than its global tracer provider: a process may run several
servers (tests do), each with its own service name and exporter, so each server owns one `Tracing` and
hands it to the parts that make spans (its data plane, its batcher, its op runtime). Nothing here is
imported, and no span or context object is made, while tracing is off: those parts hold `None` instead
and test for it once per request.

Everything a span records is OpenTelemetry's own (the SDK's TracerProvider, BatchSpanProcessor,
OTLPSpanExporter, TraceContextTextMapPropagator); this module only decides names of attributes, and how a
span gets its parent:

* a server span continues the W3C `traceparent`/`tracestate` the request carried (gRPC metadata, HTTP
  headers, tcp frame metadata; for an in-process call, the calling client span's), else starts a trace;
* every other span is a child of the current span of the thread (OpenTelemetry's context, a contextvar,
  which a RemotePredict kernel running in the request's thread shares: see op/request_context.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from remote_predict.errors import Code

# Attribute names: ours, under one prefix (OpenTelemetry's semantic conventions have none for model serving).
API = "remote_predict.api"
PROTOCOL = "remote_predict.protocol"
MODEL = "remote_predict.model.name"
VERSION = "remote_predict.model.version"
SIGNATURE = "remote_predict.model.signature"
STATUS_CODE = "remote_predict.status_code"  # canonical code name: OK, NOT_FOUND, ...
TARGET = "remote_predict.target"
ENDPOINT = "remote_predict.endpoint"
REQUEST_BYTES = "remote_predict.request.bytes"
RESPONSE_BYTES = "remote_predict.response.bytes"
SHARD = "remote_predict.shard"
BATCH_ROWS = "remote_predict.batch.rows"
BATCH_REQUESTS = "remote_predict.batch.requests"
LOOKUP_REQUESTS = "remote_predict.lookup.requests"

DEFAULT_SERVICE_NAME = "remote-predict"


@dataclass(frozen=True)
class TracingSettings:
    """What to build. A field left None is taken from the standard OTEL_* environment variables, which
    OpenTelemetry's SDK reads itself (then its defaults: parent-based always-on, http://localhost:4317)."""

    endpoint: str | None = None  # OTLP/gRPC receiver, http://HOST:PORT (plaintext) or https://HOST:PORT (TLS)
    sampling_ratio: float | None = None  # of new traces; a request that carries a parent follows its decision
    service_name: str | None = None


class Tracing:
    """A server's tracer. Thread-safe; `shutdown()` exports what is still queued."""

    def __init__(self, settings: TracingSettings):
        from opentelemetry import context, trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.settings = settings
        self._trace = trace
        self._context = context
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self.SERVER, self.CLIENT, self.INTERNAL = trace.SpanKind.SERVER, trace.SpanKind.CLIENT, trace.SpanKind.INTERNAL
        resource = Resource.create({SERVICE_NAME: settings.service_name} if settings.service_name else {})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        sampler = None if settings.sampling_ratio is None else ParentBased(TraceIdRatioBased(settings.sampling_ratio))
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint)))
        self.tracer = self.provider.get_tracer("remote_predict")
        self.propagator = TraceContextTextMapPropagator()
        self.service_name = str(resource.attributes[SERVICE_NAME])
        # Spans whose times were taken with time.monotonic() (the batcher's) are placed on the wall clock.
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()

    # ------------------------------------------------------------------------------------- spans

    def server_span(self, name: str, carrier: Mapping[str, str] | None, attributes: Mapping[str, object]):
        """A SERVER span continuing the W3C context in `carrier` (a new trace when it holds none)."""
        parent = self.propagator.extract(carrier) if carrier else None
        return self.tracer.start_span(name, context=parent, kind=self.SERVER, attributes=attributes)

    def start(self, name: str, kind=None, attributes: Mapping[str, object] | None = None,
              links: Sequence = (), start_monotonic: float | None = None):
        """A span, child of the thread's current span; `start_monotonic` (time.monotonic()) dates it back.

        Under a request that is not sampled, this is the current (non-recording) span itself: a child would
        not be sampled either (the sampler is parent-based, or decides by trace id alone), and making one
        costs as much as making a recorded span. Calls still send its context on, not sampled, so the
        servers they reach do not sample them either."""
        current = self._trace.get_current_span()
        if not current.is_recording() and current.get_span_context().is_valid:
            return current
        start_time = None if start_monotonic is None else self.wall_ns(start_monotonic)
        return self.tracer.start_span(name, kind=kind or self.INTERNAL, attributes=attributes,
                                      links=[self._trace.Link(c) for c in links], start_time=start_time)

    def current_span(self):
        return self._trace.get_current_span()

    def current_span_context(self):
        return self._trace.get_current_span().get_span_context()

    def attach(self, span) -> object:
        """Make `span` the thread's current span until `detach(token)` (same thread)."""
        return self._context.attach(self._trace.set_span_in_context(span))

    def detach(self, token: object) -> None:
        self._context.detach(token)

    @contextlib.contextmanager
    def current(self, span) -> Iterator[None]:
        token = self.attach(span)
        try:
            yield
        finally:
            self.detach(token)

    def headers(self, span) -> dict[str, str]:
        """The W3C `traceparent` (and `tracestate`) naming `span`, to send on a call it makes."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return carrier

    def end(self, span, code: Code, message: str = "", end_monotonic: float | None = None) -> None:
        """Record the outcome (the canonical code; an error status with its message) and end the span."""
        span.set_attribute(STATUS_CODE, code.name)
        if code != Code.OK:
            span.set_status(self._status(self._error, f"{code.name}: {message}" if message else code.name))
        span.end(end_time=None if end_monotonic is None else self.wall_ns(end_monotonic))

    def wall_ns(self, monotonic_seconds: float) -> int:
        return int(monotonic_seconds * 1e9) + self._wall_offset_ns

    @staticmethod
    def trace_id(span) -> str | None:
        """The span's trace id (32 hex digits) when it is sampled, for exemplars; else None."""
        context = span.get_span_context()
        return f"{context.trace_id:032x}" if context.trace_flags.sampled else None

    def shutdown(self) -> None:
        self.provider.shutdown()

"""What a server records about each request it serves: where its time went (always) and a span (tracing on).

Every front-end (gRPC, REST, tcp, and calls a model of this process makes to a model of it in-process)
wraps the whole of a request, in the thread that does its work, in `Telemetry.serve(api, protocol,
metadata)`. So the span's name, its attributes and its outcome come from this one place, whatever the
protocol: the span is named for TF Serving's method (Predict, Classify, Regress, MultiInference,
GetModelMetadata, GetModelStatus), carries the protocol, the model, version and signature the data plane
resolved (`Served.identify`), and the canonical code the request ended with (an error status with the
message when it failed).

The stage times (decode, queue, run, remote, encode) are summed by what runs in the request's thread into
the request's `StageTimes` (op/request_context.py), and observed once when the request ends, into
`remote_predict_request_stage_seconds{model,stage}`, with the trace id as an exemplar when the request was
sampled. With tracing off, a request costs one small object, a few clock reads and the observations.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from remote_predict import tracing as attrs
from remote_predict.errors import Code, ServingError
from remote_predict.op import request_context
from remote_predict.op.request_context import StageTimes
from remote_predict.tracing import Tracing

SPAN_NAMES = {
    "predict": "Predict", "classify": "Classify", "regress": "Regress", "multi_inference": "MultiInference",
    "metadata": "GetModelMetadata", "status": "GetModelStatus", "reload_config": "HandleReloadConfigRequest",
}
STAGES = ("decode", "queue", "run", "remote", "encode")


def outcome(error: BaseException | None) -> tuple[Code, str]:
    """The canonical code and message a request ends with, as the front-ends answer it."""
    if error is None:
        return Code.OK, ""
    if isinstance(error, ServingError):
        return error.code, error.message
    return Code.INTERNAL, f"{type(error).__name__}: {error}"


class Served:
    """One request being served (a context manager: `with telemetry.serve(...) as served`): what it turned
    out to be about, its stage times, its span (or None). Exceptions pass through, recorded with the code
    they will be answered with."""

    __slots__ = ("_carrier", "_scope", "_telemetry", "_token", "api", "model", "protocol", "signature", "span",
                 "stages", "started", "version")

    def __init__(self, telemetry: Telemetry, api: str, protocol: str, metadata: Mapping[str, str] | None):
        self._telemetry = telemetry
        self.api, self.protocol = api, protocol
        self._carrier = metadata
        self.stages = StageTimes()
        self.model = ""
        self.version: int | None = None
        self.signature = ""
        self.span = None

    def __enter__(self) -> Served:
        self.started = time.perf_counter()
        carrier = self._carrier if self._carrier is not None else request_context.current().metadata
        self._scope = request_context.scope(metadata=carrier, stages=self.stages)
        self._scope.__enter__()
        tracing = self._telemetry.tracing
        if tracing is not None:
            self.span = tracing.server_span(SPAN_NAMES[self.api], carrier,
                                            {attrs.API: self.api, attrs.PROTOCOL: self.protocol})
            self._token = tracing.attach(self.span)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        tracing = self._telemetry.tracing
        if tracing is not None:
            tracing.detach(self._token)
            span = self.span
            if self.model:
                span.set_attribute(attrs.MODEL, self.model)
            if self.version is not None:
                span.set_attribute(attrs.VERSION, self.version)
            if self.signature:
                span.set_attribute(attrs.SIGNATURE, self.signature)
            tracing.end(span, *outcome(error))
        self._scope.__exit__(None, None, None)
        self._telemetry.observe(self)

    def identify(self, model: str, version: int | None = None, signature: str = "") -> None:
        """The model version (and signature) the request resolved to."""
        self.model, self.version, self.signature = model, version, signature

    def decoded(self) -> None:
        """The request's inputs are decoded: its time so far was the decode stage."""
        self.stages.decode = time.perf_counter() - self.started


class _Running:
    """`Telemetry.running`: times a run into the `run` stage; with tracing on, a current `run` span."""

    __slots__ = ("_attributes", "_served", "_span", "_started", "_token", "_tracing")

    def __init__(self, served: Served | None, tracing: Tracing | None, attributes: Mapping[str, object] | None):
        self._served, self._tracing, self._attributes = served, tracing, attributes
        self._span = None

    def __enter__(self):
        self._started = time.perf_counter()
        if self._served is not None and self._tracing is not None:
            self._span = self._tracing.start("run", attributes=self._attributes)
            self._token = self._tracing.attach(self._span)
        return self._span

    def __exit__(self, kind, error, traceback) -> None:
        if self._span is not None:
            self._tracing.detach(self._token)
            self._tracing.end(self._span, *outcome(error))
        if self._served is not None:
            stages = self._served.stages
            stages.run = (stages.run or 0.0) + time.perf_counter() - self._started


class Telemetry:
    """Owns the server's per-request recording: its stage histogram and (when on) its tracer."""

    def __init__(self, stage_histogram=None, tracing: Tracing | None = None):
        self.stage_histogram = stage_histogram  # (model, stage) -> its histogram child; None: not recorded
        self.tracing = tracing

    def serve(self, api: str, protocol: str, metadata: Mapping[str, str] | None = None) -> Served:
        """Serve one request: `metadata` is its W3C trace context (None: the enclosing request's, for calls
        made in-process)."""
        return Served(self, api, protocol, metadata)

    def observe(self, served: Served) -> None:
        """The request's stage times, into the histogram (with its trace id as exemplar when sampled)."""
        if self.stage_histogram is None or not served.model:
            return
        exemplar = None
        if served.span is not None:
            trace_id = Tracing.trace_id(served.span)
            exemplar = {"trace_id": trace_id} if trace_id else None
        stages = served.stages
        for stage in STAGES:
            seconds = getattr(stages, stage)
            if seconds is None:
                continue
            self.stage_histogram(served.model, stage).observe(seconds, exemplar)

    # ------------------------------------------------------------------- stages within a request

    def running(self, served: Served | None, attributes: Mapping[str, object] | None = None) -> _Running:
        """A model run in this thread (`with telemetry.running(served) as span`): the `run` stage, and (tracing
        on) a `run` span, yielded, that is current while it lasts, so the RemotePredict calls the run makes are
        its children. Nothing is recorded for `served` None."""
        return _Running(served, self.tracing, attributes)

    def batched(self, served: Served, enqueued: float, runs: list, now: float) -> None:
        """Record, in the request's own thread, what the batcher did with it: its `queue` stage (from
        `enqueued` to its first run, or to `now` if it never ran) and, for runs another request's thread
        made for it, their `run` and `remote` time. Times are time.monotonic(); `runs` are `BatchRun`s.

        With tracing on: a `queue` span, and for each run made elsewhere a `run` span of its own covering
        that run, linked to the runner's `run` span (which holds the run's RemotePredict calls)."""
        start = min((r.started for r in runs), default=now)
        served.stages.queue = max(0.0, start - enqueued)
        foreign = [r for r in runs if r.runner is not served]
        for r in foreign:
            served.stages.run = (served.stages.run or 0.0) + r.finished - r.started
            if r.remote is not None:
                served.stages.add_remote(r.remote)
        tracing = self.tracing
        if tracing is None:
            return
        queue = tracing.start("queue", start_monotonic=enqueued)
        tracing.end(queue, Code.OK, end_monotonic=start)
        for r in foreign:
            span = tracing.start("run", attributes={attrs.BATCH_ROWS: r.rows, attrs.BATCH_REQUESTS: r.requests},
                                 links=[r.span_context] if r.span_context is not None else (),
                                 start_monotonic=r.started)
            tracing.end(span, r.code, r.message, end_monotonic=r.finished)

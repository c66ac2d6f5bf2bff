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

import contextlib
import time
from collections.abc import Iterator, Mapping

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
    """One request being served: what it turned out to be about, its stage times, its span (or None)."""

    __slots__ = ("model", "signature", "span", "stages", "started", "version")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stages = StageTimes()
        self.model = ""
        self.version: int | None = None
        self.signature = ""
        self.span = None

    def identify(self, model: str, version: int | None = None, signature: str = "") -> None:
        """The model version (and signature) the request resolved to."""
        self.model, self.version, self.signature = model, version, signature

    def decoded(self) -> None:
        """The request's inputs are decoded: its time so far was the decode stage."""
        self.stages.decode = time.perf_counter() - self.started


class Telemetry:
    """Owns the server's per-request recording: its stage histogram and (when on) its tracer."""

    def __init__(self, stage_histogram=None, tracing: Tracing | None = None):
        self.stage_histogram = stage_histogram  # labels (model, stage); None: not recorded
        self.tracing = tracing
        self._children: dict[tuple[str, str], object] = {}

    @contextlib.contextmanager
    def serve(self, api: str, protocol: str, metadata: Mapping[str, str] | None = None) -> Iterator[Served]:
        """Serve one request: `metadata` is its W3C trace context (None: the enclosing request's, for calls
        made in-process). Exceptions pass through, after being recorded with the code they will answer."""
        served = Served()
        carrier = metadata if metadata is not None else request_context.current().metadata
        tracing = self.tracing
        error: BaseException | None = None
        with request_context.scope(metadata=carrier, stages=served.stages):
            if tracing is not None:
                served.span = tracing.server_span(SPAN_NAMES[api], carrier, {attrs.API: api, attrs.PROTOCOL: protocol})
                token = tracing.attach(served.span)
            try:
                yield served
            except BaseException as e:
                error = e
                raise
            finally:
                if tracing is not None:
                    tracing.detach(token)
                    self._end_span(tracing, served, *outcome(error))
                self._observe(served)

    @staticmethod
    def _end_span(tracing: Tracing, served: Served, code: Code, message: str) -> None:
        span = served.span
        if served.model:
            span.set_attribute(attrs.MODEL, served.model)
        if served.version is not None:
            span.set_attribute(attrs.VERSION, served.version)
        if served.signature:
            span.set_attribute(attrs.SIGNATURE, served.signature)
        tracing.end(span, code, message)

    def _observe(self, served: Served) -> None:
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
            child = self._children.get((served.model, stage))
            if child is None:
                child = self._children.setdefault((served.model, stage),
                                                  self.stage_histogram.labels(served.model, stage))
            child.observe(seconds, exemplar)

    # ------------------------------------------------------------------- stages within a request

    @contextlib.contextmanager
    def running(self, served: Served | None, attributes: Mapping[str, object] | None = None) -> Iterator[object]:
        """A model run in this thread: the `run` stage, and (tracing on) a `run` span, yielded, that is current
        while it lasts, so the RemotePredict calls the run makes are its children."""
        if served is None:
            yield None
            return
        started = time.perf_counter()
        tracing = self.tracing
        span = token = None
        error: BaseException | None = None
        if tracing is not None:
            span = tracing.start("run", attributes=attributes)
            token = tracing.attach(span)
        try:
            yield span
        except BaseException as e:
            error = e
            raise
        finally:
            if span is not None:
                tracing.detach(token)
                tracing.end(span, *outcome(error))
            served.stages.run = (served.stages.run or 0.0) + time.perf_counter() - started

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

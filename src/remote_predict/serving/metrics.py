"""Prometheus metrics of one server: requests, where their time goes, model versions, and the RemotePredict
calls it makes.

The scrape answers Prometheus's text format, or OpenMetrics when the scraper asks for it (`Accept:
application/openmetrics-text`, as Prometheus does with exemplar storage on): only OpenMetrics carries the
exemplars, the trace ids of sampled requests, that the stage histogram records when tracing is on.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from remote_predict.errors import Code, ServingError
from remote_predict.op import endpoints
from remote_predict.op.runtime import CallRecord, OpRuntime
from remote_predict.serving.manager import State

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# A request's stages start at tens of microseconds (decoding a small tensor).
_STAGE_BUCKETS = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
                  1.0, 2.0, 5.0, 10.0, 30.0)


class Children:
    """A labelled metric's children, remembered by their labels: `metric.labels()` validates the labels and takes
    a lock on every call, a few microseconds on each request and RemotePredict call. Only for metrics whose
    children are never removed."""

    __slots__ = ("_by_labels", "_metric")

    def __init__(self, metric):
        self._metric = metric
        self._by_labels: dict[tuple[str, ...], object] = {}

    def __call__(self, *labels: str):
        child = self._by_labels.get(labels)
        if child is None:
            child = self._by_labels.setdefault(labels, self._metric.labels(*labels))
        return child


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "remote_predict_requests", "Requests served, by model, API, protocol and status code.",
            ["model", "api", "protocol", "code"], registry=self.registry)
        self.latency = Histogram(
            "remote_predict_request_duration_seconds", "Wall time to answer a request.",
            ["model", "api", "protocol"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram(
            "remote_predict_request_stage_seconds", "Time requests spent in each stage, by model: decode (the "
            "request's tensors), queue (waiting for a batch), run (the model, RemotePredict calls included), "
            "remote (RemotePredict calls and sharded lookups made in the request's thread), encode (the answer).",
            ["model", "stage"], buckets=_STAGE_BUCKETS, registry=self.registry)
        self.versions = Gauge(
            "remote_predict_model_versions", "Model versions in each state (START, LOADING, AVAILABLE, "
            "UNLOADING, END).", ["model", "state"], registry=self.registry)
        self.load_failures = Counter(
            "remote_predict_model_load_failures", "Versions that failed to load.", ["model"], registry=self.registry)
        self.store_errors = Counter(
            "remote_predict_model_store_errors", "Polls of a model's base path that failed (unreachable store, "
            "missing bucket, refused credentials).", ["model", "code"], registry=self.registry)
        self.store_up = Gauge(
            "remote_predict_model_store_up", "1 when the model's base path was listed at the last poll, else 0.",
            ["model"], registry=self.registry)
        self.op_calls = Counter(
            "remote_predict_op_calls", "RemotePredict calls made by models on this server, by target and code.",
            ["target", "model", "code"], registry=self.registry)
        self.op_latency = Histogram(
            "remote_predict_op_call_duration_seconds", "Wall time of RemotePredict calls, by target.",
            ["target"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.op_inflight = Gauge(
            "remote_predict_op_inflight_calls", "RemotePredict calls in flight, by target.", ["target"],
            registry=self.registry)
        self.endpoint_up = Gauge(
            "remote_predict_op_endpoint_up", "Replicas of tcp:// targets: 1 in rotation, 0 ejected.",
            ["target", "endpoint"], registry=self.registry)
        self.ejections = Counter(
            "remote_predict_op_ejections", "Replicas taken out of rotation (stopped answering, refused, ...).",
            ["target", "endpoint"], registry=self.registry)
        self.op_events = Counter(
            "remote_predict_op_attempts_extra", "Extra attempts of RemotePredict calls: re-sent after a replica "
            "failed (resend) or sent to a second replica because the first was slow (hedge).",
            ["target", "kind"], registry=self.registry)
        self.batch_size = Histogram(
            "remote_predict_batch_size", "Rows in each batch run (with --enable_batching).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry)
        self._states: dict[tuple[str, int], State] = {}
        self._lock = threading.Lock()
        # What is counted per request and per RemotePredict call (children never removed).
        self.stage_children = Children(self.stages)
        self._request_children, self._latency_children = Children(self.requests), Children(self.latency)
        self._op_call_children, self._op_latency_children = Children(self.op_calls), Children(self.op_latency)

    def observe_request(self, model: str, api: str, protocol: str, code: Code, seconds: float) -> None:
        self._request_children(model, api, protocol, code.name).inc()
        self._latency_children(model, api, protocol).observe(seconds)

    def on_version_state(self, model: str, version: int, state: State, error: ServingError | None) -> None:
        with self._lock:
            self._states[(model, version)] = state
            tally = Tally(s for (m, _), s in self._states.items() if m == model)
        for each in State:
            self.versions.labels(model, each.value).set(tally.get(each, 0))
        if state is State.END and error is not None:
            self.load_failures.labels(model).inc()

    def observe_runtime(self, runtime: OpRuntime) -> None:
        """Count the RemotePredict calls of the models this server loads (bound to `runtime`), and report
        its lookups' row caches (read when scraped: nothing is counted per request)."""
        self.registry.register(_CacheCollector(runtime))
        runtime.observers.calls.append(self.on_remote_call)
        runtime.observers.inflight.append(self.on_remote_inflight)
        runtime.observers.endpoints.append(self.on_endpoint)
        runtime.observers.events.append(self.on_call_event)

    def on_store_listing(self, model: str, error: ServingError | None) -> None:
        self.store_up.labels(model).set(0 if error else 1)
        if error is not None:
            self.store_errors.labels(model, error.code.name).inc()

    def on_remote_call(self, record: CallRecord) -> None:
        self._op_call_children(record.target, record.model_name, record.code.name).inc()
        self._op_latency_children(record.target).observe(record.seconds)

    def on_remote_inflight(self, target: str, delta: int) -> None:
        self.op_inflight.labels(target).inc(delta)

    def on_endpoint(self, target: str, endpoint: str, event: str, reason: str) -> None:
        if event == endpoints.GONE:  # no longer resolved: not a replica of the target any more
            with contextlib.suppress(KeyError):
                self.endpoint_up.remove(target, endpoint)
            return
        self.endpoint_up.labels(target, endpoint).set(0 if event == endpoints.EJECTED else 1)
        if event == endpoints.EJECTED:
            self.ejections.labels(target, endpoint).inc()

    def on_call_event(self, target: str, kind: str) -> None:
        self.op_events.labels(target, kind).inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape's body and content type, in the format the scraper's Accept header asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _CacheCollector:
    """remote_predict_lookup_cache_*: the hot-row caches of a runtime, by table and model version."""

    def __init__(self, runtime: OpRuntime):
        self.runtime = runtime

    def describe(self):
        return []

    def collect(self):
        labels = ["table", "version"]
        families = {
            "hits": CounterMetricFamily("remote_predict_lookup_cache_hits", "Rows the cache answered.", labels=labels),
            "misses": CounterMetricFamily("remote_predict_lookup_cache_misses", "Rows asked of the shards.",
                                          labels=labels),
            "evictions": CounterMetricFamily("remote_predict_lookup_cache_evictions", "Rows let go for hotter ones.",
                                             labels=labels),
        }
        size = GaugeMetricFamily("remote_predict_lookup_cache_bytes",
                                 "Bytes the cache holds at its capacity: rows, ids, index, sketch.",
                                 labels=labels)
        for (models, version, table), cache in self.runtime.row_caches.items():
            key = [f"{models[0].rsplit('_shard_', 1)[0]}/{table}", str(version)]
            families["hits"].add_metric(key, cache.stats.hits)
            families["misses"].add_metric(key, cache.stats.misses)
            families["evictions"].add_metric(key, cache.stats.evictions)
            size.add_metric(key, cache.nbytes)
        yield from families.values()
        yield size

"""A bounded, steady client load that records what every request got, for fault tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


@dataclass(frozen=True)
class Outcome:
    model: str
    started: float  # time.monotonic()
    seconds: float
    code: str  # "OK", a gRPC status name, or "WRONG" for an answer that is not the expected one
    detail: str = ""


class _Load:
    """Client threads (started here) whose outcomes are collected; `stop()` ends them, `snapshot()` reads."""

    def __init__(self, address: str, timeout: float, max_seconds: float, clients: list[tuple]):
        self.address, self.timeout = address, timeout
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._client, args=args, daemon=True) for args in clients]
        for thread in self._threads:
            thread.start()

    def _client(self, *args) -> None:
        raise NotImplementedError

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)
        return self.outcomes

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


class SteadyLoad(_Load):
    """`threads` clients per model, each sending Predict back to back until stopped (or `max_seconds`).

    Every answer is checked against `expected(x)`, so a wrong answer is counted as WRONG, never as OK.
    """

    def __init__(self, address: str, models: dict[str, int], expected, timeout: float = 10.0,
                 max_seconds: float = 60.0, pause: float = 0.0):
        self.expected, self.pause = expected, pause
        super().__init__(address, timeout, max_seconds,
                         [(model, i) for model, count in models.items() for i in range(count)])

    def _client(self, model: str, index: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            n = 0
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                x = float(index * 1000 + n)
                n += 1
                request = predict_pb2.PredictRequest()
                request.model_spec.name = model
                request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[x]], np.float32)))
                started = time.monotonic()
                try:
                    y = stub.Predict(request, timeout=self.timeout).outputs["y"].float_val[0]
                    good = abs(y - self.expected(model, x)) < 1e-3
                    outcome = Outcome(model, started, time.monotonic() - started, "OK" if good else "WRONG",
                                      "" if good else f"x={x} y={y}")
                except grpc.RpcError as e:
                    outcome = Outcome(model, started, time.monotonic() - started, e.code().name, e.details() or "")
                self._record(outcome)
                if self.pause:
                    time.sleep(self.pause)


def counts(outcomes: list[Outcome], model: str | None = None, since: float = 0.0, until: float = float("inf")
           ) -> Counter:
    return Counter(o.code for o in outcomes if (model is None or o.model == model) and since <= o.started < until)


def describe(outcomes: list[Outcome]) -> str:
    """Counts by model and outcome, for assertion messages."""
    by_model: dict[str, Counter] = {}
    for o in outcomes:
        by_model.setdefault(o.model, Counter())[o.code] += 1
    return "; ".join(f"{m}: {dict(c)}" for m, c in sorted(by_model.items()))


class PacedLoad(_Load):
    """`clients` clients, each starting a request every `period` seconds (at once when the last one took
    longer), until stopped: a steady, bounded rate that a fault cannot turn into a retry storm.

    `make(client, n)` gives `(model, request, check)`; `check(response)` is "" for the expected answer,
    else what is wrong with it (counted as WRONG, never as OK).
    """

    def __init__(self, address: str, clients: int, period: float, make, timeout: float = 10.0,
                 max_seconds: float = 300.0):
        self.period, self.make = period, make
        super().__init__(address, timeout, max_seconds, [(i,) for i in range(clients)])

    def _client(self, index: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            n = 0
            # Clients start spread over one period, not all at once.
            next_at = time.monotonic() + self.period * index / max(1, len(self._threads))
            while not self._stop.wait(max(0.0, next_at - time.monotonic())) and time.monotonic() < self._deadline:
                model, request, check = self.make(index, n)
                n += 1
                started = time.monotonic()
                next_at = started + self.period
                try:
                    wrong = check(stub.Predict(request, timeout=self.timeout))
                    outcome = Outcome(model, started, time.monotonic() - started, "WRONG" if wrong else "OK", wrong)
                except grpc.RpcError as e:
                    outcome = Outcome(model, started, time.monotonic() - started, e.code().name, e.details() or "")
                self._record(outcome)

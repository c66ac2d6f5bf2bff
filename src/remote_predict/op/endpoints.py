"""Health per endpoint: which replica of a target to call, when one has stopped answering, when it is back.

This module decides; it does no I/O (the `tcp` transport does, and asks it), so its rules are tested
exactly and fast, with a clock the tests move (`tests/test_endpoints.py`).

The rules, and why:

* **Stopped answering.** An endpoint has stopped answering when a call to it has waited longer than
  `stall_after` and the endpoint has answered nothing at all since that call was sent. The second half
  is what tells a hang or a cut (nothing comes back) from a busy replica (slow, but answering others),
  which is only slow and is left to hedging. `stall_after` follows the target's own latency: eight
  times its recent p99, at least 50 ms, at most a quarter of the call's deadline. A healthy answer is
  very rarely 8x the p99; a missed detection costs a request its deadline, a false one a single re-sent
  call and a probe. Until the target has answered a few calls there is no p99 to go by, and its first
  answers are its slowest (a new connection, the leaf's first run of a model): they get 250 ms.
  That holds while another endpoint is up: for the last one standing (or the only one) a false
  detection would fail every call at once, and with nowhere else to send a call there is nothing to
  gain by guessing early, so it is given a quarter of the deadline (a large request to the one healthy
  replica left, which answers nothing else meanwhile, must not look like a hang).
* **Ejection.** An endpoint that stopped answering, refused or dropped a connection, did not finish
  accepting one (TCP and TLS) within `stall_after` (at most a second), sent garbage, or answered
  UNAVAILABLE (it is draining or overloaded) is ejected: no new call is sent to it, and calls waiting
  on it are re-sent to another endpoint (Predict has no side effects). As Envoy's outlier
  detection, ejection is by observed behaviour; unlike it, a hang is found by the stall rule above,
  within `stall_after`, not after the calls' timeouts.
* **Rejoining.** Every ejected endpoint is probed (a health frame on a new connection, all at once, each
  given `PROBE_TIMEOUT_SECONDS`) every `PROBE_SECONDS`; the first SERVING answer brings it back. A
  restarted or healed replica takes traffic again within about `PROBE_SECONDS + PROBE_TIMEOUT_SECONDS`,
  however many other endpoints are silent.
* **Nowhere else to go.** When every endpoint of a target is ejected, new calls fail at once with
  UNAVAILABLE (naming each endpoint and why), and calls already waiting give up once they have waited a
  quarter of their deadline, except the one that has waited longest, which waits out its deadline (it
  may yet be answered), so a dead target cannot hold the server's threads. A single-address target
  thus behaves as before: fail fast while stalled, probe, recover, after a quarter of the deadline.
* **Choosing.** Among endpoints that are up, the one with the fewest calls in flight, ties in turn
  (round robin when all answer alike; a slow replica gets less).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

STALL_FLOOR_SECONDS = 0.05
STALL_UNKNOWN_SECONDS = 0.25  # before a target has a p99
STALL_P99_MULTIPLE = 8.0
STALL_DEADLINE_FRACTION = 0.25
PROBE_SECONDS = 0.1
PROBE_TIMEOUT_SECONDS = 0.25

# What listeners hear about an endpoint: (target, endpoint, event, reason).
ADDED, UP, EJECTED, GONE = "added", "up", "ejected", "gone"  # first resolved / back / out / no longer resolved
_WINDOW = 256  # answered calls whose latency sets a target's p99
_RECOMPUTE = 32  # recompute the p99 every this many answers


@dataclass
class Endpoint:
    """One address of a target (`host:port`), as the transport connects to it."""

    address: str
    up: bool = True
    reason: str = ""  # why it was ejected
    ejected_at: float = 0.0
    ejections: int = 0
    last_answer: float = 0.0  # time.monotonic() of its last answer (any answer), 0 if none yet
    inflight: int = 0
    idle: list = field(default_factory=list)  # the transport's pooled connections
    waiting: dict = field(default_factory=dict)  # attempt id -> when it was sent, for the attempts in flight

    def oldest_waiting(self) -> int | None:
        """The attempt that has waited longest (the probe, when this endpoint has stopped answering)."""
        waiting = list(self.waiting.items())  # a copy: other threads add and remove theirs
        return min(waiting, key=lambda item: item[1])[0] if waiting else None

    def describe(self, now: float) -> str:
        if self.up:
            return f"{self.address} is up"
        return f"{self.address} {self.reason} {1000 * (now - self.ejected_at):.0f} ms ago"


class Latency:
    """A target's recent latency of answered calls: its p99, and any quantile (None until it has a few)."""

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._ordered: list[float] = []  # the samples, sorted when the p99 was last recomputed
        self._next = 0
        self._count = 0
        self.p99: float | None = None

    def add(self, seconds: float) -> None:
        if len(self._samples) < _WINDOW:
            self._samples.append(seconds)
        else:
            self._samples[self._next] = seconds
            self._next = (self._next + 1) % _WINDOW
        self._count += 1
        if self._count % _RECOMPUTE == 0 or self._count == 8:
            self._ordered = sorted(self._samples)
            self.p99 = self.quantile(0.99)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 < q < 1) as of the last recompute of the p99, without sorting again."""
        ordered = self._ordered
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def hedge_after(fixed: float, quantile: float, latency: Latency) -> float | None:
    """Seconds a call waits before it is also sent to another replica (None: it is not hedged).

    `fixed` (seconds, 0: none) alone, or with `quantile` (0: none) the target's recent latency at that
    quantile, never less than `fixed`: a delay that follows the replicas, so about 1 - quantile of calls
    are hedged whatever their speed, where a fixed one is late when they are fast and, when they are all
    slow, hedges nearly every call (twice the load). Until the target has answered a few calls, `fixed`."""
    recent = latency.quantile(quantile) if quantile else None
    if recent is None:
        return fixed or None
    return max(fixed, recent)


def stall_after(p99: float | None, deadline_seconds: float, alternatives: bool = True) -> float:
    """How long a call may wait before its endpoint counts as stopped answering; `alternatives`: another
    endpoint of the target is up."""
    if not alternatives:
        return deadline_seconds * STALL_DEADLINE_FRACTION
    base = STALL_UNKNOWN_SECONDS if p99 is None else max(STALL_FLOOR_SECONDS, STALL_P99_MULTIPLE * p99)
    return min(base, deadline_seconds * STALL_DEADLINE_FRACTION)


def stopped_answering(endpoint: Endpoint, sent_at: float, now: float, after: float) -> bool:
    """The stall rule: waited longer than `after`, and the endpoint has answered nothing since."""
    return now - sent_at > after and endpoint.last_answer < sent_at


def choose(endpoints: Sequence[Endpoint], turn: int, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
    """The up endpoint with the fewest calls in flight, not in `exclude`; ties broken by `turn`."""
    candidates = [e for e in endpoints if e.up and e not in exclude]
    if not candidates:
        return None
    fewest = min(e.inflight for e in candidates)
    tied = [e for e in candidates if e.inflight == fewest]
    return tied[turn % len(tied)]


class EndpointSet:
    """The endpoints of one target and their health, shared by every call to it (thread-safe)."""

    def __init__(self, target: str, addresses: Sequence[str]):
        self.target = target
        self.lock = threading.Lock()
        self.endpoints = [Endpoint(a) for a in addresses]
        self.latency = Latency()
        self._turn = 0
        self.listeners: list = []  # f(target, endpoint, event, reason): event ADDED, UP, EJECTED or GONE

    def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        with self.lock:
            self._turn += 1
            endpoint = choose(self.endpoints, self._turn, exclude)
            if endpoint is not None:
                endpoint.inflight += 1
            return endpoint

    def done(self, endpoint: Endpoint) -> None:
        with self.lock:
            endpoint.inflight -= 1

    def answered(self, endpoint: Endpoint, seconds: float, now: float | None = None) -> None:
        with self.lock:
            endpoint.last_answer = time.monotonic() if now is None else now
            self.latency.add(seconds)

    def eject(self, endpoint: Endpoint, reason: str, now: float | None = None) -> bool:
        """Take `endpoint` out of rotation; True if it was up (the caller then reports it)."""
        with self.lock:
            if not endpoint.up:
                return False
            endpoint.up, endpoint.reason = False, reason
            endpoint.ejected_at = time.monotonic() if now is None else now
            endpoint.ejections += 1
        self._tell(endpoint, EJECTED, reason)
        return True

    def rejoin(self, endpoint: Endpoint) -> bool:
        with self.lock:
            if endpoint.up:
                return False
            endpoint.up, endpoint.reason = True, ""
        self._tell(endpoint, UP, "")
        return True

    def replace(self, addresses: Sequence[str]) -> list[Endpoint]:
        """A new address list (DNS changed): keep the known ones, add the new; returns those dropped."""
        with self.lock:
            known = {e.address: e for e in self.endpoints}
            self.endpoints = [known.get(a) or Endpoint(a) for a in addresses]
            kept = set(addresses)
            added = [e for e in self.endpoints if e.address not in known]
            dropped = [e for a, e in known.items() if a not in kept]
        for endpoint in added:
            self._tell(endpoint, ADDED, "")
        for endpoint in dropped:
            self._tell(endpoint, GONE, "no longer resolved")
        return dropped

    def others_up(self, endpoint: Endpoint) -> bool:
        """Whether a call could go elsewhere than `endpoint`."""
        with self.lock:
            return any(e.up and e is not endpoint for e in self.endpoints)

    def _tell(self, endpoint: Endpoint, event: str, reason: str) -> None:
        for listener in self.listeners:
            listener(self.target, endpoint.address, event, reason)

    def ejected(self) -> list[Endpoint]:
        with self.lock:
            return [e for e in self.endpoints if not e.up]

    def any_up(self) -> bool:
        with self.lock:
            return any(e.up for e in self.endpoints)

    def describe(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        with self.lock:
            return "; ".join(e.describe(now) for e in self.endpoints)

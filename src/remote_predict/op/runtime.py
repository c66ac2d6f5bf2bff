"""The one object that owns how RemotePredict ops call out: settings, stubs, endpoint health, observers.

Each model server owns an `OpRuntime` built from its flags, and binds the models it loads to it (see
`tokens`), so two servers in one process keep their own allowed targets, TLS, channels and metrics. A
process without a server (a model loaded with `tf.saved_model.load`, ops run eagerly) uses
`default_runtime()`. The registry of live runtimes, by id, is the only process-wide state here, and
only `OpRuntime` writes it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from remote_predict.errors import Code, ServingError
from remote_predict.op import endpoints, targets
from remote_predict.op.breaker import CircuitBreaker
from remote_predict.op.failure_log import FailureLog
from remote_predict.op.row_cache import RowCaches
from remote_predict.tracing import Tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientTls:
    """TLS for the ops' outgoing calls: `ca` verifies servers; `cert`/`key` (PEM) are our client cert."""

    ca: str = ""
    cert: str = ""
    key: str = ""


@dataclass(frozen=True)
class OpSettings:
    allowed_targets: tuple[str, ...] = ()  # host:port globs; empty allows every target
    loopback_in_process: bool = True  # serve loopback gRPC targets naming a server of this process in-process
    max_inflight_per_target: int = 0  # 0: no cap
    tls: ClientTls | None = None
    channel_arguments: tuple[tuple[str, object], ...] = ()  # gRPC channel arguments, over our defaults
    hedge_after_ms: int = 0  # tcp targets: also ask another replica when a call waits this long (0: never)
    hedge_percentile: float = 0.0  # ... or waits longer than this percentile of the target's recent calls
    cache_mib: float = 0.0  # hot rows the sharded lookups keep, in MiB for the whole runtime (0: none)


@dataclass(frozen=True)
class CallRecord:
    """One finished remote call, as observers (metrics, logs) see it."""

    target: str
    model_name: str
    code: Code
    message: str
    seconds: float
    endpoint: str = ""  # the replica that answered (tcp targets), or "" when not known


@dataclass
class Observers:
    calls: list[Callable[[CallRecord], None]] = field(default_factory=list)
    inflight: list[Callable[[str, int], None]] = field(default_factory=list)  # (target, +1 / -1)
    # (target, endpoint, event, why): event is endpoints.ADDED, UP, EJECTED or GONE
    endpoints: list[Callable[[str, str, str, str], None]] = field(default_factory=list)
    events: list[Callable[[str, str], None]] = field(default_factory=list)  # (target, "resend" | "hedge")


_ids = itertools.count(1)
_live: weakref.WeakValueDictionary[int, OpRuntime] = weakref.WeakValueDictionary()
_live_lock = threading.Lock()


class OpRuntime:
    def __init__(self, settings: OpSettings | None = None, name: str = "process", tracing: Tracing | None = None):
        self.settings = settings or OpSettings()
        self.name = name
        self.tracing = tracing  # the server's tracer: client spans for the calls (None: tracing off)
        self.observers = Observers(calls=[FailureLog()])
        self.breaker = CircuitBreaker(self.settings.max_inflight_per_target)
        self.row_caches = RowCaches(int(self.settings.cache_mib * (1 << 20)))
        self.closed = False
        self._lock = threading.RLock()  # a stub being made may ask for a service
        self._stubs: dict[str, object] = {}
        self._services: dict[str, object] = {}
        self._allowed = targets.patterns(self.settings.allowed_targets)
        with _live_lock:
            self.id = next(_ids)
            _live[self.id] = self

    # ------------------------------------------------------------------------------------ stubs

    def stub_for(self, target: str):
        """The stub for `target` (one per address, shared by every op and call of this runtime)."""
        targets.check_allowed(self._allowed, target)
        stub = self._stubs.get(target)
        if stub is not None:
            return stub
        from remote_predict.op.stubs import base

        with self._lock:
            if self.closed:
                raise ServingError(Code.UNAVAILABLE, "the server is shutting down")
            stub = self._stubs.get(target)
            if stub is None:
                stub = base.create_stub(target, self)
                self._stubs[target] = stub
        return stub

    def forget_stubs(self, scheme: str) -> None:
        """Drop stubs of `scheme://` targets (a stub factory for it was registered since)."""
        with self._lock:
            for target in [t for t in self._stubs if t.lower().startswith(scheme + "://")]:
                self._stubs.pop(target)

    def service(self, name: str, factory: Callable[[], object]):
        """A helper this runtime owns (a prober thread, ...), made on first use, closed with it."""
        with self._lock:
            service = self._services.get(name)
            if service is None:
                service = self._services[name] = factory()
            return service

    # ---------------------------------------------------------------------------------- observers

    def report(self, record: CallRecord) -> None:
        for observer in self.observers.calls:
            observer(record)

    def inflight(self, target: str, delta: int) -> None:
        for observer in self.observers.inflight:
            observer(target, delta)

    def endpoint_changed(self, target: str, endpoint: str, event: str, reason: str) -> None:
        if event == endpoints.EJECTED:
            log.warning("RemotePredict target %s: %s %s; taken out of rotation", target, endpoint, reason)
        elif event == endpoints.UP:
            log.info("RemotePredict target %s: %s answers again", target, endpoint)
        else:
            log.info("RemotePredict target %s: %s %s", target, endpoint,
                     "resolved" if event == endpoints.ADDED else reason)
        for observer in self.observers.endpoints:
            observer(target, endpoint, event, reason)

    def event(self, target: str, kind: str) -> None:
        for observer in self.observers.events:
            observer(target, kind)

    def close(self) -> None:
        """Close every stub (cancelling calls in flight), its helpers and the watchdog."""
        with self._lock:
            self.closed = True
            stubs, self._stubs = list(self._stubs.values()), {}
            services, self._services = list(self._services.values()), {}
        for thing in [*stubs, *services]:
            close = getattr(thing, "close", None) or getattr(thing, "shutdown", None)
            if close is not None:
                close()
        self.breaker.close()


_default: OpRuntime | None = None
_default_lock = threading.Lock()


def default_runtime() -> OpRuntime:
    """The runtime of ops that no server bound: models loaded outside a server, eager calls."""
    global _default
    with _default_lock:
        if _default is None:
            _default = OpRuntime(name="process default")
        return _default


def runtime_for(runtime_id: int | None) -> OpRuntime:
    """The runtime a bound token names; the default one for unbound tokens."""
    if runtime_id is None:
        return default_runtime()
    runtime = _live.get(runtime_id)
    if runtime is None or runtime.closed:
        raise ServingError(Code.UNAVAILABLE, "the server that loaded this model has stopped")
    return runtime


def live_runtimes() -> list[OpRuntime]:
    with _live_lock:
        return [r for r in _live.values() if not r.closed]

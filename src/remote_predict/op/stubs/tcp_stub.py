"""`tcp://host:port[,host:port...]` targets: Predict over remote-predict's framed TCP transport (`frames`).

What it does for a call, in the calling thread and without handing it to another:

* picks an endpoint that is up (`endpoints.choose`), takes one of its idle connections or begins a new
  one, and writes the request frame; nothing here waits on a socket (`tcp_exchange`: the connect, the
  TLS handshake, the write and the read each go as far as the socket allows), so a silent replica holds
  only its own attempt, never the thread and the other calls it waits for;
* waits for the answer with `selectors`, together with every other call of the same fan-out (a master's
  lookup sends each shard its frame, then waits for all of them at once);
* while it waits, applies the health rules of `endpoints`: a replica that stopped answering is
  ejected and the call is re-sent to another (the first answer wins, the other connection is closed);
  with `hedge_after_ms` (or `hedge_percentile`: the target's recent latency at that percentile), a call
  still unanswered then is also sent to another replica;
* answers that are errors of the model (bad input, unknown model...) are final; UNAVAILABLE (the replica
  drains or sheds load) and broken connections move the call to another replica.

Names resolve with the system resolver when the stub is made and again every `RESOLVE_SECONDS`, so a
headless Kubernetes Service's pods (one address each) are each an endpoint; a thread per runtime does
it, so a slow resolver delays neither calls nor probes. Another thread per runtime probes every ejected
endpoint at once (a HEALTH frame each) every `endpoints.PROBE_SECONDS`.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tensorflow_serving.apis import model_pb2, predict_pb2

from remote_predict import frames, pem, wire
from remote_predict.errors import Code
from remote_predict.op import addresses, endpoints, request_context
from remote_predict.op.runtime import ClientTls, OpRuntime
from remote_predict.op.stubs import tcp_exchange
from remote_predict.op.stubs.base import StubError
from remote_predict.op.stubs.tcp_exchange import CONNECTING, HANDSHAKING, WRITING, Exchange

log = logging.getLogger(__name__)

RESOLVE_SECONDS = 5.0  # re-resolve names this often (every second while a target has no endpoint)
CONNECT_SECONDS = 1.0  # at most this long to connect (less when the call's deadline is nearer)
MAX_IDLE = 64  # idle connections kept per endpoint
_POLL_SECONDS = 0.02  # how often a call waiting on an ejected endpoint looks again
_RETRYABLE = (Code.UNAVAILABLE,)
_HEALTH = frames.encode(frames.HEALTH, 0, b"", b"")
_FAILURES = (OSError, EOFError, frames.FrameError)  # what a failed exchange raises (ssl.SSLError is an OSError)


def client_ssl_context(tls: ClientTls | None) -> ssl.SSLContext | None:
    """TLS as the gRPC stub's: `ca` verifies the server (system roots if empty), cert/key authenticate us."""
    if tls is None:
        return None
    context = ssl.create_default_context(cadata=tls.ca or None)
    if tls.cert and tls.key:
        pem.load_cert_chain(context, tls.cert, tls.key)
    return context


def _resolve(names: Sequence[str]) -> list[tuple[str, tuple]]:
    """(endpoint "ip:port", socket address) for every address every name resolves to, in order."""
    found: dict[str, tuple] = {}
    for name in names:
        host, port = addresses.split_host_port(name)
        if port is None:
            raise StubError(Code.INVALID_ARGUMENT, f"tcp target endpoint {name!r} has no port")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("cannot resolve %s: %s", name, e)
            continue
        for family, _, _, _, sockaddr in infos:
            ip = sockaddr[0]
            endpoint = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            found.setdefault(endpoint, (family, sockaddr, host.strip("[]")))
    return list(found.items())


def _what_failed(state: str, error: BaseException) -> str:
    """How an endpoint failed, said by the point of the exchange where it did."""
    detail = getattr(error, "strerror", None) or str(error) or type(error).__name__
    if state == CONNECTING:
        return f"refused the connection ({detail})"
    if state == HANDSHAKING:
        return f"failed the TLS handshake ({detail})"
    if isinstance(error, EOFError):
        return "closed the connection"
    if state == WRITING:
        return f"dropped the connection ({detail})"
    return f"broke the connection ({detail})"


class TcpStub:
    def __init__(self, target: addresses.Target, runtime: OpRuntime):
        self.target = target.text
        self.runtime = runtime
        self._names = target.endpoints
        if not self._names:
            raise StubError(Code.INVALID_ARGUMENT, f"tcp target {target.text!r} names no host:port")
        self.endpoints = endpoints.EndpointSet(target.text, [])
        self.endpoints.listeners.append(runtime.endpoint_changed)
        self._sockaddrs: dict[str, tuple] = {}
        self._resolved_at = 0.0
        self.resolve()
        self.ssl = client_ssl_context(runtime.settings.tls)
        self._hedge_fixed = runtime.settings.hedge_after_ms / 1000
        self._hedge_quantile = runtime.settings.hedge_percentile / 100
        self.closed = False
        _prober(runtime).add(self)
        _resolver(runtime).add(self)

    def hedge_after(self) -> float | None:
        """How long a call made now waits before it is hedged (None: never)."""
        return endpoints.hedge_after(self._hedge_fixed, self._hedge_quantile, self.endpoints.latency)

    # ------------------------------------------------------------------------------- endpoints

    def resolve(self) -> None:
        resolved = _resolve(self._names)
        self._resolved_at = time.monotonic()
        if not resolved and self.endpoints.endpoints:
            return  # keep the last good list when the resolver fails
        self._sockaddrs = dict(resolved)
        for gone in self.endpoints.replace([e for e, _ in resolved]):
            _close_all(gone)

    def resolve_due(self, now: float) -> bool:
        return now - self._resolved_at > (RESOLVE_SECONDS if self.endpoints.endpoints else 1.0)

    def exchange(self, endpoint: endpoints.Endpoint, parts: list, reuse: bool = True) -> tuple[Exchange, bool]:
        """An exchange of `parts` with `endpoint`, on one of its idle connections if `reuse` finds one (then
        True), else on a new one. OSError when not even a connect can begin."""
        sock = self.take_idle(endpoint) if reuse else None
        if sock is not None:
            return Exchange(sock, parts, connected=True), True
        where = self._sockaddrs.get(endpoint.address)
        if where is None:
            raise OSError(errno.EADDRNOTAVAIL, "no longer resolved")
        family, sockaddr, host = where
        return Exchange(tcp_exchange.connect(family, sockaddr), parts, connected=False, tls=self.ssl,
                        hostname=host), False

    def take_idle(self, endpoint: endpoints.Endpoint) -> socket.socket | None:
        """An idle connection; one the server closed meanwhile shows itself by EOF, and the call is made
        again on a fresh one (no peek before each reuse: that would be a system call per call)."""
        with self.endpoints.lock:
            return endpoint.idle.pop() if endpoint.idle else None

    def give_back(self, endpoint: endpoints.Endpoint, sock: socket.socket) -> None:
        with self.endpoints.lock:
            if not self.closed and len(endpoint.idle) < MAX_IDLE and endpoint in self.endpoints.endpoints:
                endpoint.idle.append(sock)
                return
        sock.close()

    # ----------------------------------------------------------------------------------- calls

    def predict_arrays(self, request: predict_pb2.PredictRequest, inputs: Mapping[str, np.ndarray],
                       timeout: float) -> tuple[model_pb2.ModelSpec, dict[str, np.ndarray]]:
        call = TcpCall(self, wire.encode_predict_request(request, inputs), request.model_spec.name,
                       version=_version(request))
        run([call], time.monotonic() + timeout)
        return call.outcome()

    def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        call = TcpCall(self, request.SerializeToString(), request.model_spec.name, version=_version(request))
        run([call], time.monotonic() + timeout)
        if call.code != Code.OK:
            raise StubError(call.code, call.message)
        return predict_pb2.PredictResponse.FromString(bytes(call.answer_body))

    def close(self) -> None:
        self.closed = True
        for endpoint in list(self.endpoints.endpoints):
            _close_all(endpoint)


def _version(request: predict_pb2.PredictRequest) -> int | None:
    return request.model_spec.version.value if request.model_spec.HasField("version") else None


def _close_all(endpoint: endpoints.Endpoint) -> None:
    idle, endpoint.idle = endpoint.idle, []
    for sock in idle:
        sock.close()


class _Attempt:
    __slots__ = ("begun_at", "endpoint", "exchange", "hedge", "reused", "sent_at")

    def __init__(self, endpoint: endpoints.Endpoint, exchange: Exchange, reused: bool, hedge: bool, now: float):
        self.endpoint, self.exchange, self.reused, self.hedge = endpoint, exchange, reused, hedge
        self.begun_at = now
        self.sent_at = now  # when the request began to be written (the stall rule's clock)

    @property
    def connecting(self) -> bool:
        return self.exchange.connecting


class TcpCall:
    """One Predict to one tcp target, possibly over several attempts (re-sends, hedges)."""

    def __init__(self, stub: TcpStub, body: bytes, model: str, version: int | None = None):
        self.stub, self.model, self.version = stub, model, version
        self.body = body
        self.meta = frames.encode_meta(request_context.current().metadata)
        self.attempts: list[_Attempt] = []
        self.tried: list[endpoints.Endpoint] = []
        self.failures: list[tuple[str, str]] = []  # (endpoint, what went wrong there), for the final message
        self.hedged = False
        self.hedge_after = stub.hedge_after()
        self.code: Code | None = None
        self.message = ""
        self.answer_body: bytearray | None = None
        self.endpoint = ""
        self.started = 0.0
        self.deadline = 0.0

    @property
    def finished(self) -> bool:
        return self.code is not None

    def outcome(self) -> tuple[model_pb2.ModelSpec, dict[str, np.ndarray]]:
        if self.code != Code.OK:
            raise StubError(self.code, self.message)
        return wire.decode_predict_response(self.answer_body)

    # -- decisions -------------------------------------------------------------------------------
    def _stall_after(self, endpoint: endpoints.Endpoint) -> float:
        return endpoints.stall_after(self.stub.endpoints.latency.p99, self.deadline - self.started,
                                     alternatives=self.stub.endpoints.others_up(endpoint))

    def _limit(self, attempt: _Attempt) -> float:
        """How long `attempt` may go on before the rules look at it: connect, or answer."""
        after = self._stall_after(attempt.endpoint)
        return min(after, CONNECT_SECONDS) if attempt.connecting else after

    def _may_hedge(self) -> bool:
        return self.hedge_after is not None and not self.hedged and len(self.attempts) == 1

    def next_wake(self, now: float) -> float:
        wake = self.deadline
        for attempt in self.attempts:
            if not attempt.endpoint.up:
                wake = min(wake, now + _POLL_SECONDS)
            # A limit already passed without a stall (the endpoint answers others) needs no wake-up of its
            # own; look again now and then, as the limit moves when other endpoints come and go.
            limit = attempt.sent_at + self._limit(attempt)
            wake = min(wake, limit if limit > now else now + _POLL_SECONDS)
        if self._may_hedge():
            wake = min(wake, self.attempts[0].begun_at + self.hedge_after)
        return wake

    def _where(self) -> str:
        where = f"RemotePredict to model {self.model!r}"
        if self.version is not None:
            where += f" version {self.version}"
        return f"{where} at {self.stub.target}"

    def _state(self, now: float) -> str:
        """Every endpoint and how it is: what this call met there, else its health."""
        met = dict(self.failures)
        with self.stub.endpoints.lock:
            known = list(self.stub.endpoints.endpoints)
        states = [f"{e.address} {met.pop(e.address)}" if e.address in met else e.describe(now) for e in known]
        states += [f"{address} {what}" for address, what in met.items()]  # no longer resolved
        return "; ".join(states) or "no address resolved"

    def _no_endpoint(self, now: float) -> str:
        return f"{'no endpoint answered' if self.failures else 'no endpoint is up'} ({self._state(now)})"

    # -- actions ---------------------------------------------------------------------------------
    def finish(self, selector: selectors.BaseSelector, code: Code, message: str = "") -> None:
        self.code, self.message = code, message
        for attempt in list(self.attempts):
            self._drop(attempt, keep_connection=False)

    def _drop(self, attempt: _Attempt, keep_connection: bool) -> None:
        self.attempts.remove(attempt)
        attempt.endpoint.waiting.pop(id(attempt), None)
        self.stub.endpoints.done(attempt.endpoint)
        sock = attempt.exchange.close(keep=keep_connection)
        if sock is not None:
            self.stub.give_back(attempt.endpoint, sock)

    def start(self, selector: selectors.BaseSelector, now: float, hedge: bool = False,
              same_endpoint: endpoints.Endpoint | None = None) -> bool:
        """Send an attempt to an endpoint not tried yet (or `same_endpoint`, on a new connection). False
        when there is none to send it to; True when the call went on (or finished) from here."""
        stub = self.stub
        if not stub.endpoints.endpoints and now - stub._resolved_at > 0.5:
            stub.resolve()
        if same_endpoint is not None:
            with stub.endpoints.lock:
                same_endpoint.inflight += 1
            endpoint = same_endpoint
        else:
            endpoint = stub.endpoints.pick(exclude=self.tried)
            if endpoint is None:
                return False
            self.tried.append(endpoint)
        parts = frames.encode(frames.PREDICT, max(1, int((self.deadline - now) * 1000)), self.meta, self.body)
        try:
            exchange, reused = stub.exchange(endpoint, parts, reuse=same_endpoint is None)
        except OSError as e:
            stub.endpoints.done(endpoint)
            self._failed(endpoint, f"refused the connection ({e.strerror or e})", now)
            return self.start(selector, now, hedge)
        attempt = _Attempt(endpoint, exchange, reused, hedge, now)
        self.attempts.append(attempt)
        endpoint.waiting[id(attempt)] = now
        if hedge:
            stub.runtime.event(stub.target, "hedge")
        self._step(selector, attempt, now, first=True)
        return True

    def ready(self, selector: selectors.BaseSelector, attempt: _Attempt) -> None:
        self._step(selector, attempt, time.monotonic())

    def _step(self, selector: selectors.BaseSelector, attempt: _Attempt, now: float, first: bool = False) -> None:
        exchange = attempt.exchange
        was_connecting = exchange.connecting
        try:
            answered = exchange.start(selector, (self, attempt)) if first else exchange.step()
        except _FAILURES as e:
            self._attempt_failed(selector, attempt, exchange.state, e, now)
            return
        if was_connecting and not exchange.connecting:  # connected: the request is being written from now
            attempt.sent_at = now
            attempt.endpoint.waiting[id(attempt)] = now
        if answered:
            self._answered(selector, attempt)

    def _attempt_failed(self, selector: selectors.BaseSelector, attempt: _Attempt, state: str,
                        error: BaseException, now: float) -> None:
        self._drop(attempt, keep_connection=False)
        stale = attempt.reused and isinstance(error, EOFError | ConnectionResetError | BrokenPipeError)
        if stale and not self.attempts and self.start(selector, now, same_endpoint=attempt.endpoint):
            return  # the server had closed an idle connection (it restarted): try a new one, once
        self._failed(attempt.endpoint, _what_failed(state, error), now)
        self._go_elsewhere(selector, now)

    def _answered(self, selector: selectors.BaseSelector, attempt: _Attempt) -> None:
        _, code, meta, body = attempt.exchange.answer
        done = time.monotonic()
        self.stub.endpoints.answered(attempt.endpoint, done - attempt.sent_at, done)
        code = Code(code) if code in Code._value2member_map_ else Code.UNKNOWN
        message = meta.decode("utf-8", "replace")
        self._drop(attempt, keep_connection=True)
        if code in _RETRYABLE:
            self._failed(attempt.endpoint, f"answered {code.name} ({message})", done)
            self._go_elsewhere(selector, done, last=(code, message))
            return
        self.endpoint = attempt.endpoint.address
        if code == Code.OK:
            self.answer_body = body
        self.finish(selector, code, message)

    def _failed(self, endpoint: endpoints.Endpoint, what: str, now: float) -> None:
        """The endpoint failed at the transport level: eject it and go on elsewhere."""
        self.failures.append((endpoint.address, what))
        self.stub.endpoints.eject(endpoint, what, now)

    def _go_elsewhere(self, selector: selectors.BaseSelector, now: float,
                      last: tuple[Code, str] | None = None) -> bool:
        """After an attempt failed: nothing to do if others are in flight; else re-send or give up."""
        if self.finished or self.attempts:
            return True
        if now < self.deadline and self.start(selector, now):
            self.stub.runtime.event(self.stub.target, "resend")
            return True
        if last is not None:
            self.finish(selector, *last)
        else:
            self.finish(selector, Code.UNAVAILABLE, self._no_endpoint(now))
        return False

    def check(self, selector: selectors.BaseSelector, now: float) -> None:
        """Deadlines, stalls, ejections by others, hedges."""
        if self.finished:
            return
        if now >= self.deadline:
            waited = ", ".join(a.endpoint.address for a in self.attempts) or "no endpoint"
            self.finish(selector, Code.DEADLINE_EXCEEDED,
                        f"Deadline Exceeded: no answer within {1000 * (self.deadline - self.started):.0f} ms "
                        f"(waiting on {waited}; {self._state(now)})")
            return
        stub = self.stub
        for attempt in list(self.attempts):
            limit = self._limit(attempt)
            if attempt.connecting:
                if now - attempt.sent_at > limit:
                    what = "did not finish the TLS handshake" if attempt.exchange.state == HANDSHAKING else \
                        "did not accept the connection"
                    self._drop(attempt, keep_connection=False)
                    self._failed(attempt.endpoint, f"{what} within {1000 * limit:.0f} ms", now)
                continue
            if attempt.endpoint.up and endpoints.stopped_answering(attempt.endpoint, attempt.sent_at, now, limit):
                waited = 1000 * (now - attempt.sent_at)
                if stub.endpoints.eject(attempt.endpoint, "stopped answering", attempt.sent_at):
                    self.failures.append((attempt.endpoint.address, f"stopped answering {waited:.0f} ms ago"))
        # Attempts on endpoints out of rotation (ejected here or by another call): race them with an
        # attempt elsewhere, or, with nowhere to go, give up after a quarter of the deadline.
        if not any(a.endpoint.up for a in self.attempts):
            if self.start(selector, now):
                if not self.finished and self.attempts:
                    stub.runtime.event(stub.target, "resend")
                    why = "; ".join(f"{a} {w}" for a, w in self.failures[-1:]) or "replica out of rotation"
                    log.info("%s: %s; re-sent to %s", self._where(), why, self.attempts[-1].endpoint.address)
            elif not self.attempts:
                self.finish(selector, Code.UNAVAILABLE, self._no_endpoint(now))
            elif now - self.started >= (self.deadline - self.started) * endpoints.STALL_DEADLINE_FRACTION and \
                    not any(a.endpoint.oldest_waiting() == id(a) for a in self.attempts):
                self.finish(selector, Code.UNAVAILABLE, f"{self._no_endpoint(now)}; failing fast until one answers")
            return
        if self._may_hedge() and now - self.attempts[0].begun_at >= self.hedge_after:
            self.hedged = True
            self.start(selector, now, hedge=True)


def run(calls: Sequence[TcpCall], deadline: float) -> None:
    """Make every call (each to its own target, concurrently, in this thread) until all are finished."""
    now = time.monotonic()
    selector = selectors.PollSelector()  # poll: registering a socket costs no system call, unlike epoll
    try:
        for call in calls:
            call.started, call.deadline = now, deadline
            if deadline <= now:
                call.finish(selector, Code.DEADLINE_EXCEEDED, "Deadline Exceeded before the call was sent")
            elif not call.start(selector, now):
                call.finish(selector, Code.UNAVAILABLE, call._no_endpoint(now))
        pending = [c for c in calls if not c.finished]
        while pending:
            now = time.monotonic()
            wake = min(c.next_wake(now) for c in pending)
            for key, _ in selector.select(max(0.0, wake - now)):
                call, attempt = key.data
                if attempt in call.attempts:
                    call.ready(selector, attempt)
            now = time.monotonic()
            for call in pending:
                call.check(selector, now)
            pending = [c for c in pending if not c.finished]
    finally:
        for call in calls:
            if not call.finished:
                call.finish(selector, Code.CANCELLED, "the call was abandoned")
        selector.close()


class _Prober:
    """Probes the ejected endpoints of a runtime's tcp targets, all at once, every `PROBE_SECONDS`."""

    def __init__(self) -> None:
        self._stubs: list[TcpStub] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="remote-predict-prober", daemon=True)
        self._thread.start()

    def add(self, stub: TcpStub) -> None:
        with self._lock:
            self._stubs.append(stub)

    def _run(self) -> None:
        while not self._stop.wait(endpoints.PROBE_SECONDS):
            with self._lock:
                self._stubs = [s for s in self._stubs if not s.closed]
                stubs = list(self._stubs)
            try:
                probe_round(stubs, endpoints.PROBE_TIMEOUT_SECONDS)
            except Exception:  # the prober must outlive a bug in one round
                log.exception("probing tcp endpoints failed")

    def close(self) -> None:
        self._stop.set()


def probe_round(stubs: Sequence[TcpStub], timeout: float) -> None:
    """A HEALTH frame to every ejected endpoint, each on a new connection; those answering SERVING within
    `timeout` rejoin, as soon as they answer. A silent one costs its own socket, not the others' time."""
    selector = selectors.PollSelector()  # poll: registering a socket costs no system call, unlike epoll
    pending: set[Exchange] = set()
    try:
        for stub in stubs:
            for endpoint in stub.endpoints.ejected():
                try:
                    exchange, _ = stub.exchange(endpoint, _HEALTH, reuse=False)
                    exchange.start(selector, (stub, endpoint, exchange))
                except _FAILURES:
                    continue
                pending.add(exchange)
        give_up = time.monotonic() + timeout
        while pending and (left := give_up - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                stub, endpoint, exchange = key.data
                if exchange not in pending:
                    continue
                try:
                    if not exchange.step():
                        continue
                    if exchange.answer[1] == Code.OK:
                        stub.endpoints.rejoin(endpoint)
                except _FAILURES:
                    pass
                exchange.close()
                pending.discard(exchange)
    finally:
        for exchange in pending:
            exchange.close()
        selector.close()


class _Resolver:
    """Re-resolves the names of a runtime's tcp targets (a thread of its own: a resolver can be slow)."""

    def __init__(self) -> None:
        self._stubs: list[TcpStub] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="remote-predict-resolver", daemon=True)
        self._thread.start()

    def add(self, stub: TcpStub) -> None:
        with self._lock:
            self._stubs.append(stub)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._stubs = [s for s in self._stubs if not s.closed]
                stubs = list(self._stubs)
            for stub in stubs:
                if stub.resolve_due(time.monotonic()):
                    try:
                        stub.resolve()
                    except Exception:  # a bad answer for one name must not stop the others'
                        log.exception("resolving %s failed", stub.target)

    def close(self) -> None:
        self._stop.set()


def _prober(runtime: OpRuntime) -> _Prober:
    return runtime.service("tcp-prober", _Prober)


def _resolver(runtime: OpRuntime) -> _Resolver:
    return runtime.service("tcp-resolver", _Resolver)

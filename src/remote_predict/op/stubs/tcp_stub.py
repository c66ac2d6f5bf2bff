"""`tcp://host:port[,host:port...]` targets: Predict over remote-predict's framed TCP transport (`frames`).

What it does for a call, in the calling thread and without handing it to another:

* picks an endpoint that is up (`endpoints.choose`), takes one of its idle connections or connects
  (without blocking), and writes the request frame;
* waits for the answer with `poll`, together with every other call of the same fan-out (a master's
  lookup sends each shard its frame, then waits for all of them at once), on non-blocking sockets (no
  system call beyond the write, the wait and the read for a small call);
* while it waits, applies the health rules of `endpoints`: a replica that stopped answering is
  ejected and the call is re-sent to another (the first answer wins, the other connection is closed);
  with `hedge_after_ms`, a call still unanswered then is also sent to another replica;
* answers that are errors of the model (bad input, unknown model...) are final; UNAVAILABLE (the replica
  drains or sheds load) and broken connections move the call to another replica.

Names resolve with the system resolver when the stub is made and again every `RESOLVE_SECONDS`, so a
headless Kubernetes Service's pods (one address each) are each an endpoint. Ejected endpoints are probed
with HEALTH frames every `endpoints.PROBE_SECONDS` by one thread per runtime.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tensorflow_serving.apis import model_pb2, predict_pb2

from remote_predict import frames, wire
from remote_predict.errors import Code
from remote_predict.op import addresses, endpoints, request_context
from remote_predict.op.runtime import ClientTls, OpRuntime
from remote_predict.op.stubs.base import StubError

log = logging.getLogger(__name__)

RESOLVE_SECONDS = 5.0  # re-resolve names this often (every probe round while a target has no endpoint)
CONNECT_SECONDS = 1.0  # at most this long to connect (less when the call's deadline is nearer)
MAX_IDLE = 64  # idle connections kept per endpoint
_POLL_SECONDS = 0.02  # how often a call waiting on an ejected endpoint looks again
_RETRYABLE = (Code.UNAVAILABLE,)


def client_ssl_context(tls: ClientTls | None) -> ssl.SSLContext | None:
    """TLS as the gRPC stub's: `ca` verifies the server (system roots if empty), cert/key authenticate us."""
    if tls is None:
        return None
    context = ssl.create_default_context(cadata=tls.ca or None)
    if tls.cert and tls.key:
        with tempfile.TemporaryDirectory() as scratch:  # load_cert_chain reads files only
            cert, key = os.path.join(scratch, "cert.pem"), os.path.join(scratch, "key.pem")
            for path, pem in ((cert, tls.cert), (key, tls.key)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                    f.write(pem)
            context.load_cert_chain(cert, key)
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
        self.hedge_after = runtime.settings.hedge_after_ms / 1000
        self.closed = False
        _prober(runtime).add(self)

    # ------------------------------------------------------------------------------- endpoints

    def resolve(self) -> None:
        resolved = _resolve(self._names)
        self._resolved_at = time.monotonic()
        if not resolved and self.endpoints.endpoints:
            return  # keep the last good list when the resolver fails
        self._sockaddrs = dict(resolved)
        for gone in self.endpoints.replace([e for e, _ in resolved]):
            _close_all(gone)

    def connect(self, endpoint: endpoints.Endpoint) -> socket.socket:
        """A new non-blocking socket with a connect in progress."""
        family, sockaddr, _ = self._sockaddrs[endpoint.address]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        result = sock.connect_ex(sockaddr)
        if result not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            raise OSError(result, os.strerror(result))
        return sock

    def finish_connect(self, endpoint: endpoints.Endpoint, sock: socket.socket, timeout: float) -> socket.socket:
        """The connected socket, non-blocking (TLS: after a handshake that blocks for up to `timeout`)."""
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl is not None:
            sock.settimeout(max(timeout, 0.001))
            sock = self.ssl.wrap_socket(sock, server_hostname=self._sockaddrs[endpoint.address][2])
            sock.setblocking(False)
        return sock

    def take_idle(self, endpoint: endpoints.Endpoint) -> socket.socket | None:
        """An idle connection; one the server closed meanwhile shows itself by EOF and is retried fresh."""
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
        call = TcpCall(self, wire.encode_predict_request(request, inputs), request.model_spec.name)
        run([call], time.monotonic() + timeout)
        return call.outcome()

    def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        call = TcpCall(self, request.SerializeToString(), request.model_spec.name)
        run([call], time.monotonic() + timeout)
        if call.code != Code.OK:
            raise StubError(call.code, call.message)
        return predict_pb2.PredictResponse.FromString(bytes(call.answer_body))

    def probe(self, endpoint: endpoints.Endpoint, timeout: float) -> bool:
        """Whether the endpoint answers a HEALTH frame with SERVING within `timeout`."""
        _family, sockaddr, host = self._sockaddrs.get(endpoint.address, (None, None, None))
        if sockaddr is None:
            return False
        try:
            with socket.create_connection(sockaddr[:2], timeout=timeout) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = self.ssl.wrap_socket(raw, server_hostname=host) if self.ssl is not None else raw
                frames.send(sock, frames.encode(frames.HEALTH, 0, b"", b""))
                _, code, _, _ = frames.FrameReader().read(sock)
                return code == Code.OK
        except (OSError, frames.FrameError, EOFError):
            return False

    def close(self) -> None:
        self.closed = True
        for endpoint in list(self.endpoints.endpoints):
            _close_all(endpoint)


def _close_all(endpoint: endpoints.Endpoint) -> None:
    idle, endpoint.idle = endpoint.idle, []
    for sock in idle:
        sock.close()


_IN, _OUT = select.POLLIN | select.POLLPRI, select.POLLOUT
_GONE = select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Poller:
    """The sockets a fan-out waits on: `select.poll`, whose registrations cost no system call."""

    def __init__(self) -> None:
        self.poll = select.poll()
        self.owners: dict[int, tuple[TcpCall, _Attempt]] = {}

    def watch(self, call: TcpCall, attempt: _Attempt, mask: int) -> None:
        fd = attempt.sock.fileno()
        self.owners[fd] = (call, attempt)
        self.poll.register(fd, mask)

    def forget(self, attempt: _Attempt) -> None:
        fd = attempt.fd
        if self.owners.pop(fd, None) is not None:
            self.poll.unregister(fd)


class _Attempt:
    __slots__ = ("connecting", "endpoint", "fd", "hedge", "pending", "reader", "reused", "sent_at", "sock")

    def __init__(self, endpoint: endpoints.Endpoint, sock: socket.socket, reused: bool, hedge: bool, now: float):
        self.endpoint, self.sock, self.reused, self.hedge = endpoint, sock, reused, hedge
        self.fd = sock.fileno()
        self.connecting = not reused
        self.sent_at = now
        self.pending: list[memoryview] = []  # what is left to write of the request frame
        self.reader = frames.FrameReader()


class TcpCall:
    """One Predict to one tcp target, possibly over several attempts (re-sends, hedges)."""

    def __init__(self, stub: TcpStub, body: bytes, model: str):
        self.stub, self.model = stub, model
        self.body = body
        self.meta = frames.encode_meta(request_context.current().metadata)
        self.attempts: list[_Attempt] = []
        self.tried: list[endpoints.Endpoint] = []
        self.failures: list[str] = []  # what went wrong where, for the final message
        self.code: Code | None = None
        self.message = ""
        self.answer_body: memoryview | None = None
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
    def _stall_after(self) -> float:
        budget = self.deadline - self.started
        if len(self.stub.endpoints.endpoints) == 1:  # nowhere else to go: be as patient as before
            return budget * endpoints.STALL_DEADLINE_FRACTION
        return endpoints.stall_after(self.stub.endpoints.latency.p99, budget)

    def next_wake(self, now: float) -> float:
        wake = self.deadline
        after = self._stall_after()
        for attempt in self.attempts:
            if not attempt.endpoint.up:
                wake = min(wake, now + _POLL_SECONDS)
            wake = min(wake, attempt.sent_at + after)
            if self.stub.hedge_after and len(self.attempts) == 1:
                wake = min(wake, attempt.sent_at + self.stub.hedge_after)
        return wake

    # -- actions ---------------------------------------------------------------------------------
    def finish(self, poller: _Poller, code: Code, message: str = "") -> None:
        self.code, self.message = code, message
        for attempt in list(self.attempts):
            self._drop(poller, attempt, keep_connection=False)

    def _drop(self, poller: _Poller, attempt: _Attempt, keep_connection: bool) -> None:
        self.attempts.remove(attempt)
        attempt.endpoint.waiting.pop(id(attempt), None)
        self.stub.endpoints.done(attempt.endpoint)
        poller.forget(attempt)
        if keep_connection:
            self.stub.give_back(attempt.endpoint, attempt.sock)
        else:
            attempt.sock.close()

    def start(self, poller: _Poller, now: float, hedge: bool = False,
              same_endpoint: endpoints.Endpoint | None = None) -> bool:
        """Send an attempt to an endpoint not tried yet (or `same_endpoint`, on a fresh connection)."""
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
        sock = None if same_endpoint is not None else stub.take_idle(endpoint)
        reused = sock is not None
        try:
            if sock is None:
                sock = stub.connect(endpoint)
        except OSError as e:
            stub.endpoints.done(endpoint)
            self._failed(endpoint, f"refused the connection ({e.strerror or e})", now)
            return self.start(poller, now, hedge)
        attempt = _Attempt(endpoint, sock, reused, hedge, now)
        self.attempts.append(attempt)
        endpoint.waiting[id(attempt)] = now
        if reused:
            if not self._send(poller, attempt, now):
                return self.start(poller, now, hedge, same_endpoint=endpoint)
        else:
            poller.watch(self, attempt, _OUT)
        if hedge:
            stub.runtime.event(stub.target, "hedge")
        return True

    def _send(self, poller: _Poller, attempt: _Attempt, now: float) -> bool:
        """Write the request frame (what fits now; the rest when writable). False if a reused connection
        turned out to be closed (try a fresh one)."""
        if not attempt.pending:
            timeout_ms = max(1, int((self.deadline - now) * 1000))
            attempt.pending = frames.views(frames.encode(frames.PREDICT, timeout_ms, self.meta, self.body))
            attempt.sent_at = now
        try:
            attempt.pending = frames.send_some(attempt.sock, attempt.pending)
        except OSError as e:
            reused = attempt.reused
            self._drop(poller, attempt, keep_connection=False)
            if reused:
                return False
            self._failed(attempt.endpoint, f"dropped the connection ({e.strerror or e})", now)
            return True
        attempt.connecting = False
        poller.watch(self, attempt, _OUT if attempt.pending else _IN)
        return True

    def _failed(self, endpoint: endpoints.Endpoint, what: str, now: float) -> None:
        """The endpoint failed at the transport level: eject it and go on elsewhere."""
        self.failures.append(f"{endpoint.address} {what}")
        self.stub.endpoints.eject(endpoint, what, now)

    def ready(self, poller: _Poller, attempt: _Attempt, events: int) -> None:
        now = time.monotonic()
        if attempt.connecting:
            poller.forget(attempt)  # before a TLS wrap replaces the socket object
            try:
                attempt.sock = self.stub.finish_connect(attempt.endpoint, attempt.sock, self.deadline - now)
            except (OSError, ssl.SSLError) as e:
                self._drop(poller, attempt, keep_connection=False)
                self._failed(attempt.endpoint, f"refused the connection ({getattr(e, 'strerror', None) or e})", now)
                self._go_elsewhere(poller, now)
                return
            attempt.fd = attempt.sock.fileno()
            attempt.connecting = False
            self._send(poller, attempt, now)
            if not self.attempts:
                self._go_elsewhere(poller, now)
            return
        if attempt.pending:  # the rest of a large request
            self._send(poller, attempt, now)
            if not self.attempts:
                self._go_elsewhere(poller, now)
            return
        try:
            frame = attempt.reader.feed(attempt.sock)
        except (OSError, EOFError, frames.FrameError) as e:
            reused = attempt.reused
            self._drop(poller, attempt, keep_connection=False)
            stale = reused and isinstance(e, EOFError | ConnectionResetError) and not self.attempts
            if stale and self.start(poller, now, same_endpoint=attempt.endpoint):
                return  # the server had closed an idle connection: try a fresh one once
            what = "closed the connection" if isinstance(e, EOFError) else f"broke the connection ({e})"
            self._failed(attempt.endpoint, what, now)
            self._go_elsewhere(poller, now)
            return
        if frame is None:
            return  # more of the answer to come
        _, code, meta, body = frame
        self.stub.endpoints.answered(attempt.endpoint, now - attempt.sent_at, now)
        code = Code(code) if code in Code._value2member_map_ else Code.UNKNOWN
        message = meta.decode("utf-8", "replace")
        self._drop(poller, attempt, keep_connection=True)
        if code in _RETRYABLE:
            self._failed(attempt.endpoint, f"answered {code.name} ({message})", now)
            self._go_elsewhere(poller, now, last=(code, message))
            return
        self.endpoint = attempt.endpoint.address
        if code == Code.OK:
            self.answer_body = body
        self.finish(poller, code, message)

    def _go_elsewhere(self, poller: _Poller, now: float, last: tuple[Code, str] | None = None) -> bool:
        """After an attempt failed: nothing to do if others are in flight; else re-send or give up."""
        if self.finished or self.attempts:
            return True
        if now < self.deadline and self.start(poller, now):
            self.stub.runtime.event(self.stub.target, "resend")
            return True
        if last is not None:
            self.finish(poller, *last)
        else:
            self.finish(poller, Code.UNAVAILABLE, self._no_endpoint(now))
        return False

    def _no_endpoint(self, now: float) -> str:
        tried = "; ".join(self.failures)
        state = self.stub.endpoints.describe(now) or "no address resolved"
        return f"no endpoint answered ({tried})" if tried else f"no endpoint is up ({state})"

    def check(self, poller: _Poller, now: float) -> None:
        """Deadlines, stalls, ejections by others, hedges."""
        if self.finished:
            return
        if now >= self.deadline:
            waited = ", ".join(a.endpoint.address for a in self.attempts) or "no endpoint"
            self.finish(poller, Code.DEADLINE_EXCEEDED,
                        f"Deadline Exceeded: no answer within {1000 * (self.deadline - self.started):.0f} ms "
                        f"(waiting on {waited})")
            return
        after = self._stall_after()
        stub = self.stub
        for attempt in list(self.attempts):
            if attempt.connecting:
                if now - attempt.sent_at > min(after, CONNECT_SECONDS):
                    self._drop(poller, attempt, keep_connection=False)
                    self._failed(attempt.endpoint, "did not accept the connection", now)
                continue
            if attempt.endpoint.up and endpoints.stopped_answering(attempt.endpoint, attempt.sent_at, now, after):
                waited = 1000 * (now - attempt.sent_at)
                if stub.endpoints.eject(attempt.endpoint, "stopped answering", attempt.sent_at):
                    self.failures.append(f"{attempt.endpoint.address} stopped answering {waited:.0f} ms ago")
        # Attempts on endpoints that are out of rotation: race them with an attempt elsewhere, or, with
        # nowhere to go, give up after a quarter of the deadline (the call that has waited longest waits on).
        live = [a for a in self.attempts if a.endpoint.up or a.connecting]
        if not live:
            if self.start(poller, now):
                stub.runtime.event(stub.target, "resend")
                log.info("RemotePredict to model %r at %s: %s; re-sent to %s", self.model, stub.target,
                         "; ".join(self.failures[-1:]) or "replica out of rotation", self.attempts[-1].endpoint.address)
            elif not self.attempts:
                self.finish(poller, Code.UNAVAILABLE, self._no_endpoint(now))
            elif now - self.started >= (self.deadline - self.started) * endpoints.STALL_DEADLINE_FRACTION and \
                    not any(a.endpoint.oldest_waiting() == id(a) for a in self.attempts):
                self.finish(poller, Code.UNAVAILABLE, f"{self._no_endpoint(now)}; failing fast until one answers")
            return
        if stub.hedge_after and len(self.attempts) == 1 and now - self.attempts[0].sent_at >= stub.hedge_after \
                and not self.attempts[0].hedge:
            self.start(poller, now, hedge=True)


def run(calls: Sequence[TcpCall], deadline: float) -> None:
    """Make every call (each to its own target, concurrently, in this thread) until all are finished."""
    now = time.monotonic()
    poller = _Poller()
    try:
        for call in calls:
            call.started, call.deadline = now, deadline
            if deadline <= now:
                call.finish(poller, Code.DEADLINE_EXCEEDED, "Deadline Exceeded before the call was sent")
            elif not call.start(poller, now):
                call.finish(poller, Code.UNAVAILABLE, call._no_endpoint(now))
        pending = [c for c in calls if not c.finished]
        while pending:
            now = time.monotonic()
            wake = min(c.next_wake(now) for c in pending)
            for fd, events in poller.poll.poll(max(0, math.ceil((wake - now) * 1000))):
                owner = poller.owners.get(fd)
                if owner is not None and owner[1] in owner[0].attempts:
                    owner[0].ready(poller, owner[1], events)
            now = time.monotonic()
            for call in pending:
                call.check(poller, now)
            pending = [c for c in pending if not c.finished]
    finally:
        for call in calls:
            if not call.finished:
                call.finish(poller, Code.CANCELLED, "the call was abandoned")


class _Prober:
    """Probes the ejected endpoints of a runtime's tcp targets and re-resolves their names."""

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
                stubs = [s for s in self._stubs if not s.closed]
                self._stubs = stubs
            for stub in stubs:
                now = time.monotonic()
                if now - stub._resolved_at > (RESOLVE_SECONDS if stub.endpoints.endpoints else 1.0):
                    stub.resolve()
                for endpoint in stub.endpoints.ejected():
                    if stub.probe(endpoint, timeout=0.25):
                        stub.endpoints.rejoin(endpoint)

    def close(self) -> None:
        self._stop.set()


def _prober(runtime: OpRuntime) -> _Prober:
    return runtime.service("tcp-prober", _Prober)

"""Calls in flight per target, and shedding the calls of a target that stopped answering.

For targets without health per endpoint: gRPC addresses naming one server, REST, in-process and custom
stubs. (A `tcp://` target's replicas are watched one by one in `endpoints`; a gRPC target listing
several replicas is left to gRPC's own keepalive, retries and round robin, see `stubs/grpc_stub.py`.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from remote_predict.errors import Code

STALL_FRACTION = 4  # a call waiting a quarter of its deadline means its target has stalled
WATCH_SECONDS = 0.05  # how often the watchdog looks at the calls in flight
# Codes that say the target did not answer; any other end of a probe means it is answering again.
NO_ANSWER = frozenset({Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE, Code.CANCELLED})
_log = logging.getLogger(__name__)


class _Call:
    __slots__ = ("cancel", "deadline", "shed", "start", "watched")

    def __init__(self, deadline: float, watched: bool):
        self.start = time.monotonic()
        self.deadline = deadline
        self.cancel: Callable[[], object] | None = None
        self.shed = False
        self.watched = watched


class _Target:
    __slots__ = ("calls", "probe", "stalled_since")

    def __init__(self) -> None:
        self.calls: dict[int, _Call] = {}
        self.stalled_since: float | None = None
        self.probe: _Call | None = None


class CircuitBreaker:
    """A circuit breaker per target, so that a target that stops answering cannot hold every thread.

    A call waits for its answer in a thread, so a hung target would hold one request thread per call
    until the deadline, and soon every thread of the server. A fixed cap per target cannot tell that
    from healthy load, so a watchdog thread looks for a target whose oldest call in flight has waited a
    quarter of its deadline: the target is then stalled, its oldest call becomes the probe and may wait
    its whole deadline, and every other call to it is cancelled (its thread freed). While the target is
    stalled, new calls fail at once with UNAVAILABLE, except that a new probe goes through when the last
    one failed; the first answer to a probe ends the stall. `limit` (optional) caps calls per target.
    """

    def __init__(self, limit: int = 0) -> None:
        self.limit = max(0, limit)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._targets: dict[str, _Target] = {}
        self._inflight = 0
        self._watchdog: threading.Thread | None = None
        self._local = threading.local()
        self._closed = False

    def begin(self, target: str, deadline: float, watched: bool = True) -> tuple[_Call | None, Code, str]:
        """Count a call (refused over the cap, or while the target is stalled); `watched=False` for
        targets whose replicas are watched elsewhere: only the cap applies to them."""
        with self._lock:
            state = self._targets.get(target)
            if state is None:
                state = self._targets[target] = _Target()
            probe = False
            if watched and state.stalled_since is not None:
                if state.probe is not None:
                    stalled_ms = (time.monotonic() - state.stalled_since) * 1000
                    return None, Code.UNAVAILABLE, (
                        f"the target stopped answering {stalled_ms:.0f} ms ago; failing fast until it answers again")
                probe = True
            if self.limit and len(state.calls) >= self.limit:
                return None, Code.RESOURCE_EXHAUSTED, (f"{self.limit} calls to this target are already in flight "
                                                       "(--remote_predict_max_inflight_per_target)")
            call = _Call(deadline, watched)
            state.calls[id(call)] = call
            if probe:
                state.probe = call
            self._inflight += 1
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="remote-predict-watchdog", daemon=True)
                self._watchdog.start()
            elif self._inflight == 1:
                self._wake.notify()
        self._local.call = call
        return call, Code.OK, ""

    def end(self, target: str, call: _Call, code: Code) -> None:
        self._local.call = None
        with self._lock:
            state = self._targets[target]
            if state.calls.pop(id(call), None) is not None:
                self._inflight -= 1
            if call is state.probe:
                state.probe = None
            if code not in NO_ANSWER and not call.shed:
                state.stalled_since = None

    def on_cancel(self, cancel: Callable[[], object]) -> None:
        """For stubs: how to cancel the call this thread is about to make (called at once if already shed)."""
        call = getattr(self._local, "call", None)
        if call is not None:
            with self._lock:
                call.cancel = cancel
                shed = call.shed
            if shed:
                cancel()

    def _watch(self) -> None:
        while True:
            with self._lock:
                while not self._inflight and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                cancels = self._shed_stalled(time.monotonic())
            for cancel in cancels:
                try:
                    cancel()
                except Exception:  # the watchdog must outlive a failing stub
                    _log.exception("cancelling a call failed")
            time.sleep(WATCH_SECONDS)

    def _shed_stalled(self, now: float) -> list[Callable[[], object]]:
        cancels: list[Callable[[], object]] = []
        for state in self._targets.values():
            watched = [c for c in state.calls.values() if c.watched]
            if state.stalled_since is not None or not watched:
                continue  # the probe may wait its whole deadline
            oldest, *others = watched
            if now - oldest.start <= oldest.deadline / STALL_FRACTION:
                continue
            state.stalled_since = now
            state.probe = oldest
            for call in others:
                call.shed = True
                if call.cancel is not None:
                    cancels.append(call.cancel)
        return cancels

    def close(self) -> None:
        """Stop the watchdog (the runtime that owns this breaker is closing)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def current_call_shed(self) -> bool:
        """For stubs: whether the call this thread is making was shed (else a cancellation hit another)."""
        call = getattr(self._local, "call", None)
        return call is not None and call.shed


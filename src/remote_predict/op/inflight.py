"""Calls in flight per target, and shedding the calls of a target that stopped answering."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from remote_predict.errors import Code

STALL_FRACTION = 4  # a call waiting a quarter of its deadline means its target has stalled


class _Call:
    __slots__ = ("cancel", "deadline", "shed", "start", "target")

    def __init__(self, target: str, deadline: float):
        self.start = time.monotonic()
        self.target = target
        self.deadline = deadline
        self.cancel: Callable[[], object] | None = None
        self.shed = False


class _Targets:
    """Calls in flight, per target; sheds the calls of a target that stopped answering.

    A call waits for its answer in a thread, so a target that stops answering would hold one request
    thread per call until the deadline, and soon every thread of the server. A target is stalled when
    its oldest call in flight has waited a quarter of its deadline: then the other calls to it are
    cancelled (their threads freed), new calls fail at once with UNAVAILABLE, and the oldest stays as a
    probe that tells when the target answers again. `limit` (optional) caps calls per target outright.
    """

    def __init__(self) -> None:
        self.limit = 0
        self._lock = threading.Lock()
        self._calls: dict[str, dict[int, _Call]] = {}
        self._local = threading.local()

    def begin(self, target: str, deadline: float) -> tuple[_Call | None, Code, str]:
        now = time.monotonic()
        with self._lock:
            calls = self._calls.setdefault(target, {})
            if calls:
                oldest = next(iter(calls.values()))
                waited = now - oldest.start
                if waited > oldest.deadline / STALL_FRACTION:
                    for call in list(calls.values())[1:]:
                        call.shed = True
                        if call.cancel is not None:
                            call.cancel()
                    return None, Code.UNAVAILABLE, (f"the target has not answered a call for {waited * 1000:.0f} ms; "
                                                    "failing fast until it answers again")
            if self.limit and len(calls) >= self.limit:
                return None, Code.RESOURCE_EXHAUSTED, (f"{self.limit} calls to this target are already in flight "
                                                       "(--remote_predict_max_inflight_per_target)")
            call = _Call(target, deadline)
            calls[id(call)] = call
        self._local.call = call
        return call, Code.OK, ""

    def end(self, target: str, call: _Call) -> None:
        self._local.call = None
        with self._lock:
            self._calls[target].pop(id(call), None)

    def should_give_up(self) -> bool:
        """For stubs waiting on an answer: True when this thread's call is shed (its target stalled).

        Waiting calls ask this every few tens of milliseconds, so a stalled target's calls are released
        even when every request thread is already waiting on it and no new call arrives to notice.
        """
        call = getattr(self._local, "call", None)
        if call is None:
            return False
        if call.shed:
            return True
        with self._lock:
            calls = self._calls.get(call.target, {})
            oldest = next(iter(calls.values()), None)
            if oldest is not None and oldest is not call and \
                    time.monotonic() - oldest.start > oldest.deadline / STALL_FRACTION:
                call.shed = True
        return call.shed

    def on_cancel(self, cancel: Callable[[], object]) -> None:
        """For stubs: how to cancel the call this thread is making."""
        call = getattr(self._local, "call", None)
        if call is not None:
            call.cancel = cancel
            if call.shed:
                cancel()


targets = _Targets()
register_cancel = targets.on_cancel
should_give_up = targets.should_give_up


def set_max_inflight_per_target(limit: int) -> None:
    targets.limit = max(0, limit)

"""Logs failed RemotePredict calls once per kind of failure, not once per request.

One per op runtime (it installs one): under a failing target every request fails the same way, and one
line every ten seconds, with a count, says as much as a line per request.
"""

from __future__ import annotations

import logging
import threading
import time

from remote_predict.errors import Code

log = logging.getLogger("remote_predict.remote_calls")


class FailureLog:
    """Log the first failure of each (target, model, code); repeat at most every `interval` seconds."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str, Code], tuple[float, int]] = {}

    def __call__(self, record) -> None:  # a runtime.CallRecord
        if record.code is Code.OK:
            return
        key = (record.target, record.model_name, record.code)
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (0.0, 0))
            if last and now - last < self.interval:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
        more = f" ({suppressed} more like it in the last {now - last:.0f}s)" if suppressed else ""
        log.warning("%s (%s)%s", record.message, record.code.name, more)  # the message names target and model


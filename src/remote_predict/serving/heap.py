"""Keeping Python's cyclic garbage collector off the objects that live as long as the server.

A server holds a few hundred thousand objects that never become garbage: TensorFlow's modules and each
loaded version's graph. Python's collector walks all of them in every full collection (0.3 s of one CPU,
with the GIL held and every request stalled, on the 2-CPU development host), and under load full
collections come every few seconds: the objects of the requests in flight outlive the young collections
and count towards the next full one. On a split master at concurrency 32 the collector had 6 % of the
master's CPU samples (perf), and 1 % with the heap frozen.

So the heap is settled: the garbage is collected, and what is left is frozen (`gc.freeze`), which the
collector then skips. The server settles once before it opens its ports (the one full collection of all
of it, while no request waits), and again when versions have stopped changing for a moment, so that a
roll-out of ten models costs one settle, not ten. After a load that is cheap: only what is not frozen yet
is walked. After an unload it unfreezes first, so that the unloaded version's objects are collected, not
kept for ever: one full collection (the stall the collector would otherwise make every few seconds under
load) per roll-out.

The collector is one per process: a server that stops unfreezes it, and servers sharing a process (tests)
each settle it when their own versions change.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger(__name__)

QUIET_SECONDS = 3.0  # how long versions must stay unchanged before a settle


class Heap:
    def __init__(self, quiet_seconds: float = QUIET_SECONDS):
        self.quiet_seconds = quiet_seconds
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False
        self._unfreeze = False  # a version was unloaded since the last settle: its objects may be frozen
        self.settles = 0  # (for tests and the log)

    def changed(self, unloaded: bool = False) -> None:
        """The servables changed (`unloaded`: some were unloaded): settle once they have not changed for
        `quiet_seconds`."""
        with self._lock:
            if self._closed:
                return
            self._unfreeze = self._unfreeze or unloaded
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.quiet_seconds, self.settle)
            self._timer.name = "heap-settle"
            self._timer.daemon = True
            self._timer.start()

    def settle(self) -> None:
        """Collect the garbage, then freeze every object left (until the next settle that follows an unload,
        or `close`)."""
        with self._lock:
            if self._closed:
                return
            started = time.perf_counter()
            if self._unfreeze:
                gc.unfreeze()
                self._unfreeze = False
            gc.collect()
            gc.freeze()
            self.settles += 1
            log.debug("Froze %d objects in %.2f s", gc.get_freeze_count(), time.perf_counter() - started)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            gc.unfreeze()

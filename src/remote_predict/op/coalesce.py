"""Coalescing concurrent requests' work into one batch: the lookups of requests in flight, merged.

Under load a master runs many requests at once, and each would call every shard server for its own few
ids. A shard's cost is mostly per call, not per id, so the lookups of requests that arrive together are
better sent as one call per shard. This is the batching of `serving/batching.py`, without a timer:

* A request that finds fewer than `max_inflight` batches under way becomes a leader: it takes every
  request queued so far (itself included, at most `max_batch`) and does the work for all of them in its
  own thread. A request that arrives while batches are under way queues.
* When a leader's batch is done, it hands the lead to the first request still queued, which takes the
  queue as it is then. So with nothing under way a request waits for nothing, and under load batches
  grow by themselves to what arrived during one batch's round trip.
* Each request gets its own result (the work returns one per item), or the batch's error; a request
  whose deadline passes while it is queued gives up (DEADLINE_EXCEEDED) and is never worked on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from remote_predict.errors import Code, ServingError

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Waiter(Generic[Item, Result]):
    __slots__ = ("error", "event", "item", "lead", "result")

    def __init__(self, item: Item):
        self.item = item
        self.event = threading.Event()
        self.lead = False
        self.result: Result | None = None
        self.error: BaseException | None = None


class Coalescer(Generic[Item, Result]):
    def __init__(self, max_inflight: int = 2, max_batch: int = 64):
        self.max_inflight = max_inflight
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Waiter] = []
        self._leaders = 0
        self.batches = 0  # batches worked (for tests and metrics)

    def run(self, item: Item, work: Callable[[Sequence[Item]], Sequence[Result]], deadline: float) -> Result:
        waiter: _Waiter = _Waiter(item)
        with self._lock:
            self._queue.append(waiter)
            if self._leaders < self.max_inflight:
                self._leaders += 1
                waiter.lead = True
        if not waiter.lead:
            waiter.event.wait(max(0.0, deadline - time.monotonic()))
            with self._lock:
                if not waiter.event.is_set() and waiter in self._queue:  # still queued at its deadline
                    self._queue.remove(waiter)
                    raise ServingError(Code.DEADLINE_EXCEEDED, "Deadline Exceeded while queued for a lookup batch")
            if not waiter.lead:
                waiter.event.wait()  # taken into a batch just in time: its answer is on the way
                return self._outcome(waiter)
        self._lead(waiter, work)
        return self._outcome(waiter)

    def _lead(self, waiter: _Waiter, work: Callable) -> None:
        with self._lock:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        if waiter not in batch:  # (cannot happen: a leader is queued until it takes the queue)
            batch.insert(0, waiter)
        try:
            results = work([w.item for w in batch])
            for w, result in zip(batch, results, strict=True):
                w.result = result
        except BaseException as e:  # every request of the batch gets the batch's error
            for w in batch:
                w.error = e
        finally:
            self.batches += 1
            with self._lock:
                following = self._queue[0] if self._queue else None
                if following is not None:
                    following.lead = True  # the lead passes on; the number of leaders stays
                else:
                    self._leaders -= 1
            for w in batch:
                if w is not waiter:
                    w.event.set()
            if following is not None:
                following.event.set()

    @staticmethod
    def _outcome(waiter: _Waiter) -> Result:
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]

"""Coalescing concurrent requests into batches (op/coalesce.py), with real threads and plain functions."""

import threading
import time

import pytest

from helpers import wait_until
from remote_predict.errors import Code, ServingError
from remote_predict.op.coalesce import Coalescer


def run_all(coalescer: Coalescer, items, work, deadline_seconds: float = 10.0) -> dict:
    results, errors = {}, {}

    def one(item):
        try:
            results[item] = coalescer.run(item, work, time.monotonic() + deadline_seconds)
        except ServingError as e:
            errors[item] = e

    threads = [threading.Thread(target=one, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results | {item: e for item, e in errors.items()}


def test_each_request_gets_its_own_result_and_batches_form_under_load():
    seen_batches = []

    def work(batch):
        seen_batches.append(list(batch))
        time.sleep(0.02)  # a round trip: others arrive meanwhile
        return [item * 10 for item in batch]

    coalescer = Coalescer(max_inflight=1)
    results = run_all(coalescer, range(40), work)
    assert results == {i: i * 10 for i in range(40)}
    assert sorted(i for batch in seen_batches for i in batch) == list(range(40)), "each item worked on once"
    assert len(seen_batches) < 40 and coalescer.batches == len(seen_batches)


def test_a_request_alone_is_worked_on_at_once_in_its_own_thread():
    threads = []
    coalescer = Coalescer()
    assert coalescer.run(7, lambda batch: threads.append(threading.current_thread()) or [8], time.monotonic() + 1) == 8
    assert threads == [threading.current_thread()]


def test_a_failed_batch_fails_every_request_in_it_and_the_next_batch_runs():
    calls = []

    def work(batch):
        calls.append(list(batch))
        time.sleep(0.02)
        if len(calls) == 1:
            raise ServingError(Code.UNAVAILABLE, "shard down")
        return list(batch)

    coalescer = Coalescer(max_inflight=1)
    results = run_all(coalescer, range(12), work)
    failed = {i for i, r in results.items() if isinstance(r, ServingError)}
    assert failed == set(calls[0]) and all(results[i].code == Code.UNAVAILABLE for i in failed)
    assert all(results[i] == i for i in set(range(12)) - failed)


def test_a_request_queued_past_its_deadline_gives_up_and_is_never_worked_on():
    release = threading.Event()
    worked = []

    def slow(batch):
        worked.extend(batch)
        release.wait(5)
        return list(batch)

    coalescer = Coalescer(max_inflight=1)
    first = threading.Thread(target=lambda: coalescer.run("first", slow, time.monotonic() + 10))
    first.start()
    wait_until(lambda: worked == ["first"], 5, "the first request to be worked on")
    with pytest.raises(ServingError) as caught:
        coalescer.run("late", slow, time.monotonic() + 0.1)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    release.set()
    first.join(timeout=10)
    assert worked == ["first"]

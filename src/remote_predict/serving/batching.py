"""Server-side batching (`--enable_batching`, `--batching_parameters_file`), with TF Serving's parameters.

Concurrent Predict requests for the same model version, signature, aliases and input shapes merge along
the first dimension into one Session run whose answer is split back. TF Serving's semantics: a batch
closes when it holds `max_batch_size` rows or its oldest request waited `batch_timeout_micros` (0: it
takes whatever queued while the previous batches ran); at most `num_batch_threads` batches run at once;
at most `max_enqueued_batches` batches wait per queue, beyond which a request is refused UNAVAILABLE;
`allowed_batch_sizes` pads a batch up to the next allowed size; `pad_variable_length_inputs` pads inputs
whose other dimensions differ; a request larger than `max_batch_size` is refused, and with
`enable_large_batch_splitting` one larger than `max_execution_batch_size` runs in pieces of that size.

Why leader/follower and no batch threads: handing a request to a batch thread and its answer back costs
two thread wake-ups (50-100 us each on a small VM), more than a small model's whole Session run, so a
batcher with its own threads made every request slower when there was nothing to merge. Here the
request threads run the batches themselves. A request that finds a free run slot and nobody queued runs
at once in its own thread: it claims a slot lock without blocking and takes no other lock, no thread
hand-off. Requests arriving while `num_batch_threads` batches run queue; when a run ends, its thread
takes the next batch off the queue and hands it to one of the waiting requests in it, which runs the
merged batch in its own thread and wakes the others with their rows. Only waiting requests pay a
wake-up (one each), and each merged request saves a Session run, itself two thread hand-offs inside
TensorFlow.

Deadlines: `Batcher.run(..., deadline=)` takes the request's absolute `time.monotonic()` deadline. A
request still queued at its deadline is answered DEADLINE_EXCEEDED and never run. A merged run's
Session timeout covers the latest deadline in its batch, and it runs in the thread of the request with
that deadline, so each other request can give up at its own deadline (DEADLINE_EXCEEDED) while the run
goes on for the rest.

Queues exist only while requests wait in them: a queue is dropped the moment it empties, so nothing
outlives an unloaded version and a scan for work sees only queues that have work.

Telemetry (`served=`, see telemetry.py): a run is timed, and traced, in the thread that runs it, as the
runner request's `run` stage and span; every request then records, in its own thread, its `queue` stage
(and span) and, when another request's thread ran its batch, that run's time as its own `run` stage,
with a `run` span linked to the runner's, which holds the run's RemotePredict calls.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from remote_predict import tracing
from remote_predict.errors import Code, ServingError, invalid_argument
from remote_predict.serving import config as config_lib
from remote_predict.serving import config_protos, flags
from remote_predict.serving.servable import Servable, Signature, run_timeout_ms
from remote_predict.serving.telemetry import Served, Telemetry, outcome

log = logging.getLogger(__name__)

QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"
EXPIRED_IN_QUEUE = "Deadline exceeded while the request waited in the batch queue"
EXPIRED_IN_RUN = "Deadline exceeded while the request's batch was running"


@dataclass(frozen=True)
class BatchingOptions:
    # TF Serving's defaults when a field is absent from the parameters file.
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = flags.CPUS
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int = 0  # 0: max_batch_size; used only with enable_large_batch_splitting

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0 or self.num_batch_threads <= 0 or self.max_enqueued_batches <= 0:
            raise invalid_argument("batching: max_batch_size, num_batch_threads and max_enqueued_batches must be > 0")
        if self.batch_timeout_micros < 0:
            raise invalid_argument("batching: batch_timeout_micros must be >= 0")
        if self.max_execution_batch_size < 0:
            raise invalid_argument("batching: max_execution_batch_size must be >= 0")
        if self.max_execution_batch_size > self.max_batch_size:
            # A piece of a split request would be larger than any batch may hold: refuse the option
            # rather than queue work that can never run.
            raise invalid_argument(
                f"batching: max_execution_batch_size ({self.max_execution_batch_size}) must not be larger than "
                f"max_batch_size ({self.max_batch_size})")
        sizes = list(self.allowed_batch_sizes)
        if sizes:
            if sizes != sorted(set(sizes)) or sizes[0] <= 0:
                raise invalid_argument("batching: allowed_batch_sizes must be positive and increasing")
            if sizes[-1] != self.execution_batch_size:
                if self.enable_large_batch_splitting:
                    raise invalid_argument(
                        "batching: the last allowed_batch_sizes entry must equal max_execution_batch_size "
                        f"({self.execution_batch_size}) when enable_large_batch_splitting is on")
                raise invalid_argument("batching: the last allowed_batch_sizes entry must equal max_batch_size")

    @property
    def execution_batch_size(self) -> int:
        """The most rows one Session run takes (TF Serving uses max_execution_batch_size only when splitting)."""
        if self.enable_large_batch_splitting:
            return self.max_execution_batch_size or self.max_batch_size
        return self.max_batch_size


def parameters_from_file(path: str) -> BatchingOptions:
    """BatchingOptions from a BatchingParameters text file ('' gives TF Serving's defaults)."""
    if not path:
        return BatchingOptions()
    params = config_lib.read_text_proto(path, config_protos.BatchingParameters())
    values = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads",
                 "max_execution_batch_size", "enable_large_batch_splitting"):
        if params.HasField(name):
            values[name] = getattr(params, name).value
    if params.allowed_batch_sizes:
        values["allowed_batch_sizes"] = tuple(params.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = params.pad_variable_length_inputs
    if params.HasField("thread_pool_name"):
        log.info("batching: thread_pool_name %r is accepted; all queues share one pool of run slots",
                 params.thread_pool_name.value)
    return BatchingOptions(**values)


# ------------------------------------------------------------------------------------------ decisions


def choose_runner(deadlines: Sequence[float | None], current: int | None, now: float,
                  run_seconds: float | None) -> int:
    """Which of a batch's requests runs it, in its own thread: an index into `deadlines`.

    The runner's thread is busy until the run ends, so it should be the request that would wait for the
    run anyway: the one with the latest deadline (None: no deadline). The `current` request (the thread
    deciding, which would otherwise wake another) keeps the run when its deadline cannot pass during it:
    it has the latest deadline, or its deadline is well beyond the queue's last run time.
    """
    def key(i: int) -> float:
        return math.inf if deadlines[i] is None else deadlines[i]

    latest = max(range(len(deadlines)), key=key)
    if current is not None:
        mine = key(current)
        if mine >= key(latest):
            return current
        if run_seconds is not None and mine - now > 4 * run_seconds + 0.001:
            return current
    return latest


def split_sizes(size: int, capacity: int, queued_rows: int) -> list[int]:
    """Piece sizes of a request larger than a batch: the first fills the open batch, then full batches."""
    first = capacity - queued_rows % capacity
    sizes = [min(first, size)]
    left = size - sizes[0]
    while left > 0:
        sizes.append(min(capacity, left))
        left -= sizes[-1]
    return sizes


def padded_size(rows: int, allowed: Sequence[int]) -> int:
    """The smallest allowed batch size that holds `rows` (rows itself when none is configured)."""
    for size in allowed:
        if size >= rows:
            return size
    return rows


def _batch_size(inputs: Mapping[str, np.ndarray]) -> int | None:
    sizes = {array.shape[0] if array.ndim else None for array in inputs.values()}
    if len(sizes) != 1 or None in sizes:
        return None
    return sizes.pop()


def _deadline_exceeded(message: str) -> ServingError:
    return ServingError(Code.DEADLINE_EXCEEDED, message)


# ---------------------------------------------------------------------------------------------- state


class _State(enum.Enum):
    QUEUED = 1  # in its queue
    TAKEN = 2  # in a batch handed to a runner
    DONE = 3  # outputs or error set


class _Waiter:
    """A request thread while it has tasks in the batcher.

    It sleeps on a lock of its own used as a binary semaphore (held: nothing new; released: look
    again), the cheapest blocking primitive Python has, rather than on a condition of the batcher's
    lock: a woken request whose rows are ready returns without touching the batcher's lock, so waking a
    batch's requests does not make them queue for that lock one after another. Wake it with `wake()`,
    under the batcher's lock (which keeps two wakers from releasing it twice).
    """

    __slots__ = ("job", "signal")

    def __init__(self) -> None:
        self.signal = threading.Lock()
        self.signal.acquire()
        self.job: _Job | None = None  # a batch this thread was given to run, until that run ended

    @property
    def idle(self) -> bool:
        return self.job is None

    def wake(self) -> None:
        if self.signal.locked():
            self.signal.release()

    def sleep(self, seconds: float | None) -> None:
        self.signal.acquire(True, -1 if seconds is None else seconds)


@dataclass(frozen=True)
class BatchRun:
    """One Session run of a batch, as each of its requests records it (monotonic times)."""

    started: float
    finished: float
    runner: Served | None  # the request whose thread ran it
    span_context: object | None  # its `run` span (tracing on)
    remote: float | None  # seconds its RemotePredict calls took
    rows: int  # as run (padded to an allowed batch size)
    requests: int
    code: Code
    message: str


class _Task:
    __slots__ = ("deadline", "enqueued", "error", "inputs", "outputs", "owner", "queue", "ran", "served", "size",
                 "state")

    def __init__(self, owner: _Waiter | None, inputs: Mapping[str, np.ndarray], size: int, deadline: float | None,
                 served: Served | None = None):
        self.owner = owner
        self.inputs = inputs
        self.size = size
        self.deadline = deadline
        self.served = served
        self.enqueued = time.monotonic()
        self.queue: _Queue | None = None
        self.state = _State.QUEUED
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.ran: BatchRun | None = None


class _Target:
    """What a batch runs: one version's signature, with the fetched output aliases."""

    __slots__ = ("aliases", "servable", "signature")

    def __init__(self, servable: Servable, signature: Signature, aliases: tuple[str, ...]):
        self.servable = servable
        self.signature = signature
        self.aliases = aliases


class _Queue:
    __slots__ = ("key", "rows", "run_seconds", "target", "tasks")

    def __init__(self, key: Hashable, target: _Target):
        self.key = key
        self.target = target
        self.tasks: deque[_Task] = deque()
        self.rows = 0
        self.run_seconds: float | None = None  # the last run's wall time, for choose_runner


@dataclass
class _Job:
    queue: _Queue
    tasks: list[_Task]
    slot: threading.Lock  # the run slot it holds


# -------------------------------------------------------------------------------------------- batcher


class Batcher:
    """Merges concurrent requests into batches run by the requests' own threads (see the module docstring)."""

    def __init__(self, options: BatchingOptions, on_batch: Callable[[int], None] | None = None,
                 telemetry: Telemetry | None = None):
        self.options = options
        self.on_batch = on_batch
        self.telemetry = telemetry or Telemetry()
        self._capacity = options.execution_batch_size
        self._timeout = options.batch_timeout_micros / 1e6
        self._queue_limit = options.max_enqueued_batches * self._capacity
        self._lock = threading.Lock()
        self._queues: dict[Hashable, _Queue] = {}
        # One lock per run slot (num_batch_threads of them), claimed without blocking: the fast path
        # never takes the batcher's lock, so requests that merge nothing never queue for it either.
        self._slots = [threading.Lock() for _ in range(options.num_batch_threads)]
        self._closed = False

    @property
    def queue_count(self) -> int:
        """Queues that hold waiting requests now (0 when idle: queues never outlive their requests)."""
        with self._lock:
            return len(self._queues)

    def close(self) -> None:
        """Refuse new requests; those already queued still run."""
        with self._lock:
            self._closed = True

    # ------------------------------------------------------------------------------ request side

    def run(self, servable: Servable, signature: Signature, inputs: Mapping[str, np.ndarray],
            output_aliases: Sequence[str], deadline: float | None = None,
            served: Served | None = None) -> dict[str, np.ndarray]:
        """Run one request, merged with others where it can be; `deadline` is absolute `time.monotonic()`;
        `served` is the request's telemetry (None: none recorded)."""
        aliases = tuple(output_aliases)
        size = _batch_size(inputs)
        if size is not None and size > self.options.max_batch_size:
            # As TF Serving, also with enable_large_batch_splitting: max_batch_size bounds a request.
            raise invalid_argument(f"Task size {size} is larger than maximum input batch size "
                                   f"{self.options.max_batch_size} (max_batch_size, --batching_parameters_file)")
        if deadline is not None and deadline <= time.monotonic():
            raise _deadline_exceeded(EXPIRED_IN_QUEUE)
        if not size:
            # Scalars, inputs of different first dimensions and empty requests cannot be merged: they run
            # on their own, still bounded by their deadline (and never as an empty batch).
            with self.telemetry.running(served):
                return servable.run(signature, inputs, aliases, run_timeout_ms(deadline))
        target_key = self._key(servable, signature, aliases, inputs)
        if size <= self._capacity and (self._timeout == 0 or size == self._capacity):
            slot = self._claim_alone()
            if slot is not None:
                try:
                    return self._run_alone(_Target(servable, signature, aliases), inputs, size, deadline, served)
                finally:
                    self._release(slot)
        return self._run_queued(target_key, _Target(servable, signature, aliases), inputs, size, deadline, served)

    def _key(self, servable: Servable, signature: Signature, aliases: tuple[str, ...],
             inputs: Mapping[str, np.ndarray]) -> Hashable:
        # Requests merge only when their merge cannot fail: same dtypes, and same inner shapes unless
        # variable-length padding is on. So one request's odd shape never fails another's batch.
        if self.options.pad_variable_length_inputs:
            shapes = tuple((alias, array.dtype, array.ndim) for alias, array in sorted(inputs.items()))
        else:
            shapes = tuple((alias, array.dtype, array.shape[1:]) for alias, array in sorted(inputs.items()))
        return servable, signature.key, aliases, shapes

    def _claim_alone(self) -> threading.Lock | None:
        """A run slot for a request that finds nobody queued (the fast path), or None.

        Read without the batcher's lock: a queue created meanwhile is seen by the next request, and a slot
        claimed here is offered to the queues when it is released, so no queued batch is forgotten.
        """
        if self._closed:
            raise ServingError(Code.UNAVAILABLE, "the server is shutting down")
        return None if self._queues else self._claim_slot()

    def _claim_slot(self) -> threading.Lock | None:
        for slot in self._slots:
            if slot.acquire(False):
                return slot
        return None

    def _release(self, slot: threading.Lock) -> None:
        """Free a run slot, then offer the free slots to waiting batches (in this order: see _dispatch)."""
        slot.release()
        if self._queues:
            with self._lock:
                self._dispatch(None)

    def _run_alone(self, target: _Target, inputs: Mapping[str, np.ndarray], size: int,
                   deadline: float | None, served: Served | None) -> dict[str, np.ndarray]:
        task = _Task(None, inputs, size, deadline, served)
        self._execute_tasks(target, [task], served)
        if served is not None:
            served.stages.queue = 0.0  # it found a free run slot and nobody queued
        if task.error is not None:
            raise task.error
        return task.outputs

    def _run_queued(self, key: Hashable, target: _Target, inputs: Mapping[str, np.ndarray], size: int,
                    deadline: float | None, served: Served | None) -> dict[str, np.ndarray]:
        waiter = _Waiter()
        with self._lock:
            if self._closed:
                raise ServingError(Code.UNAVAILABLE, "the server is shutting down")
            queue = self._queues.get(key)
            if queue is None:
                queue = _Queue(key, target)
            if queue.rows + size > self._queue_limit:
                raise ServingError(Code.UNAVAILABLE, QUEUE_FULL)
            if size <= self._capacity:
                pieces = [inputs]
                sizes = [size]
            else:  # enable_large_batch_splitting (larger requests were refused above)
                sizes = split_sizes(size, self._capacity, queue.rows)
                offsets = np.cumsum([0, *sizes])
                pieces = [{a: v[offsets[i]:offsets[i + 1]] for a, v in inputs.items()} for i in range(len(sizes))]
            tasks = [_Task(waiter, piece, n, deadline, served) for piece, n in zip(pieces, sizes, strict=True)]
            self._queues[key] = queue
            for task in tasks:
                task.queue = queue
                queue.tasks.append(task)
            queue.rows += size
            self._dispatch(waiter)
        expired = self._wait(waiter, tasks, deadline)
        if served is not None:
            self.telemetry.batched(served, tasks[0].enqueued, [t.ran for t in tasks if t.ran is not None],
                                   time.monotonic())
        if expired is not None:
            raise expired
        for task in tasks:
            if task.error is not None:
                raise task.error
        if len(tasks) == 1:
            return tasks[0].outputs
        return {alias: _concatenate([t.outputs[alias] for t in tasks]) for alias in target.aliases}

    def _wait(self, waiter: _Waiter, tasks: list[_Task], deadline: float | None) -> ServingError | None:
        """Wait until every task is done, running the batches given to us. Called without the lock.

        Returns the DEADLINE_EXCEEDED error when the deadline passed first (the tasks are then abandoned).
        Whoever changes our tasks or gives us a batch does so before waking us, and a wake-up that comes
        between our look and our sleep makes the sleep return at once, so none is lost.
        """
        while True:
            if waiter.job is not None:
                self._execute(waiter.job, waiter)
                continue
            if all(task.state is _State.DONE for task in tasks):
                return None
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                with self._lock:
                    if waiter.job is None and not all(task.state is _State.DONE for task in tasks):
                        return self._give_up(tasks)
                continue  # given a batch or answered meanwhile
            wake = deadline
            if self._timeout:
                with self._lock:
                    wake = self._wake_time(tasks, deadline, now)
            waiter.sleep(None if wake is None else wake - now)
            if self._timeout and waiter.job is None:
                with self._lock:
                    self._dispatch(waiter)  # a batch may have reached batch_timeout_micros

    def _wake_time(self, tasks: list[_Task], deadline: float | None, now: float) -> float | None:
        """When to wake unasked: our deadline, or when a queue we head times out. Called with the lock."""
        wake = deadline
        for task in tasks:
            queue = task.queue
            if task.state is _State.QUEUED and queue.tasks[0] is task:
                close = task.enqueued + self._timeout
                if close > now and queue.rows < self._capacity:
                    wake = close if wake is None else min(wake, close)
        return wake

    def _give_up(self, tasks: list[_Task]) -> ServingError:
        """Our deadline passed: queued tasks leave their queues unrun; running ones are left to finish."""
        error = _deadline_exceeded(EXPIRED_IN_QUEUE)
        for task in tasks:
            if task.state is _State.QUEUED:
                queue = task.queue
                was_head = queue.tasks[0] is task
                queue.tasks.remove(task)
                queue.rows -= task.size
                self._after_head_change(queue, was_head)
            elif task.state is _State.TAKEN:
                error = _deadline_exceeded(EXPIRED_IN_RUN)  # its runner finishes the batch for the others
            task.state = _State.DONE
        return error

    def _after_head_change(self, queue: _Queue, changed: bool) -> None:
        if not queue.tasks:
            del self._queues[queue.key]
        elif changed and self._timeout:
            queue.tasks[0].owner.wake()  # the new head keeps the queue's batch timeout

    # -------------------------------------------------------------------------------- batch side

    def _dispatch(self, current: _Waiter | None) -> None:
        """Hand closed batches to waiting requests while run slots are free. Called with the lock held.

        Whoever frees a slot calls this after freeing it, and whoever queues a task calls it after
        queueing, so a free slot and a closed batch never both wait.
        """
        if not self._queues:
            return
        now = time.monotonic()
        while True:
            ready = [q for q in self._queues.values()
                     if q.rows >= self._capacity or now - q.tasks[0].enqueued >= self._timeout]
            ready.sort(key=lambda q: q.tasks[0].enqueued)
            for queue in ready:
                outcome = self._take(queue, current, now)
                if outcome is None:
                    return  # no free slot
                if outcome:
                    break
            else:
                return  # nothing ready, or nobody free to run it

    def _take(self, queue: _Queue, current: _Waiter | None, now: float) -> bool | None:
        """Give `queue`'s next batch to one of its waiting requests: False when none of them is free to
        run it, None when no run slot is."""
        batch, rows = [], 0
        for task in queue.tasks:
            if rows + task.size > self._capacity:
                break
            batch.append(task)
            rows += task.size
        # The head always fits (no task is larger than a batch), so a batch is never empty.
        candidates = [i for i, task in enumerate(batch) if task.owner.idle]
        if not candidates:
            return False
        slot = self._claim_slot()
        if slot is None:
            return None
        mine = next((n for n, i in enumerate(candidates) if batch[i].owner is current), None)
        pick = choose_runner([batch[i].deadline for i in candidates], mine, now, queue.run_seconds)
        runner = batch[candidates[pick]].owner
        for _ in batch:
            queue.tasks.popleft()
        queue.rows -= rows
        for task in batch:
            task.state = _State.TAKEN
        runner.job = _Job(queue, batch, slot)
        if runner is not current:
            runner.wake()
        self._after_head_change(queue, True)
        return True

    def _execute(self, job: _Job, runner: _Waiter) -> None:
        """Run a batch given to this thread, free its run slot, wake the batch's other requests."""
        started = time.monotonic()
        runner_served = next((t.served for t in job.tasks if t.owner is runner), None)
        self._execute_tasks(job.queue.target, job.tasks, runner_served)
        job.queue.run_seconds = time.monotonic() - started
        job.slot.release()
        with self._lock:
            runner.job = None
            self._dispatch(runner)  # first keep the run slot busy, then answer
            for task in job.tasks:
                if task.state is _State.TAKEN:
                    task.state = _State.DONE
                    if task.owner is not runner:
                        task.owner.wake()

    def _execute_tasks(self, target: _Target, tasks: list[_Task], runner: Served | None = None) -> None:
        """Run the tasks as one batch, in the thread of the request `runner` (its telemetry, or None); every
        task gets its outputs or an error, and the run's BatchRun. Never raises."""
        now = time.monotonic()
        live = []
        for task in tasks:
            if task.deadline is not None and task.deadline <= now:
                task.error = _deadline_exceeded(EXPIRED_IN_QUEUE)  # still queued at its deadline: never run
            else:
                live.append(task)
        if not live:
            return
        rows = sum(task.size for task in live)
        deadlines = [task.deadline for task in live]
        latest = None if None in deadlines else max(deadlines)
        started = time.monotonic()
        remote_before = runner.stages.remote if runner is not None else None
        span_context = None
        error: BaseException | None = None
        size = rows  # padded below, when allowed_batch_sizes asks
        try:
            if self.on_batch is not None:
                self.on_batch(rows)
            timeout_ms = run_timeout_ms(latest)
            size = padded_size(rows, self.options.allowed_batch_sizes)
            attributes = None if self.telemetry.tracing is None else {
                tracing.BATCH_ROWS: size, tracing.BATCH_REQUESTS: len(live)}
            with self.telemetry.running(runner, attributes) as span:
                span_context = span.get_span_context() if span is not None else None
                if len(live) == 1 and size == rows:
                    results = [target.servable.run(target.signature, live[0].inputs, target.aliases, timeout_ms)]
                else:
                    outputs = target.servable.run(target.signature, self._merge(live, rows, size), target.aliases,
                                                  timeout_ms)
                    for alias, array in outputs.items():
                        if array.ndim == 0 or array.shape[0] != size:
                            raise ServingError(Code.INTERNAL, f"Batched output tensor {alias} has 0th dimension "
                                                              f"{array.shape[:1]} != batch size {size}")
                    offsets = np.cumsum([0] + [t.size for t in live])
                    results = [{a: v[offsets[i]:offsets[i + 1]] for a, v in outputs.items()}
                               for i in range(len(live))]
        except BaseException as e:  # every request of the batch gets the error
            results, error = None, e
            for task in live:
                task.error = e
        finished = time.monotonic()
        remote = runner.stages.remote if runner is not None else None
        remote = None if remote is None else remote - (remote_before or 0.0)
        ran = BatchRun(started, finished, runner, span_context, remote, size, len(live), *outcome(error))
        for task in live:
            task.ran = ran
        if results is None:
            return
        for task, result in zip(live, results, strict=True):
            if task.deadline is not None and task.deadline <= finished:
                task.error = _deadline_exceeded(EXPIRED_IN_RUN)  # its answer came too late to be given
            else:
                task.outputs = result

    def _merge(self, tasks: list[_Task], rows: int, size: int) -> dict[str, np.ndarray]:
        merged = {}
        for alias in tasks[0].inputs:
            parts = [t.inputs[alias] for t in tasks]
            if len({p.shape[1:] for p in parts}) > 1:  # only with pad_variable_length_inputs (see _key)
                parts = _pad_to_common_shape(parts)
            if size > rows:
                parts.append(np.repeat(parts[0][:1], size - rows, axis=0))  # TF Serving pads with the first row
            merged[alias] = np.concatenate(parts)
        return merged


def _pad_to_common_shape(parts: list[np.ndarray]) -> list[np.ndarray]:
    target = tuple(max(p.shape[i] for p in parts) for i in range(1, parts[0].ndim))
    padded = []
    for part in parts:
        widths = [(0, 0)] + [(0, t - s) for s, t in zip(part.shape[1:], target, strict=True)]
        fill = part.flat[0] if part.size else 0  # TF Serving pads with the tensor's first element
        padded.append(np.pad(part, widths, constant_values=fill))
    return padded


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """A split request's pieces back together (padded alike first if variable-length padding differed)."""
    if len({p.shape[1:] for p in parts}) > 1:
        parts = _pad_to_common_shape(parts)
    return np.concatenate(parts)

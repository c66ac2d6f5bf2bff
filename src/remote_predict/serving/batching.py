"""Server-side batching (`--enable_batching`, `--batching_parameters_file`), with TF Serving's parameters.

Concurrent Predict requests for the same model version, signature and input/output aliases queue
together; a batch thread merges queued requests along the first dimension into one Session run and
splits the answer back. As TF Serving's shared batch scheduler: a batch closes when it holds
`max_batch_size` rows or its oldest request waited `batch_timeout_micros` (0: whatever queued while the
batch threads were busy); at most `max_enqueued_batches` full batches wait per queue, beyond which a
request is refused with UNAVAILABLE; `allowed_batch_sizes` pads a batch up to the next allowed size;
`pad_variable_length_inputs` pads inputs whose other dimensions differ; a request larger than
`max_batch_size` is refused, or split when `enable_large_batch_splitting` is on.
Requests whose inputs cannot be batched (a scalar input, or inputs of different first dimensions) run
on their own rather than failing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from remote_predict.errors import Code, ServingError, invalid_argument
from remote_predict.serving import config as config_lib
from remote_predict.serving import config_protos
from remote_predict.serving.servable import Servable, Signature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingOptions:
    # TF Serving's defaults when a field is absent from the parameters file.
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int = 0  # 0: max_batch_size

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0 or self.num_batch_threads <= 0 or self.max_enqueued_batches <= 0:
            raise invalid_argument("batching: max_batch_size, num_batch_threads and max_enqueued_batches must be > 0")
        if self.batch_timeout_micros < 0:
            raise invalid_argument("batching: batch_timeout_micros must be >= 0")
        sizes = list(self.allowed_batch_sizes)
        if sizes:
            if sizes != sorted(set(sizes)) or sizes[0] <= 0:
                raise invalid_argument("batching: allowed_batch_sizes must be positive and increasing")
            if sizes[-1] != self.max_batch_size:
                raise invalid_argument("batching: the last allowed_batch_sizes entry must equal max_batch_size")

    @property
    def execution_batch_size(self) -> int:
        return self.max_execution_batch_size or self.max_batch_size


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
        log.info("batching: thread_pool_name %r is accepted; all queues share one pool of batch threads",
                 params.thread_pool_name.value)
    return BatchingOptions(**values)


@dataclass
class _Task:
    inputs: Mapping[str, np.ndarray]
    size: int
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


class _Queue:
    def __init__(self, servable: Servable, signature: Signature, aliases: tuple[str, ...]):
        self.servable = servable
        self.signature = signature
        self.aliases = aliases
        self.tasks: deque[_Task] = deque()
        self.rows = 0


def _batch_size(inputs: Mapping[str, np.ndarray]) -> int | None:
    sizes = {array.shape[0] if array.ndim else None for array in inputs.values()}
    if len(sizes) != 1 or None in sizes:
        return None
    return sizes.pop()


class Batcher:
    def __init__(self, options: BatchingOptions, on_batch: Callable[[int], None] | None = None):
        self.options = options
        self.on_batch = on_batch
        self._cond = threading.Condition()
        self._queues: dict[tuple, _Queue] = {}
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------------------ request side

    def run(self, servable: Servable, signature: Signature, inputs: Mapping[str, np.ndarray],
            output_aliases: Sequence[str]) -> dict[str, np.ndarray]:
        size = _batch_size(inputs)
        if size is None or size == 0:
            return servable.run(signature, inputs, output_aliases)
        if size > self.options.max_batch_size:
            if not self.options.enable_large_batch_splitting:
                raise invalid_argument(
                    f"Task size {size} is larger than maximum input batch size {self.options.max_batch_size} "
                    "(batching parameters; enable_large_batch_splitting splits such requests)")
            return self._run_split(servable, signature, inputs, output_aliases, size)
        task = _Task(inputs, size)
        self._submit(servable, signature, tuple(output_aliases), task)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def _run_split(self, servable, signature, inputs, output_aliases, size) -> dict[str, np.ndarray]:
        step = self.options.execution_batch_size
        tasks = [_Task({k: v[start:start + step] for k, v in inputs.items()}, min(step, size - start))
                 for start in range(0, size, step)]
        for task in tasks:
            self._submit(servable, signature, tuple(output_aliases), task)
        for task in tasks:
            task.done.wait()
            if task.error is not None:
                raise task.error
        return {alias: np.concatenate([t.outputs[alias] for t in tasks]) for alias in output_aliases}

    def _submit(self, servable: Servable, signature: Signature, aliases: tuple[str, ...], task: _Task) -> None:
        key = (id(servable), signature.key, tuple(sorted(task.inputs)), aliases)
        with self._cond:
            if self._closed:
                raise ServingError(Code.UNAVAILABLE, "the server is shutting down")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(servable, signature, aliases)
            limit = self.options.max_enqueued_batches * self.options.max_batch_size
            if queue.rows + task.size > limit:
                raise ServingError(Code.UNAVAILABLE,
                                   "The batch scheduling queue to which this task was submitted is full")
            queue.tasks.append(task)
            queue.rows += task.size
            self._cond.notify()

    # -------------------------------------------------------------------------------- batch side

    def _take_batch(self) -> tuple[_Queue, list[_Task]] | float:
        """A closed batch to run, or how long to wait for one."""
        now = time.monotonic()
        timeout = self.options.batch_timeout_micros / 1e6
        best, wait = None, 3600.0
        for queue in self._queues.values():
            if not queue.tasks:
                continue
            oldest = queue.tasks[0].enqueued
            if queue.rows >= self.options.max_batch_size or now - oldest >= timeout:
                if best is None or oldest < best.tasks[0].enqueued:
                    best = queue
            else:
                wait = min(wait, oldest + timeout - now)
        if best is None:
            return wait
        batch, rows = [], 0
        while best.tasks and rows + best.tasks[0].size <= self.options.max_batch_size:
            task = best.tasks.popleft()
            rows += task.size
            batch.append(task)
        best.rows -= rows
        return best, batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed and not any(q.tasks for q in self._queues.values()):
                        return
                    taken = self._take_batch()
                    if not isinstance(taken, float):
                        break
                    self._cond.wait(timeout=taken)
            queue, tasks = taken
            self._process(queue, tasks)

    def _padded_size(self, rows: int) -> int:
        for size in self.options.allowed_batch_sizes:
            if size >= rows:
                return size
        return rows

    def _merge(self, tasks: list[_Task], rows: int) -> dict[str, np.ndarray]:
        merged = {}
        for alias in tasks[0].inputs:
            parts = [t.inputs[alias] for t in tasks]
            shapes = {p.shape[1:] for p in parts}
            if len(shapes) > 1:
                if not self.options.pad_variable_length_inputs:
                    raise invalid_argument(
                        f"input {alias}: batched requests have different shapes {sorted(shapes)}; "
                        "pad_variable_length_inputs would pad them")
                parts = _pad_to_common_shape(parts)
            padding = self._padded_size(rows) - rows
            if padding:
                parts.append(np.repeat(parts[0][:1], padding, axis=0))  # TF Serving pads with the first row
            merged[alias] = np.concatenate(parts)
        return merged

    def _process(self, queue: _Queue, tasks: list[_Task]) -> None:
        rows = sum(t.size for t in tasks)
        if self.on_batch is not None:
            self.on_batch(rows)
        try:
            if len(tasks) == 1 and self._padded_size(rows) == rows:
                results = [queue.servable.run(queue.signature, tasks[0].inputs, queue.aliases)]
            else:
                outputs = queue.servable.run(queue.signature, self._merge(tasks, rows), queue.aliases)
                for alias, array in outputs.items():
                    if array.ndim == 0 or array.shape[0] != self._padded_size(rows):
                        raise ServingError(Code.INTERNAL, f"Batched output tensor {alias} has 0th dimension "
                                                          f"{array.shape[:1]} != batch size {self._padded_size(rows)}")
                offsets = np.cumsum([0] + [t.size for t in tasks])
                results = [{a: v[offsets[i]:offsets[i + 1]] for a, v in outputs.items()} for i in range(len(tasks))]
            for task, result in zip(tasks, results, strict=True):
                task.outputs = result
        except BaseException as e:  # every request of the batch gets the error
            for task in tasks:
                task.error = e
        finally:
            for task in tasks:
                task.done.set()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)


def _pad_to_common_shape(parts: list[np.ndarray]) -> list[np.ndarray]:
    target = tuple(max(p.shape[i] for p in parts) for i in range(1, parts[0].ndim))
    padded = []
    for part in parts:
        widths = [(0, 0)] + [(0, t - s) for s, t in zip(part.shape[1:], target, strict=True)]
        fill = part.flat[0] if part.size else 0  # TF Serving pads with the tensor's first element
        padded.append(np.pad(part, widths, constant_values=fill))
    return padded

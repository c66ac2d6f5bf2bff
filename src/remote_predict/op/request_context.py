"""What a RemotePredict call inherits from the request that made it: its deadline, its trace context, and
the ledger of where its time goes.

A call must never outlive the request it serves (a client that gave up after 50 ms must not leave
2-second calls running on the shards), and its trace must continue the request's. The server sets both
here, in the request's thread, around the Session run; a kernel that runs in that same thread reads them.
Our server runs a model's RemotePredict calls in the request's thread whenever they form one step (every
split master, every model with one RemotePredict op): TensorFlow then runs the graph in the calling
thread, and thread-local state crosses into the kernel. A model whose several RemotePredict ops run
concurrently on TensorFlow's inter-op pool does not see it: its calls are bounded by their own
`max_rpc_deadline_millis` only, their calls do not count in its `remote` stage, and (with tracing on)
their client spans start traces of their own instead of joining the request's.

`metadata` holds the W3C headers the op sends on: the request's own (passed through as they came), or,
with tracing on, those of the client span of the call being made (the kernel opens a nested scope).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field


class StageTimes:
    """Seconds a request spent in each stage (None: it did not pass that stage), for the per-stage
    histograms. The server makes one per request; what runs in the request's thread adds to it."""

    __slots__ = ("decode", "encode", "queue", "remote", "run")

    def __init__(self) -> None:
        self.decode: float | None = None
        self.queue: float | None = None
        self.run: float | None = None
        self.remote: float | None = None  # RemotePredict calls and lookups made by the request's thread
        self.encode: float | None = None

    def add_remote(self, seconds: float) -> None:
        self.remote = seconds if self.remote is None else self.remote + seconds


@dataclass(frozen=True)
class RequestContext:
    deadline: float | None = None  # time.monotonic() by which the request must be answered
    metadata: Mapping[str, str] = field(default_factory=dict)  # W3C trace context headers to send on
    stages: StageTimes | None = None  # where the request's time goes (None: nobody is counting)

    def remaining(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (time.monotonic() if now is None else now)


_NONE = RequestContext()
_local = threading.local()


def current() -> RequestContext:
    return getattr(_local, "context", _NONE)


class scope:  # used as `with scope(...)`, like the function it replaced
    """Make `deadline` (absolute, monotonic), `metadata` and `stages` the current request's for this thread
    (None: keep the enclosing scope's) while the `with` block runs.

    A class rather than a generator: every request enters two or three of these, and a generator-based
    context manager costs several times as much.
    """

    __slots__ = ("_deadline", "_metadata", "_previous", "_stages")

    def __init__(self, deadline: float | None = None, metadata: Mapping[str, str] | None = None,
                 stages: StageTimes | None = None):
        self._deadline, self._metadata, self._stages = deadline, metadata, stages

    def __enter__(self) -> RequestContext:
        previous = self._previous = current()
        deadline = self._deadline
        if previous.deadline is not None and (deadline is None or previous.deadline < deadline):
            deadline = previous.deadline  # a nested scope can only shorten the deadline
        metadata, stages = self._metadata, self._stages
        context = RequestContext(deadline, dict(metadata) if metadata is not None else previous.metadata,
                                 stages if stages is not None else previous.stages)
        _local.context = context
        return context

    def __exit__(self, *exc) -> None:
        _local.context = self._previous


def call_timeout(max_seconds: float, now: float | None = None) -> float:
    """A call's timeout: its own limit, or less if the request's deadline comes first (may be <= 0)."""
    remaining = current().remaining(now)
    return max_seconds if remaining is None else min(max_seconds, remaining)

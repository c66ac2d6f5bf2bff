"""One load-generating process: closed-loop clients on an asyncio loop, gRPC or REST.

Run as a script (`python load_worker.py`), never imported by the package: it needs only grpcio and
aiohttp, so it starts fast and does not load TensorFlow. It reads one JSON job per line on stdin and
answers one JSON result per line on stdout. Requests are pre-serialized bytes, sent as they are: one
`body_b64`, or a pool `bodies_b64` taken in turn; with `expected_b64` (one per body), an answer whose bytes
differ from the expected ones counts as WRONG, never as OK.
"""

import asyncio
import base64
import json
import sys
import time
from collections import Counter


async def _grpc_clients(job: dict, record) -> None:
    import grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(job["target"], options=options) as channel:
        call = channel.unary_unary(job["method"])  # bytes in, bytes out
        bodies = [base64.b64decode(b) for b in job.get("bodies_b64") or [job["body_b64"]]]
        expected = [base64.b64decode(b) for b in job.get("expected_b64") or []]
        metadata = tuple(tuple(pair) for pair in job.get("metadata", ()))
        timeout = job["timeout"]
        turn = iter(range(1 << 62))

        async def one() -> str:
            i = next(turn) % len(bodies)
            try:
                answer = await call(bodies[i], timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                return e.code().name
            return "WRONG" if expected and answer != expected[i] else "OK"

        await _closed_loop(job, one, record)


async def _rest_clients(job: dict, record) -> None:
    import aiohttp

    body = base64.b64decode(job["body_b64"])
    timeout = aiohttp.ClientTimeout(total=job["timeout"])
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        headers = {"Content-Type": "application/json"}

        async def one() -> str:
            try:
                async with session.post(job["url"], data=body, headers=headers) as response:
                    await response.read()
                    return "OK" if response.status == 200 else f"HTTP_{response.status}"
            except (TimeoutError, aiohttp.ClientError) as e:
                return type(e).__name__

        await _closed_loop(job, one, record)


async def _closed_loop(job: dict, one, record) -> None:
    start = time.monotonic()
    measure_from = start + job["warmup"]
    stop_at = measure_from + job["duration"]
    limit = job.get("max_requests") or 0

    async def client() -> None:
        while True:
            now = time.monotonic()
            if now >= stop_at or (limit and record.count >= limit):
                return
            t0 = time.perf_counter_ns()
            outcome = await one()
            t1 = time.perf_counter_ns()
            if now >= measure_from:
                record(outcome, (t1 - t0) / 1000.0)

    await asyncio.gather(*(client() for _ in range(job["concurrency"])))


class _Record:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.outcomes: Counter = Counter()
        self.count = 0

    def __call__(self, outcome: str, micros: float) -> None:
        self.count += 1
        self.outcomes[outcome] += 1
        if outcome == "OK":
            self.latencies.append(micros)


async def _lag_probe(stop: asyncio.Event, lags: list[float]) -> None:
    """How late the loop wakes a 10 ms sleep: a busy client delays its own measurements."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append((time.perf_counter() - t0 - 0.01) * 1000)


async def _run(job: dict) -> dict:
    record = _Record()
    stop = asyncio.Event()
    lags: list[float] = []
    probe = asyncio.create_task(_lag_probe(stop, lags))
    cpu0, wall0 = time.process_time(), time.monotonic()
    clients = _grpc_clients if job["protocol"] == "grpc" else _rest_clients
    await clients(job, record)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    stop.set()
    await probe
    errors = {k: v for k, v in record.outcomes.items() if k != "OK"}
    lags.sort()
    return {"latencies_us": record.latencies, "errors": errors, "cpu_seconds": cpu, "wall_seconds": wall,
            "loop_lag_p99_ms": lags[int(len(lags) * 0.99)] if lags else 0.0}


def main() -> None:
    for line in sys.stdin:
        if line.strip():
            result = asyncio.run(_run(json.loads(line)))
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Drive a server at a given concurrency from several worker processes, and summarize what happened.

The workers (`load_worker.py`) are separate processes so that the client side scales past one core
and one GIL; each reports its CPU time, so a result says when the client itself was the bottleneck.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load_worker.py")
SATURATED_CPU = 0.9  # a worker busy this fraction of the wall time measures its own queueing


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    client_processes: int = 1
    client_cpu: float = 0.0  # busiest worker's CPU time / wall time
    client_saturated: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} CPUs ({cpu}), {system}, Python {platform.python_version()}"


class LoadGenerator:
    def __init__(self, processes: int = 1):
        self.processes = [
            subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(max(1, processes))
        ]

    def run(self, job: dict, concurrency: int, duration: float, warmup: float = 0.5,
            max_requests: int = 0) -> LevelResult:
        """Run `concurrency` closed-loop clients for `duration` seconds (after `warmup`), spread over workers."""
        shares = [concurrency // len(self.processes) + (1 if i < concurrency % len(self.processes) else 0)
                  for i in range(len(self.processes))]
        active = [(p, s) for p, s in zip(self.processes, shares, strict=True) if s > 0]
        per_worker_limit = -(-max_requests // len(active)) if max_requests else 0
        for process, share in active:
            process.stdin.write(json.dumps({**job, "concurrency": share, "duration": duration, "warmup": warmup,
                                            "max_requests": per_worker_limit}) + "\n")
            process.stdin.flush()
        results = []
        for process, _ in active:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("a load worker exited unexpectedly")
            results.append(json.loads(line))
        latencies = np.sort(np.concatenate([np.asarray(r["latencies_us"], np.float64) for r in results]))
        errors: dict[str, int] = {}
        for r in results:
            for code, count in r["errors"].items():
                errors[code] = errors.get(code, 0) + count
        seconds = max(r["wall_seconds"] for r in results) - warmup
        cpu = max(r["cpu_seconds"] / max(r["wall_seconds"], 1e-9) for r in results)
        done = len(latencies) + sum(errors.values())

        def pct(q: float) -> float:
            return float(np.percentile(latencies, q) / 1000.0) if len(latencies) else float("nan")

        return LevelResult(
            concurrency=concurrency, requests=done, seconds=seconds,
            rps=len(latencies) / seconds if seconds > 0 else 0.0,
            p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99),
            max_ms=float(latencies[-1] / 1000.0) if len(latencies) else float("nan"),
            errors=errors, client_processes=len(active), client_cpu=cpu, client_saturated=cpu >= SATURATED_CPU,
        )

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.stdin.close()
                process.wait(timeout=10)

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def grpc_job(target: str, method: str, body: bytes, metadata: tuple = (), timeout: float = 30.0) -> dict:
    return {"protocol": "grpc", "target": target, "method": method, "metadata": [list(m) for m in metadata],
            "body_b64": base64.b64encode(body).decode("ascii"), "timeout": timeout}


def rest_job(url: str, body: bytes, timeout: float = 30.0) -> dict:
    return {"protocol": "rest", "url": url, "body_b64": base64.b64encode(body).decode("ascii"), "timeout": timeout}

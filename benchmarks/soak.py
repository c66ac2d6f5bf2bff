"""Soak: many requests through a master and two leaves; errors must be 0 and memory must stay flat.

    .venv/bin/python benchmarks/soak.py [--requests 100000] [--concurrency 32] [--max_seconds 1800]

The master's model calls both leaves concurrently (RemotePredict ops), so every request crosses two
hops. Memory (RSS) of each server is read after a warm-up and at the end; growth must stay under 5 %.
Exit status 1 when any request failed, an answer was wrong, or memory grew 5 % or more.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import models  # noqa: E402
from helpers import HALF_PLUS_TWO, ServerProcess, write_config  # noqa: E402
from remote_predict.tools.bench import build_job  # noqa: E402
from remote_predict.tools.loadgen import LoadGenerator, machine_description  # noqa: E402

GROWTH_LIMIT = 0.05


def rss_mb(server: ServerProcess) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / (1 << 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup_requests", type=int, default=5_000)
    parser.add_argument("--max_seconds", type=float, default=1800.0, help="stop by then even if not done")
    parser.add_argument("--client_processes", type=int, default=2)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="remote-predict-soak-"))
    leaves = [ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two", rest=False,
                            wait=False) for _ in range(2)]
    models.fan_out(tmp / "master_model" / "1", [leaf.address for leaf in leaves], model="half_plus_two",
                   with_delay=False)
    master = ServerProcess(f"--model_config_file={write_config(tmp / 'm.config', {'both': tmp / 'master_model'})}",
                           "--file_system_poll_wait_seconds=0", rest=False, wait=False)
    servers = {"master": master, "leaf 1": leaves[0], "leaf 2": leaves[1]}
    try:
        for server in servers.values():
            server.wait_ready(timeout=180)
        x = np.array([1.0, 2.0, 3.0], np.float32)
        answer = master.predict("both", {"x": x}).outputs["y"].float_val
        assert list(answer) == list(2 * (0.5 * x + 2)), f"wrong answer before the soak: {list(answer)}"
        job = build_job("grpc", master.address, "both", "serving_default", {"x": x})
        with LoadGenerator(args.client_processes) as load:
            warm = load.run(job, args.concurrency, duration=args.max_seconds, warmup=0,
                            max_requests=args.warmup_requests)
            before = {name: rss_mb(server) for name, server in servers.items()}
            started = time.monotonic()
            result = load.run(job, args.concurrency, duration=args.max_seconds, warmup=0,
                              max_requests=args.requests)
            elapsed = time.monotonic() - started
        after = {name: rss_mb(server) for name, server in servers.items()}
        answer = master.predict("both", {"x": x}).outputs["y"].float_val
        correct = list(answer) == list(2 * (0.5 * x + 2))
    finally:
        for server in servers.values():
            server.stop()

    errors = sum(result.errors.values()) + sum(warm.errors.values())
    print(f"# soak on {machine_description()}")
    print(f"# {args.requests} requests at concurrency {args.concurrency} through a master calling 2 leaves "
          f"(after {args.warmup_requests} warm-up requests), {args.client_processes} client processes")
    print(f"requests: {result.requests} in {elapsed:.0f} s ({result.rps:.0f}/s); errors: {errors} "
          f"{result.errors or ''}; answer after the soak correct: {correct}")
    print(f"latency ms: p50 {result.p50_ms:.2f}  p90 {result.p90_ms:.2f}  p99 {result.p99_ms:.2f}  "
          f"max {result.max_ms:.2f}")
    worst = 0.0
    for name in servers:
        growth = after[name] / before[name] - 1
        worst = max(worst, growth)
        print(f"{name:7s} RSS after warm-up {before[name]:7.1f} MB, at the end {after[name]:7.1f} MB "
              f"({growth * 100:+.2f} %)")
    finished = result.requests >= args.requests
    ok = errors == 0 and correct and worst < GROWTH_LIMIT and finished
    print("PASS" if ok else f"FAIL (errors={errors}, correct={correct}, worst growth={worst * 100:.2f} %, "
                            f"finished={finished})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

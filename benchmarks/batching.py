"""Does batching ever cost more than no batching? Throughput and server CPU per request, off vs on.

    .venv/bin/python benchmarks/batching.py [--quick] [--rounds N] [--seconds S] [--concurrency C]
                                            [--together] [--compare OTHER_CHECKOUT/src]

Two `remote-predict serve` processes serve the same models, one without and one with `--enable_batching`
(the batching parameters of the suite's scenario 6). Closed-loop gRPC clients (`remote-predict bench`'s
load generator, in their own processes) drive each at the same concurrency, rounds alternating off and
on, so each ratio compares two runs that saw the same machine (`--compare` adds a batching server running
another checkout's code, to compare two batchers in the same rounds). Per round it records requests/s, p50, the
server process's own CPU time per request (user + system, from psutil), and on the batching server the
mean rows per Session run (from its Prometheus batch-size histogram), and the server threads' voluntary
context switches per request (how often a thread went to sleep: thread hand-offs, and waits for the GIL,
which grow with the machine's load). Medians over rounds are printed. With `--together` both servers run
their load at the same time, so that a shared machine's drift hits both alike.

Models: half_plus_two (a trivial Session run: the request path is the whole cost, so batching can only
lose there) and four dense 1024x1024 layers (the run dominates, so merged runs should win). Timing is
never asserted; this prints figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import urllib3
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import models  # noqa: E402  (the test suite's model builders)
from helpers import ServerProcess, write_config  # noqa: E402
from remote_predict.tools.bench import build_job  # noqa: E402
from remote_predict.tools.export import export_half_plus_two  # noqa: E402
from remote_predict.tools.loadgen import LoadGenerator, machine_description  # noqa: E402

BATCHING = ("max_batch_size { value: 64 } batch_timeout_micros { value: 0 } "
            "num_batch_threads { value: 2 } max_enqueued_batches { value: 100 }")
METRICS = "/monitoring/prometheus/metrics"


def batch_totals(server: ServerProcess) -> tuple[float, float]:
    """(batches run, rows run) so far, from the server's batch-size histogram."""
    text = urllib3.request("GET", server.rest + METRICS, timeout=10).data.decode()
    count = rows = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "remote_predict_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    count = sample.value
                elif sample.name.endswith("_sum"):
                    rows = sample.value
    return count, rows


def cpu_seconds(server: ServerProcess) -> float:
    times = psutil.Process(server.proc.pid).cpu_times()
    return times.user + times.system


def context_switches(server: ServerProcess) -> int:
    """Voluntary context switches of the server's threads so far: each is a thread going to sleep (waiting
    for a lock, a wake-up, the network), a count that a busy machine does not distort as it does times."""
    total = 0
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return total


def snapshot(server: ServerProcess) -> tuple[float, tuple[float, float], int]:
    return cpu_seconds(server), batch_totals(server), context_switches(server)


def figures(server: ServerProcess, before: tuple, result) -> dict:
    (cpu0, (runs0, rows0), switches0), (cpu1, (runs1, rows1), switches1) = before, snapshot(server)
    cpu, runs, rows, switches = cpu1 - cpu0, runs1 - runs0, rows1 - rows0, switches1 - switches0
    if result.errors:
        raise RuntimeError(f"errors under load: {result.errors}")
    return {"rps": result.rps, "p50_ms": result.p50_ms, "cpu_us": cpu / result.requests * 1e6,
            "switches": switches / result.requests, "rows_per_run": rows / runs if runs else float("nan"),
            "saturated": result.client_saturated}


def run_round(loads: dict[str, LoadGenerator], servers: dict[str, ServerProcess], jobs: dict[str, dict],
              concurrency: int, seconds: float, together: bool) -> dict[str, dict]:
    """One run of each server, one after the other, or both at once (`together`)."""
    if not together:
        out = {}
        for name, server in servers.items():
            before = snapshot(server)
            out[name] = figures(server, before, loads[name].run(jobs[name], concurrency, duration=seconds, warmup=0))
        return out
    before = {name: snapshot(server) for name, server in servers.items()}
    with ThreadPoolExecutor(len(servers)) as pool:
        results = {name: pool.submit(loads[name].run, jobs[name], concurrency, duration=seconds, warmup=0)
                   for name in servers}
        return {name: figures(servers[name], before[name], results[name].result()) for name in servers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s (a smoke run)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each running every server once")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients per server")
    parser.add_argument("--models", default="half_plus_two,dense", help="which of half_plus_two,dense to load")
    parser.add_argument("--together", action="store_true",
                        help="load every server at once in each round: they then share the machine's state "
                             "(compare CPU per request; throughput then also depends on how the CPUs are shared)")
    parser.add_argument("--compare", action="append", default=[], metavar="SRC",
                        help="also a batching server running the remote_predict package found in SRC (another "
                             "checkout's src directory), to compare two batchers in the same rounds")
    args = parser.parse_args()
    rounds, seconds = (2, 2.0) if args.quick else (args.rounds, args.seconds)
    tmp = Path(tempfile.mkdtemp(prefix="remote-predict-batching-"))
    export_half_plus_two(str(tmp / "half_plus_two" / "1"))
    models.dense_stack(tmp / "dense" / "1")
    config = write_config(tmp / "models.config", {"half_plus_two": tmp / "half_plus_two", "dense": tmp / "dense"})
    (tmp / "batching.txt").write_text(BATCHING)
    (tmp / "monitoring.txt").write_text(f'prometheus_config: {{ enable: true, path: "{METRICS}" }}')
    common = (f"--model_config_file={config}", "--file_system_poll_wait_seconds=0",
              f"--grpc_max_threads={args.concurrency}", f"--monitoring_config_file={tmp / 'monitoring.txt'}")
    batching = ("--enable_batching", f"--batching_parameters_file={tmp / 'batching.txt'}")
    servers = {"off": ServerProcess(*common, wait=False), "on": ServerProcess(*common, *batching, wait=False)}
    for src in args.compare:
        servers[f"on@{src}"] = ServerProcess(*common, *batching, wait=False, env={"PYTHONPATH": src})
    processes = max(1, args.concurrency // 32)
    loads = {name: LoadGenerator(processes) for name in servers}
    try:
        for server in servers.values():
            server.wait_ready(timeout=180)
        inputs = {"half_plus_two": {"x": np.array([[2.0]], np.float32)},
                  "dense": {"x": np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)}}
        inputs = {name: inputs[name] for name in args.models.split(",")}
        mode = "every server loaded at once" if args.together else "one server at a time"
        print(f"# machine: {machine_description()}; concurrency {args.concurrency}, {rounds} rounds of {seconds:g} s, "
              f"{mode}")
        print(f"# batching: {BATCHING}")
        print(" | ".join(("model", "server", "req/s", "vs off", "CPU/req", "vs off", "p50", "rows/run",
                          "switches/req")))
        for model, x in inputs.items():
            jobs = {name: build_job("grpc", server.address, model, "serving_default", x)
                    for name, server in servers.items()}
            for name in servers:  # warm up: callables, connections, thread pools
                loads[name].run(jobs[name], args.concurrency, duration=1.0, warmup=0)
            rounds_run = [run_round(loads, servers, jobs, args.concurrency, seconds, args.together)
                          for _ in range(rounds)]
            for name in servers:
                runs = [r[name] for r in rounds_run]
                # Ratios are taken within each round (the same minute of a drifting machine), then the median.
                speed = statistics.median(r[name]["rps"] / r["off"]["rps"] for r in rounds_run)
                cpu = statistics.median(r[name]["cpu_us"] / r["off"]["cpu_us"] for r in rounds_run)
                note = " (client saturated)" if any(r["saturated"] for r in runs) else ""
                print(" | ".join([
                    model, name, f"{_median(runs, 'rps'):.0f}{note}", f"{speed:.2f}x",
                    f"{_median(runs, 'cpu_us'):.0f} us", f"{cpu:.2f}x", f"{_median(runs, 'p50_ms'):.2f} ms",
                    f"{_median(runs, 'rows_per_run'):.1f}", f"{_median(runs, 'switches'):.1f}"]))
            for i, r in enumerate(rounds_run):
                print(f"#   round {i + 1}: " + "; ".join(
                    f"{name} {f['rps']:.0f} req/s {f['cpu_us']:.0f} us/req {f['rows_per_run']:.1f} rows/run"
                    for name, f in r.items()))
    finally:
        for load in loads.values():
            load.close()
        for server in servers.values():
            server.stop()
    return 0


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


if __name__ == "__main__":
    sys.exit(main())

"""What does hedging buy when one replica pauses now and then? Tail latency and extra calls, per delay.

    .venv/bin/python benchmarks/hedging.py [--quick] [--delays 0,5,10,20] [--percentiles 90,95]
                                           [--pause_ms 30] [--period_ms 200] [--write benchmarks/RESULTS.md]

Two replicas of half_plus_two (`remote-predict serve --tcp_port`) behind one `tcp://A,B` target; one master
per hedge delay (`--remote_predict_hedge_after_ms`, 0 = off) and per percentile
(`--remote_predict_hedge_percentile`: after the target's recent latency at it), each a `remote-predict
serve` process serving a model whose one RemotePredict op calls that target. Replica B is paused for `--pause_ms`
(SIGSTOP, then SIGCONT) every `--period_ms`, as a garbage-collection pause or a noisy neighbour would
pause it: it still answers, late, so the stall rule (which finds replicas that answer nobody) does not
take it out, and only a hedge helps the calls caught by a pause. A row "no pauses" measures each master
with B left alone. Closed-loop gRPC clients (`remote-predict bench`'s load generator) drive each master in
turn, rounds interleaved; per run: p50, p99, max, and the master's hedges and re-sends per request
(`remote_predict_op_attempts_extra_total`). Medians over rounds. Timing is never asserted: this prints.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import urllib3
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import models  # noqa: E402  (the test suite's model builders)
from helpers import ServerProcess, free_port, write_config  # noqa: E402
from remote_predict.tools.bench import build_job  # noqa: E402
from remote_predict.tools.export import export_half_plus_two  # noqa: E402
from remote_predict.tools.loadgen import LoadGenerator, machine_description  # noqa: E402
from results_file import command_line, write_region  # noqa: E402

METRICS = "/monitoring/prometheus/metrics"


class Pauser:
    """Pauses a process for `pause` seconds every `period` seconds until stopped (then leaves it running)."""

    def __init__(self, server: ServerProcess, pause: float, period: float):
        self.server, self.pause, self.period = server, pause, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Pauser:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period - self.pause):
            self.server.signal(signal.SIGSTOP)
            self._stop.wait(self.pause)
            self.server.signal(signal.SIGCONT)


def extra_attempts(server: ServerProcess) -> dict[str, float]:
    """The master's hedges and re-sends so far."""
    text = urllib3.request("GET", server.rest + METRICS, timeout=10).data.decode()
    found = {"hedge": 0.0, "resend": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "remote_predict_op_attempts_extra_total":
                found[sample.labels["kind"]] = found.get(sample.labels["kind"], 0.0) + sample.value
    return found


def measure(load: LoadGenerator, master: ServerProcess, job: dict, concurrency: int, seconds: float) -> dict:
    before = extra_attempts(master)
    result = load.run(job, concurrency, duration=seconds, warmup=0.5)
    after = extra_attempts(master)
    if result.errors:
        raise RuntimeError(f"errors during a run: {result.errors}")
    requests = max(1, result.requests)
    return {"p50": result.p50_ms, "p99": result.p99_ms, "max": result.max_ms, "rps": result.rps,
            "hedges": (after["hedge"] - before["hedge"]) / requests,
            "resends": (after["resend"] - before["resend"]) / requests}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s (a smoke run)")
    parser.add_argument("--delays", default="0,5,10,20", help="hedge delays in ms to compare (0: hedging off)")
    parser.add_argument("--percentiles", default="90,95",
                        help="hedge after this percentile of the target's recent latency, to compare")
    parser.add_argument("--pause_ms", type=float, default=30.0, help="how long replica B is paused each time")
    parser.add_argument("--period_ms", type=float, default=200.0, help="one pause of B every this many ms")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each running every master once")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="closed-loop clients per run (few: on 2 CPUs, more would measure queueing)")
    parser.add_argument("--write", help="also write the figures and the command to this Markdown file "
                                        "(its hedging region)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 2, 3.0
    settings = {("off" if int(d) == 0 else f"{int(d)} ms"): f"--remote_predict_hedge_after_ms={int(d)}"
                for d in args.delays.split(",") if d}
    settings |= {f"p{p}": f"--remote_predict_hedge_percentile={p}" for p in args.percentiles.split(",") if p}
    tmp = Path(tempfile.mkdtemp(prefix="remote-predict-hedging-"))
    monitoring = tmp / "monitoring.txt"
    monitoring.write_text(f'prometheus_config: {{ enable: true, path: "{METRICS}" }}')
    export_half_plus_two(str(tmp / "half_plus_two" / "1"))
    ports = [free_port(), free_port()]
    servers: list[ServerProcess] = []
    try:
        replicas = [ServerProcess(f"--model_base_path={tmp / 'half_plus_two'}", "--model_name=half_plus_two",
                                  f"--tcp_port={port}", rest=False, wait=False) for port in ports]
        servers += replicas
        target = "tcp://" + ",".join(f"127.0.0.1:{port}" for port in ports)
        models.caller(tmp / "caller" / "1", target, "half_plus_two", deadline_ms=5000)
        config = write_config(tmp / "master.config", {"remote": tmp / "caller"})
        masters = {label: ServerProcess(f"--model_config_file={config}", flag,
                                        f"--monitoring_config_file={monitoring}", wait=False)
                   for label, flag in settings.items()}
        servers += masters.values()
        for server in servers:
            server.wait_ready(timeout=180)
        x = {"x": np.array([2.0], np.float32)}
        jobs = {label: build_job("grpc", master.address, "remote", "serving_default", x)
                for label, master in masters.items()}
        runs: dict[tuple[str, str], list[dict]] = {}
        with LoadGenerator(1) as load:
            for job in jobs.values():  # warm: every master's target has a p99 before measuring
                load.run(job, args.concurrency, duration=1.0, warmup=0.0)
            for _ in range(args.rounds):
                for label, master in masters.items():
                    runs.setdefault(("no pauses", label), []).append(
                        measure(load, master, jobs[label], args.concurrency, args.seconds))
                with Pauser(replicas[1], args.pause_ms / 1000, args.period_ms / 1000):
                    for label, master in masters.items():
                        runs.setdefault(("B paused", label), []).append(
                            measure(load, master, jobs[label], args.concurrency, args.seconds))
    finally:
        for server in servers:
            server.stop()
    lines = [f"Machine: {machine_description()}; {datetime.date.today().isoformat()}.",
             f"Replica B paused {args.pause_ms:.0f} ms every {args.period_ms:.0f} ms (SIGSTOP/SIGCONT); "
             f"{args.concurrency} closed-loop clients, {args.rounds} interleaved rounds of {args.seconds:.0f} s "
             "per master; medians over rounds.", "",
             "| replica B | hedge after | p50 ms | p99 ms | max ms | req/s | hedges per request "
             "| re-sends per request |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (condition, label), figures in runs.items():
        def median(key: str, figures=figures) -> float:
            return statistics.median(f[key] for f in figures)
        lines.append(f"| {condition} | {label} | {median('p50'):.2f} | "
                     f"{median('p99'):.2f} | {median('max'):.1f} | {median('rps'):.0f} | {median('hedges'):.3f} | "
                     f"{median('resends'):.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_region(args.write, "hedging", f"## Hedging a replica that pauses (`benchmarks/hedging.py`)\n\n"
                                            f"Command: `{command_line()}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

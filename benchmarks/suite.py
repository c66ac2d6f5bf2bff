"""What does a remote hop cost? Six scenarios on loopback, one table, ratios measured in the same run.

    .venv/bin/python benchmarks/suite.py [--quick] [--write benchmarks/RESULTS.md]

1. floor: a bare grpcio unary echo of the same bytes (no TensorFlow, no model);
2. direct: half_plus_two Predict over gRPC and over REST;
3. one hop: half_plus_two_with_rpop (one RemotePredict call inside) to another server over gRPC, and
   over remote-predict's tcp:// transport (what split masters use); hop overhead = (3) - (2);
4. fan-out: a master calling 1, 2, 4 and 8 shards concurrently, as a multiple of the 1-shard latency;
5. bulk: one hop carrying 1, 16 and 64 MiB float32 tensors, MB/s as a fraction of the floor's;
6. batching: throughput at concurrency 64 with batching off and on (half_plus_two, four dense layers);
7. tracing: direct Predict and one hop with tracing off, on sampling 100 % and on sampling 1 % (spans
   exported over OTLP to a receiver in this process), as ratios to tracing off in the same rounds.

Every server is a `remote-predict serve` process; the client is `remote-predict bench`'s load generator.
Each latency figure is the median over runs of each run's p50. Timing is never asserted: this prints.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import models  # noqa: E402  (the test suite's model builders)
from helpers import ServerProcess, free_port, write_config  # noqa: E402
from otlp_receiver import OtlpReceiver  # noqa: E402
from remote_predict.tools.bench import build_job  # noqa: E402
from remote_predict.tools.export import export_half_plus_two, export_half_plus_two_with_rpop  # noqa: E402
from remote_predict.tools.loadgen import LoadGenerator, grpc_job, machine_description  # noqa: E402
from results_file import command_line, write_region  # noqa: E402

TARGETS = {
    "hop": "hop overhead at p50 <= 1.5x the floor",
    "fanout": "4-shard fan-out <= 1.25x the 1-shard latency",
    "bulk": "bulk >= 50% of the floor's MB/s at 16 MiB and up",
    "batching": "batching on never slower than batching off at concurrency 64 on half_plus_two (>= 1.0x)",
}


@dataclass
class Settings:
    runs: int
    requests: int
    fanout: tuple[int, ...]
    bulk_mib: tuple[int, ...]
    bulk_requests: int
    throughput_seconds: float


FULL = Settings(runs=5, requests=1000, fanout=(1, 2, 4, 8), bulk_mib=(1, 16, 64), bulk_requests=8,
                throughput_seconds=8.0)
QUICK = Settings(runs=2, requests=200, fanout=(1, 2, 4), bulk_mib=(1, 16), bulk_requests=3, throughput_seconds=2.0)


class EchoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "echo_server.py"), str(self.port)],
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("echo server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def p50s(load: LoadGenerator, jobs: dict[str, dict], settings: Settings, requests: int | None = None
         ) -> list[dict[str, float]]:
    """Each round runs every job in turn (sequential requests) and records its p50.

    Interleaving matters on a shared machine whose speed drifts by 2x between minutes: ratios are taken
    within a round, where all scenarios saw the same machine.
    """
    rounds = []
    for _ in range(settings.runs):
        figures = {}
        for name, job in jobs.items():
            result = load.run(job, 1, duration=600, warmup=0, max_requests=requests or settings.requests)
            if result.errors:
                raise RuntimeError(f"errors during a latency run of {name}: {result.errors}")
            figures[name] = result.p50_ms
        rounds.append(figures)
    return rounds


def median_of(rounds: list[dict[str, float]], value) -> float:
    """The median over rounds of `value(round)`."""
    return statistics.median(value(r) for r in rounds)


def _verdict(ok: bool, detail: str) -> str:
    return "met" if ok else f"MISSED ({detail})"


def run(settings: Settings) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    servers: list = []
    tmp = Path(tempfile.mkdtemp(prefix="remote-predict-bench-"))
    try:
        # The leaf host serves half_plus_two, the identity shard, and (the seed's set-up) a
        # half_plus_two_with_rpop that calls half_plus_two on this same server.
        leaf_port = free_port()
        export_half_plus_two(str(tmp / "half_plus_two" / "1"))
        models.identity(tmp / "identity" / "1")
        export_half_plus_two_with_rpop(str(tmp / "rpop_local" / "1"), f"localhost:{leaf_port}")
        leaf_config = write_config(tmp / "leaf.config", {
            "half_plus_two": tmp / "half_plus_two", "identity": tmp / "identity",
            "half_plus_two_with_rpop": tmp / "rpop_local"})
        leaf_tcp_port = free_port()
        leaf = ServerProcess(f"--model_config_file={leaf_config}", "--file_system_poll_wait_seconds=0",
                             f"--tcp_port={leaf_tcp_port}", grpc_port=leaf_port, wait=False)
        shards = [leaf] + [ServerProcess(f"--model_base_path={tmp / 'identity'}", "--model_name=identity",
                                         "--file_system_poll_wait_seconds=0", rest=False, wait=False)
                           for _ in range(max(settings.fanout) - 1)]
        servers += shards
        batching_file = tmp / "batching.txt"
        batching_file.write_text("max_batch_size { value: 64 } batch_timeout_micros { value: 0 } "
                                 "num_batch_threads { value: 2 } max_enqueued_batches { value: 100 }")
        models.dense_stack(tmp / "dense" / "1")
        batch_config = write_config(tmp / "batch.config", {"half_plus_two": tmp / "half_plus_two",
                                                           "dense": tmp / "dense"})
        unbatched, batched = (
            ServerProcess(f"--model_config_file={batch_config}", *flags, "--file_system_poll_wait_seconds=0",
                          "--grpc_max_threads=64", rest=False, wait=False)
            for flags in ((), ("--enable_batching", f"--batching_parameters_file={batching_file}")))
        servers += [unbatched, batched]
        master_models = {"half_plus_two_with_rpop": tmp / "rpop", "hop": tmp / "hop", "tcp_hop": tmp / "rpop_tcp"}
        export_half_plus_two_with_rpop(str(tmp / "rpop" / "1"), leaf.address)
        export_half_plus_two_with_rpop(str(tmp / "rpop_tcp" / "1"), f"tcp://127.0.0.1:{leaf_tcp_port}")
        models.caller(tmp / "hop" / "1", leaf.address, "identity", deadline_ms=120000)
        for n in settings.fanout:
            models.fan_out(tmp / f"fan{n}" / "1", [s.address for s in shards[:n]], model="identity",
                           with_delay=False)
            master_models[f"fan{n}"] = tmp / f"fan{n}"
        master_config = write_config(tmp / "master.config", master_models)
        master = ServerProcess(f"--model_config_file={master_config}", "--file_system_poll_wait_seconds=0",
                               rest=False, wait=False)
        servers.append(master)
        receiver = OtlpReceiver()
        servers.append(receiver)
        traced = {}  # sampling label -> (leaf, master), every server exporting its spans to the receiver
        for label, ratio in (("100%", 1.0), ("1%", 0.01)):
            config = tmp / f"tracing_{ratio}.txt"
            config.write_text(f'otlp_endpoint: "{receiver.endpoint}" sampling_ratio: {ratio} '
                              f'service_name: "bench-{ratio}"')
            traced_leaf = ServerProcess(f"--model_base_path={tmp / 'half_plus_two'}", "--model_name=half_plus_two",
                                        "--file_system_poll_wait_seconds=0", f"--tracing_config_file={config}",
                                        rest=False, wait=False)
            export_half_plus_two_with_rpop(str(tmp / f"rpop_{ratio}" / "1"), traced_leaf.address)
            traced_master = ServerProcess(f"--model_base_path={tmp / f'rpop_{ratio}'}",
                                          "--model_name=half_plus_two_with_rpop", "--file_system_poll_wait_seconds=0",
                                          f"--tracing_config_file={config}", rest=False, wait=False)
            traced[label] = (traced_leaf, traced_master)
            servers += [traced_leaf, traced_master]
        echo = EchoServer()
        servers.append(echo)
        for server in servers:
            if isinstance(server, ServerProcess):
                server.wait_ready(timeout=180)

        x = {"x": np.array([[2.0]], np.float32)}
        with LoadGenerator(1) as load:
            direct_job = build_job("grpc", leaf.address, "half_plus_two", "serving_default", x)
            jobs = {
                "floor": grpc_job(f"127.0.0.1:{echo.port}", "/echo/Echo", _body(direct_job)),
                "direct": direct_job,
                "rest": build_job("rest", f"127.0.0.1:{leaf.rest_port}", "half_plus_two", "serving_default", x),
                "hop": build_job("grpc", master.address, "half_plus_two_with_rpop", "serving_default", x),
                "local_hop": build_job("grpc", leaf.address, "half_plus_two_with_rpop", "serving_default", x),
                "tcp_hop": build_job("grpc", master.address, "tcp_hop", "serving_default", x),
            }
            rounds = p50s(load, jobs, settings)
            floor = median_of(rounds, lambda r: r["floor"])
            over = median_of(rounds, lambda r: (r["hop"] - r["direct"]) / r["floor"])
            local_over = median_of(rounds, lambda r: (r["local_hop"] - r["direct"]) / r["floor"])
            tcp_over = median_of(rounds, lambda r: (r["tcp_hop"] - r["direct"]) / r["floor"])
            ratio = {k: median_of(rounds, lambda r, k=k: r[k] / r["floor"]) for k in jobs}
            rows += [
                ("1. floor: grpcio echo, same bytes", f"{floor:.3f} ms", "1.00x floor", ""),
                ("2. direct Predict, gRPC", f"{median_of(rounds, lambda r: r['direct']):.3f} ms",
                 f"{ratio['direct']:.2f}x floor", ""),
                ("2. direct Predict, REST", f"{median_of(rounds, lambda r: r['rest']):.3f} ms",
                 f"{ratio['rest']:.2f}x floor", ""),
                ("3. one hop to another server", f"{median_of(rounds, lambda r: r['hop']):.3f} ms",
                 f"{ratio['hop']:.2f}x floor", ""),
                ("3. hop overhead = (3) - (2)", f"{median_of(rounds, lambda r: r['hop'] - r['direct']):.3f} ms",
                 f"{over:.2f}x floor", _verdict(over <= 1.5, f"{over:.2f}x, target 1.5x")),
                ("3. one hop to another server over tcp://", f"{median_of(rounds, lambda r: r['tcp_hop']):.3f} ms",
                 f"{ratio['tcp_hop']:.2f}x floor", ""),
                ("3. its overhead over (2) (what split masters use)",
                 f"{median_of(rounds, lambda r: r['tcp_hop'] - r['direct']):.3f} ms", f"{tcp_over:.2f}x floor",
                 _verdict(tcp_over <= 1.5, f"{tcp_over:.2f}x, target 1.5x")),
                ("3. one hop within one server (seed set-up)", f"{median_of(rounds, lambda r: r['local_hop']):.3f} ms",
                 f"{ratio['local_hop']:.2f}x floor", ""),
                ("3. its overhead over (2)", f"{median_of(rounds, lambda r: r['local_hop'] - r['direct']):.3f} ms",
                 f"{local_over:.2f}x floor", _verdict(local_over <= 1.5, f"{local_over:.2f}x, target 1.5x")),
            ]
            jobs = {"off direct": direct_job, "off hop": jobs["hop"]}
            for label, (traced_leaf, traced_master) in traced.items():
                jobs[f"{label} direct"] = build_job("grpc", traced_leaf.address, "half_plus_two", "serving_default", x)
                jobs[f"{label} hop"] = build_job("grpc", traced_master.address, "half_plus_two_with_rpop",
                                                 "serving_default", x)
            rounds = p50s(load, jobs, settings)
            for kind, what in (("direct", "direct Predict"), ("hop", "one hop to another server")):
                for label in ("off", *traced):
                    figure = median_of(rounds, lambda r, k=f"{label} {kind}": r[k])
                    ratio = median_of(rounds, lambda r, k=f"{label} {kind}", o=f"off {kind}": r[k] / r[o])
                    sampling = "tracing off" if label == "off" else f"tracing on, sampling {label}"
                    rows.append((f"7. {what}, {sampling}", f"{figure:.3f} ms", f"{ratio:.2f}x off", ""))
            shard_x = {"x": np.array([1.0, 2.0], np.float32)}
            fan_jobs = {n: build_job("grpc", master.address, f"fan{n}", "serving_default", shard_x)
                        for n in settings.fanout}
            rounds = p50s(load, fan_jobs, settings)
            for n in settings.fanout:
                ratio = median_of(rounds, lambda r, n=n: r[n] / r[1])
                verdict = _verdict(ratio <= 1.25, f"{ratio:.2f}x, target 1.25x") if n == 4 else ""
                rows.append((f"4. fan-out to {n} shard(s)", f"{median_of(rounds, lambda r, n=n: r[n]):.3f} ms",
                             f"{ratio:.2f}x 1-shard", verdict))
            for mib in settings.bulk_mib:
                array = np.random.default_rng(mib).standard_normal(mib * (1 << 20) // 4).astype(np.float32)
                hop_job = build_job("grpc", master.address, "hop", "serving_default", {"x": array},
                                    tensor_content=True, timeout=120)
                echo_job = grpc_job(f"127.0.0.1:{echo.port}", "/echo/Echo", _body(hop_job), timeout=120)
                rounds = p50s(load, {"floor": echo_job, "hop": hop_job}, settings, settings.bulk_requests)
                share = median_of(rounds, lambda r: r["floor"] / r["hop"])  # MB/s ratio = time ratio
                megabytes = mib * 1.048576
                floor_rate = megabytes / median_of(rounds, lambda r: r["floor"]) * 1000
                hop_rate = megabytes / median_of(rounds, lambda r: r["hop"]) * 1000
                verdict = _verdict(share >= 0.5, f"{share * 100:.0f}%, target 50%") if mib >= 16 else ""
                rows.append((f"5. bulk {mib} MiB: floor {floor_rate:.0f} MB/s, hop {hop_rate:.0f} MB/s",
                             f"{median_of(rounds, lambda r: r['hop']):.1f} ms", f"{share * 100:.0f}% of floor",
                             verdict))
        with LoadGenerator(2) as load:
            dense_x = {"x": np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)}
            for model, inputs, label in (("half_plus_two", x, "half_plus_two"),
                                          ("dense", dense_x, "4 dense 1024x1024 layers")):
                jobs = {name: build_job("grpc", server.address, model, "serving_default", inputs)
                        for name, server in (("off", unbatched), ("on", batched))}
                rates = {"off": [], "on": []}
                saturated = False
                for _ in range(settings.runs):  # interleaved, as above
                    for name, job in jobs.items():
                        result = load.run(job, 64, duration=settings.throughput_seconds, warmup=0.5)
                        rates[name].append(result.rps)
                        saturated |= result.client_saturated
                gain = statistics.median(on / off for on, off in zip(rates["on"], rates["off"], strict=True))
                note = " (client saturated)" if saturated else ""
                target = _verdict(gain >= 1, f"{gain:.2f}x, target 1.0x") if model == "half_plus_two" else ""
                rows += [
                    (f"6. {label}, batching off, concurrency 64", f"{statistics.median(rates['off']):.0f} req/s",
                     "1.00x", ""),
                    (f"6. {label}, batching on, concurrency 64", f"{statistics.median(rates['on']):.0f} req/s",
                     f"{gain:.2f}x off{note}", target),
                ]
    finally:
        for server in servers:
            server.stop()
    return rows


def _body(job: dict) -> bytes:
    import base64

    return base64.b64decode(job["body_b64"])


ANALYSIS = """
### What bounds the missed targets

Profiles (py-spy, and timers around each stage) on this 2-CPU virtual machine:

- **Hop to another server.** The overhead is a second full round trip through Python gRPC (by definition
  at least 1x the floor) plus the leaf's own per-request cost (direct Predict is about 2.3x the floor:
  the Python gRPC server's handling and a TensorFlow Session run, each paying thread wake-ups that cost
  50-100 us apiece on this VM), plus about 0.3 ms in the master for the py-func call and the client-side
  call. The data plane itself is about 90 us of that. Within one server (the seed's set-up) the call
  skips the network and the overhead is about 1x the floor: that target is met. What would move the
  cross-server figure: a request path outside Python (grpc.aio with inline handlers measured +40 %
  throughput, a C++ front-end more), and an asynchronous op kernel as in TF Serving's C++ op, which a
  Python py-func cannot be.
- **Fan-out.** The master, the shards and the client share 2 CPUs: four shards' work cannot overlap on
  two cores, and the master's four py-func calls take turns on its GIL. The calls themselves do overlap:
  `tests/test_remote_predict_e2e.py::test_fan_out_runs_the_calls_concurrently` runs four 1 s calls well
  within the 4 s they take in turn (four 400 ms calls took 400-500 ms when timed by hand). With a core per
  shard (or shards on their own machines) the ratio follows.
- **Bulk.** A hop moves the bytes twice as often as the echo (client to master to leaf and back), so 50 %
  is the ceiling. Big tensors cross the wire without protobuf copies (`wire.py`); the rest goes to copies
  into and out of TensorFlow (an unaligned feed, the py-func's outputs), each a page-faulting memcpy here.
- **Batching on half_plus_two.** Its cost per request is the Python gRPC path (about 0.5 ms of CPU), which
  batching does not remove. The batcher has no threads of its own: a request that finds a run slot free
  runs at once in its own thread; one that queues pays one wake-up and, merged, saves a Session run (two
  hand-offs inside TensorFlow), so on this model batching can only about break even.
  `benchmarks/batching.py` prints CPU per request, rows per run and context switches per request, off
  and on. On a model whose run dominates (four dense 1024x1024 layers) merged runs gain, and the request
  path is again the bound.
"""


def format_rows(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("scenario", "figure", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run, under a minute (CI smoke test)")
    parser.add_argument("--write", help="also write the table, machine and command to this Markdown file")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    rows = run(settings)
    table = format_rows(rows)
    machine = machine_description()
    print(f"# machine: {machine}\n{table}")
    if args.write:
        write_region(args.write, "suite", "## What a hop costs (`benchmarks/suite.py`)\n\n"
            f"Measured {datetime.date.today().isoformat()} on {machine}, loopback, every server a "
            f"`remote-predict serve` process on the same machine as the client.\n\n"
            f"Command: `{command_line()}`\n\n"
            f"Targets: {'; '.join(TARGETS.values())}.\n\n"
            "| " + table.replace("\n", " |\n| ") + " |\n" + ANALYSIS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

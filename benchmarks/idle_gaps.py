"""What one call costs a server's CPU, by how long the server sat idle before it (issue 10's bound).

    .venv/bin/python benchmarks/idle_gaps.py                                # about 2 minutes on 2 CPUs
    .venv/bin/python benchmarks/idle_gaps.py --write benchmarks/RESULTS.md  # also record the figures

Why: a request path measured in a loop in its own process (warm caches, each call right after the last)
costs a fraction of what the same path costs in a running split, where each server answers a call and then
waits while the others work. This measures that difference with real servers: one client sends calls one
at a time and sleeps --gaps milliseconds between an answer and the next call (0: back to back).

Two servers, each a `remote-predict serve` process with default flags and --tcp_port, on split_cost.py's
model (smaller tables by default: a call's path does not depend on the table's size) and workload:
  * shard 0 of a --shards split (`--partition=mod`) answering the lookups a split master sends it over tcp:
    for each of split_cost's requests, its ids that fall on shard 0, de-duplicated, as the shard's rows;
  * the unsplit model answering split_cost's Predict requests, over tcp and over gRPC (as clients call it).

CPU per call: the server process's own time on a CPU (every thread, as the scheduler counts it) across the
calls, less what it spends idle (its rate measured beforehand, times the calls' duration), over the number
of calls; median over --rounds rounds, gaps and paths interleaved within a round. Every answer must be OK.
Timing is never asserted: this prints.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import split_cost  # noqa: E402

from helpers import ServerProcess, free_port, write_config  # noqa: E402
from remote_predict import frames, wire  # noqa: E402
from remote_predict.split import cli as split_cli  # noqa: E402
from remote_predict.tools.loadgen import machine_description  # noqa: E402
from results_file import command_line, write_region  # noqa: E402

TABLES = {"user": "user_table", "items": "item_table"}  # the model's inputs and the tables they look up
SHARD, UNSPLIT_TCP, UNSPLIT_GRPC = "shard lookup (tcp)", "unsplit Predict (tcp)", "unsplit Predict (gRPC)"


def cpu_seconds(server: ServerProcess) -> float:
    """The process's time on a CPU so far, to the nanosecond (the scheduler's count per thread; the user and
    system times of /proc/PID/stat count 10 ms ticks, coarse against calls of a fraction of a ms)."""
    total = 0
    tasks = Path(f"/proc/{server.proc.pid}/task")
    for task in tasks.iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended since the listing
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def lookup_bodies(requests: list[bytes], shards: int, shard: int) -> list[bytes]:
    """The lookups a split master sends shard `shard` for `requests` (`mod`: row r is row r // shards there)."""
    lookup = predict_pb2.PredictRequest()
    lookup.model_spec.name = f"rec_shard_{shard}"
    lookup.model_spec.signature_name = "lookup"
    lookup.output_filter.extend(TABLES.values())
    bodies = []
    for body in requests:
        _, inputs = wire.decode_predict_request(body)
        ids = {table: np.unique(inputs[name].reshape(-1)) for name, table in TABLES.items()}
        mine = {table: (values[values % shards == shard] // shards).astype(np.int64) for table, values in ids.items()}
        bodies.append(wire.encode_predict_request(lookup, mine))
    return bodies


class TcpCaller:
    """One connection to a server's --tcp_port, one Predict frame at a time (as the op's tcp stub sends them)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = frames.FrameReader()

    def __call__(self, body: bytes) -> None:
        frames.send(self.sock, frames.encode(frames.PREDICT, 10_000, b"", body))
        _, code, message, _ = self.reader.read(self.sock)
        if code:
            raise RuntimeError(f"the shard answered code {code}: {bytes(message).decode()}")

    def close(self) -> None:
        self.sock.close()


class GrpcCaller:
    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.call = self.channel.unary_unary(split_cost.PREDICT)

    def __call__(self, body: bytes) -> None:
        self.call(body, timeout=10)

    def close(self) -> None:
        self.channel.close()


def idle_rate(server: ServerProcess, seconds: float) -> float:
    """CPU seconds per second the server spends with nothing to do (its timers and pollers)."""
    before, started = cpu_seconds(server), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(server) - before) / (time.monotonic() - started)


def measure(server: ServerProcess, caller, bodies: list[bytes], gap: float, idle: float) -> float:
    """Milliseconds of the server's CPU per call, calls `gap` seconds apart."""
    for body in bodies[:20]:  # the connection and the first calls' one-off costs are not what is measured
        caller(body)
    before, started = cpu_seconds(server), time.monotonic()
    for body in bodies:
        if gap:
            time.sleep(gap)
        caller(body)
    used = cpu_seconds(server) - before - idle * (time.monotonic() - started)
    return 1000 * used / len(bodies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000, help="rows of the user table")
    parser.add_argument("--items", type=int, default=20_000, help="rows of the item table")
    parser.add_argument("--dim", type=int, default=32, help="width of both tables")
    parser.add_argument("--shards", type=int, default=4, help="shard servers of the split (shard 0 is measured)")
    parser.add_argument("--gaps", default="0,0.5,2,10", help="idle milliseconds before each call, comma-separated")
    parser.add_argument("--calls", type=int, default=500, help="calls per path, gap and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", help="also write the figures and the command to this Markdown file")
    args = parser.parse_args()
    gaps = [float(g) / 1000 for g in args.gaps.split(",")]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="idle-gaps-") as tmp:
        work = Path(tmp)
        model = split_cost.build_model(work / "rec.keras", args.users, args.items, args.dim)
        out = work / "split"
        addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(args.shards))
        if split_cli.main([str(model), f"--output_dir={out}", f"--shards={args.shards}", "--partition=mod",
                           f"--tables={','.join(TABLES.values())}", f"--shard_addresses={addresses}",
                           "--export_unsplit"]) != 0:
            raise SystemExit("the split failed")
        requests = split_cost.request_pool(args.calls, args.users, args.items)
        shard_port, unsplit_port = free_port(), free_port()
        shard = ServerProcess(f"--model_config_file={out / 'config' / 'shard_0.config'}",
                              f"--tcp_port={shard_port}", rest=False)
        unsplit = ServerProcess(
            f"--model_config_file={write_config(work / 'unsplit.config', {'rec': out / 'unsplit'})}",
            f"--tcp_port={unsplit_port}", rest=False)
        try:
            idle = {"shard": idle_rate(shard, 5.0), "unsplit": idle_rate(unsplit, 5.0)}
            paths = {  # name: (server, caller, calls)
                SHARD: (shard, TcpCaller(shard_port), lookup_bodies(requests, args.shards, 0)),
                UNSPLIT_TCP: (unsplit, TcpCaller(unsplit_port), requests),
                UNSPLIT_GRPC: (unsplit, GrpcCaller(unsplit.address), requests),
            }
            figures: dict[tuple[str, float], list[float]] = {}
            for _ in range(args.rounds):
                for gap in gaps:
                    for name, (server, caller, bodies) in paths.items():
                        rate = idle["shard" if server is shard else "unsplit"]
                        figures.setdefault((name, gap), []).append(measure(server, caller, bodies, gap, rate))
            for _, caller, _ in paths.values():
                caller.close()
        finally:
            shard.stop()
            unsplit.stop()
    lines = report(args, gaps, figures, idle)
    lines.append(f"\n(measured in {time.monotonic() - started:.0f} s)")
    print("\n".join(lines))
    if args.write:
        write_region(args.write, "idle_gaps",
                     "## A call's CPU by the idle time before it (`benchmarks/idle_gaps.py`)\n\n"
                     f"Measured {datetime.date.today().isoformat()}. Command: `{command_line()}`\n\n"
                     + "\n".join(lines))
    return 0


def report(args, gaps: list[float], figures: dict, idle: dict) -> list[str]:
    names = (SHARD, UNSPLIT_TCP, UNSPLIT_GRPC)
    lines = [f"Machine: {machine_description()}. Model: users {args.users} x {args.dim}, items {args.items} x "
             f"{args.dim}; shard 0 of {args.shards}. {args.calls} calls per path, gap and round, median of "
             f"{args.rounds} rounds. Idle CPU (subtracted): shard {1000 * idle['shard']:.1f} ms/s, unsplit "
             f"{1000 * idle['unsplit']:.1f} ms/s.", "",
             "| idle before each call | " + " | ".join(f"{n}: CPU per call" for n in names)
             + " | shard call / unsplit tcp request |",
             "| --- | " + " | ".join("---" for _ in names) + " | --- |"]
    first = {name: statistics.median(figures[(name, gaps[0])]) for name in names}
    for gap in gaps:
        cpu = {name: statistics.median(figures[(name, gap)]) for name in names}
        cells = [f"{1000 * cpu[n]:.0f} us ({cpu[n] / first[n]:.1f}x)" for n in names]
        lines.append(f"| {1000 * gap:g} ms | " + " | ".join(cells) + f" | {cpu[SHARD] / cpu[UNSPLIT_TCP]:.2f} |")
    lines += ["", f"(x: against the first row, {1000 * gaps[0]:g} ms of idle.)"]
    return lines


if __name__ == "__main__":
    sys.exit(main())

"""What does a split model cost per request, against the same model unsplit? (issue 10's benchmark)

    .venv/bin/python benchmarks/split_cost.py                 # the full run (about 10 minutes on 2 CPUs)
    .venv/bin/python benchmarks/split_cost.py --quick         # a reduced run (about 3 minutes)
    .venv/bin/python benchmarks/split_cost.py --write benchmarks/RESULTS.md   # also record the figures

The model: a Keras 3 recommender, a user table of --users x --dim and an item table of --items x --dim
(float32), inputs `user` [b, 1] and `items` [b, 10] int64, a Dense(64) tower. It is split with
`remote-predict split --partition=mod --tables=user_table,item_table` over 1, 2, 4 and 8 shard servers.
Every server is a `remote-predict serve` process with default flags (shards add --tcp_port, and
--remote_predict_cache_mib on the master where a cache size is measured).

The workload: 16 users x 10 items per request, ids drawn from a Zipf distribution (a = 1.1, as click logs)
over a random permutation of each table, a pool of requests sent in turn. Each round sends the same
requests to the unsplit model and to the split one, one after the other (rounds interleaved, because
this machine's speed drifts); sequential rounds (one client, --requests requests) and loaded rounds
(--concurrency closed-loop clients for --seconds, after a second of warm-up load that is not measured).
Every answer is compared with the unsplit model's, byte for byte (any difference is counted WRONG).

Figures: p50/p99 latency at the client; CPU per request from the server processes' own CPU time
(user + system, every thread, over exactly the requests counted), master and shards apart; for the
split, the ratios against the unsplit model measured in the same round (median over rounds), the calls
the master made to shard servers per request (one per shard server sequentially; fewer under load,
where concurrent lookups are merged) and what each call cost the shards; with a cache, the share of
rows the cache served.
Timing is never asserted: this prints.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import ServerProcess, free_port, write_config  # noqa: E402
from remote_predict.serving.heap import QUIET_SECONDS  # noqa: E402
from remote_predict.tools.loadgen import LoadGenerator, machine_description  # noqa: E402
from results_file import command_line, write_region  # noqa: E402

USERS_PER_REQUEST, ITEMS_PER_USER = 16, 10
ZIPF_A = 1.1
PREDICT = "/tensorflow.serving.PredictionService/Predict"
METRICS = "/monitoring/prometheus/metrics"
OP_CALLS = "remote_predict_op_calls_total"  # the master's calls to shard servers, by target and code
TARGETS = {
    "seq_p50": ("sequential split p50 <= 2x unsplit", 2.0),
    "seq_cpu": ("sequential split CPU/request <= 3x unsplit", 3.0),
    "load_cpu": ("loaded split CPU/request <= 1.5x unsplit", 1.5),
    "master_growth": ("master CPU/request grows <= 0.2 ms per extra shard server", 0.2),
}


def build_model(path: Path, users: int, items: int, dim: int) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    user = keras.Input(shape=(1,), dtype="int64", name="user")
    item = keras.Input(shape=(ITEMS_PER_USER,), dtype="int64", name="items")
    u = keras.layers.Embedding(users, dim, name="user_table", embeddings_initializer="normal")(user)
    i = keras.layers.Embedding(items, dim, name="item_table", embeddings_initializer="normal")(item)
    x = keras.layers.Flatten()(keras.layers.Concatenate(axis=1)([u, i]))
    x = keras.layers.Dense(64, activation="relu", name="tower")(x)
    keras.Model([user, item], keras.layers.Dense(1, name="score")(x), name="rec").save(path)
    return path


def zipf_ids(rng: np.random.Generator, rows: int, shape: tuple[int, ...], order: np.ndarray) -> np.ndarray:
    """Ids whose popularity follows Zipf(a) over `order` (a permutation of the table's rows)."""
    ranks = rng.zipf(ZIPF_A, size=int(np.prod(shape)))
    while (over := ranks > rows).any():  # redraw the tail beyond the table
        ranks[over] = rng.zipf(ZIPF_A, size=int(over.sum()))
    return order[ranks - 1].reshape(shape).astype(np.int64)


def request_pool(count: int, users: int, items: int, seed: int = 1) -> list[bytes]:
    from tensorflow.core.framework import tensor_pb2  # noqa: F401  (loads the protos' dependencies)
    from tensorflow_serving.apis import predict_pb2

    from remote_predict import tensor_codec

    rng = np.random.default_rng(seed)
    user_order, item_order = rng.permutation(users), rng.permutation(items)
    bodies = []
    for _ in range(count):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "rec"
        request.inputs["user"].CopyFrom(tensor_codec.from_ndarray(
            zipf_ids(rng, users, (USERS_PER_REQUEST, 1), user_order), tensor_content=True))
        request.inputs["items"].CopyFrom(tensor_codec.from_ndarray(
            zipf_ids(rng, items, (USERS_PER_REQUEST, ITEMS_PER_USER), item_order), tensor_content=True))
        bodies.append(request.SerializeToString())
    return bodies


def answers(address: str, bodies: list[bytes]) -> list[bytes]:
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(PREDICT)
        return [call(body, timeout=60) for body in bodies]


def cpu_seconds(processes: list[ServerProcess]) -> list[float]:
    out = []
    for server in processes:
        times = psutil.Process(server.proc.pid).cpu_times()
        out.append(times.user + times.system)
    return out


def metric_total(server: ServerProcess, name: str) -> float:
    """The sum of a sample (`name`, as exposed: a counter's `_total`) over all its labels, from the server's
    metrics."""
    _, text = server.get(METRICS)
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name)


def cache_counts(master: ServerProcess) -> tuple[float, float]:
    """(rows the master's cache served, rows fetched from shards), from its metrics."""
    return (metric_total(master, "remote_predict_lookup_cache_hits_total"),
            metric_total(master, "remote_predict_lookup_cache_misses_total"))


def measure(load: LoadGenerator, servers: list[ServerProcess], job: dict, concurrency: int, requests: int,
            seconds: float, master: ServerProcess | None = None) -> dict:
    """One round. CPU is read over exactly the requests counted: a loaded round is warmed up by a run of
    its own first (connections made, pools grown), not inside the measured one. With `master`, also the
    shard calls it made per request (under load, fewer than one per shard: lookups are merged). Errors
    (and wrong answers) count in the warm-up too."""
    errors: dict[str, int] = {}
    if concurrency > 1:
        errors = dict(load.run(job, concurrency=concurrency, duration=1.0, warmup=0.0).errors)
    calls_before = metric_total(master, OP_CALLS) if master is not None else 0.0
    before = cpu_seconds(servers)
    if concurrency == 1:
        result = load.run(job, concurrency=1, duration=3600, warmup=0.0, max_requests=requests)
    else:
        result = load.run(job, concurrency=concurrency, duration=seconds, warmup=0.0)
    after = cpu_seconds(servers)
    done = max(1, result.requests)
    cpu_ms = [1000 * (a - b) / done for a, b in zip(after, before, strict=True)]
    calls = (metric_total(master, OP_CALLS) - calls_before) / done if master is not None else 0.0
    return {"p50": result.p50_ms, "p99": result.p99_ms, "rps": result.rps, "requests": result.requests,
            "errors": {code: errors.get(code, 0) + result.errors.get(code, 0) for code in {*errors, *result.errors}},
            "cpu_ms": cpu_ms, "calls": calls}


def run(args) -> list[str]:
    from remote_predict.tools.loadgen import grpc_job

    work = Path(tempfile.mkdtemp(prefix="split-cost-"))
    print(f"# building the model ({args.users} + {args.items} rows x {args.dim}) in {work}", file=sys.stderr)
    model = build_model(work / "rec.keras", args.users, args.items, args.dim)
    bodies = request_pool(args.pool, args.users, args.items)
    rows_per_request = USERS_PER_REQUEST * (1 + ITEMS_PER_USER)
    monitoring = work / "monitoring.txt"
    monitoring.write_text(f'prometheus_config {{ enable: true path: "{METRICS}" }}\n')
    lines = []
    unsplit = None
    results: dict[tuple, list[dict]] = {}
    with LoadGenerator(processes=1) as load:
        for shards in args.shards:
            out = work / f"split{shards}"
            ports = [free_port() for _ in range(shards)]
            from remote_predict.split import cli as split_cli

            flags = [str(model), f"--output_dir={out}", f"--shards={shards}", "--partition=mod",
                     "--tables=user_table,item_table", "--shard_addresses=" + ";".join(f"127.0.0.1:{p}" for p in ports)]
            if unsplit is None:
                flags.append("--export_unsplit")
            if split_cli.main(flags) != 0:
                raise SystemExit("split failed")
            if unsplit is None:
                config = write_config(work / "unsplit.config", {"rec": out / "unsplit"})
                unsplit = ServerProcess(f"--model_config_file={config}", rest=False)
                expected = answers(unsplit.address, bodies)
            for cache in args.cache_fractions:
                cache_mib = cache * (args.users + args.items) * args.dim * 4 / (1 << 20)
                shard_servers = [ServerProcess(f"--model_config_file={out / 'config' / f'shard_{k}.config'}",
                                               f"--tcp_port={p}", rest=False) for k, p in enumerate(ports)]
                master_flags = [f"--model_config_file={out / 'config' / 'master.config'}",
                                f"--monitoring_config_file={monitoring}"]
                if cache:
                    master_flags.append(f"--remote_predict_cache_mib={cache_mib:.3f}")
                master = ServerProcess(*master_flags)
                try:
                    got = answers(master.address, bodies)
                    wrong = sum(a != b for a, b in zip(got, expected, strict=True))
                    if wrong:
                        raise SystemExit(f"{wrong} of {len(bodies)} split answers differ from the unsplit model's")
                    time.sleep(QUIET_SECONDS + 1)  # the servers settle their heaps (serving/heap.py) before we measure
                    hits0, misses0 = cache_counts(master)
                    for name, concurrency in (("seq", 1), ("load", args.concurrency)):
                        for _ in range(args.rounds):
                            for which, address, processes, calling in (
                                    ("unsplit", unsplit.address, [unsplit], None),
                                    ("split", master.address, [master, *shard_servers], master)):
                                job = grpc_job(address, PREDICT, bodies[0], timeout=30)
                                job["bodies_b64"] = [grpc_job("", "", b)["body_b64"] for b in bodies]
                                job["expected_b64"] = [grpc_job("", "", b)["body_b64"] for b in expected]
                                outcome = measure(load, processes, job, concurrency, args.requests, args.seconds,
                                                  master=calling)
                                results.setdefault((shards, cache, name, which), []).append(outcome)
                    hits, misses = cache_counts(master)
                    saved = (hits - hits0) / max(1.0, hits - hits0 + misses - misses0)
                    results[(shards, cache, "cache")] = [{"saved": saved}]
                finally:
                    master.stop()
                    for server in shard_servers:
                        server.stop()
                print(f"# {shards} shard(s), cache {cache:.0%}: done", file=sys.stderr)
    unsplit.stop()
    lines += report(args, results, rows_per_request)
    return lines


def _median(outcomes: list[dict], key, index=None) -> float:
    values = [o[key] if index is None else o[key][index] for o in outcomes]
    return statistics.median(values)


def report(args, results: dict, rows_per_request: int) -> list[str]:
    lines = [f"Machine: {machine_description()}. Model: users {args.users} x {args.dim}, items {args.items} x "
             f"{args.dim}; {USERS_PER_REQUEST} users x {ITEMS_PER_USER} items per request ({rows_per_request} ids), "
             f"Zipf a = {ZIPF_A}; {args.rounds} interleaved rounds; sequential: {args.requests} requests, loaded: "
             f"{args.concurrency} clients for {args.seconds:g} s. Medians over rounds.", ""]
    header = ("| shards | cache | mode | unsplit p50 / p99 ms | split p50 / p99 ms | p50 ratio | unsplit CPU ms/req "
              "| split CPU ms/req (master + shards) | CPU ratio | shard calls/req | shards' CPU ms/call | split req/s "
              "| rows from cache | errors |")
    lines += [header, "|---" * 14 + "|"]
    master_cpu: dict[tuple, float] = {}
    verdicts = []
    for shards in args.shards:
        for cache in args.cache_fractions:
            for mode in ("seq", "load"):
                un = results[(shards, cache, mode, "unsplit")]
                sp = results[(shards, cache, mode, "split")]
                ratios_p50 = [s["p50"] / u["p50"] for s, u in zip(sp, un, strict=True)]
                ratios_cpu = [sum(s["cpu_ms"]) / u["cpu_ms"][0] for s, u in zip(sp, un, strict=True)]
                m_cpu = _median(sp, "cpu_ms", 0)
                shards_cpu = statistics.median(sum(s["cpu_ms"][1:]) for s in sp)
                calls = _median(sp, "calls")
                per_call = statistics.median([sum(s["cpu_ms"][1:]) / s["calls"] for s in sp if s["calls"]] or [0.0])
                errors: dict[str, int] = {}
                for o in sp + un:
                    for code, n in o["errors"].items():
                        errors[code] = errors.get(code, 0) + n
                saved = results[(shards, cache, "cache")][0]["saved"] if cache else 0.0
                lines.append(
                    f"| {shards} | {cache:.0%} | {'sequential' if mode == 'seq' else f'{args.concurrency} clients'} | "
                    f"{_median(un, 'p50'):.2f} / {_median(un, 'p99'):.2f} | {_median(sp, 'p50'):.2f} / "
                    f"{_median(sp, 'p99'):.2f} | {statistics.median(ratios_p50):.2f}x | "
                    f"{_median(un, 'cpu_ms', 0):.2f} | {m_cpu + shards_cpu:.2f} ({m_cpu:.2f} + {shards_cpu:.2f}) | "
                    f"{statistics.median(ratios_cpu):.2f}x | {calls:.2f} | {per_call:.2f} | "
                    f"{_median(sp, 'rps'):.0f} | {saved:.0%} | {errors or 0} |")
                master_cpu[(shards, cache, mode)] = m_cpu
                if cache == 0:
                    if mode == "seq":
                        verdicts.append(("seq_p50", shards, statistics.median(ratios_p50)))
                        verdicts.append(("seq_cpu", shards, statistics.median(ratios_cpu)))
                    else:
                        verdicts.append(("load_cpu", shards, statistics.median(ratios_cpu)))
    lines.append("")
    for key, shards, value in verdicts:
        text, limit = TARGETS[key]
        lines.append(f"- {shards} shard(s): {text}: {value:.2f}x, {'met' if value <= limit else 'MISSED'}")
    counts = sorted(args.shards)
    if len(counts) > 1 and 0 in args.cache_fractions:
        for mode in ("seq", "load"):
            growth = [(master_cpu[(b, 0, mode)] - master_cpu[(a, 0, mode)]) / (b - a)
                      for a, b in itertools.pairwise(counts)]
            worst = max(growth)
            text, limit = TARGETS["master_growth"]
            lines.append(f"- {mode}: {text}: {', '.join(f'{g:+.3f}' for g in growth)} ms per shard; "
                         f"{'met' if worst <= limit else 'MISSED'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller tables, fewer rounds and shard counts")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--shards", default="1,2,4,8", help="shard server counts to measure")
    parser.add_argument("--cache_fractions", default="0", help="cache sizes as fractions of the tables, e.g. 0,0.01")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="requests per sequential round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of a loaded round")
    parser.add_argument("--pool", type=int, default=400, help="distinct requests, sent in turn")
    parser.add_argument("--write", help="also write the figures and the command to this Markdown file "
                                         "(its split_cost region; a run per cache setting keeps one region each)")
    args = parser.parse_args()
    if args.quick:
        args.users, args.items, args.rounds, args.requests, args.seconds = 100_000, 20_000, 2, 150, 3.0
        if args.shards == "1,2,4,8":
            args.shards = "1,4"
    args.shards = [int(s) for s in args.shards.split(",")]
    args.cache_fractions = [float(c) for c in args.cache_fractions.split(",")]
    started = time.monotonic()
    lines = run(args)
    lines.append(f"\n(measured in {time.monotonic() - started:.0f} s)")
    print("\n".join(lines))
    if args.write:
        caches = ",".join(f"{c:g}" for c in args.cache_fractions)
        write_region(args.write, f"split_cost cache={caches}",
                     f"## A split model against the unsplit one (`benchmarks/split_cost.py`, cache {caches})\n\n"
                     f"Measured {datetime.date.today().isoformat()}. Command: `{command_line()}`\n\n"
                     + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

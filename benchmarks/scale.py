"""A recommender whose user table is larger than one server should hold, split, served, and checked.

    .venv/bin/python benchmarks/scale.py --rows 33554432 --dim 64 --shards 4   # an 8 GiB table
    .venv/bin/python benchmarks/scale.py ... --from_saved_model   # split the SavedModel export instead

Builds a .keras model (user table rows x dim float32, a small item table, a dense tower) without ever
holding the big table in memory, splits it with `remote-predict split` (div partitioning: each shard
reads only its rows), serves the shards, the master and the unsplit model as `remote-predict serve`
processes, checks that the split answers equal the unsplit model's bit for bit, and reports each
process's peak memory and the latency of the split versus the unsplit model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import ServerProcess, free_port, write_config  # noqa: E402

ITEMS, ITEMS_PER_REQUEST = 10_000, 4
CHUNK_ROWS = 1 << 18


def write_recommender(path: Path, rows: int, dim: int, seed: int = 0) -> Path:
    """A .keras file with a rows x dim user table, filled a chunk at a time (memory stays small)."""
    import keras

    keras.utils.set_random_seed(seed)
    user = keras.Input(shape=(1,), dtype="int32", name="user")
    items = keras.Input(shape=(ITEMS_PER_REQUEST,), dtype="int32", name="items")
    u = keras.layers.Embedding(2, dim, name="user_table")(user)  # resized below, in the files
    i = keras.layers.Embedding(ITEMS, dim, name="item_table")(items)
    x = keras.layers.Flatten()(keras.layers.Concatenate(axis=1)([u, i]))
    x = keras.layers.Dense(64, activation="relu", name="tower")(x)
    model = keras.Model([user, items], keras.layers.Dense(1, name="score")(x), name="recommender")
    work = Path(tempfile.mkdtemp(prefix="scale-model-", dir=path.parent))
    small = work / "small.keras"
    model.save(small)
    with zipfile.ZipFile(small) as archive:
        config = json.loads(archive.read("config.json"))
        metadata = archive.read("metadata.json")
        with archive.open("model.weights.h5") as source, open(work / "model.weights.h5", "wb") as target:
            shutil.copyfileobj(source, target)
    for layer in config["config"]["layers"]:
        if layer["name"] == "user_table":
            layer["config"]["input_dim"] = rows
    rng = np.random.default_rng(seed)
    with h5py.File(work / "model.weights.h5", "r+") as weights:
        group = weights["layers/embedding/vars"]
        del group["0"]
        table = group.create_dataset("0", (rows, dim), dtype="float32")
        for start in range(0, rows, CHUNK_ROWS):
            end = min(rows, start + CHUNK_ROWS)
            table[start:end] = (rng.standard_normal((end - start, dim)) * 0.05).astype(np.float32)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr("metadata.json", metadata)
        archive.writestr("config.json", json.dumps(config))
        archive.write(work / "model.weights.h5", "model.weights.h5")
    shutil.rmtree(work)
    return path


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_measured(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a command, its peak read from /proc while it runs."""
    started = time.monotonic()
    process = subprocess.Popen(command)
    peak = 0.0
    while process.poll() is None:
        with contextlib.suppress(OSError):
            peak = max(peak, peak_rss_mb(process.pid))
        time.sleep(0.05)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with {process.returncode}")
    return time.monotonic() - started, peak


def drop_page_cache() -> None:
    """Best effort (root only): the 8 GiB files just written fill the page cache, and TensorFlow's CPU
    allocator refuses large tensors when little memory is free, even if the kernel could reclaim it."""
    with contextlib.suppress(OSError):
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")


def serve_and_time(servers: dict, client: ServerProcess, model: str, requests: list[dict]
                   ) -> tuple[list[bytes], list[float], dict[str, float]]:
    """Start `servers`, send `requests` one by one to `model`; (answers, latencies in ms, peak RSS by server)."""
    import tensorflow as tf

    try:
        for server in servers.values():
            server.wait_ready(timeout=1800)
        client.predict(model, requests[0])  # warm up
        answers, times = [], []
        for inputs in requests:
            started = time.perf_counter()
            response = client.predict(model, inputs, timeout=60)
            times.append((time.perf_counter() - started) * 1000)
            answers.append(tf.make_ndarray(response.outputs["output_0"]).tobytes())
        return answers, times, {name: peak_rss_mb(server.proc.pid) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--requests", type=int, default=300, help="latency samples per model")
    parser.add_argument("--batch", type=int, default=16, help="rows per request")
    parser.add_argument("--workdir", default=None, help="where files go (default: a temporary directory)")
    parser.add_argument("--from_saved_model", action="store_true",
                        help="split the model's SavedModel export (graph rewrite) instead of the .keras file")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="remote-predict-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    table_gib = args.rows * args.dim * 4 / (1 << 30)
    print(f"# user table {args.rows} x {args.dim} float32 = {table_gib:.2f} GiB over {args.shards} shards; "
          f"files in {work}", flush=True)

    started = time.monotonic()
    model = write_recommender(work / "recommender.keras", args.rows, args.dim)
    print(f"wrote {model} ({os.path.getsize(model) / (1 << 30):.2f} GiB) in {time.monotonic() - started:.0f}s",
          flush=True)
    ports = [free_port() for _ in range(args.shards)]
    unsplit_seconds, unsplit_peak = run_measured([
        sys.executable, "-c", "import sys\nfrom remote_predict.split import models, writers\n"
        "from remote_predict.split.keras_archive import KerasArchive\n"
        "with KerasArchive(sys.argv[1]) as archive:\n"
        "    writers.write_keras(sys.argv[2], models.unsplit_model(archive))", str(model), str(work / "unsplit" / "1")])
    print(f"unsplit export in {unsplit_seconds:.0f}s, peak RSS {unsplit_peak:.0f} MB", flush=True)
    source = work / "unsplit" if args.from_saved_model else model
    split_seconds, split_peak = run_measured([
        sys.executable, "-m", "remote_predict", "split", str(source), f"--output_dir={work / 'split'}",
        f"--shards={args.shards}", "--partition=div", "--tables=user_table", "--name=recommender",
        "--shard_addresses=" + ";".join(f"127.0.0.1:{p}" for p in ports)])
    print(f"split {source} in {split_seconds:.0f}s, splitter peak RSS {split_peak:.0f} MB", flush=True)

    # Shards and master first, then the unsplit model alone: both at once would need the table twice.
    config = work / "split" / "config"
    rng = np.random.default_rng(1)
    requests = [{"user": rng.integers(0, args.rows, (args.batch, 1)).astype(np.int32),
                 "items": rng.integers(0, ITEMS, (args.batch, ITEMS_PER_REQUEST)).astype(np.int32)}
                for _ in range(args.requests)]
    # The split's shard addresses name each shard server's --tcp_port (the framed transport the master calls).
    shards = {f"shard {k}": ServerProcess(f"--model_config_file={config / f'shard_{k}.config'}",
                                          "--file_system_poll_wait_seconds=0", f"--tcp_port={port}", rest=False,
                                          wait=False) for k, port in enumerate(ports)}
    master = ServerProcess(f"--model_config_file={config / 'master.config'}", "--file_system_poll_wait_seconds=0",
                           rest=False, wait=False)
    drop_page_cache()
    split_answers, split_ms, peaks = serve_and_time({**shards, "master": master}, master, "recommender", requests)
    print("split deployment peak RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()), flush=True)
    drop_page_cache()
    unsplit_config = write_config(work / "unsplit.config", {"unsplit": work / "unsplit"})
    unsplit = ServerProcess(f"--model_config_file={unsplit_config}", "--file_system_poll_wait_seconds=0",
                            rest=False, wait=False)
    unsplit_answers, unsplit_ms, unsplit_peaks = serve_and_time({"unsplit": unsplit}, unsplit, "unsplit", requests)
    peaks.update(unsplit_peaks)
    if split_answers != unsplit_answers:
        raise SystemExit("the split answers differ from the unsplit model's")
    timings = {"split": split_ms, "unsplit": unsplit_ms}

    print("\n| process | peak RSS (MB) |\n|---|---|")
    print(f"| splitter (`remote-predict split`) | {split_peak:.0f} |")
    for name, peak in peaks.items():
        print(f"| {name} server | {peak:.0f} |")
    print("\n| model | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|")
    for name, values in timings.items():
        values.sort()
        print(f"| {name} | {statistics.median(values):.2f} | {values[int(len(values) * 0.9)]:.2f} | "
              f"{values[int(len(values) * 0.99)]:.2f} |")
    largest = max(v for k, v in peaks.items() if k.startswith("shard"))
    print(f"\n{args.batch} rows per request, {args.requests} sequential requests each, answers equal bit for bit; "
          f"table {table_gib:.2f} GiB, largest shard server {largest:.0f} MB")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`remote-predict bench`: load any TF Serving-compatible server and report throughput and latency.

For each concurrency level it runs closed-loop clients for `--duration` seconds and prints requests/s,
p50/p90/p99/max latency and errors by code. Inputs come from `--input ALIAS=FILE.npy`, or are random,
shaped after the model's metadata (unknown dimensions become `--batch` for the first, 1 for others).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import urllib.request

import grpc
import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from remote_predict import json_codec, tensor_codec
from remote_predict.protocol import PREDICTION_SERVICE
from remote_predict.tools.loadgen import LevelResult, LoadGenerator, grpc_job, machine_description, rest_job


def _signature_inputs_grpc(target: str, model: str, signature: str) -> dict[str, tuple[int, list[int] | None]]:
    with grpc.insecure_channel(target) as channel:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    if signature not in signatures.signature_def:
        raise SystemExit(f"model {model} has no signature {signature!r} (has {sorted(signatures.signature_def)})")
    return {alias: (info.dtype, None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim])
            for alias, info in signatures.signature_def[signature].inputs.items()}


def _signature_inputs_rest(target: str, model: str, signature: str) -> dict[str, tuple[int, list[int] | None]]:
    with urllib.request.urlopen(f"http://{target}/v1/models/{model}/metadata", timeout=30) as response:
        doc = json.loads(response.read())
    signatures = doc["metadata"]["signature_def"]["signature_def"]
    if signature not in signatures:
        raise SystemExit(f"model {model} has no signature {signature!r} (has {sorted(signatures)})")
    inputs = {}
    for alias, info in signatures[signature]["inputs"].items():
        shape = info.get("tensor_shape", {})
        dims = None if shape.get("unknown_rank") else [int(d["size"]) for d in shape.get("dim", [])]
        inputs[alias] = (types_pb2.DataType.Value(info["dtype"]), dims)
    return inputs


def random_inputs(spec: dict[str, tuple[int, list[int] | None]], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for alias, (dtype, dims) in spec.items():
        shape = [batch] if dims is None else [(batch if i == 0 else 1) if d < 0 else d for i, d in enumerate(dims)]
        npdt = tensor_codec.numpy_dtype(dtype)
        if npdt.kind == "f":
            arrays[alias] = rng.standard_normal(shape).astype(npdt)
        elif npdt.kind in "iu":
            arrays[alias] = rng.integers(0, 10, shape).astype(npdt)
        elif npdt.kind == "b":
            arrays[alias] = rng.integers(0, 2, shape).astype(bool)
        else:
            array = np.empty(shape, dtype=object)
            array.flat[:] = [b"x" * int(n) for n in rng.integers(1, 9, math.prod(shape))]
            arrays[alias] = array
    return arrays


def build_job(protocol: str, target: str, model: str, signature: str, inputs: dict[str, np.ndarray],
              tensor_content: bool = False, timeout: float = 30.0) -> dict:
    if protocol == "grpc":
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        tensor_codec.put_arrays(request.inputs, inputs, tensor_content)
        metadata = (("x-remote-predict-tensor-encoding", "tensor_content"),) if tensor_content else ()
        return grpc_job(target, f"/{PREDICTION_SERVICE}/Predict", request.SerializeToString(), metadata, timeout)
    body = json_codec.encode_columnar_request(signature, inputs).encode("utf-8")
    return rest_job(f"http://{target}/v1/models/{model}:predict", body, timeout)


def format_table(results: list[LevelResult]) -> str:
    rows = [("concurrency", "requests/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "client CPU")]
    for r in results:
        errors = ", ".join(f"{k}={v}" for k, v in sorted(r.errors.items())) or "0"
        client = f"{r.client_cpu * 100:.0f}% x{r.client_processes}" + (" SATURATED" if r.client_saturated else "")
        rows.append((str(r.concurrency), f"{r.rps:.0f}", f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
                     f"{r.max_ms:.2f}", errors, client))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def _plot(results: list[LevelResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r.concurrency for r in results]
    fig, left = plt.subplots(figsize=(7, 4))
    for name in ("p50_ms", "p90_ms", "p99_ms"):
        left.plot(levels, [getattr(r, name) for r in results], marker="o", label=name.replace("_ms", ""))
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrency")
    left.set_ylabel("latency (ms)")
    right = left.twinx()
    right.plot(levels, [r.rps for r in results], color="black", linestyle="--", marker="s", label="requests/s")
    right.set_ylabel("requests/s")
    lines = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(lines, labels, loc="upper left")
    left.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="remote-predict bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="HOST:PORT of the gRPC API (or of the REST API with "
                                                        "--protocol=rest)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--signature_name", default="serving_default")
    parser.add_argument("--protocol", choices=["grpc", "rest"], default="grpc")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels (default 1,4,16,64)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each level")
    parser.add_argument("--input", action="append", default=[], metavar="ALIAS=FILE.npy")
    parser.add_argument("--batch", type=int, default=1, help="first dimension of random inputs")
    parser.add_argument("--tensor_content", action="store_true", help="send and ask for tensor_content (gRPC)")
    parser.add_argument("--client_processes", type=int, default=0,
                        help="load worker processes (default: one per 32 clients, at most the CPU count)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline in seconds")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--csv", help="write the results as CSV to this file")
    parser.add_argument("--plot", help="draw latency and throughput against concurrency to this PNG file")
    args = parser.parse_args(argv)

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) <= 0:
        parser.error("--concurrency needs positive integers")
    if args.input:
        inputs = {}
        for item in args.input:
            alias, _, path = item.partition("=")
            if not path:
                parser.error(f"--input {item!r} is not ALIAS=FILE.npy")
            inputs[alias] = np.load(path, allow_pickle=False)
    else:
        fetch = _signature_inputs_grpc if args.protocol == "grpc" else _signature_inputs_rest
        inputs = random_inputs(fetch(args.target, args.model, args.signature_name), args.batch)
    job = build_job(args.protocol, args.target, args.model, args.signature_name, inputs, args.tensor_content,
                    args.timeout)
    processes = args.client_processes or min(os.cpu_count() or 1, max(1, max(levels) // 32))
    print(f"# remote-predict bench: {args.protocol} {args.target} model={args.model} "
          f"signature={args.signature_name} inputs={ {k: list(v.shape) for k, v in inputs.items()} }")
    print(f"# machine: {machine_description()}; {processes} client process(es); {args.duration:g}s per level")
    results = []
    with LoadGenerator(processes) as load:
        for level in levels:
            results.append(load.run(job, level, args.duration, args.warmup))
            print(format_table(results).splitlines()[-1] if len(results) > 1 else format_table(results), flush=True)
    if any(r.client_saturated for r in results):
        print("# SATURATED: a client process was busy >= 90% of the time at that level, so its figures include "
              "client-side queueing; raise --client_processes (the server shares this machine's CPUs).")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"target": args.target, "model": args.model, "protocol": args.protocol,
                       "machine": machine_description(), "levels": [r.as_dict() for r in results]}, f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            fields = list(results[0].as_dict())
            writer.writerow(fields)
            for r in results:
                writer.writerow([json.dumps(v) if isinstance(v, dict) else v for v in r.as_dict().values()])
    if args.plot:
        _plot(results, args.plot, f"{args.model} over {args.protocol}")
    return 1 if any(r.errors for r in results) and not any(r.rps for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

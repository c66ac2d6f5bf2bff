"""`remote-predict split`: cut a Keras model into pieces that servers host, with RemotePredict ops between.

The model is a `.keras` file or a SavedModel exported from Keras (`model.export()`); a SavedModel is
split by rewriting its graph (every gather from a table becomes a call to the shards). Two ways to split:

* Sharding tables (the default): every Embedding table larger than --threshold_mib (or those named by
  --tables) is sharded by rows over --shards servers. Written: one shard SavedModel per table and shard
  (signature `lookup`: ids -> embeddings), a master SavedModel that sends each shard its ids concurrently
  and runs the rest of the model, a model config per server, launch.sh and a Procfile.
* --cut LAYER: the model up to LAYER becomes a base model, the rest a head model whose input comes from a
  RemotePredict call to the base (host one base, call it from several heads).

The model and --output_dir may be s3://BUCKET/PREFIX (the deployment files then go to --deploy_dir);
--kubernetes makes the master call each shard's headless Service and writes manifests for `kubectl apply -k`.

Version N of a master calls version N of its shards. A roll-out writes the shards of version N+1 beside
version N (shard servers keep the latest two), waits until they are loaded (--wait_for_shards), then
writes master N+1: the master swaps over with no gap, and every answer comes from one version.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from remote_predict.errors import ServingError
from remote_predict.op import api as remote_predict
from remote_predict.op.kernel import call_stub
from remote_predict.op.lookup import LOOKUP_SIGNATURE
from remote_predict.op.partition import STRATEGIES, Partition
from remote_predict.split import deploy, kubernetes, locations, models, sources, writers
from remote_predict.split.keras_archive import KerasArchive

SHARD_POLICY = "latest { num_versions: 2 }"  # a master's version N and N+1 may both be live in a roll-out
SHARD_VERSIONS_KEPT = 2


def _parse_addresses(text: str, count: int, base_port: int, protocol: str) -> list[str]:
    """The master's target for each shard; an address without a scheme gets `protocol`'s."""
    if not text:
        listed = [f"localhost:{base_port + k}" for k in range(count)]
    else:
        listed = [a.strip() for a in text.replace("\n", ";").split(";") if a.strip()]
    if len(listed) != count:
        raise SystemExit(f"--shard_addresses lists {len(listed)} addresses for {count} shards "
                         "(separate shards with ';', replicas of one shard with ',')")
    if protocol == "tcp":
        listed = [a if "://" in a else f"tcp://{a.removeprefix('ipv4:')}" for a in listed]
    return listed


def _choose_tables(source: sources.ModelSource, names: str, threshold_mib: float) -> dict:
    """Table name -> rows: those named, or every table larger than the threshold."""
    tables = source.tables()
    if names:
        chosen = {}
        for name in (n.strip() for n in names.split(",") if n.strip()):
            try:
                key = source.resolve(name)
            except ValueError as e:
                raise SystemExit(f"--tables: {e}") from None
            chosen[key] = tables[key]
        return chosen
    chosen = {name: rows for name, rows in tables.items() if rows.nbytes > threshold_mib * (1 << 20)}
    for name, (nbytes, why) in source.unshardable().items():
        if nbytes > threshold_mib * (1 << 20):
            print(f"  not sharding {name} ({nbytes / (1 << 20):.1f} MiB): the graph also uses it otherwise ({why})",
                  file=sys.stderr)
    if not chosen:
        sizes = ", ".join(f"{name} {rows.nbytes / (1 << 20):.1f} MiB" for name, rows in tables.items()) or "none"
        raise SystemExit(f"no Embedding table is larger than {threshold_mib:g} MiB (tables: {sizes}); "
                         "name the tables to shard with --tables, or lower --threshold_mib")
    return chosen


def _wait_for_versions(shards: dict[str, str], tables: Sequence[str], version: int, timeout: float) -> None:
    """Block until every replica of every shard (model -> its target) answers a lookup of `version`.

    The question goes over the same transport the master will use, to each replica on its own, as an
    empty lookup: NOT_FOUND until the version is loaded there.
    """
    from remote_predict.op.runtime import default_runtime
    from remote_predict.op.stubs import StubError

    deadline = time.monotonic() + timeout
    runtime = default_runtime()
    for model, target in shards.items():
        for replica in deploy.replica_targets(target):
            request = predict_pb2.PredictRequest()
            request.model_spec.name, request.model_spec.signature_name = model, LOOKUP_SIGNATURE
            request.model_spec.version.value = version
            ids = {table: np.zeros([0], np.int64) for table in tables}
            while True:
                try:
                    call_stub(runtime.stub_for(replica), request, ids, timeout=5.0)
                    break
                except StubError as e:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{model} version {version} is not answering at {replica} after "
                                         f"{timeout:.0f}s ({e.message}); not writing the master") from None
                time.sleep(0.5)
            print(f"  {model} version {version} answers at {replica}", file=sys.stderr)


def _refuse_taken(out: locations.Output, version: int, pieces: Sequence[tuple[str, ...]],
                  masters: Sequence[tuple[str, ...]]) -> None:
    """Stop before any work if a version directory this run writes is there already (`masters`: the
    master's or head's, which a run stopped while waiting for its shards, or failed after them, lacks)."""
    existing = out.taken(version, list(pieces))
    if existing:
        hint = bool(masters) and not out.taken(version, list(masters)) and len(existing) + len(masters) == len(pieces)
        raise SystemExit(f"remote-predict split: {out.refusal(existing, version, only_master=hint)}")


def _split_tables(args, source: sources.ModelSource, name: str) -> list[deploy.Server]:
    if args.kubernetes:
        targets = [kubernetes.target(name, f"shard_{k}", args.namespace) for k in range(args.shards)]
    else:
        targets = _parse_addresses(args.shard_addresses, args.shards, args.shard_base_port, args.shard_protocol)
    out: locations.Output = args.output
    shard_names = tuple(f"{name}_shard_{k}" for k in range(args.shards))
    shard_pieces = [("shards", shard_name) for shard_name in shard_names] if args.only != "master" else []
    master = [("master",)] if args.only != "shards" else []
    unsplit = [("unsplit",)] if args.export_unsplit else []
    _refuse_taken(out, args.version, [*shard_pieces, *master, *unsplit], master)
    tables = _choose_tables(source, args.tables, args.threshold_mib)
    plans = []
    for table_name, table in tables.items():
        rows, dim = table.shape
        plans.append(models.TablePlan(table_name, rows, dim, args.partition, tuple(targets), shard_names))
    shard_bytes = dict.fromkeys(range(args.shards), 0)
    for k in range(args.shards):  # one model per shard server, holding its part of every table
        parts = []
        for plan in plans:
            table = tables[plan.layer]
            partition = Partition(args.partition, plan.rows, args.shards)
            shard_bytes[k] += partition.shard_rows(k) * plan.dim * table.dtype.itemsize
            label = f"table {plan.layer} ({plan.rows} x {plan.dim}) shard {k + 1}/{args.shards}"
            parts.append(writers.ShardTable(plan.layer, partition.shard_rows(k), plan.dim, table.dtype,
                                            writers.shard_chunks(table, partition, k, writers.Progress(label))))
        if shard_pieces:
            writers.write_shard(out.version_dir(args.version, "shards", shard_names[k]), parts)
            out.publish(args.version, "shards", shard_names[k])
    if master and args.wait_for_shards:
        out.commit()  # the shard servers must see them to load them
        _wait_for_versions(dict(zip(shard_names, targets, strict=True)), list(tables), args.version,
                           args.wait_timeout)
    if master:
        print(f"  master {name} version {args.version}", file=sys.stderr)
        source.write_master(out.version_dir(args.version, "master"), plans, args.version, args.deadline_ms)
        out.publish(args.version, "master")
    if unsplit:
        print(f"  unsplit {name} version {args.version} (for comparisons)", file=sys.stderr)
        source.write_unsplit(out.version_dir(args.version, "unsplit"))
        out.publish(args.version, "unsplit")
    out.commit()
    servers = [deploy.Server("master", {name: out.base_path("master")}, [args.master_port],
                             rest_port=args.master_rest_port, held_bytes=out.written("master"))]
    for k in range(args.shards):
        servers.append(deploy.shard_server(f"shard_{k}", {shard_names[k]: out.base_path("shards", shard_names[k])},
                                           targets[k], SHARD_POLICY, held_bytes=shard_bytes[k],
                                           versions_kept=SHARD_VERSIONS_KEPT))
    return servers


def _write_consumer(path: str, head: keras.Model, archive: KerasArchive, base_inputs: list[str],
                    needed: list[str], target: str, base_model: str, version: int, deadline_ms: int) -> list[str]:
    """The head, served with the original model's inputs: it calls the base for the cut layer's output."""
    specs = {}
    for layer in archive.config["config"]["layers"]:
        if layer["class_name"] == "InputLayer":
            config = layer["config"]
            specs[config["name"]] = tf.TensorSpec(config["batch_shape"], config["dtype"], name=config["name"])
    inputs = [name for name in specs if name in base_inputs or name in needed]
    cut_spec = head.inputs[0]
    cut_dtype = tf.as_dtype(cut_spec.dtype)

    def call_base(*values):
        result = remote_predict.run(base_inputs, list(values), ["output_0"], target_address=target,
                                    model_name=base_model, model_version=version,
                                    max_rpc_deadline_millis=deadline_ms, output_types=[cut_dtype],
                                    name="call_base")[0]
        result.set_shape(cut_spec.shape)
        return result

    base_call = tf.compat.v1.wrap_function(call_base, [specs[n] for n in base_inputs])

    def serve(*values):
        by_name = dict(zip(inputs, values, strict=True))
        head_inputs = [base_call(*(by_name[n] for n in base_inputs)), *(by_name[n] for n in needed)]
        return head(head_inputs if len(head_inputs) > 1 else head_inputs[0])

    archive_ = keras.export.ExportArchive()
    archive_.track(head)
    archive_.add_endpoint("serving_default", serve, input_signature=[specs[n] for n in inputs])
    with writers.atomic_directory(path) as scratch:
        archive_.write_out(scratch, verbose=False)
    return inputs


def _split_cut(args, archive: KerasArchive, name: str) -> list[deploy.Server]:
    out: locations.Output = args.output
    base_name = args.base_name or f"{name}_base"
    if args.kubernetes:
        args.base_address = kubernetes.target(name, "base", args.namespace)
    base_piece = [("base",)] if args.only != "master" else []
    head_piece = [("head",)] if args.only != "shards" else []
    _refuse_taken(out, args.version, [*base_piece, *head_piece], head_piece)
    base, head, needed = models.cut_models(archive, args.cut)
    base_inputs = [tensor.name for tensor in base.inputs]  # the names its exported signature takes
    if base_piece:
        print(f"  base {base_name} version {args.version}: inputs {base_inputs} -> {args.cut}", file=sys.stderr)
        writers.write_keras(out.version_dir(args.version, "base"), base)
        out.publish(args.version, "base")
    if head_piece:
        inputs = _write_consumer(out.version_dir(args.version, "head"), head, archive, base_inputs, needed,
                                 args.base_address, base_name, args.version, args.deadline_ms)
        out.publish(args.version, "head")
        print(f"  head {name} version {args.version}: inputs {inputs}, calls {base_name} at {args.base_address}",
              file=sys.stderr)
    out.commit()
    ports, others = deploy.local_ports(args.base_address)
    head_server = deploy.Server("head", {name: out.base_path("head")}, [args.master_port],
                                rest_port=args.master_rest_port, held_bytes=out.written("head"))
    base_server = deploy.Server("base", {base_name: out.base_path("base")}, ports, policy=SHARD_POLICY,
                                remote_hosts=others, held_bytes=out.written("base"),
                                versions_kept=SHARD_VERSIONS_KEPT)
    return [head_server, base_server]


def main(argv: list[str], started: float | None = None) -> int:
    """Run a split; `started` (on the monotonic clock) is when the command began, for its "done in"."""
    parser = argparse.ArgumentParser(prog="remote-predict split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .keras file, or a SavedModel directory (or a base path of versions) "
                                      "exported from Keras; local or s3://BUCKET/PREFIX")
    parser.add_argument("--output_dir", required=True, help="a local directory, or s3://BUCKET/PREFIX")
    parser.add_argument("--deploy_dir", default="",
                        help="local directory for the model configs, split.json and kubernetes/ (default: "
                             "--output_dir; required when --output_dir is in the store)")
    parser.add_argument("--name", help="model name the master (or head) is served under (default: the model's)")
    parser.add_argument("--version", type=int, default=1, help="version written (default 1)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--tables", default="", help="comma-separated Embedding layers to shard (overrides the "
                                                     "size threshold)")
    parser.add_argument("--threshold_mib", type=float, default=64.0,
                        help="shard every Embedding table larger than this (default 64 MiB)")
    parser.add_argument("--partition", choices=STRATEGIES, default="mod", help="mod or div, as tf.nn.embedding_lookup")
    parser.add_argument("--shard_addresses", default="",
                        help="where the master calls each shard: ';' between shards, ',' between replicas of a "
                             "shard ('127.0.0.1:9000,127.0.0.1:9100;localhost:9001'); default localhost:9000, "
                             "9001, ... An address without a scheme uses --shard_protocol")
    parser.add_argument("--shard_protocol", choices=["tcp", "grpc"], default="tcp",
                        help="how the master calls the shards: tcp (remote-predict's framed transport, on the "
                             "shards' --tcp_port; about a tenth of gRPC's cost per call) or grpc (default tcp)")
    parser.add_argument("--shard_base_port", type=int, default=9000)
    parser.add_argument("--master_port", type=int, default=8500)
    parser.add_argument("--master_rest_port", type=int, default=8501)
    parser.add_argument("--deadline_ms", type=int, default=10000, help="the RemotePredict calls' deadline")
    parser.add_argument("--only", choices=["all", "shards", "master"], default="all",
                        help="write only the shards (or the base) or only the master (or the head)")
    parser.add_argument("--wait_for_shards", action="store_true",
                        help="before writing the master, wait until every shard server has this version loaded")
    parser.add_argument("--wait_timeout", type=float, default=600.0)
    parser.add_argument("--export_unsplit", action="store_true",
                        help="also export the whole model as a SavedModel (loads every table into memory)")
    parser.add_argument("--cut", help="split at this layer instead: base = up to it, head = the rest")
    parser.add_argument("--base_name", help="model name of the base (default: NAME_base)")
    parser.add_argument("--base_address", default="localhost:9000", help="where the head calls the base")
    kubernetes_flags = parser.add_argument_group("Kubernetes (with --kubernetes)")
    kubernetes_flags.add_argument("--kubernetes", action="store_true",
                                  help="write DEPLOY_DIR/kubernetes/ for `kubectl apply -k`; the master calls each "
                                       "shard's headless Service (needs --output_dir=s3://...)")
    kubernetes_flags.add_argument("--image", default="remote-predict:latest", help="the server image (Containerfile)")
    kubernetes_flags.add_argument("--namespace", default="remote-predict", help="namespace of every object")
    kubernetes_flags.add_argument("--shard_replicas", type=int, default=2, help="pods per shard (the HPA's minimum)")
    kubernetes_flags.add_argument("--master_replicas", type=int, default=2, help="master pods (the HPA's minimum)")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    if args.kubernetes:
        if not args.output_dir.lower().startswith("s3://"):
            parser.error("--kubernetes needs --output_dir=s3://BUCKET/PREFIX: pods read the models from the store")
        if args.shard_addresses:
            parser.error("--kubernetes writes the shard addresses itself (their Services); drop --shard_addresses")
        if args.shard_replicas < 1 or args.master_replicas < 1:
            parser.error("--shard_replicas and --master_replicas must be at least 1")
        if kubernetes.dns_label(args.namespace) != args.namespace:
            parser.error(f"--namespace={args.namespace} is not a Kubernetes namespace name (lowercase letters, digits "
                         "and '-', at most 63)")
    started = time.monotonic() if started is None else started
    try:
        args.output = locations.Output(args.output_dir, args.deploy_dir)
    except ServingError as e:
        parser.error(e.message)
    scratch = tempfile.mkdtemp(prefix="remote-predict-input-")
    try:
        source = sources.open_source(locations.local_input(args.model, scratch))
    except (OSError, ValueError) as e:
        args.output.close()
        shutil.rmtree(scratch, ignore_errors=True)
        raise SystemExit(f"remote-predict split: cannot read {args.model}: {e}") from None
    except BaseException:
        args.output.close()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        name = args.name or source.name
        print(f"remote-predict split {args.model} -> {args.output_dir}", file=sys.stderr)
        if args.cut and not isinstance(source, sources.KerasSource):
            raise SystemExit("--cut needs the model's layers: give the .keras file (a SavedModel export has no "
                             "layer config)")
        servers = _split_cut(args, source.archive, name) if args.cut else _split_tables(args, source, name)
    except OSError as e:  # e.g. no space left, or a file where a directory of OUTPUT goes: nothing was left
        raise SystemExit(f"remote-predict split: {e}") from None
    finally:
        source.close()
        args.output.close()
        shutil.rmtree(scratch, ignore_errors=True)
    deploy_dir = args.output.deploy_dir
    previous = _previous_sizes(deploy_dir)
    for server in servers:
        if server.held_bytes is None:  # not written by this run (--only): as recorded by the last one
            server.held_bytes = previous.get(server.name)
    written = deploy.write(deploy_dir, servers, scripts=not args.kubernetes)
    model = args.model if "://" in args.model else os.path.abspath(args.model)
    manifest = {"model": model, "name": name, "version": args.version, "output": args.output.root,
                "mode": "cut" if args.cut else "tables", "servers": {s.name: s.ports for s in servers},
                "held_bytes": {s.name: s.held_bytes for s in servers}}
    with open(os.path.join(deploy_dir, "split.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    if args.kubernetes:
        options = kubernetes.Options(image=args.image, namespace=args.namespace, shard_replicas=args.shard_replicas,
                                     master_replicas=args.master_replicas)
        manifests = os.path.join(deploy_dir, "kubernetes")
        written += kubernetes.write(manifests, kubernetes.workloads(name, servers), options)
        print(f"done in {time.monotonic() - started:.1f}s; deploy with: kubectl apply -k {manifests}", file=sys.stderr)
    else:
        launch = os.path.join(deploy_dir, "launch.sh")
        print(f"done in {time.monotonic() - started:.1f}s; start everything with {launch}", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def _previous_sizes(deploy_dir: str) -> dict[str, int]:
    try:
        with open(os.path.join(deploy_dir, "split.json"), encoding="utf-8") as f:
            return {k: v for k, v in json.load(f).get("held_bytes", {}).items() if v}
    except (OSError, ValueError):
        return {}


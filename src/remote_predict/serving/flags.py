"""`remote-predict serve` flags: tensorflow_model_server's names, `--flag=value` syntax and defaults.

A TF Serving flag this server does not implement is refused when set to anything but its default,
never silently ignored. Flags of our own are marked "(remote-predict)" in `--help`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from remote_predict.serving.cpus import BUDGET

CPUS = BUDGET.cpus  # what the pools are sized for: see cpus.py (a container's CPU quota counts)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "t", "yes", "y"):
        return True
    if lowered in ("0", "false", "f", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag(default, help: str):
    """A flag's default and its `--help` text, beside its field."""
    return field(default=default, metadata={"help": help})


@dataclass
class ServerOptions:
    # --- tensorflow_model_server flags --------------------------------------------------------
    port: int = flag(8500, "TCP port for the gRPC API")
    grpc_socket_path: str = flag("", "if set, also serve gRPC on this UNIX socket path")
    rest_api_port: int = flag(0, "TCP port for the REST API (0: no REST API)")
    rest_api_num_threads: int = flag(0, "threads that run REST requests (0: as --grpc_max_threads decides when 0)")
    rest_api_timeout_in_ms: int = flag(30000, "timeout of a REST request in milliseconds (0: none)")
    rest_api_enable_cors_support: bool = flag(False, "answer CORS preflight requests and add CORS headers")
    enable_batching: bool = flag(False, "merge concurrent requests into batches")
    allow_version_labels_for_unavailable_models: bool = flag(
        False, "allow labels that point at versions not yet loaded")
    batching_parameters_file: str = flag("", "text-format BatchingParameters file")
    model_config_file: str = flag("", "text-format ModelServerConfig file (overrides --model_name/--model_base_path)")
    model_config_file_poll_wait_seconds: int = flag(0, "re-read --model_config_file this often (0: never)")
    model_name: str = flag("default", "name of the single model served with --model_base_path")
    model_base_path: str = flag(
        "", "directory (or s3://BUCKET/PREFIX) holding the integer version directories of the single model")
    num_load_threads: int = flag(0, "threads that load model versions (0: one)")
    num_unload_threads: int = flag(0, "threads that unload model versions (0: four)")
    max_num_load_retries: int = flag(5, "times a failed load is retried")
    load_retry_interval_micros: int = flag(60 * 1000 * 1000, "wait between load retries, in microseconds")
    file_system_poll_wait_seconds: int = flag(1, "look for new model versions this often (0: only at start)")
    flush_filesystem_caches: bool = flag(True, "accepted for compatibility (this server keeps no file system caches)")
    tensorflow_session_parallelism: int = flag(
        0, "threads of both TF pools when the two flags below are 0 (0: one per CPU, counting a CPU quota)")
    tensorflow_intra_op_parallelism: int = flag(0, "TF intra-op threads (0: one per CPU, counting a CPU quota)")
    tensorflow_inter_op_parallelism: int = flag(0, "TF inter-op threads (0: one per CPU, counting a CPU quota)")
    ssl_config_file: str = flag("", "text-format SSLConfig file: serve gRPC over TLS")
    saved_model_tags: str = flag("serve", "comma-separated MetaGraphDef tags to load")
    grpc_channel_arguments: str = flag("", "comma-separated gRPC server arguments, key=value")
    grpc_max_threads: int = flag(
        0, "threads that run gRPC requests: the most requests in progress at once, counting those waiting on "
           "RemotePredict calls or for a batch to fill (0: 4 per CPU, TF Serving's default; 16 per CPU when a model "
           "loaded at start makes remote calls)")
    enable_model_warmup: bool = flag(True, "replay assets.extra/tf_serving_warmup_requests when a version loads")
    monitoring_config_file: str = flag("", "text-format MonitoringConfig file: Prometheus metrics on the REST port")
    prefer_tflite_model: bool = flag(
        False, "serve a version directory's model.tflite (TensorFlow Lite) instead of its SavedModel; versions "
               "without one are served from their SavedModel")
    num_tflite_pools: int = flag(
        CPUS, "TFLite interpreters per loaded TFLite version: the requests it runs at once (0: one)")
    enable_profiler: bool = flag(
        True, "serve tensorflow.ProfilerService on the gRPC port (for tf.profiler.experimental.client.trace), "
              "answered in this process; no other port opens")
    # --- remote-predict flags -----------------------------------------------------------------
    host: str = flag("0.0.0.0", "(remote-predict) address to bind; 127.0.0.1 for loopback only")
    remote_predict_allowed_targets: str = flag(
        "", "(remote-predict) comma-separated host:port globs RemotePredict ops may call (empty: any)")
    remote_predict_threads: int = flag(
        64, "(remote-predict) threads for models with RemotePredict ops: the most remote calls in flight at once")
    remote_predict_client_tls_config_file: str = flag(
        "", "(remote-predict) text-format SSLConfig for the RemotePredict ops' outgoing gRPC channels (custom_ca; "
            "server_cert/server_key as the client certificate)")
    remote_predict_plugins: str = flag(
        "", "(remote-predict) comma-separated Python modules to import at start, for example modules that register "
            "custom stubs")
    remote_predict_loopback_in_process: bool = flag(
        True, "(remote-predict) serve RemotePredict calls that name this server over loopback (localhost:PORT) "
              "in-process, without the network")
    remote_predict_max_inflight_per_target: int = flag(
        0, "(remote-predict) the most RemotePredict calls in flight to one target; past it calls fail at once (0: no "
           "limit)")
    remote_predict_channel_arguments: str = flag(
        "", "(remote-predict) comma-separated gRPC channel arguments, key=value, for the RemotePredict ops' channels "
            "(over our defaults: keepalive every 1 s, retries, reconnect backoff up to 1 s)")
    remote_predict_hedge_after_ms: int = flag(
        0, "(remote-predict) tcp:// targets with several replicas: a call unanswered after this long is also sent to "
           "another replica, the first answer wins (0: never)")
    remote_predict_hedge_percentile: float = flag(
        0.0, "(remote-predict) tcp:// targets with several replicas: a call unanswered after this percentile of the "
             "target's recent latency (e.g. 95) is also sent to another replica; --remote_predict_hedge_after_ms is "
             "then the least delay (0: off)")
    remote_predict_cache_mib: float = flag(
        0.0, "(remote-predict) MiB of hot table rows a split master keeps, per server, shared by its tables in "
             "proportion to their size; rows of each model version apart (0: no cache)")
    tcp_port: int = flag(
        0, "(remote-predict) also serve Predict on this port over remote-predict's framed TCP transport, which "
           "RemotePredict ops reach as tcp://HOST:PORT (0: off)")
    lookup_fast_path: bool = flag(
        True, "(remote-predict) answer the shard models `remote-predict split` writes straight from their "
              "checkpoint's rows (memory-mapped, no TensorFlow Session); false loads them as any SavedModel")
    drain_timeout_seconds: float = flag(30.0, "(remote-predict) on SIGTERM/SIGINT, time allowed for in-flight requests")
    rest_api_max_body_bytes: int = flag(1 << 30, "(remote-predict) largest REST request body (413 above)")
    max_tensor_elements: int = flag(1 << 31, "(remote-predict) largest tensor a request may declare")
    model_cache_dir: str = flag(
        "", "(remote-predict) where versions in object storage (s3:// base paths) are copied to be loaded; each copy "
            "is deleted when its version is unloaded (empty: a directory under the system's temporary directory)")
    model_cache_max_bytes: int = flag(
        0, "(remote-predict) most bytes of copies in --model_cache_dir at once; a version that would exceed it fails "
           "to load with RESOURCE_EXHAUSTED (0: the disk's free space)")
    tracing_config_file: str = flag(
        "", "(remote-predict) text-format TracingConfig file: trace every request with OpenTelemetry and export the "
            "spans over OTLP (otlp_endpoint, sampling_ratio, service_name); the standard OTEL_* environment "
            "variables fill in what it leaves out, and turn tracing on without it (empty: tracing only if "
            "OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_TRACES_EXPORTER=otlp is set)")



# tensorflow_model_server flags we do not implement, with TF Serving's defaults.
UNSUPPORTED_DEFAULTS = {
    "platform_config_file": "",
    "per_process_gpu_memory_fraction": "0",
    "num_tflite_interpreters_per_pool": "1",
    "num_tflite_interpreters": "1",
    "enable_signature_method_name_check": "false",
    "xla_cpu_compilation_enabled": "false",
    "remove_unused_fields_from_bundle_metagraph": "true",
    "thread_pool_factory_config_file": "",
    "mixed_precision": "",
    "use_tflite_model": "false",
    "skip_initialize_tpu": "false",
    "enable_grpc_healthcheck_service": "false",
    "tensorflow_intra_op_parallelism_threads": "0",
}
# Why a refused flag is refused, where more can be said than "not supported".
_REFUSAL_REASONS = {
    "num_tflite_interpreters_per_pool": "TF Serving's splitting of one request's batch over several TFLite "
                                        "interpreters is not implemented; --num_tflite_pools sets how many "
                                        "requests run at once",
}


def _same_as_default(value: str, default: str) -> bool:
    if value.strip().lower() == default:
        return True
    try:
        return float(value) == float(default)
    except ValueError:
        return default in ("true", "false") and value.strip().lower() in ("1", "0") and \
            _bool(value) == _bool(default)


def build_parser(prog: str = "remote-predict serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Serve TensorFlow SavedModels over TF Serving's gRPC and REST APIs.")
    for option in fields(ServerOptions):
        default = option.default
        kind = {bool: _bool, int: int, float: float, str: str}[type(default)]
        kwargs = {"type": kind, "default": default, "help": f"{option.metadata['help']} (default: {default!r})",
                  "metavar": type(default).__name__.upper()}
        if isinstance(default, bool):
            kwargs.update(nargs="?", const=True)
        parser.add_argument(f"--{option.name}", **kwargs)
    for name in UNSUPPORTED_DEFAULTS:
        parser.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


class FlagError(ValueError):
    pass


def parse(argv: list[str]) -> tuple[ServerOptions, bool]:
    """Options from command-line flags; the bool is True when `--version` was asked."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    for name, default in UNSUPPORTED_DEFAULTS.items():
        value = getattr(namespace, name)
        if value is not None and not _same_as_default(value, default):
            reason = _REFUSAL_REASONS.get(
                name, "this tensorflow_model_server flag is not supported by remote-predict yet")
            raise FlagError(f"--{name}={value}: {reason}")
    options = ServerOptions(**{f.name: getattr(namespace, f.name) for f in fields(ServerOptions)})
    validate(options)
    return options, namespace.version


def validate(options: ServerOptions) -> None:
    if not options.model_config_file and not options.model_base_path:
        raise FlagError("Both server_model_base_path and model_config_file are empty: give --model_base_path "
                        "(with --model_name) or --model_config_file")
    for name in ("port", "rest_api_port", "tcp_port"):
        value = getattr(options, name)
        if not 0 <= value <= 65535:
            raise FlagError(f"--{name}={value} is not a TCP port")
    if options.rest_api_port and options.rest_api_port == options.port:
        raise FlagError("--rest_api_port cannot be the same as --port")
    if options.tcp_port and options.tcp_port in (options.port, options.rest_api_port):
        raise FlagError("--tcp_port must differ from --port and --rest_api_port")
    if options.remote_predict_cache_mib < 0:
        raise FlagError("--remote_predict_cache_mib must be >= 0")
    if options.remote_predict_hedge_after_ms < 0:
        raise FlagError("--remote_predict_hedge_after_ms must be >= 0")
    if not 0 <= options.remote_predict_hedge_percentile < 100:
        raise FlagError("--remote_predict_hedge_percentile must be in [0, 100)")
    if options.file_system_poll_wait_seconds < 0:
        raise FlagError("--file_system_poll_wait_seconds must be >= 0 (a negative value would never load a model)")
    if options.model_config_file_poll_wait_seconds < 0:
        raise FlagError("--model_config_file_poll_wait_seconds must be >= 0")
    if options.monitoring_config_file and not options.rest_api_port:
        raise FlagError("--monitoring_config_file serves metrics on the REST port: also give --rest_api_port")
    if options.batching_parameters_file and not options.enable_batching:
        raise FlagError("--batching_parameters_file needs --enable_batching")
    for name in ("remote_predict_threads", "rest_api_max_body_bytes", "max_tensor_elements"):
        if getattr(options, name) <= 0:
            raise FlagError(f"--{name} must be positive")
    for name in ("rest_api_num_threads", "grpc_max_threads"):
        if getattr(options, name) < 0:
            raise FlagError(f"--{name} must be >= 0")
    if options.num_tflite_pools < 0:
        raise FlagError("--num_tflite_pools must be >= 0")
    if options.remote_predict_max_inflight_per_target < 0:
        raise FlagError("--remote_predict_max_inflight_per_target must be >= 0")
    if options.model_cache_max_bytes < 0:
        raise FlagError("--model_cache_max_bytes must be >= 0")
    if options.drain_timeout_seconds < 0:
        raise FlagError("--drain_timeout_seconds must be >= 0")
    for name in ("grpc_channel_arguments", "remote_predict_channel_arguments"):
        for argument in filter(None, getattr(options, name).split(",")):
            if "=" not in argument:
                raise FlagError(f"--{name}: {argument!r} is not key=value")


REQUEST_THREADS_PER_CPU = 4  # TF Serving's default for both request pools
REMOTE_REQUEST_THREADS_PER_CPU = 16


def request_threads(configured: int, remote_calls: bool, cpus: int = CPUS) -> int:
    """Threads of a request pool (gRPC or REST): the flag when given, else by what the server serves.

    A request of a model that makes remote calls (a split master, a RemotePredict caller) spends most of
    its time waiting on other servers, and the lookups of requests in flight together share one call per
    shard (op/coalesce.py): with TF Serving's 4 per CPU, 32 clients of a master on 2 CPUs got 8 requests
    in flight, and 16 per CPU cut the CPU per request (master and shards together, benchmarks/split_cost.py)
    by 27 % at 4 shard servers and 39 % at 8. A server of plain models keeps 4 per CPU: more threads only
    contend there (no gain measured, perhaps a few % lost).
    """
    if configured:
        return configured
    return cpus * (REMOTE_REQUEST_THREADS_PER_CPU if remote_calls else REQUEST_THREADS_PER_CPU)


def parse_channel_arguments(text: str) -> list[tuple[str, object]]:
    """TF Serving's parsing of `key=value,...`: integers become int arguments, anything else stays a string."""
    result: list[tuple[str, object]] = []
    for argument in filter(None, text.split(",")):
        key, value = argument.split("=", 1)
        try:
            result.append((key.strip(), int(value)))
        except ValueError:
            result.append((key.strip(), value))
    return result


def channel_arguments(options: ServerOptions) -> list[tuple[str, object]]:
    return parse_channel_arguments(options.grpc_channel_arguments)

"""Assembles one model server from its options, and runs its life: start, reload, drain, stop."""

from __future__ import annotations

import importlib
import logging
import os
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from remote_predict import pem
from remote_predict.errors import Code, ServingError
from remote_predict.op.runtime import ClientTls, OpRuntime, OpSettings
from remote_predict.op.stubs import StubError
from remote_predict.op.stubs.inprocess_stub import register_local_server, unregister_local_server
from remote_predict.serving import config as config_lib
from remote_predict.serving import config_protos, grpc_api, rest_api, tcp_api
from remote_predict.serving.cpus import BUDGET
from remote_predict.serving.data_plane import DataPlane
from remote_predict.serving.flags import ServerOptions, channel_arguments, parse_channel_arguments, request_threads
from remote_predict.serving.heap import Heap
from remote_predict.serving.load_plan import State
from remote_predict.serving.manager import ManagerOptions, ModelManager
from remote_predict.serving.metrics import ServerMetrics
from remote_predict.serving.servable import LoadOptions
from remote_predict.serving.telemetry import Telemetry
from remote_predict.serving.tracing_config import settings as tracing_settings
from remote_predict.tracing import Tracing

log = logging.getLogger(__name__)


def tensorflow_threads(options: ServerOptions) -> tuple[int, int]:
    """(intra-op, inter-op) threads: the flags, else one per CPU as counted in cpus.py. TensorFlow's own
    default counts the affinity mask only, which sizes a CPU-limited container's pools for the whole node."""
    intra = options.tensorflow_intra_op_parallelism or options.tensorflow_session_parallelism or BUDGET.cpus
    inter = options.tensorflow_inter_op_parallelism or options.tensorflow_session_parallelism or BUDGET.cpus
    return intra, inter


def _configure_tensorflow(options: ServerOptions) -> None:
    intra, inter = tensorflow_threads(options)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        pass  # the eager context already exists (several servers in one process); sessions get their own config


def tracing_for(options: ServerOptions) -> Tracing | None:
    """This server's tracer, or None when tracing is off (see tracing_config.py for the rule)."""
    chosen = tracing_settings(options.tracing_config_file, os.environ)
    if chosen is None:
        return None
    tracing = Tracing(chosen)
    log.info("Tracing requests as service %s, exporting over OTLP to %s", tracing.service_name,
             chosen.endpoint or "the endpoint the OTEL_EXPORTER_OTLP_* variables name (default localhost:4317)")
    return tracing


def op_runtime(options: ServerOptions, tracing: Tracing | None = None) -> OpRuntime:
    """This server's RemotePredict settings, in the runtime that the models it loads are bound to."""
    for module in filter(None, (m.strip() for m in options.remote_predict_plugins.split(","))):
        try:
            importlib.import_module(module)
        except Exception as e:
            raise ServingError(Code.FAILED_PRECONDITION, f"--remote_predict_plugins: cannot import {module}: "
                               f"{type(e).__name__}: {e}") from None
    tls = options.remote_predict_client_tls_config_file
    settings = OpSettings(
        allowed_targets=tuple(options.remote_predict_allowed_targets.split(",")),
        loopback_in_process=options.remote_predict_loopback_in_process,
        max_inflight_per_target=options.remote_predict_max_inflight_per_target,
        tls=client_tls(tls) if tls else None,
        channel_arguments=tuple(parse_channel_arguments(options.remote_predict_channel_arguments)),
        hedge_after_ms=options.remote_predict_hedge_after_ms,
        hedge_percentile=options.remote_predict_hedge_percentile,
        cache_mib=options.remote_predict_cache_mib,
    )
    return OpRuntime(settings, name=f"server on port {options.port}", tracing=tracing)


def server_credentials(path: str) -> grpc.ServerCredentials:
    ssl = config_lib.read_text_proto(path, config_protos.SSLConfig())
    if not ssl.server_key or not ssl.server_cert:
        raise ServingError(Code.INVALID_ARGUMENT, f"{path}: server_key and server_cert are required")
    return grpc.ssl_server_credentials(
        [(ssl.server_key.encode(), ssl.server_cert.encode())],
        root_certificates=ssl.custom_ca.encode() if ssl.custom_ca else None,
        require_client_auth=ssl.client_verify,
    )


def client_tls(path: str) -> ClientTls:
    """The RemotePredict ops' TLS: custom_ca verifies servers; server_cert/server_key is our client cert."""
    ssl_config = config_lib.read_text_proto(path, config_protos.SSLConfig())
    return ClientTls(ca=ssl_config.custom_ca, cert=ssl_config.server_cert, key=ssl_config.server_key)


def tcp_ssl_context(path: str) -> ssl.SSLContext:
    """The --ssl_config_file's TLS for the tcp port, as for gRPC (client_verify: mutual TLS)."""
    ssl_config = config_lib.read_text_proto(path, config_protos.SSLConfig())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pem.load_cert_chain(context, ssl_config.server_cert, ssl_config.server_key)
    if ssl_config.custom_ca:
        context.load_verify_locations(cadata=ssl_config.custom_ca)
    if ssl_config.client_verify:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class ModelServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = ServerMetrics()
        self.manager: ModelManager | None = None
        self.data_plane: DataPlane | None = None
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self.tcp_port: int | None = None
        self.grpc_threads = self.rest_threads = 0  # the request pools' sizes, decided at start
        self.runtime: OpRuntime | None = None
        self.tracing: Tracing | None = None
        self.telemetry: Telemetry | None = None
        self._tcp: tcp_api.TcpServer | None = None
        self._grpc_server: grpc.Server | None = None
        self._health = None
        self._rest: rest_api.RestServer | None = None
        self._rest_executor: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._config_text: str | None = None
        self._config_thread: threading.Thread | None = None
        self._reload_lock = threading.Lock()
        self.heap = Heap()  # the garbage collector skips what the loaded versions hold (see heap.py)

    # ---------------------------------------------------------------------------------- start-up

    def _model_configs(self) -> list:
        options = self.options
        if options.model_config_file:
            with open(options.model_config_file, encoding="utf-8") as f:
                self._config_text = f.read()
            config = config_lib.parse_text_proto(self._config_text, config_lib.ModelServerConfig(),
                                                 options.model_config_file)
            return config_lib.model_configs(config, options.model_config_file)
        return config_lib.model_configs(config_lib.single_model_config(options.model_name, options.model_base_path))

    def _batcher(self):
        if not self.options.enable_batching:
            return None
        from remote_predict.serving.batching import Batcher, parameters_from_file

        return Batcher(parameters_from_file(self.options.batching_parameters_file), self.metrics.batch_size.observe,
                       telemetry=self.telemetry)

    def start(self) -> None:
        """Load the models, then open the ports. Raises ServingError (or OSError) when it cannot."""
        options = self.options
        _configure_tensorflow(options)
        self.tracing = tracing_for(options)
        self.telemetry = Telemetry(self.metrics.stage_children, self.tracing)
        self.runtime = op_runtime(options, self.tracing)
        self.metrics.observe_runtime(self.runtime)
        try:
            configs = self._model_configs()
        except OSError as e:
            raise ServingError(Code.NOT_FOUND,
                               f"Cannot read '{options.model_config_file}': {e.strerror or e}") from None
        metrics_path = self._metrics_path()
        credentials = server_credentials(options.ssl_config_file) if options.ssl_config_file else None
        batcher = self._batcher()
        intra, inter = tensorflow_threads(options)
        load_options = LoadOptions(
            tags=tuple(t.strip() for t in options.saved_model_tags.split(",") if t.strip()),
            intra_op_threads=intra,
            inter_op_threads=inter,
            remote_predict_threads=options.remote_predict_threads,
            warmup=options.enable_model_warmup,
            runtime_id=self.runtime.id,
            lookup_fast_path=options.lookup_fast_path,
            prefer_tflite_model=options.prefer_tflite_model,
            tflite_interpreters=max(1, options.num_tflite_pools),  # TF Serving: 0 means one
        )
        self.manager = ModelManager(
            ManagerOptions(
                load_options=load_options,
                poll_seconds=float(options.file_system_poll_wait_seconds),
                num_load_threads=options.num_load_threads,
                max_load_retries=options.max_num_load_retries,
                load_retry_interval_seconds=options.load_retry_interval_micros / 1e6,
                allow_labels_for_unavailable_models=options.allow_version_labels_for_unavailable_models,
                num_unload_threads=options.num_unload_threads,
                cache_dir=options.model_cache_dir,
                cache_max_bytes=options.model_cache_max_bytes,
            ),
            listeners=[self.metrics.on_version_state, self._on_version_state],
            store_listeners=[self.metrics.on_store_listing],
        )
        self.data_plane = DataPlane(self.manager, batcher=batcher, max_tensor_elements=options.max_tensor_elements,
                                    telemetry=self.telemetry)
        try:
            self.manager.start(configs)
            self.heap.settle()  # its one full collection, before any request can wait for it
            remote_calls = any(servable.remote_ops for servable in self.manager.loaded_servables())
            self.grpc_threads = request_threads(options.grpc_max_threads, remote_calls)
            self.rest_threads = request_threads(options.rest_api_num_threads, remote_calls)
            self._start_grpc(credentials)
            if options.rest_api_port:
                self._start_rest(metrics_path)
            if options.tcp_port:
                self._start_tcp()
        except BaseException:
            self.stop()
            raise
        register_local_server(self.grpc_port, self._local_predict)
        if self.tcp_port is not None:
            register_local_server(self.tcp_port, self._local_predict)
        grpc_api.set_health(self._health, True)
        if options.model_config_file and options.model_config_file_poll_wait_seconds > 0:
            self._config_thread = threading.Thread(target=self._poll_config_file, name="config-poll", daemon=True)
            self._config_thread.start()
        log.info("Serving models %s on %s; gRPC on %s:%d (%d threads)%s%s", ", ".join(self.manager.model_names()),
                 BUDGET.describe(), options.host, self.grpc_port, self.grpc_threads,
                 f", REST on {options.host}:{self.rest_port} ({self.rest_threads} threads)" if self.rest_port else "",
                 f", tcp on {options.host}:{self.tcp_port}" if self.tcp_port else "")

    def _on_version_state(self, model: str, version: int, state: State, error: ServingError | None) -> None:
        if state in (State.AVAILABLE, State.END):
            self.heap.changed(unloaded=state is State.END)

    def _start_tcp(self) -> None:
        options = self.options
        context = tcp_ssl_context(options.ssl_config_file) if options.ssl_config_file else None
        self._tcp = tcp_api.TcpServer(self.data_plane, self.metrics, options.host, options.tcp_port, context,
                                      options.drain_timeout_seconds)
        self._tcp.start()
        self.tcp_port = self._tcp.port

    def _metrics_path(self) -> str | None:
        if not self.options.monitoring_config_file:
            return None
        monitoring = config_lib.read_text_proto(self.options.monitoring_config_file, config_protos.MonitoringConfig())
        if not monitoring.prometheus_config.enable:
            return None
        return monitoring.prometheus_config.path or "/monitoring/prometheus/metrics"

    def _start_grpc(self, credentials: grpc.ServerCredentials | None) -> None:
        options = self.options
        self._grpc_server, self._health = grpc_api.build_server(
            data_plane=self.data_plane, metrics=self.metrics, on_reload=self.reload,
            max_threads=self.grpc_threads, channel_arguments=channel_arguments(options),
            profiler=options.enable_profiler)
        address = f"{options.host}:{options.port}" if ":" not in options.host else f"[{options.host}]:{options.port}"
        try:
            if credentials is None:
                self.grpc_port = self._grpc_server.add_insecure_port(address)
            else:
                self.grpc_port = self._grpc_server.add_secure_port(address, credentials)
            if options.grpc_socket_path:
                self._grpc_server.add_insecure_port(f"unix:{options.grpc_socket_path}")
        except RuntimeError as e:
            raise OSError(f"Cannot listen for gRPC on {address}: {e}") from None
        self._grpc_server.start()

    def _start_rest(self, metrics_path: str | None) -> None:
        options = self.options
        self._rest_executor = ThreadPoolExecutor(self.rest_threads, thread_name_prefix="rest")
        api = rest_api.RestApi(self.data_plane, self.metrics, self._rest_executor, options.rest_api_timeout_in_ms,
                               metrics_path, options.rest_api_enable_cors_support, options.rest_api_max_body_bytes)
        self._rest = rest_api.RestServer(api, options.host, options.rest_api_port, options.drain_timeout_seconds)
        self._rest.start()
        self.rest_port = options.rest_api_port

    # ------------------------------------------------------------------------------------ running

    def _local_predict(self, request: predict_pb2.PredictRequest, inputs, timeout: float):
        """A call a model of this process makes to a model of this server, in the caller's thread: served as a
        request of its own (protocol "inprocess"), continuing the calling client span's trace."""
        try:
            with self.data_plane.serve("predict", "inprocess") as served:
                return self.data_plane.predict_arrays(request, inputs, deadline=time.monotonic() + timeout,
                                                      served=served)
        except ServingError as e:
            raise StubError(e.code, e.message) from None

    def reload(self, server_config: config_lib.ModelServerConfig) -> None:
        """Apply a new ModelServerConfig (HandleReloadConfigRequest, or the polled config file)."""
        with self._reload_lock:
            self.manager.reload(config_lib.model_configs(server_config, "ReloadConfigRequest"))

    def _poll_config_file(self) -> None:
        path = self.options.model_config_file
        while not self._stop.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if text == self._config_text:
                    continue
                config = config_lib.parse_text_proto(text, config_lib.ModelServerConfig(), path)
                self.reload(config)
                self._config_text = text
                log.info("Applied the new model config from %s", path)
            except (OSError, ServingError) as e:
                log.error("Not applying %s: %s", path, getattr(e, "message", None) or e)

    def wait(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        """Refuse new requests, let in-flight ones finish (up to --drain_timeout_seconds), unload."""
        self._stop.set()
        grace = self.options.drain_timeout_seconds
        if self._health is not None:
            grpc_api.set_health(self._health, False)
        for port in (self.grpc_port, self.tcp_port):
            if port is not None:
                unregister_local_server(port)
        stopped = self._grpc_server.stop(grace) if self._grpc_server is not None else None
        if self._tcp is not None:
            self._tcp.stop()
        if self._rest is not None:
            self._rest.stop()
        if stopped is not None:
            stopped.wait(grace + 1)
        if self._rest_executor is not None:
            self._rest_executor.shutdown(wait=False, cancel_futures=True)
        if self.manager is not None:
            self.manager.stop()
        if self.data_plane is not None and self.data_plane.batcher is not None:
            self.data_plane.batcher.close()
        if self.runtime is not None:
            self.runtime.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # exports the spans still queued
        self.heap.close()


"""Assembles one model server from its options, and runs its life: start, reload, drain, stop."""

from __future__ import annotations

import importlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from remote_predict.errors import Code, ServingError
from remote_predict.op import inflight, kernel, targets
from remote_predict.op.stubs import StubError, grpc_stub, reset_stubs
from remote_predict.op.stubs.inprocess_stub import (
    register_local_server,
    set_loopback_shortcut,
    unregister_local_server,
)
from remote_predict.serving import config as config_lib
from remote_predict.serving import config_protos, grpc_api, rest_api
from remote_predict.serving.data_plane import DataPlane
from remote_predict.serving.flags import ServerOptions, channel_arguments
from remote_predict.serving.manager import ManagerOptions, ModelManager
from remote_predict.serving.metrics import ServerMetrics
from remote_predict.serving.servable import LoadOptions

log = logging.getLogger(__name__)


def _configure_tensorflow(options: ServerOptions) -> None:
    intra = options.tensorflow_intra_op_parallelism or options.tensorflow_session_parallelism
    inter = options.tensorflow_inter_op_parallelism or options.tensorflow_session_parallelism
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        pass  # the eager context already exists (several servers in one process); sessions get their own config


def _configure_remote_predict(options: ServerOptions) -> None:
    """The op's settings are per process: where ops may call, how, and with which plug-ins."""
    targets.set_allowed_targets(options.remote_predict_allowed_targets.split(","))
    set_loopback_shortcut(options.remote_predict_loopback_in_process)
    inflight.set_max_inflight_per_target(options.remote_predict_max_inflight_per_target)
    inflight.targets.clear_stalls()
    tls = options.remote_predict_client_tls_config_file
    grpc_stub.set_client_credentials(client_credentials(tls) if tls else None)
    reset_stubs()  # stubs chosen under the previous settings must not outlive them
    for module in filter(None, (m.strip() for m in options.remote_predict_plugins.split(","))):
        try:
            importlib.import_module(module)
        except Exception as e:
            raise ServingError(Code.FAILED_PRECONDITION, f"--remote_predict_plugins: cannot import {module}: "
                               f"{type(e).__name__}: {e}") from None


def server_credentials(path: str) -> grpc.ServerCredentials:
    ssl = config_lib.read_text_proto(path, config_protos.SSLConfig())
    if not ssl.server_key or not ssl.server_cert:
        raise ServingError(Code.INVALID_ARGUMENT, f"{path}: server_key and server_cert are required")
    return grpc.ssl_server_credentials(
        [(ssl.server_key.encode(), ssl.server_cert.encode())],
        root_certificates=ssl.custom_ca.encode() if ssl.custom_ca else None,
        require_client_auth=ssl.client_verify,
    )


def client_credentials(path: str) -> grpc.ChannelCredentials:
    """The RemotePredict ops' TLS: custom_ca verifies servers; server_cert/server_key is our client cert."""
    ssl = config_lib.read_text_proto(path, config_protos.SSLConfig())
    return grpc.ssl_channel_credentials(
        root_certificates=ssl.custom_ca.encode() if ssl.custom_ca else None,
        private_key=ssl.server_key.encode() if ssl.server_key else None,
        certificate_chain=ssl.server_cert.encode() if ssl.server_cert else None,
    )


class ModelServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = ServerMetrics()
        self.manager: ModelManager | None = None
        self.data_plane: DataPlane | None = None
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._grpc_server: grpc.Server | None = None
        self._health = None
        self._rest: rest_api.RestServer | None = None
        self._rest_executor: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._config_text: str | None = None
        self._config_thread: threading.Thread | None = None
        self._reload_lock = threading.Lock()

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

        return Batcher(parameters_from_file(self.options.batching_parameters_file), self.metrics.batch_size.observe)

    def start(self) -> None:
        """Load the models, then open the ports. Raises ServingError (or OSError) when it cannot."""
        options = self.options
        _configure_tensorflow(options)
        _configure_remote_predict(options)
        kernel.add_observer(self.metrics.on_remote_call)
        kernel.add_inflight_observer(self.metrics.on_remote_inflight)
        try:
            configs = self._model_configs()
        except OSError as e:
            raise ServingError(Code.NOT_FOUND,
                               f"Cannot read '{options.model_config_file}': {e.strerror or e}") from None
        metrics_path = self._metrics_path()
        credentials = server_credentials(options.ssl_config_file) if options.ssl_config_file else None
        batcher = self._batcher()
        load_options = LoadOptions(
            tags=tuple(t.strip() for t in options.saved_model_tags.split(",") if t.strip()),
            intra_op_threads=options.tensorflow_intra_op_parallelism or options.tensorflow_session_parallelism,
            inter_op_threads=options.tensorflow_inter_op_parallelism or options.tensorflow_session_parallelism,
            remote_predict_threads=options.remote_predict_threads,
            warmup=options.enable_model_warmup,
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
            listeners=[self.metrics.on_version_state],
            store_listeners=[self.metrics.on_store_listing],
        )
        self.data_plane = DataPlane(self.manager, batcher=batcher, max_tensor_elements=options.max_tensor_elements)
        try:
            self.manager.start(configs)
            self._start_grpc(credentials)
            if options.rest_api_port:
                self._start_rest(metrics_path)
        except BaseException:
            self.stop()
            raise
        register_local_server(self.grpc_port, self._local_predict)
        grpc_api.set_health(self._health, True)
        if options.model_config_file and options.model_config_file_poll_wait_seconds > 0:
            self._config_thread = threading.Thread(target=self._poll_config_file, name="config-poll", daemon=True)
            self._config_thread.start()
        log.info("Serving models %s; gRPC on %s:%d%s", ", ".join(self.manager.model_names()), options.host,
                 self.grpc_port, f", REST on {options.host}:{self.rest_port}" if self.rest_port else "")

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
            self.data_plane, self.metrics, self.reload, options.grpc_max_threads, channel_arguments(options))
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
        self._rest_executor = ThreadPoolExecutor(options.rest_api_num_threads, thread_name_prefix="rest")
        api = rest_api.RestApi(self.data_plane, self.metrics, self._rest_executor, options.rest_api_timeout_in_ms,
                               metrics_path, options.rest_api_enable_cors_support, options.rest_api_max_body_bytes)
        self._rest = rest_api.RestServer(api, options.host, options.rest_api_port, options.drain_timeout_seconds)
        self._rest.start()
        self.rest_port = options.rest_api_port

    # ------------------------------------------------------------------------------------ running

    def _local_predict(self, request: predict_pb2.PredictRequest, inputs, timeout: float):
        try:
            return self.data_plane.predict_arrays(request, inputs, timeout_ms=max(1, round(timeout * 1000)))
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
        if self.grpc_port is not None:
            unregister_local_server(self.grpc_port)
        stopped = self._grpc_server.stop(grace) if self._grpc_server is not None else None
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
        kernel.remove_observer(self.metrics.on_remote_call)
        kernel.remove_inflight_observer(self.metrics.on_remote_inflight)


"""Whether a server traces, and how: `--tracing_config_file` and the standard OTEL_* environment variables.

The rule (`decide`, a pure function of the file's contents and the environment):

* `OTEL_SDK_DISABLED=true` turns tracing off whatever else is set (OpenTelemetry's own switch);
* otherwise tracing is on when `--tracing_config_file` is given, or when the environment names where to
  send spans (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`) or asks for the OTLP
  exporter (`OTEL_TRACES_EXPORTER=otlp`); `OTEL_TRACES_EXPORTER=none` keeps it off unless the file is given;
* a field the file sets wins; a field it leaves out is read by OpenTelemetry's SDK from the environment
  (`OTEL_EXPORTER_OTLP_*`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
  `OTEL_BSP_*`), then its defaults (every new trace sampled, http://localhost:4317), and the service name
  defaults to "remote-predict".

Only the OTLP exporter over gRPC is built in: another exporter asked for is refused, not ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

from remote_predict.errors import invalid_argument
from remote_predict.serving import config as config_lib
from remote_predict.serving import config_protos
from remote_predict.tracing import TracingSettings

TracingConfig = config_protos.TracingConfig

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def _exporters(environ: Mapping[str, str]) -> set[str]:
    return {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}


def decide(config: TracingConfig | None, environ: Mapping[str, str], source: str = "--tracing_config_file"
           ) -> TracingSettings | None:
    """The tracing settings, or None for no tracing. Raises INVALID_ARGUMENT for settings it cannot honour."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = _exporters(environ)
    if exporters - {"otlp", "none"}:
        raise invalid_argument(f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']}: only the otlp exporter "
                               "(OTLP over gRPC) is built in")
    if config is None:
        endpoint_named = any(environ.get(v) for v in _ENDPOINT_VARIABLES)
        if "otlp" in exporters or (endpoint_named and "none" not in exporters):
            return TracingSettings()
        return None
    endpoint = config.otlp_endpoint if config.HasField("otlp_endpoint") else None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise invalid_argument(f"{source}: otlp_endpoint {endpoint!r} must start with http:// (plaintext) or "
                               "https:// (TLS)")
    ratio = config.sampling_ratio if config.HasField("sampling_ratio") else None
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise invalid_argument(f"{source}: sampling_ratio must be between 0 and 1, got {ratio}")
    service = config.service_name if config.HasField("service_name") else None
    if service is not None and not service.strip():
        raise invalid_argument(f"{source}: service_name must not be empty")
    return TracingSettings(endpoint=endpoint, sampling_ratio=ratio, service_name=service)


def settings(path: str, environ: Mapping[str, str]) -> TracingSettings | None:
    """`decide` for a server's flag (a path, or "" when not given) and its environment."""
    config = config_lib.read_text_proto(path, TracingConfig()) if path else None
    return decide(config, environ, source=path or "--tracing_config_file")

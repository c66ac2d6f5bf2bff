"""The REST front-end: TF Serving's `/v1/models/...` API on aiohttp, calling the same data plane.

Paths follow TF Serving's two patterns (case-insensitive): POST
`/v1/models/NAME[/versions/V|/labels/L]:(predict|classify|regress)` and GET
`/v1/models/NAME[/versions/V|/labels/L][/metadata]`. Errors answer `{"error": message}` with the HTTP
status TF Serving maps the canonical code to. Model work runs on a thread pool, never on the event loop,
inside the data plane's `serve` (its span and stage times), continuing the W3C trace context of the
request's `traceparent`/`tracestate` headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    regression_pb2,
)

from remote_predict import json_codec
from remote_predict.errors import HTTP_STATUS, Code, ServingError, invalid_argument
from remote_predict.protocol import TRACE_HEADERS, trace_context
from remote_predict.serving.data_plane import SIGNATURE_DEF_FIELD, DataPlane
from remote_predict.serving.metrics import ServerMetrics
from remote_predict.serving.telemetry import Served

log = logging.getLogger(__name__)

_PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE)
_JSON = "application/json"


def _json_response(status: int, body: str, cors: bool) -> web.Response:
    headers = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET",
               "Access-Control-Allow-Headers": "Content-Type"} if cors else None
    return web.Response(status=status, text=body, content_type=_JSON, headers=headers)


def _model_spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=unquote(name))
    if version is not None:
        try:
            spec.version.value = int(version)
        except ValueError:
            raise invalid_argument(f"Failed to convert version: {version} to numeric.") from None
    if label is not None:
        spec.version_label = unquote(label)
    return spec


def _proto_json(message) -> str:
    return json.dumps(json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True), indent=1)


class RestApi:
    def __init__(
        self,
        data_plane: DataPlane,
        metrics: ServerMetrics,
        executor: ThreadPoolExecutor,
        timeout_ms: int,
        metrics_path: str | None,
        cors: bool,
        max_body_bytes: int,
    ):
        self.data_plane = data_plane
        self.metrics = metrics
        self.executor = executor
        self.timeout = timeout_ms / 1000.0 if timeout_ms > 0 else None
        self.metrics_path = metrics_path
        self.cors = cors
        self.max_body_bytes = max_body_bytes

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        if self.metrics_path is not None and path == self.metrics_path:
            if request.method != "GET":
                return web.Response(status=405, text="metrics: use GET", headers={"Allow": "GET"})
            body, content_type = self.metrics.render(request.headers.get("Accept"))
            return web.Response(body=body, headers={"Content-Type": content_type})
        if self.cors and request.method == "OPTIONS":
            return _json_response(200, "", True)
        post, get = _PREDICTION_PATH.fullmatch(path), _STATUS_PATH.fullmatch(path)
        if post is None and get is None:
            return _json_response(404, json_codec.error_json(f"Not found: {request.method} {path}"), self.cors)
        if (request.method == "POST" and post is None) or (request.method == "GET" and get is None) or \
                request.method not in ("GET", "POST"):
            allowed = "POST" if post is not None else "GET"
            response = _json_response(405, json_codec.error_json(
                f"Malformed request: {request.method} {path} (this path accepts {allowed})"), self.cors)
            response.headers["Allow"] = allowed
            return response
        start = time.perf_counter()
        trace = trace_context((k, request.headers[k]) for k in TRACE_HEADERS if k in request.headers)
        if post is not None:
            name, version, label, method = post.groups()
            api = method.lower()
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                message = f"Request body is larger than the limit of {self.max_body_bytes} bytes"
                self.metrics.observe_request(unquote(name), api, "rest", Code.RESOURCE_EXHAUSTED, 0.0)
                return _json_response(413, json_codec.error_json(message), self.cors)
            deadline = time.monotonic() + self.timeout if self.timeout else None
            work: Callable[[], str] = lambda: self._post(  # noqa: E731
                api, name, version, label, body, deadline=deadline, trace=trace)
        else:
            name, version, label, metadata = get.groups()
            api = "metadata" if metadata else "status"
            work = lambda: self._get(api, name, version, label, trace)  # noqa: E731
        model = unquote(name or "")
        code = Code.OK
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, work)
            text = await asyncio.wait_for(future, self.timeout)
            return _json_response(200, text, self.cors)
        except ServingError as e:
            code = e.code
            return _json_response(HTTP_STATUS[e.code], json_codec.error_json(e.message), self.cors)
        except TimeoutError:
            code = Code.DEADLINE_EXCEEDED
            message = f"Request timed out after {self.timeout * 1000:.0f} ms (--rest_api_timeout_in_ms)"
            return _json_response(504, json_codec.error_json(message), self.cors)
        except Exception as e:
            log.exception("REST %s %s failed", request.method, path)
            code = Code.INTERNAL
            return _json_response(500, json_codec.error_json(f"{type(e).__name__}: {e}"), self.cors)
        finally:
            self.metrics.observe_request(model, api, "rest", code, time.perf_counter() - start)

    # Runs on the executor.
    def _post(self, api: str, name: str, version: str | None, label: str | None, body: bytes,
              deadline: float | None = None, trace: dict[str, str] | None = None) -> str:
        with self.data_plane.serve(api, "rest", trace or {}) as served:
            return self._post_served(api, name, version, label, body, deadline=deadline, served=served)

    def _post_served(self, api: str, name: str, version: str | None, label: str | None, body: bytes,
                     deadline: float | None, served: Served) -> str:
        started = time.perf_counter()
        spec = _model_spec(name, version, label)
        doc = json_codec.parse_body(body)
        spec.signature_name = json_codec.signature_name_of(doc)
        decoding = time.perf_counter() - started
        dp = self.data_plane
        if api == "predict":
            with dp.acquire(spec) as handle:
                served.identify(handle.name, handle.version)
                signature = handle.servable.signature(spec.signature_name)
                started = time.perf_counter()
                fmt, inputs = json_codec.decode_predict_inputs(
                    doc, {alias: info.dtype for alias, info in signature.inputs.items()})
                served.stages.decode = decoding + time.perf_counter() - started
                outputs = dp.run_predict(handle, signature, inputs, deadline=deadline, served=served)
            started = time.perf_counter()
            text = json_codec.encode_predict_response(outputs, fmt)
            served.stages.encode = time.perf_counter() - started
            return text
        examples = json_codec.decode_examples(doc, api)
        served.stages.decode = time.perf_counter() - served.started
        if api == "classify":
            result = dp.classify(classification_pb2.ClassificationRequest(model_spec=spec, input=examples),
                                 served=served).result
            started, text = time.perf_counter(), json_codec.encode_classification(result)
        else:
            result = dp.regress(regression_pb2.RegressionRequest(model_spec=spec, input=examples), served=served).result
            started, text = time.perf_counter(), json_codec.encode_regression(result)
        served.stages.encode = time.perf_counter() - started
        return text

    def _get(self, api: str, name: str | None, version: str | None, label: str | None,
             trace: dict[str, str] | None = None) -> str:
        with self.data_plane.serve(api, "rest", trace or {}) as served:
            return self._get_served(api, name, version, label, served)

    def _get_served(self, api: str, name: str | None, version: str | None, label: str | None,
                    served: Served) -> str:
        if not name:
            raise invalid_argument("Missing model name in request.")
        spec = _model_spec(name, version, label)
        if api == "status":
            request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
            return _proto_json(self.data_plane.model_status(request, served=served))
        response = self.data_plane.metadata(
            get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=[SIGNATURE_DEF_FIELD]),
            served=served)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(signatures)
        doc = {"model_spec": json_format.MessageToDict(response.model_spec, preserving_proto_field_name=True,
                                                       always_print_fields_with_no_presence=True),
               "metadata": {SIGNATURE_DEF_FIELD: json_format.MessageToDict(
                   signatures, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)}}
        return json.dumps(doc, indent=1)


class RestServer:
    """Runs the aiohttp application on its own event-loop thread."""

    def __init__(self, api: RestApi, host: str, port: int, drain_seconds: float):
        self.api = api
        self.host = host
        self.port = port
        self.drain_seconds = drain_seconds
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="rest", daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.api.application(), access_log=None, handle_signals=False,
                                     shutdown_timeout=self.drain_seconds)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=False)
        await site.start()

    def stop(self) -> None:
        """Stop accepting; finish in-flight requests for up to the drain time."""
        if self._runner is not None:
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            try:
                future.result(timeout=self.drain_seconds + 5)
            except Exception:
                log.warning("REST server did not stop cleanly", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

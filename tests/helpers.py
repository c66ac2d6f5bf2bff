"""Real servers for tests: in this process (fast) or as `remote-predict serve` subprocesses (as users run it)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
import urllib3
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc

from remote_predict.serving import flags
from remote_predict.serving.server import ModelServer

REPO = Path(__file__).resolve().parents[1]
TESTDATA = (REPO / ".." / "shared" / "testdata" / "tensorflow_serving").resolve()
HALF_PLUS_TWO = TESTDATA / "saved_model_half_plus_two_cpu"
HALF_PLUS_TWO_TF2 = TESTDATA / "saved_model_half_plus_two_tf2_cpu"
HALF_PLUS_THREE = TESTDATA / "saved_model_half_plus_three"
TWO_VERSIONS = TESTDATA / "saved_model_half_plus_two_2_versions"
COUNTER = TESTDATA / "saved_model_counter"

http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(total=30))


class _Ports:
    """Ports for servers that bind them later (subprocesses, seconds later: TensorFlow imports first).

    Why not a port the kernel picks (bind to 0): it comes from the ephemeral range, from which every
    outgoing connection of the machine takes its local port meanwhile, and the suite makes thousands; one
    of them taking a server's port failed a run ("Address already in use"). Ports below that range are
    taken only by a bind that names them. Each is handed out once per test run, from a start that
    depends on the process, so two runs on one machine seldom meet."""

    def __init__(self) -> None:
        low = 32768
        with contextlib.suppress(OSError, ValueError):
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        self._range = range(max(1024, low - 12000), low) if low > 5000 else range(0)
        self._next = os.getpid() % max(1, len(self._range))
        self._given: set[int] = set()

    def pick(self) -> int:
        for _ in range(len(self._range)):
            port = self._range[self._next]
            self._next = (self._next + 1) % len(self._range)
            if port not in self._given and self._bindable(port):
                self._given.add(port)
                return port
        with socket.socket() as s:  # no room below the ephemeral range: let the kernel pick
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    @staticmethod
    def _bindable(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True


_PORTS = _Ports()


def free_port() -> int:
    """A loopback port nothing listens on, for a server a test starts."""
    return _PORTS.pick()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def copy_model(source: Path, dest: Path, versions: dict[str, str] | None = None) -> Path:
    """Copy a TF Serving model directory; `versions` renames version directories (old -> new)."""
    dest.mkdir(parents=True, exist_ok=True)
    for child in sorted(source.iterdir()):
        target = (versions or {}).get(child.name, child.name)
        shutil.copytree(child, dest / target)
    return dest


def write_config(path: Path, models: dict[str, Path], extra: dict[str, str] | None = None) -> Path:
    """A model_config_list file; `extra` adds text inside a model's config block."""
    blocks = []
    for name, base in models.items():
        body = f'name: "{name}" base_path: "{base}" model_platform: "tensorflow" {(extra or {}).get(name, "")}'
        blocks.append(f"  config: {{ {body} }}")
    path.write_text("model_config_list {\n" + "\n".join(blocks) + "\n}\n")
    return path


class Endpoint:
    """Clients for one running server."""

    grpc_port: int
    rest_port: int | None
    host = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def rest(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    def channel(self) -> grpc.Channel:
        if getattr(self, "_channel", None) is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def prediction(self) -> prediction_service_pb2_grpc.PredictionServiceStub:
        return prediction_service_pb2_grpc.PredictionServiceStub(self.channel())

    def models(self) -> model_service_pb2_grpc.ModelServiceStub:
        return model_service_pb2_grpc.ModelServiceStub(self.channel())

    def predict(
        self, model: str, inputs: dict[str, object], timeout: float = 30, **spec
    ) -> predict_pb2.PredictResponse:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        for key, value in spec.items():
            if key == "version":
                request.model_spec.version.value = value
            else:
                setattr(request.model_spec, key, value)
        for alias, value in inputs.items():
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
        return self.prediction().Predict(request, timeout=timeout)

    def post(self, path: str, body: object | bytes | str, method: str = "POST") -> tuple[int, dict | str]:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        response = http.request(method, self.rest + path, body=data)
        text = response.data.decode("utf-8")
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    def get(self, path: str) -> tuple[int, dict | str]:
        return self.post(path, None, method="GET")

    def close_channel(self) -> None:
        if getattr(self, "_channel", None) is not None:
            self._channel.close()
            self._channel = None


class InProcessServer(Endpoint):
    """`remote-predict serve` flags, run by ModelServer in this process."""

    def __init__(self, *argv: str, rest: bool = True, grpc_port: int | None = None):
        self.grpc_port = grpc_port or free_port()
        self.rest_port = free_port() if rest else None
        args = ["--host=127.0.0.1", f"--port={self.grpc_port}", *argv]
        if rest:
            args.append(f"--rest_api_port={self.rest_port}")
        options, _ = flags.parse(args)
        self.server = ModelServer(options)
        self.server.start()

    def stop(self) -> None:
        self.close_channel()
        self.server.stop()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(Endpoint):
    """`remote-predict serve` as a subprocess, as users run it."""

    def __init__(self, *argv: str, rest: bool = True, grpc_port: int | None = None, rest_port: int | None = None,
                 wait: bool = True, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
                 host: str = "127.0.0.1"):
        """`prefix` runs the server under another command (`ip netns exec NS`), bound to `host`."""
        self.host = host
        self.grpc_port = grpc_port or free_port()
        self.rest_port = (rest_port or free_port()) if rest else None
        args = [f"--host={host}", f"--port={self.grpc_port}", *argv]
        if rest:
            args.append(f"--rest_api_port={self.rest_port}")
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"remote-predict-{self.grpc_port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "remote_predict", "serve", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        if wait:
            self.wait_ready()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel())

        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                return status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_until(serving, timeout, f"server on port {self.grpc_port}", interval=0.2)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 60) -> int:
        self.close_channel()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def servers(*items: Endpoint) -> Iterator[tuple[Endpoint, ...]]:
    try:
        yield items
    finally:
        for item in items:
            item.stop()


def float_val(response: predict_pb2.PredictResponse, alias: str) -> np.ndarray:
    return tf.make_ndarray(response.outputs[alias])

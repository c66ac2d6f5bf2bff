"""The model manager with fake loaders: no-gap swaps, retries, failures, unloads that wait for requests.

Storage is real (local directories here; the S3 store in test_storage.py); only the servable is fake,
so these tests exercise the manager's threads and its plan in milliseconds, without TensorFlow sessions.
"""

import threading
import time
from pathlib import Path

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from helpers import wait_until
from remote_predict.errors import Code, ServingError
from remote_predict.serving.manager import ManagerOptions, ModelManager, State
from remote_predict.serving.servable import LoadOptions


class FakeServable:
    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, version, path
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


class FakeLoader:
    """Loads instantly (or after `gate` opens); fails the first `failures[version]` attempts of a version."""

    def __init__(self, failures: dict[int, int] | None = None):
        self.failures = dict(failures or {})
        self.calls: list[tuple[int, str]] = []
        self.loaded: dict[int, list[FakeServable]] = {}
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, name, version, path, options):
        self.gate.wait(30)
        with self._lock:
            self.calls.append((version, path))
            if self.failures.get(version, 0) > 0:
                self.failures[version] -= 1
                raise ServingError(Code.FAILED_PRECONDITION, f"fake failure loading {path}")
            servable = FakeServable(name, version, path)
            self.loaded.setdefault(version, []).append(servable)
            return servable


def config(base: Path, policy: str = "") -> model_server_config_pb2.ModelConfig:
    text = f'name: "m" base_path: "{base}"' + (f" model_version_policy {{ {policy} }}" if policy else "")
    return text_format.Parse(text, model_server_config_pb2.ModelConfig())


def add_version(base: Path, version: int) -> None:
    staging = base.parent / f".staging-{version}"
    staging.mkdir(parents=True)
    (staging / "saved_model.pb").write_bytes(b"fake")
    staging.rename(base / str(version))


def manager(loader: FakeLoader, **options) -> ModelManager:
    defaults = {"poll_seconds": 0, "load_retry_interval_seconds": 0.01,
                "load_options": LoadOptions(warmup=False)}
    return ModelManager(ManagerOptions(**{**defaults, **options}), loader=loader)


def states(m: ModelManager) -> dict[int, State]:
    return {s.version: s.state for s in m.status("m")}


@pytest.fixture
def base(tmp_path) -> Path:
    path = tmp_path / "m"
    path.mkdir()
    add_version(path, 1)
    return path


def test_a_new_version_swaps_in_with_no_gap(base):
    loader = FakeLoader()
    m = manager(loader)
    m.start([config(base)])
    try:
        loader.gate.clear()  # version 2's load will wait: requests must keep getting version 1 meanwhile
        add_version(base, 2)
        m.poll()
        seen, gaps = set(), 0
        for _ in range(200):
            try:
                with m.acquire("m") as handle:
                    seen.add(handle.version)
            except ServingError:
                gaps += 1
            if len(seen) == 1 and _ == 100:
                loader.gate.set()
            if 2 in seen:
                break
            time.sleep(0.001)
        wait_until(lambda: states(m) == {1: State.END, 2: State.AVAILABLE}, 10, "version 2 to replace version 1")
        assert gaps == 0 and seen == {1, 2}
        assert loader.loaded[1][0].closed.is_set() and not loader.loaded[2][0].closed.is_set()
    finally:
        loader.gate.set()
        m.stop()


def test_failed_loads_are_retried_then_reported_and_the_previous_version_serves(base):
    loader = FakeLoader(failures={2: 2, 3: 100})
    m = manager(loader, max_load_retries=3)
    m.start([config(base)])
    try:
        add_version(base, 2)
        m.poll()
        wait_until(lambda: states(m).get(2) is State.AVAILABLE, 10, "version 2 after two failed attempts")
        assert [v for v, _ in loader.calls].count(2) == 3
        add_version(base, 3)
        m.poll()
        wait_until(lambda: states(m).get(3) is State.END, 10, "version 3 to fail for good")
        assert [v for v, _ in loader.calls].count(3) == 4, "one attempt and three retries"
        error = next(s.error for s in m.status("m") if s.version == 3)
        assert error.code == Code.FAILED_PRECONDITION and str(base / "3") in error.message
        with m.acquire("m") as handle:
            assert handle.version == 2, "the newest version that loads keeps serving"
    finally:
        m.stop()


def test_a_version_waiting_to_retry_that_is_deleted_ends_instead_of_waiting_forever(base):
    loader = FakeLoader(failures={2: 1000})
    m = manager(loader, max_load_retries=1000, load_retry_interval_seconds=3600)
    m.start([config(base)])
    try:
        add_version(base, 2)
        m.poll()
        wait_until(lambda: len(loader.calls) >= 2, 10, "version 2's first attempt")
        assert states(m)[2] is State.LOADING
        for child in (base / "2").iterdir():
            child.unlink()
        (base / "2").rmdir()
        m.poll()
        wait_until(lambda: 2 not in states(m) or states(m)[2] is State.END, 10, "version 2 to be abandoned")
        assert states(m)[1] is State.AVAILABLE
    finally:
        m.stop()


def test_an_unload_waits_for_the_requests_holding_the_version(base):
    loader = FakeLoader()
    m = manager(loader)
    m.start([config(base)])
    try:
        handle = m.acquire("m")
        assert handle.version == 1
        add_version(base, 2)
        m.poll()
        wait_until(lambda: states(m) == {1: State.UNLOADING, 2: State.AVAILABLE}, 10, "version 1 to start unloading")
        time.sleep(0.2)
        assert not loader.loaded[1][0].closed.is_set(), "closed while a request still holds it"
        with pytest.raises(ServingError):
            m.acquire("m", version=1)  # no new request gets an unloading version
        handle.release()
        wait_until(loader.loaded[1][0].closed.is_set, 10, "version 1 to close once released")
        wait_until(lambda: states(m)[1] is State.END, 10, "version 1 to end")
    finally:
        m.stop()


def test_a_base_path_that_goes_away_keeps_serving_and_is_reported(base, tmp_path):
    loader = FakeLoader()
    m = manager(loader)
    m.start([config(base)])
    try:
        moved = tmp_path / "elsewhere"
        base.rename(moved)
        m.poll()
        error = m.store_error("m")
        assert error is not None and error.code == Code.NOT_FOUND and str(base) in error.message
        with m.acquire("m") as handle:
            assert handle.version == 1
        assert states(m) == {1: State.AVAILABLE}
        moved.rename(base)
        m.poll()
        assert m.store_error("m") is None
    finally:
        m.stop()


def test_a_reload_naming_a_missing_base_path_is_refused_and_changes_nothing(base, tmp_path):
    loader = FakeLoader()
    m = manager(loader)
    m.start([config(base)])
    try:
        with pytest.raises(ServingError) as caught:
            m.reload([config(tmp_path / "missing")])
        assert caught.value.code == Code.NOT_FOUND and "missing" in caught.value.message
        assert states(m) == {1: State.AVAILABLE}
    finally:
        m.stop()

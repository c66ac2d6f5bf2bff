"""Versions and config: polling, no-gap swaps under load, draining unloads, broken versions, reloads, labels."""

import shutil
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2
from tensorflow_serving.config import model_server_config_pb2

import models
from helpers import HALF_PLUS_THREE, HALF_PLUS_TWO, InProcessServer, copy_model, wait_until, write_config
from remote_predict.serving.manager import State

X = {"x": np.array([[2.0]], np.float32)}


def states(server, model: str) -> dict[int, str]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    response = server.models().GetModelStatus(request, timeout=10)
    name = get_model_status_pb2.ModelVersionStatus.State.Name
    return {s.version: name(s.state) for s in response.model_version_status}


def status_errors(server, model: str) -> dict[int, str]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    response = server.models().GetModelStatus(request, timeout=10)
    return {s.version: s.status.error_message for s in response.model_version_status}


def reload(server, text: str):
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    return server.models().HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config),
                                                     timeout=60)


class Load:
    """A bounded client hammering one model from a thread; records every outcome."""

    def __init__(self, server, model: str, seconds: float = 30):
        self.server, self.model, self.seconds = server, model, seconds
        self.outcomes: Counter = Counter()
        self.versions: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                response = self.server.predict(self.model, X, timeout=10)
                self.outcomes["OK"] += 1
                self.versions.append(response.model_spec.version.value)
            except grpc.RpcError as e:
                self.outcomes[e.code().name] += 1

    def stop(self) -> Counter:
        self._stop.set()
        self._thread.join()
        return self.outcomes


def test_new_version_replaces_old_without_a_gap(tmp_path):
    base = copy_model(HALF_PLUS_TWO, tmp_path / "model", {"00000123": "1"})
    with InProcessServer(f"--model_base_path={base}", "--model_name=m", "--file_system_poll_wait_seconds=1") as s:
        load = Load(s, "m")
        time.sleep(0.3)
        shutil.copytree(HALF_PLUS_THREE / "00000123", tmp_path / "staging")
        (tmp_path / "staging").rename(base / "2")  # appear atomically, as deployment tools do
        wait_until(lambda: states(s, "m") == {1: "END", 2: "AVAILABLE"}, 20, "version 2 to replace version 1")
        time.sleep(0.3)
        outcomes = load.stop()
        assert set(outcomes) == {"OK"}, f"every request must succeed during the swap: {outcomes}"
        assert load.versions == sorted(load.versions) and set(load.versions) == {1, 2}
        assert s.predict("m", X).outputs["y"].float_val == [4.0]  # half_plus_three now


def test_unload_waits_for_requests_holding_the_version(tmp_path):
    base = tmp_path / "sleepy"
    models.sleepy(base / "1")
    with InProcessServer(f"--model_base_path={base}", "--model_name=sleepy", "--file_system_poll_wait_seconds=1") as s:
        result = {}

        def slow_request():
            # long enough to outlast version 2's discovery (a 1 s poll) and load on a busy machine
            result["response"] = s.predict("sleepy", {"x": np.array([7.0], np.float32), "delay_ms": np.int64(8000)})

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.5)
        shutil.copytree(base / "1", tmp_path / "staging")
        (tmp_path / "staging").rename(base / "2")
        wait_until(lambda: states(s, "sleepy").get(1) == "UNLOADING", 20, "version 1 to start unloading")
        assert states(s, "sleepy")[2] == "AVAILABLE"
        thread.join()
        assert result["response"].outputs["y"].float_val == [7.0]
        assert result["response"].model_spec.version.value == 1
        wait_until(lambda: states(s, "sleepy") == {1: "END", 2: "AVAILABLE"}, 10, "version 1 to unload")


def test_broken_version_is_reported_and_the_previous_one_keeps_serving(tmp_path):
    base = copy_model(HALF_PLUS_TWO, tmp_path / "model", {"00000123": "1"})
    (base / "2").mkdir()
    (base / "2" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    with InProcessServer(f"--model_base_path={base}", "--model_name=m", "--file_system_poll_wait_seconds=1",
                         "--max_num_load_retries=0") as s:
        assert states(s, "m") == {1: "AVAILABLE", 2: "END"}
        assert str(base / "2") in status_errors(s, "m")[2]
        assert s.predict("m", X).model_spec.version.value == 1
        status, body = s.get("/v1/models/m/versions/2")
        assert status == 200 and body["model_version_status"][0]["status"]["error_code"] != "OK"
        # Replacing the broken directory gets it a new try.
        shutil.rmtree(base / "2")
        shutil.copytree(HALF_PLUS_THREE / "00000123", tmp_path / "staging")
        (tmp_path / "staging").rename(base / "2")
        wait_until(lambda: states(s, "m") == {1: "END", 2: "AVAILABLE"}, 20, "the fixed version 2 to load")
        assert s.predict("m", X).outputs["y"].float_val == [4.0]


def test_failed_load_is_retried(tmp_path):
    base = copy_model(HALF_PLUS_TWO, tmp_path / "model", {"00000123": "1"})
    with InProcessServer(f"--model_base_path={base}", "--model_name=m", "--file_system_poll_wait_seconds=1",
                         "--max_num_load_retries=50", "--load_retry_interval_micros=200000", rest=False) as s:
        (base / "2").mkdir()  # a copy in progress: the first loads fail, and are retried
        wait_until(lambda: states(s, "m").get(2) == "LOADING", 10, "version 2 to be tried")
        time.sleep(0.5)
        assert states(s, "m") == {1: "AVAILABLE", 2: "LOADING"}
        for child in (HALF_PLUS_THREE / "00000123").iterdir():
            target = base / "2" / child.name
            shutil.copytree(child, target) if child.is_dir() else shutil.copy(child, target)
        wait_until(lambda: states(s, "m") == {1: "END", 2: "AVAILABLE"}, 20, "the retried load to succeed")


def test_version_policies(tmp_path):
    base = copy_model(HALF_PLUS_TWO, tmp_path / "model", {"00000123": "1"})
    copy_model(HALF_PLUS_TWO, base, {"00000123": "2"})
    copy_model(HALF_PLUS_TWO, base, {"00000123": "3"})
    config = write_config(tmp_path / "c.config", {"latest2": base, "all": base, "specific": base}, extra={
        "latest2": "model_version_policy { latest { num_versions: 2 } }",
        "all": "model_version_policy { all {} }",
        "specific": "model_version_policy { specific { versions: 1 versions: 3 } }",
    })
    with InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0", rest=False) as s:
        assert states(s, "latest2") == {2: "AVAILABLE", 3: "AVAILABLE"}
        assert states(s, "all") == {1: "AVAILABLE", 2: "AVAILABLE", 3: "AVAILABLE"}
        assert states(s, "specific") == {1: "AVAILABLE", 3: "AVAILABLE"}


def test_reload_config_adds_removes_and_relabels(tmp_path):
    versions = copy_model(HALF_PLUS_TWO, tmp_path / "v", {"00000123": "1"})
    copy_model(HALF_PLUS_THREE, versions, {"00000123": "2"})
    with InProcessServer(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=first",
                         "--file_system_poll_wait_seconds=0") as s:
        reload(s, f'model_config_list {{ config {{ name: "second" base_path: "{versions}" model_platform: "tensorflow" '
                  'model_version_policy { all {} } version_labels { key: "stable" value: 1 } '
                  'version_labels { key: "canary" value: 2 } } }')
        assert s.predict("second", X, version_label="canary").outputs["y"].float_val == [4.0]
        assert s.predict("second", X, version_label="stable").outputs["y"].float_val == [3.0]
        with pytest.raises(grpc.RpcError) as caught:  # "first" is no longer configured
            s.predict("first", X)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert set(states(s, "first").values()) == {"END"}

        with pytest.raises(grpc.RpcError) as caught:
            reload(s, f'model_config_list {{ config {{ name: "second" base_path: "{versions}" '
                      'model_version_policy { all {} } version_labels { key: "stable" value: 9 } } }')
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 9 of model second" in caught.value.details()

        with pytest.raises(grpc.RpcError) as caught:
            reload(s, 'model_config_list { config { name: "third" base_path: "/does/not/exist" } }')
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "/does/not/exist" in caught.value.details()
        assert s.predict("second", X, version_label="stable").outputs["y"].float_val == [3.0]


def test_config_file_is_polled(tmp_path):
    config = write_config(tmp_path / "models.config", {"a": HALF_PLUS_TWO})
    with InProcessServer(f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=1",
                         "--file_system_poll_wait_seconds=0", rest=False) as s:
        write_config(config, {"a": HALF_PLUS_TWO, "b": HALF_PLUS_THREE})
        wait_until(lambda: _serves(s, "b"), 20, "model b from the edited config file")
        config.write_text("model_config_list { this is not valid }")
        time.sleep(2.5)  # a broken edit is logged and ignored: the last good config stays
        assert _serves(s, "a") and _serves(s, "b")


def _serves(server, model: str) -> bool:
    try:
        server.predict(model, X, timeout=5)
        return True
    except grpc.RpcError:
        return False


def test_state_names_match_the_status_proto():
    for state in State:
        assert get_model_status_pb2.ModelVersionStatus.State.Value(state.value) >= 0

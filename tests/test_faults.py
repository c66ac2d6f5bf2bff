"""Faults between servers, under steady load, with real server processes. Every request's outcome is
counted, and no request may get a wrong answer."""

import signal
import time

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2
from tensorflow_serving.config import model_server_config_pb2

import models
from helpers import HALF_PLUS_THREE, HALF_PLUS_TWO, ServerProcess, copy_model, free_port, wait_until, write_config
from load import SteadyLoad, counts, describe

DEADLINE_MS = 1500


def half_plus_two(model: str, x: float) -> float:
    return 0.5 * x + 2.0


def build_master(tmp_path, targets: dict[str, str], deadline_ms: int = DEADLINE_MS) -> ServerProcess:
    """A master serving `local` (half_plus_two itself) and, per entry, a model calling half_plus_two at a target."""
    built = {"local": HALF_PLUS_TWO}
    for name, target in targets.items():
        models.caller(tmp_path / name / "1", target, "half_plus_two", deadline_ms=deadline_ms)
        built[name] = tmp_path / name
    config = write_config(tmp_path / "master.config", built)
    return ServerProcess(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0")


def leaf(port: int | None = None, *flags: str) -> ServerProcess:
    return ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two", *flags, rest=False,
                         grpc_port=port)


def serving(server: ServerProcess) -> bool:
    stub = health_pb2_grpc.HealthStub(server.channel())
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_leaf_killed_then_restarted(tmp_path):
    port = free_port()
    first = leaf(port)
    with build_master(tmp_path, {"remote": f"127.0.0.1:{port}"}) as master:
        load = SteadyLoad(master.address, {"remote": 3, "local": 1}, half_plus_two, pause=0.005)
        time.sleep(1.5)
        killed_at = time.monotonic()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        time.sleep(2.5)
        assert serving(master)
        restarting_at = time.monotonic()
        second = leaf(port)
        back_at = time.monotonic()  # the restarted leaf answers its health check
        wait_until(lambda: counts(load.snapshot(), "remote", since=back_at).get("OK", 0) > 0, 10,
                   "the master to reach the restarted leaf")
        recovered = min(o.started for o in load.snapshot() if o.model == "remote" and o.code == "OK"
                        and o.started >= back_at) - back_at
        time.sleep(1.0)
        outcomes = load.stop()
        second.stop()
    summary = describe(outcomes)
    assert not counts(outcomes).get("WRONG"), summary
    assert set(counts(outcomes, "local")) == {"OK"}, f"the master's other model must keep serving: {summary}"
    down = [o for o in outcomes if o.model == "remote" and killed_at + 0.5 <= o.started < restarting_at]
    assert down and {o.code for o in down} == {"UNAVAILABLE"}, summary
    took = sorted(o.seconds for o in down)  # fast, not after the deadline (on a busy machine, nearly all)
    assert took[int(0.99 * len(took))] < DEADLINE_MS / 1000 / 3 and took[-1] < DEADLINE_MS / 1000, \
        f"calls to a dead leaf must fail fast: p99 {took[int(0.99 * len(took))]:.3f}s, slowest {took[-1]:.3f}s"
    before = {o.code for o in outcomes if o.model == "remote" and o.started + o.seconds < killed_at}
    assert before == {"OK"}, summary
    at_kill = {o.code for o in outcomes if o.model == "remote" and o.started < killed_at < o.started + o.seconds}
    assert at_kill <= {"OK", "UNAVAILABLE"}, summary
    assert set(counts(outcomes, "remote", since=back_at + recovered + 1.0)) == {"OK"}, summary
    assert recovered < 5, f"recovered {recovered:.1f}s after the leaf came back; {summary}"
    failures = [o for o in outcomes if o.code == "UNAVAILABLE"]
    assert all("half_plus_two" in o.detail and f"127.0.0.1:{port}" in o.detail for o in failures)


def test_hung_leaf_times_out_and_does_not_starve_others(tmp_path):
    hung, healthy = leaf(), leaf()
    with build_master(tmp_path, {"to_hung": hung.address, "to_healthy": healthy.address}) as master:
        load = SteadyLoad(master.address, {"to_hung": 8, "to_healthy": 2, "local": 1}, half_plus_two, timeout=30)
        time.sleep(1.0)
        stopped_at = time.monotonic()
        hung.signal(signal.SIGSTOP)
        time.sleep(4.0)
        hung.signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        time.sleep(4.0)
        outcomes = load.stop()
    hung.stop()
    healthy.stop()
    summary = describe(outcomes)
    assert not counts(outcomes).get("WRONG"), summary
    during = [o for o in outcomes if stopped_at + 0.2 <= o.started < resumed_at - DEADLINE_MS / 1000]
    hung_calls = [o for o in during if o.model == "to_hung"]
    assert {o.code for o in hung_calls} <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, summary
    # No call outlives its deadline by much: the probe is re-sent on a fresh connection (each channel has its
    # own), whose connect to a stopped process times out; or it waits for its deadline or the keepalive.
    assert max(o.seconds for o in hung_calls) < DEADLINE_MS / 1000 + 1.0, summary
    # The probe waits its deadline; the other calls are cancelled or fail at once instead of each
    # holding a thread for the whole deadline.
    assert sorted(o.seconds for o in hung_calls)[len(hung_calls) // 2] < DEADLINE_MS / 1000 / 4, summary
    assert any("a quarter of its deadline" in o.detail for o in outcomes
               if o.model == "to_hung" and stopped_at - 0.1 <= o.started < resumed_at), summary
    others = [o for o in during if o.model != "to_hung"]
    assert others and {o.code for o in others} == {"OK"}, f"a hung target must not starve others: {summary}"
    latencies = sorted(o.seconds for o in others)  # a starved model would wait its deadline, not a few ms
    assert latencies[int(0.95 * len(latencies))] < 0.5 and latencies[-1] < DEADLINE_MS / 1000, \
        f"other models must keep their latency: p95 {latencies[int(0.95 * len(latencies))]:.3f}s, " \
        f"slowest {latencies[-1]:.3f}s"
    assert counts(outcomes, "to_hung", since=resumed_at + 1.0).get("OK", 0) > 0, summary


def test_leaf_errors_keep_their_code_and_name_target_and_model(tmp_path):
    with leaf() as target:
        models.caller(tmp_path / "unknown" / "1", target.address, "no_such_model")
        models.caller(tmp_path / "wrong_signature" / "1", target.address, "half_plus_two", signature="nope")
        config = write_config(tmp_path / "m.config", {"unknown": tmp_path / "unknown",
                                                      "wrong_signature": tmp_path / "wrong_signature"})
        with ServerProcess(f"--model_config_file={config}") as master:
            for model, code in (("unknown", grpc.StatusCode.NOT_FOUND),
                                ("wrong_signature", grpc.StatusCode.FAILED_PRECONDITION)):
                with pytest.raises(grpc.RpcError) as caught:
                    master.predict(model, {"x": np.array([[1.0]], np.float32)})
                assert caught.value.code() == code, caught.value.details()
                assert target.address in caught.value.details()
                assert ("no_such_model" if model == "unknown" else "half_plus_two") in caught.value.details()
            status, body = master.post("/v1/models/unknown:predict", {"instances": [[1.0]]})
            assert status == 404 and target.address in body["error"]


def test_version_swap_on_leaf_and_config_reload_on_master_under_load(tmp_path):
    base = copy_model(HALF_PLUS_TWO, tmp_path / "leaf_model", {"00000123": "1"})
    # A long deadline: this is about swaps and reloads, not about a stall (a quarter of the deadline) while
    # a version loads on a busy machine.
    with leaf_with(base) as target, build_master(tmp_path, {"remote": target.address}, deadline_ms=10000) as master:
        load = SteadyLoad(master.address, {"remote": 3, "local": 1}, half_plus_two)
        time.sleep(1.0)
        # The leaf gets version 2 (the same function): version 1 is unloaded while requests hold it.
        copy_model(HALF_PLUS_TWO, tmp_path / "staging", {"00000123": "2"})
        (tmp_path / "staging" / "2").rename(base / "2")
        # The master's config is reloaded to add a model while the others keep serving.
        config = text_format.Parse((tmp_path / "master.config").read_text(),
                                   model_server_config_pb2.ModelServerConfig())
        extra = config.model_config_list.config.add(name="three", base_path=str(HALF_PLUS_THREE),
                                                    model_platform="tensorflow")
        assert extra.name == "three"
        master.models().HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config),
                                                 timeout=60)
        wait_until(lambda: version_states(target, "half_plus_two") == {2: "AVAILABLE", 1: "END"}, 30,
                   "the leaf to swap versions")
        time.sleep(1.0)
        outcomes = load.stop()
        assert master.predict("three", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val == [4.0]
    assert set(counts(outcomes)) == {"OK"}, describe(outcomes)


def version_states(server: ServerProcess, model: str) -> dict[int, str]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    response = server.models().GetModelStatus(request, timeout=10)
    name = get_model_status_pb2.ModelVersionStatus.State.Name
    return {s.version: name(s.state) for s in response.model_version_status}


def leaf_with(base) -> ServerProcess:
    return ServerProcess(f"--model_base_path={base}", "--model_name=half_plus_two",
                         "--file_system_poll_wait_seconds=1", rest=False)


def test_sigterm_under_load_drains(tmp_path):
    models.slow_scale(tmp_path / "slow" / "1", 1.0, delay_ms=300)
    with ServerProcess(f"--model_base_path={tmp_path / 'slow'}", "--model_name=slow", "--drain_timeout_seconds=10",
                       rest=False) as server:
        load = SteadyLoad(server.address, {"slow": 4}, lambda model, x: x, timeout=15)
        time.sleep(1.5)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        exited = time.monotonic()
        outcomes = load.stop()
    summary = describe(outcomes)
    in_flight = [o for o in outcomes if o.started < signalled and o.code != "OK"]
    assert not in_flight, f"requests in flight at SIGTERM must complete: {summary}"
    after = {o.code for o in outcomes if o.started > signalled + 0.5}  # once the signal is handled
    assert after <= {"UNAVAILABLE"}, summary
    assert not counts(outcomes).get("WRONG"), summary
    assert exited - signalled < 10 + 2, "exit within the drain bound"

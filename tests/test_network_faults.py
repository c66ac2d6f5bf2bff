"""A network between master and leaf: the leaf is its own host in a network namespace, behind a veth pair.

Needs root and iproute2 (`.ci/run` installs it); the slow-network test also needs the kernel's netem
queueing discipline. Tests skip, saying why, where these are missing.
"""

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

import models
from helpers import HALF_PLUS_TWO, InProcessServer, ServerProcess, wait_until, write_config
from load import SteadyLoad, counts, describe
from netns import netns_problem as _netns_problem
from netns import run as _run

DEADLINE_MS = 1000


def _netem_problem(device: str) -> str | None:
    if not shutil.which("tc"):
        return "tc (iproute2) is not installed"
    probe = _run("tc", "qdisc", "add", "dev", device, "root", "netem", "delay", "1ms", check=False)
    if probe.returncode != 0:
        return f"tc netem is unavailable on this kernel: {probe.stderr.strip()}"
    _run("tc", "qdisc", "del", "dev", device, "root", check=False)
    return None


class LeafHost:
    """A namespace `ns` with address `leaf_ip`, reached from here through `outside` <-> `inside`."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.ns, self.outside, self.inside = f"rp-leaf-{tag}", f"rpo{tag}", f"rpi{tag}"
        subnet = f"10.123.{tag % 250}"
        self.host_ip, self.leaf_ip = f"{subnet}.1", f"{subnet}.2"
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        _run("ip", "link", "set", self.inside, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.outside)
        _run("ip", "link", "set", self.outside, "up")
        self.inside_run("ip", "addr", "add", f"{self.leaf_ip}/30", "dev", self.inside)
        self.inside_run("ip", "link", "set", self.inside, "up")
        self.inside_run("ip", "link", "set", "lo", "up")

    def inside_run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.ns, *command, check=check)

    def cut(self) -> None:
        """Nothing comes back from the leaf, silently, as when a link fails somewhere on the way.

        A blackhole route on the leaf's side drops its answers (and its SYN-ACKs). Taking a link down
        instead would let the master's kernel answer every send with "unreachable" at once, which is a
        refused connection, not a cut.
        """
        self.inside_run("ip", "route", "add", "blackhole", f"{self.host_ip}/32")

    def heal(self) -> None:
        self.inside_run("ip", "route", "del", "blackhole", f"{self.host_ip}/32")

    def close(self) -> None:
        _run("ip", "link", "del", self.outside, check=False)
        _run("ip", "netns", "del", self.ns, check=False)


@pytest.fixture
def network(tmp_path):
    problem = _netns_problem()
    if problem:
        pytest.skip(problem)
    host = LeafHost()
    leaf = ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two", rest=False,
                         prefix=("ip", "netns", "exec", host.ns), host=host.leaf_ip)
    models.caller(tmp_path / "remote" / "1", leaf.address, "half_plus_two", deadline_ms=DEADLINE_MS)
    config = write_config(tmp_path / "m.config", {"remote": tmp_path / "remote", "local": HALF_PLUS_TWO})
    master = InProcessServer(f"--model_config_file={config}", "--file_system_poll_wait_seconds=0", rest=False)
    try:
        yield host, leaf, master
    finally:
        master.stop()
        leaf.stop()
        host.close()


def half_plus_two(model: str, x: float) -> float:
    return 0.5 * x + 2.0


def test_cut_behaves_as_a_hang_and_healing_recovers(network):
    host, _, master = network
    load = SteadyLoad(master.address, {"remote": 3, "local": 1}, half_plus_two, timeout=10)
    time.sleep(1.0)
    cut_at = time.monotonic()
    host.cut()
    time.sleep(3.0)
    healed_at = time.monotonic()
    host.heal()
    wait_until(lambda: counts(load.snapshot(), "remote", since=healed_at).get("OK", 0) > 0, 20,
               "recovery after the cut")
    time.sleep(1.0)
    outcomes = load.stop()
    summary = describe(outcomes)
    assert not counts(outcomes).get("WRONG"), summary
    during = [o for o in outcomes if o.model == "remote" and cut_at + 0.1 <= o.started < healed_at - 1.0]
    assert during and {o.code for o in during} <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, summary
    assert max(o.seconds for o in during) < DEADLINE_MS / 1000 + 1.0
    # As a hang, not a refusal: the failure is found by waiting. The oldest call (the probe) waits; the
    # others are shed at once. The probe, re-sent on a fresh connection (each channel has its own), may end
    # with its connect timing out (UNAVAILABLE) rather than DEADLINE_EXCEEDED: the op's channels give up a
    # connect attempt early.
    around = [o for o in outcomes if o.model == "remote" and cut_at - DEADLINE_MS / 1000 <= o.started < healed_at]
    assert any("a quarter of its deadline" in o.detail for o in around), summary
    # Whatever gRPC's wording for how the probe ended, it waited (a refused connection fails at once).
    assert any(o.code != "OK" and o.seconds >= DEADLINE_MS / 1000 / 4 for o in around), \
        f"{summary}; {sorted({o.detail for o in around if o.code != 'OK'})[:6]}"
    assert sorted(o.seconds for o in during)[len(during) // 2] < DEADLINE_MS / 1000 / 4, summary
    assert set(counts(outcomes, "local")) == {"OK"}, summary


def test_slow_network_gives_correct_answers_later(network):
    host, _, master = network
    problem = _netem_problem(host.outside)
    if problem:
        pytest.skip(problem)
    x = {"x": np.array([[4.0]], np.float32)}

    def latency() -> float:
        started = time.monotonic()
        assert master.predict("remote", x).outputs["y"].float_val == [4.0]
        return time.monotonic() - started

    before = min(latency() for _ in range(5))
    _run("tc", "qdisc", "add", "dev", host.outside, "root", "netem", "delay", "50ms")
    host.inside_run("tc", "qdisc", "add", "dev", host.inside, "root", "netem", "delay", "50ms")
    slow = min(latency() for _ in range(5))
    _run("tc", "qdisc", "del", "dev", host.outside, "root")
    host.inside_run("tc", "qdisc", "del", "dev", host.inside, "root")
    assert 0.08 < slow - before < 0.5, f"50 ms each way should add ~100 ms: {before:.3f}s -> {slow:.3f}s"

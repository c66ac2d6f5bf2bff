"""Hosts for tests: network namespaces on a bridge, each with its own address, that can be cut off.

Needs root and iproute2 (`.ci/run` installs it); `netns_problem()` says why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, check=check)


def netns_problem() -> str | None:
    """Why namespace hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2 (the ip command) is not installed"
    name = f"rp-probe-{os.getpid()}"
    probe = run("ip", "netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    run("ip", "netns", "del", name, check=False)
    return None


class Host:
    """A namespace `ns` with address `ip` on the bridge; `hosts` lines become its /etc/hosts."""

    def __init__(self, network: Network, index: int, ip: str, hosts: str = ""):
        self.network, self.ip = network, ip
        self.ns = f"rp{network.tag}-h{index}"
        self.veth = f"rp{network.tag}v{index}"  # the bridge's side (interface names: at most 15 characters)
        self._etc = Path("/etc/netns") / self.ns  # `ip netns exec` mounts these files over /etc's
        if hosts:
            self._etc.mkdir(parents=True, exist_ok=True)
            (self._etc / "hosts").write_text(f"127.0.0.1 localhost\n{hosts}")
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", f"{self.veth}p")
        run("ip", "link", "set", f"{self.veth}p", "netns", self.ns)
        run("ip", "link", "set", self.veth, "master", network.bridge)
        run("ip", "link", "set", self.veth, "up")
        self.inside("ip", "link", "set", f"{self.veth}p", "name", "eth0")
        self.inside("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        self.inside("ip", "link", "set", "eth0", "up")
        self.inside("ip", "link", "set", "lo", "up")
        self.is_cut = False

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command on this host."""
        return ("ip", "netns", "exec", self.ns)

    def inside(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(*self.prefix, *command, check=check)

    def cut(self) -> None:
        """Everything this host sends vanishes, silently, its link staying up (a dead switch port on the way
        back, a firewall dropping): two blackhole routes more specific than the bridge's subnet. Taking the
        link down instead would have the kernel answer "unreachable" at once, which is a refusal, not a cut."""
        for half in self.network.halves:
            self.inside("ip", "route", "add", "blackhole", half)
        self.is_cut = True

    def heal(self) -> None:
        for half in self.network.halves:
            self.inside("ip", "route", "del", "blackhole", half, check=False)
        self.is_cut = False

    def close(self) -> None:
        run("ip", "link", "del", self.veth, check=False)
        run("ip", "netns", "del", self.ns, check=False)
        shutil.rmtree(self._etc, ignore_errors=True)


class Network:
    """A bridge in this namespace (address `.1` of its /24), and hosts on it (`.11`, `.12`, ...)."""

    def __init__(self) -> None:
        self.tag = os.getpid() % 10000
        subnet = f"10.124.{self.tag % 250}"
        self.bridge, self.ip = f"rp{self.tag}br", f"{subnet}.1"
        self.halves = (f"{subnet}.0/25", f"{subnet}.128/25")
        self._subnet = subnet
        self.hosts: list[Host] = []
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.ip}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")

    def add_host(self, hosts: str = "") -> Host:
        index = len(self.hosts)
        host = Host(self, index, f"{self._subnet}.{11 + index}", hosts)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.close()
        run("ip", "link", "del", self.bridge, check=False)

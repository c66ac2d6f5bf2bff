"""A small stand-in for a cluster's network, for tests: each pod is a network namespace on one bridge.

Pods get addresses on a private /24 behind a bridge in this namespace (so the test reaches every pod),
and names resolve through per-namespace hosts files (`/etc/netns/NS/hosts`, which `ip netns exec`
mounts over /etc/hosts), the way cluster DNS answers a Service name with its pods' addresses. Needs
root and iproute2; `problem()` says why not where they are missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from netns import run as _run


class Network:
    def __init__(self) -> None:
        self.tag = os.getpid() % 10000
        self.subnet = f"10.124.{self.tag % 250}"
        self.bridge = f"rpbr{self.tag}"
        self.host_ip = f"{self.subnet}.1"
        self.pods: dict[str, str] = {}  # namespace -> address
        self._links: list[str] = []
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def add_pod(self, name: str) -> tuple[str, str]:
        """A new namespace on the bridge; returns (namespace, address)."""
        index = len(self.pods) + 2
        ns, outside, inside = f"rp{self.tag}-{name}"[:40], f"rph{self.tag}x{index}", f"rpp{self.tag}x{index}"
        address = f"{self.subnet}.{index}"
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        self._links.append(outside)
        _run("ip", "link", "set", inside, "netns", ns)
        _run("ip", "link", "set", outside, "master", self.bridge)
        _run("ip", "link", "set", outside, "up")
        for command in (("ip", "addr", "add", f"{address}/24", "dev", inside), ("ip", "link", "set", inside, "up"),
                        ("ip", "link", "set", "lo", "up")):
            _run("ip", "netns", "exec", ns, *command)
        self.pods[ns] = address
        return ns, address

    def set_hosts(self, names: dict[str, list[str]]) -> None:
        """Every pod resolves each name to its addresses (one hosts line per address, as DNS's A records)."""
        lines = ["127.0.0.1 localhost"] + [f"{ip} {name}" for name, ips in names.items() for ip in ips]
        for ns in self.pods:
            directory = Path("/etc/netns") / ns
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text("\n".join(lines) + "\n")

    def prefix(self, ns: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", ns)

    def close(self) -> None:
        for link in self._links:
            _run("ip", "link", "del", link, check=False)
        for ns in self.pods:
            _run("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        _run("ip", "link", "del", self.bridge, check=False)

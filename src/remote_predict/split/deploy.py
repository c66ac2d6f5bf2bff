"""What a split needs to run: a model config per server, a launch script and a Procfile."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass
class Server:
    name: str  # "master", "shard_0", "base", ...
    models: dict[str, str]  # model name -> base path
    ports: list[int] = field(default_factory=list)  # one process per port (replicas)
    rest_port: int = 0
    policy: str = ""  # a model_version_policy block, or "" for TF Serving's default (latest 1)
    remote_hosts: list[str] = field(default_factory=list)  # replicas on other machines, run there
    held_bytes: int | None = None  # bytes of one version of its models (None: not known to this run)
    versions_kept: int = 1  # versions its policy keeps loaded


def shard_target(host: str, port: int) -> str:
    """The address a master (or head) calls a shard (or base) server at, when the server has a DNS name.

    Every such target in a split comes from here, so a change of transport is a change of this function.
    `dns:///` makes gRPC resolve every address of the name (a headless Service: every ready pod) and
    round-robin over them, re-resolving when a connection closes.
    """
    return f"dns:///{host}:{port}"


def endpoints(address: str) -> list[str]:
    """Every `host:port` an address reaches: a `dns:///` name resolved to each of its addresses now."""
    import socket

    body = address
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if body.lower().startswith(prefix):
            body = body[len(prefix):]
            break
    found = []
    for endpoint in filter(None, (e.strip() for e in body.split(","))):
        host, _, port = endpoint.rpartition(":")
        if address.lower().startswith("dns:") and port.isdigit():
            try:
                infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
            except OSError:
                found.append(endpoint)  # not resolvable (yet): wait on the name itself
                continue
            for info in infos:
                ip = info[4][0]
                item = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                if item not in found:
                    found.append(item)
        else:
            found.append(endpoint)
    return found


def local_ports(address: str) -> tuple[list[int], list[str]]:
    """The loopback ports of a gRPC address (`host:port`, `dns:///h:p`, `ipv4:h1:p1,h2:p2`), and other hosts."""
    body = address
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if body.lower().startswith(prefix):
            body = body[len(prefix):]
            break
    ports, others = [], []
    for endpoint in filter(None, (e.strip() for e in body.split(","))):
        host, _, port = endpoint.rpartition(":")
        if host.lower() in LOOPBACK and port.isdigit():
            ports.append(int(port))
        else:
            others.append(endpoint)
    return ports, others


def config_text(server: Server) -> str:
    blocks = []
    for name, path in server.models.items():
        policy = f"\n    model_version_policy {{ {server.policy} }}" if server.policy else ""
        blocks.append(f'  config {{\n    name: "{name}"\n    base_path: "{path}"\n    model_platform: "tensorflow"'
                      f"{policy}\n  }}")
    return "model_config_list {\n" + "\n".join(blocks) + "\n}\n"


def _command(server: Server, port: int, config: str, first: bool) -> str:
    args = ["${REMOTE_PREDICT:-remote-predict}", "serve", "--host=127.0.0.1", f"--port={port}",
            f"--model_config_file={shlex.quote(config)}"]
    if server.rest_port and first:
        args.append(f"--rest_api_port={server.rest_port}")
    return " ".join(args)


def write(output_dir: str, servers: Sequence[Server], scripts: bool = True) -> list[str]:
    """Write config/<server>.config, and launch.sh and Procfile unless `scripts` is False; returns the files."""
    config_dir = os.path.join(output_dir, "config")
    os.makedirs(config_dir, exist_ok=True)
    written, launch, procfile = [], [], []
    for server in servers:
        path = os.path.join(config_dir, f"{server.name}.config")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config_text(server))
        written.append(path)
        for index, port in enumerate(server.ports):
            label = server.name if index == 0 else f"{server.name}_replica_{index}"
            command = _command(server, port, os.path.abspath(path), first=index == 0)
            launch.append(f'echo "starting {label} on 127.0.0.1:{port}"\n{command} &\npids+=($!)')
            procfile.append(f"{label}: {command}")
        for host in server.remote_hosts:
            launch.append(f"# {server.name} on {host}: run there with --model_config_file={os.path.abspath(path)}")
    if not scripts:  # the servers run elsewhere (Kubernetes): a script for this machine would mislead
        return written
    script = os.path.join(output_dir, "launch.sh")
    with open(script, "w", encoding="utf-8") as f:
        f.write("#!/usr/bin/env bash\n"
                "# Starts every server of this split on this machine (loopback only); Ctrl-C stops them all.\n"
                "# Set REMOTE_PREDICT to the remote-predict command if it is not on PATH.\n"
                "set -u\npids=()\ntrap 'kill \"${pids[@]}\" 2>/dev/null; wait' EXIT INT TERM\n"
                + "\n".join(launch) + "\nwait\n")
    os.chmod(script, 0o755)
    procfile_path = os.path.join(output_dir, "Procfile")
    with open(procfile_path, "w", encoding="utf-8") as f:
        f.write("\n".join(procfile) + "\n")
    return [*written, script, procfile_path]
